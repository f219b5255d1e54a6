"""Timing helpers: compile ahead of time, then time only the compiled executable.

Rules every measurement in `stts_jax.bench` follows:
  * compilation is excluded: a function is lowered and compiled once with
    `jax.jit(fn).lower(*args).compile()` (`aot_compile`), and the timed callable is the
    resulting `Compiled` object, which can never recompile (a mismatched input is an error);
  * `warmup` untimed calls first (allocator, caches, thread pools), then `repeats` timed calls;
  * each call is closed by `jax.block_until_ready` on its whole output, so asynchronous
    dispatch never hides work, and the reported figure is the median of the repeats;
  * `CompileCounter` counts XLA backend compilations (a `jax.monitoring` listener) so callers
    can assert that the timed region compiled nothing and that each cell compiled once.

Functions whose first argument is donated (a train state) are timed through `StatefulCall`, which
feeds each call's new state into the next call (and can keep a piece of every output).
"""

import dataclasses
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass(frozen=True)
class Timing:
  """Wall-clock seconds of `repeats` timed calls (after `warmup` untimed ones).

  cpu_seconds: this process's CPU time (all threads) per call, a secondary figure that is less
  disturbed by other processes on a shared machine (it also counts XLA's idle-spinning threads).
  """
  name: str
  seconds: tuple[float, ...]
  warmup: int
  cpu_seconds: tuple[float, ...] = ()

  @property
  def median(self) -> float:
    return statistics.median(self.seconds)

  @property
  def min(self) -> float:
    return min(self.seconds)

  @property
  def spread(self) -> float:
    """(max - min) / median: a quick noise indicator."""
    return (max(self.seconds) - min(self.seconds)) / max(self.median, 1e-12)

  @property
  def cpu_median(self) -> float:
    return statistics.median(self.cpu_seconds) if self.cpu_seconds else float("nan")

  def to_dict(self) -> dict[str, Any]:
    return {"name": self.name, "median_s": self.median, "min_s": self.min, "spread": self.spread,
            "cpu_median_s": self.cpu_median, "repeats": len(self.seconds), "warmup": self.warmup,
            "seconds": list(self.seconds), "cpu_seconds": list(self.cpu_seconds)}


@dataclasses.dataclass(frozen=True)
class MemoryStats:
  """`Compiled.memory_analysis()` in bytes (per device). On CPU many bf16 buffers are upcast and
  `peak` is not reported, so `arguments + temporaries` is the figure to read (an upper bound)."""
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  code_bytes: int

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.temp_bytes

  @classmethod
  def from_compiled(cls, compiled: jax.stages.Compiled) -> "MemoryStats":
    m = compiled.memory_analysis()
    if m is None:
      return cls(0, 0, 0, 0, 0)
    return cls(argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
               temp_bytes=int(m.temp_size_in_bytes), alias_bytes=int(m.alias_size_in_bytes),
               code_bytes=int(m.generated_code_size_in_bytes))


def _cost_dict(cost: Any) -> dict[str, float]:
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def cost_flops(stage: Any) -> float:
  """`flops` of a `Lowered` (global, whole program) or `Compiled` (per device) cost analysis.

  XLA counts a loop body (`scan`, `fori_loop`, `while`) once, whatever its trip count, and the
  larger branch of a `cond`; count unrolled programs when that matters (`stts_jax.bench.abstract`).
  """
  return float(_cost_dict(stage.cost_analysis()).get("flops", 0.0))


@dataclasses.dataclass
class CompiledFn:
  """An ahead-of-time compiled function plus what XLA says about it."""
  name: str
  compiled: jax.stages.Compiled
  lower_seconds: float
  compile_seconds: float
  xla_flops: float                  # Compiled.cost_analysis()["flops"] (loop bodies counted once)
  memory: MemoryStats

  def __call__(self, *args):
    return self.compiled(*args)


def aot_compile(fn: Callable[..., Any], *args: Any, name: str = "", jit_kwargs: Optional[dict] = None
                ) -> CompiledFn:
  """`jax.jit(fn, **jit_kwargs).lower(*args).compile()`; `fn` may already be jitted.

  args: concrete arrays or `jax.ShapeDtypeStruct`s (pytrees of them).
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn, **(jit_kwargs or {}))
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return CompiledFn(name=name or getattr(fn, "__name__", "fn"), compiled=compiled, lower_seconds=t1 - t0,
                    compile_seconds=t2 - t1, xla_flops=cost_flops(compiled),
                    memory=MemoryStats.from_compiled(compiled))


class CompileCounter:
  """Counts XLA backend compilations while active (all threads of this process).

    with CompileCounter() as cc:
      ...
    cc.count, cc.names   # number of compilations, jitted function names in order
  """

  def __init__(self):
    self.names: list[str] = []
    self._lock = threading.Lock()

  def _listener(self, event: str, duration: float, **kwargs) -> None:
    del duration
    if event == BACKEND_COMPILE_EVENT:
      with self._lock:
        self.names.append(str(kwargs.get("fun_name", "?")))

  @property
  def count(self) -> int:
    return len(self.names)

  def __enter__(self) -> "CompileCounter":
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listener)


def _check_counts(warmup: int, repeats: int) -> None:
  if warmup < 0 or repeats < 1:
    raise ValueError(f"timing: need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")


def _timed_loop(run: Callable[[int], None], *, warmup: int, repeats: int, name: str, min_seconds: float,
                max_repeats: int) -> Timing:
  """Calls `run(i)` (which blocks on its outputs) `warmup` times untimed, then timed until there are
  `repeats` timed calls *and* `min_seconds` of timed work, at most max(max_repeats, repeats) calls:
  cheap parts get many calls, so their medians are as stable as the expensive ones'."""
  _check_counts(warmup, repeats)
  seconds, cpu = [], []
  with CompileCounter() as cc:
    i = 0
    while i < warmup + repeats or (sum(seconds) < min_seconds and len(seconds) < max(max_repeats, repeats)):
      c0, t0 = time.process_time(), time.perf_counter()
      run(i)
      dt, dc = time.perf_counter() - t0, time.process_time() - c0
      if i >= warmup:
        seconds.append(dt)
        cpu.append(dc)
      i += 1
  if cc.count:
    raise RuntimeError(f"timing {name!r}: {cc.count} compilation(s) inside the timed region: {cc.names}")
  return Timing(name=name, seconds=tuple(seconds), warmup=warmup, cpu_seconds=tuple(cpu))


def time_calls(call: Callable[[int], Any], *, warmup: int = 1, repeats: int = 5, name: str = "",
               min_seconds: float = 0.0, max_repeats: int = 100) -> Timing:
  """Times `call(i)` for i = 0, 1, ... (a compiled function closed over its inputs; `i` lets the
  caller rotate through several inputs); blocks on the whole output of each call. At least
  `repeats` timed calls, more until `min_seconds` of timed calls (at most `max_repeats`).

  Raises if anything compiles during the warm-up or timed calls (a timed region must run
  already compiled code only).
  """
  return _timed_loop(lambda i: jax.block_until_ready(call(i)), warmup=warmup, repeats=repeats, name=name,
                     min_seconds=min_seconds, max_repeats=max_repeats)


class StatefulCall:
  """`call(i)` runs `state, out = step(state, i)` with the state threaded through the calls (so a
  donated state is never reused), blocks on both, and appends `keep(out)` to `outputs` (device
  values: reading them after timing adds no host sync to the timed calls). Time it with
  `time_calls`; it stays callable for later rounds (`runner.interleave`)."""

  def __init__(self, step: Callable[[Any, int], tuple[Any, Any]], state: Any,
               keep: Optional[Callable[[Any], Any]] = None):
    self.step, self.state, self.keep = step, state, keep
    self.outputs: list[Any] = []

  def __call__(self, i: int) -> None:
    self.state, out = self.step(self.state, i)
    jax.block_until_ready((self.state, out))
    if self.keep is not None:
      self.outputs.append(self.keep(out))

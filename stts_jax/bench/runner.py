"""The benchmark grid: every (frames, ratio) cell timed part by part in one process.

One cell = one model config (the cell's ratio, method and packed row count) and `num_batches`
batches of real video (`batches.video_batch`). Its parts (`parts.py`) are each compiled exactly
once, ahead of time (`timing.aot_compile`), from the first batch's shapes; the compilation count
of every part is measured (`timing.CompileCounter`) and asserted to be 1, and the timed calls,
which rotate through all the cell's batches (different content, different keep patterns), must
compile nothing. Per part the cell records: median seconds, compile seconds, XLA's FLOPs of the
compiled program (loop bodies counted once) and of an unrolled copy with the taken branch only
(`xla_count`), the analytic FLOPs (`costs`) and `memory_analysis()`.

Ratio 0 is the baseline (method "none": the host model, no scorer); speedups and FLOP ratios are
taken against the baseline of the same frame count (`report.py`). With `bench.interleave_rounds`,
the cells of one frame count stay alive once measured and are timed again in rounds (`interleave`),
every round calling each (cell, part) in turn; those pooled calls replace the per-cell timings, so
load that comes and goes on a shared machine slows the unpruned and the pruned cells alike.
Packed rows of pruned cells follow `bench.rows`; by default ("heldout") they are fitted on other
batches than the timed ones, so a timed batch can need more and take the dense fallback: the cell
counts it per vision batch (`packed`) and per train step. The train step runs with frozen weights
(`frozen_weights`): the keep masks the rows were sized for do not drift between timed steps, and its
`dense_fallback` metric is counted over every call. With `bench.compare_packing`, cells whose rows
reach T (late ViT blocks per frame) are measured a second time with `stts.packing="always"`.
"""

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stts_jax import config as config_lib
from stts_jax.bench import batches as batches_lib
from stts_jax.bench import costs
from stts_jax.bench import parts
from stts_jax.bench import timing
from stts_jax.bench import xla_count
from stts_jax.bench.config import BenchConfig
from stts_jax.models import budget
from stts_jax.models import vlm
from stts_jax.train import loop
from stts_jax.parallel import mesh as mesh_lib
from stts_jax.parallel import sharding
from stts_jax.train.config import MeshConfig, TrainConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PartResult:
  name: str
  timing: timing.Timing
  per_call: int                 # units per call (decode: tokens); seconds = median / per_call
  compiles: int                 # backend compilations of this part in this cell (asserted 1)
  compile_seconds: float
  xla_flops_compiled: float     # Compiled.cost_analysis (per device; scanned layers counted once)
  xla_flops: Optional[float]    # unrolled copy, packed branch (global); None if not counted
  analytic_flops: float
  memory: timing.MemoryStats

  @property
  def seconds(self) -> float:
    return self.timing.median / self.per_call

  def to_dict(self) -> dict[str, Any]:
    return {"seconds": self.seconds, "per_call": self.per_call, "compiles": self.compiles,
            "compile_seconds": self.compile_seconds, "xla_flops_compiled": self.xla_flops_compiled,
            "xla_flops": self.xla_flops, "analytic_flops": self.analytic_flops,
            "memory": dataclasses.asdict(self.memory), "timing": self.timing.to_dict()}


@dataclasses.dataclass
class CellResult:
  frames: int
  ratio: float
  method: str
  batch_size: int
  seq_len: int            # unpruned prompt length S
  llm_len: int            # decoder length S' (S - dropped(T) when pruned)
  num_rows: Optional[int]  # packed ViT rows per video (None: unpruned)
  rows_needed: list[int]  # max rows first-fit decreasing needed, per timed batch
  packed: list[bool]      # per batch: the packed path ran (False: dense fallback)
  kept_windows: int       # per video (static budget)
  keep_patterns: int      # distinct keep masks among the cell's batches (all timed by one compilation)
  parts: dict[str, PartResult]
  train_steps: int = 0           # train steps run (warm-up, timed, interleaved)
  train_fallback_steps: int = 0  # of those, steps whose ViT ran the dense fallback (metric dense_fallback)
  rows_policy: str = ""          # bench.rows the cell's num_rows came from ("" unpruned)
  late_vit: str = "all"          # blocks after the soft block: "all" (unpruned), "packed" or "per_frame"
  variant: str = ""              # "" for the grid's cells; "packing=always" for compare_packing's extra cells

  def to_dict(self) -> dict[str, Any]:
    d = {k: v for k, v in dataclasses.asdict(self).items() if k != "parts"}
    d["parts"] = {k: v.to_dict() for k, v in self.parts.items()}
    return d


def cell_model_config(base: config_lib.ModelConfig, frames: int, ratio: float, rows: str,
                      num_rows: Optional[int] = None, packing: str = "auto") -> config_lib.ModelConfig:
  """The cell's config: method "none" at ratio 0, else the base method (default "stts") at `ratio`
  with `num_rows` from the row policy ("fit" / "heldout": the given `num_rows`, default T, which
  always fits) and `stts.packing` = `packing`."""
  if ratio == 0.0:
    stts = dataclasses.replace(base.stts, method="none", ratio=0.0, num_rows=None)
  else:
    w = base.windows_per_frame
    method = base.stts.method if base.stts.method != "none" else "stts"
    if rows in FITTED_POLICIES:
      rows_ = frames if num_rows is None else max(num_rows, budget.min_rows(frames, w, ratio))
    else:
      rows_ = {"typical": budget.typical_num_rows(frames, w, ratio), "bound": None,
               "min": budget.min_rows(frames, w, ratio)}[rows]
    stts = dataclasses.replace(base.stts, method=method, ratio=ratio, num_rows=rows_, packing=packing)
  return dataclasses.replace(base, stts=stts).validate()


FITTED_POLICIES = ("fit", "heldout")


def late_vit_path(cfg: config_lib.ModelConfig, frames: int) -> str:
  """What the cell's late ViT blocks run (`video_forward.vit_after_prune`): "all" (unpruned),
  "per_frame" (rows reach T and `stts.packing` is "auto") or "packed"."""
  st = cfg.stts
  if not st.prunes:
    return "all"
  rows = budget.num_rows(frames, cfg.windows_per_frame, st.ratio, st.num_rows)
  return "per_frame" if rows >= frames and st.packing == "auto" else "packed"


def fitted_rows(cfg: config_lib.ModelConfig, graphdef: Any, state: Any, data: list[dict], frames: int) -> int:
  """The fewest packed rows every batch of `data` fits in (the "fit" policy), from the keep masks."""
  keep = jax.jit(parts.keep_mask_fn(graphdef))
  needed = jax.jit(parts.rows_needed_fn(cfg, frames))
  return max(int(np.max(needed(keep(state, d["patches"], d["frame_mask"])))) for d in data)


def single_device_mesh() -> jax.sharding.Mesh:
  return mesh_lib.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def _model_fn(cfg: config_lib.ModelConfig, seed: int) -> Callable[[], nnx.Module]:
  return lambda: vlm.Molmo2(cfg, rngs=nnx.Rngs(seed))


def host_state(abstract_state: Any, seed: int, *, params_under: Optional[str] = None,
               shardings: Any = None) -> Any:
  """Concrete state for `abstract_state` drawn on the host, without compiling an init program.

  (Compiling the jitted random init of a model costs more than timing it here.) Parameters by name:
  `scale` ones, `bias` zeros, `kernel` normal / sqrt(fan_in), embeddings normal * 0.02; with
  `params_under` (a train state: "model"), every leaf outside it (optimizer moments, counters)
  is zero, as after a fresh init. Timing does not depend on the values.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    names = [n for n in names if n != "value"]
    shape, dtype = leaf.shape, np.dtype(leaf.dtype)
    if (params_under is not None and names[0] != params_under) or not jnp.issubdtype(dtype, jnp.floating):
      return np.zeros(shape, dtype)
    if names[-1] == "scale":
      return np.ones(shape, dtype)
    if names[-1] == "bias":
      return np.zeros(shape, dtype)
    std = 1.0 / np.sqrt(shape[-2]) if names[-1] == "kernel" and len(shape) >= 2 else 0.02
    return (rng.standard_normal(shape, np.float32) * std).astype(dtype)

  values = jax.tree_util.tree_map_with_path(fill, abstract_state)
  return jax.device_put(values, shardings) if shardings is not None else jax.device_put(values)


def _init_model(model_fn, seed: int = 0):
  graphdef, abstract_state = nnx.split(nnx.eval_shape(model_fn))
  return graphdef, host_state(abstract_state, seed)


class _Cell:
  """Compiles, times and counts the parts of one cell (see `run_cell`)."""

  def __init__(self, cfg: config_lib.ModelConfig, bench: BenchConfig):
    self.bench = bench
    self.timers: dict[str, Callable[[int], None]] = {}   # part -> blocking call(i), for interleaving
    self.unrolled = None
    if bench.xla_flops:
      self.unrolled = xla_count.abstract_model_state(
          _model_fn(dataclasses.replace(cfg, scan_layers=False), bench.seed))

  def run(self, name: str, fn, state, inputs: list[tuple], *, analytic: float, per_call: int = 1,
          unrolled: Optional[tuple[Any, Any]] = None) -> tuple[PartResult, timing.CompiledFn]:
    """Compiles `fn(state, *inputs[0])` once and times it over the rotated inputs.

    unrolled: (same function built on the unrolled abstract module, its abstract state) for
    XLA's FLOP count. Returns the result and the compiled function (for the next parts' inputs).
    """
    with timing.CompileCounter() as cc:
      compiled = timing.aot_compile(jax.jit(fn), state, *inputs[0], name=name)
    if cc.count != 1:
      raise AssertionError(f"bench part {name!r}: expected exactly one compilation, got {cc.count} ({cc.names})")
    call = lambda i: compiled(state, *inputs[i % len(inputs)])  # noqa: E731
    t = timing.time_calls(call, warmup=self.bench.warmup, repeats=self.bench.repeats, name=name,
                          min_seconds=self.bench.min_seconds)
    if self.bench.interleave_rounds:
      self.timers[name] = lambda i: jax.block_until_ready(call(i))
    xla = None
    if unrolled is not None:
      u_fn, u_state = unrolled
      xla = xla_count.lowered_flops(u_fn, u_state, *xla_count.shapes_of(inputs[0]))
    elif self.bench.xla_flops:
      xla = compiled.xla_flops   # no layer stacks inside (the STTS overhead part)
    return PartResult(name, t, per_call, cc.count, compiled.compile_seconds, compiled.xla_flops, xla,
                      analytic, compiled.memory), compiled


def run_cell(base_cfg: config_lib.ModelConfig, train_cfg: TrainConfig, bench: BenchConfig, frames: int,
             ratio: float, timers: Optional[dict[str, Callable[[int], None]]] = None, *,
             packing: str = "auto") -> CellResult:
  """Measures one (frames, ratio) cell; see the module docstring. `timers` (with
  `bench.interleave_rounds`): filled with a blocking call(i) per measured part, which keeps the
  cell's compiled functions and states alive for `interleave`. `packing`: the cell's `stts.packing`."""
  cfg = cell_model_config(base_cfg, frames, ratio, bench.rows, packing=packing)
  b, w = bench.batch_size, cfg.windows_per_frame
  batch = lambda i: batches_lib.video_batch(cfg, batch_size=b, num_frames=frames, index=i,  # noqa: E731
                                            timestamp_tokens=bench.timestamp_tokens, text_tokens=bench.text_tokens)
  data = [batch(i) for i in range(bench.num_batches)]
  if bench.rows in FITTED_POLICIES and cfg.stts.prunes:
    # "heldout": other batches (indices past the timed ones: other clips, strides and starts)
    fit_on = data if bench.rows == "fit" else [batch(bench.num_batches + i) for i in range(bench.heldout_batches)]
    graphdef, state = _init_model(_model_fn(cfg, bench.seed), bench.seed)
    cfg = cell_model_config(base_cfg, frames, ratio, bench.rows, fitted_rows(cfg, graphdef, state, fit_on, frames),
                            packing=packing)
    del state
  seq_len = data[0]["input_ids"].shape[1]
  s_llm = parts.llm_len(cfg, frames, seq_len)
  slots = parts.num_slots(cfg, frames)
  fwd = costs.forward(cfg, frames, seq_len)
  cell = _Cell(cfg, bench)
  graphdef, state = _init_model(_model_fn(cfg, bench.seed), bench.seed)
  model = nnx.merge(graphdef, state)
  llm_graphdef, llm_state = nnx.split(model.llm)
  u_model = None if cell.unrolled is None else nnx.merge(*cell.unrolled)
  u_llm = None if u_model is None else nnx.split(u_model.llm)
  unrolled = lambda make, mod: None if mod is None else (make(mod[0]), mod[1])
  results: dict[str, PartResult] = {}
  dev = [jax.device_put({k: v for k, v in d.items() if k != "timestamps"}) for d in data]
  todo = set(bench.parts)
  n_new = bench.decode_tokens

  # vision (always measured: the LLM parts take their inputs from its output)
  vis_in = [(d["patches"], d["frame_mask"]) for d in dev]
  res, vision = cell.run("vision", parts.vision_fn(graphdef, slots), state, vis_in, analytic=costs.vision(fwd, b),
                         unrolled=unrolled(lambda g: parts.vision_fn(g, slots), cell.unrolled))
  if "vision" in todo:
    results["vision"] = res
  visions = [vision(state, *x) for x in vis_in]
  packed, rows_needed = [], []
  keep_patterns = len({np.asarray(v.keep_mask_btw).tobytes() for v in visions})
  if cfg.stts.prunes:
    rows_used = jax.jit(parts.rows_needed_fn(cfg, frames))
    for v in visions:
      rows_needed.append(int(np.max(rows_used(v.keep_mask_btw))))
      packed.append(bool(v.packed))

  if "prefill" in todo:
    prep = jax.jit(parts.llm_inputs_fn(graphdef, s_llm))
    llm_in = [parts.llm_input_arrays(prep(state, d["input_ids"], d["token_mask"], d["target_ids"], d["loss_mask"], v))
              for d, v in zip(dev, visions)]
    results["prefill"], prefill = cell.run(
        "prefill", parts.prefill_fn(llm_graphdef, n_new), llm_state, llm_in,
        analytic=costs.prefill(cfg.llm, s_llm, s_llm + n_new + 1, b),
        unrolled=unrolled(lambda g: parts.prefill_fn(g, n_new), u_llm))
    if "decode" in todo:
      states = [parts.prefill_arrays(prefill(llm_state, *x)) for x in llm_in]
      decode = lambda g: parts.decode_fn(g, n_new, cfg.tokens.pad, s_llm)
      results["decode"], _ = cell.run(
          "decode", decode(llm_graphdef), llm_state, states,
          analytic=n_new * costs.decode_token(cfg.llm, s_llm + n_new + 1, b), per_call=n_new,
          unrolled=unrolled(decode, u_llm))

  if "overhead" in todo and cfg.stts.prunes and model.scorer is not None:
    hidden_fn = jax.jit(parts.prune_hidden_fn(graphdef))
    sc_graphdef, sc_state = nnx.split(model.scorer)
    ov_in = [(hidden_fn(state, d["patches"]), d["frame_mask"], d["input_ids"], d["token_mask"],
              d["target_ids"], d["loss_mask"]) for d in dev]
    results["overhead"], _ = cell.run(
        "overhead", parts.overhead_fn(sc_graphdef, cfg, frames, seq_len), sc_state, ov_in,
        analytic=costs.stts_overhead(cfg, frames, b))
  del model, visions, state

  train_steps = None
  if "train" in todo:
    results["train"], train_steps = _run_train(cfg, train_cfg, bench, data, costs.train_step(cfg, fwd, b))
    if bench.interleave_rounds:
      cell.timers["train"] = train_steps
  if timers is not None:
    timers.update({k: v for k, v in cell.timers.items() if k in results and v is not None})
  result = CellResult(frames=frames, ratio=ratio, method=cfg.stts.method, batch_size=b, seq_len=seq_len,
                    llm_len=s_llm, num_rows=budget.num_rows(frames, w, ratio, cfg.stts.num_rows) if cfg.stts.prunes else None,
                    rows_needed=rows_needed, packed=packed,
                    kept_windows=budget.num_kept(frames, w, ratio) if cfg.stts.prunes else frames * w,
                    keep_patterns=keep_patterns, parts=results, rows_policy=bench.rows if cfg.stts.prunes else "",
                    late_vit=late_vit_path(cfg, frames), variant="" if packing == "auto" else f"packing={packing}")
  if train_steps is not None:
    result.train_steps, result.train_fallback_steps = fallback_counts(train_steps)
  return result


def frozen_weights(train_cfg: TrainConfig) -> TrainConfig:
  """`train_cfg` with every learning rate 0: the step does the same work (gradients, AdamW moments,
  the update) but the weights, hence the keep masks, stay those the cell's packed rows were fitted
  to, so every timed step takes the packed branch (with drifting scorer weights a batch can outgrow
  the fitted rows and time the dense fallback instead)."""
  optim = dataclasses.replace(train_cfg.optim, learning_rate=0.0, scorer_learning_rate=0.0,
                              vision_learning_rate=0.0)
  return dataclasses.replace(train_cfg, optim=optim)


def fallback_counts(steps: timing.StatefulCall) -> tuple[int, int]:
  """(train steps run, steps whose ViT ran the dense fallback) of a cell's `StatefulCall`."""
  return len(steps.outputs), int(sum(float(x) > 0 for x in steps.outputs))


def _run_train(cfg, train_cfg: TrainConfig, bench: BenchConfig, data: list[dict],
               analytic: float) -> tuple[PartResult, timing.StatefulCall]:
  train_cfg = frozen_weights(train_cfg)
  mesh = single_device_mesh()
  rules = sharding.make_rules()
  model_fn = _model_fn(cfg, bench.seed)
  fields = [loop.device_fields(d) for d in data]
  batch_sh = sharding.data_sharding(fields[0], mesh, rules)
  graphdef, abstract_state, shardings = loop.abstract_state(model_fn, train_cfg, mesh, rules)
  state = host_state(abstract_state, bench.seed, params_under="model", shardings=shardings)
  step_fn = loop.make_step_fn(graphdef, shardings, batch_sh, mesh, rules, train_cfg)
  dev = [sharding.shard_batch(f, mesh, rules) for f in fields]
  with jax.set_mesh(mesh):
    with timing.CompileCounter() as cc:
      compiled = timing.aot_compile(step_fn, state, dev[0], name="train")
  if cc.count != 1:
    raise AssertionError(f"bench part 'train': expected exactly one compilation, got {cc.count} ({cc.names})")

  def step(state, i):
    with jax.set_mesh(mesh):
      return compiled(state, dev[i % len(dev)])
  steps = timing.StatefulCall(step, state, keep=lambda out: out["dense_fallback"])
  del state
  t = timing.time_calls(steps, warmup=bench.warmup, repeats=bench.repeats, name="train",
                        min_seconds=bench.min_seconds)
  xla = None
  if bench.xla_flops:
    u_model_fn = _model_fn(dataclasses.replace(cfg, scan_layers=False), bench.seed)
    u_graphdef, u_state, u_sh = loop.abstract_state(u_model_fn, train_cfg, mesh, rules)
    u_step = loop.make_step_fn(u_graphdef, u_sh, batch_sh, mesh, rules, train_cfg)
    xla = xla_count.lowered_flops(u_step, u_state, xla_count.shapes_of(fields[0]), mesh=mesh)
  return PartResult("train", t, 1, cc.count, compiled.compile_seconds, compiled.xla_flops, xla, analytic,
                    compiled.memory), steps


def run_grid(base_cfg: config_lib.ModelConfig, train_cfg: TrainConfig, bench: BenchConfig,
             progress: Callable[[str], None] = log.info) -> list[CellResult]:
  """All cells, frames outer, baseline ratio 0 first; see the module docstring."""
  bench.validate()
  cells = []
  for frames in bench.frames:
    group, timers = [], []
    todo = [(ratio, "auto") for ratio in bench.grid_ratios]
    while todo:
      ratio, packing = todo.pop(0)
      timers.append({} if bench.interleave_rounds else None)
      cell = run_cell(base_cfg, train_cfg, bench, frames, ratio, timers[-1], packing=packing)
      group.append(cell)
      if bench.compare_packing and cell.late_vit == "per_frame":
        todo.append((ratio, "always"))
      progress(f"T={frames} ratio={ratio}{' ' + cell.variant if cell.variant else ''} late ViT {cell.late_vit}"
               f"{'' if cell.num_rows is None else f' ({cell.num_rows} rows)'}: " + ", ".join(
          f"{k} {v.seconds * 1e3:.1f} ms" for k, v in cell.parts.items())
               + ("" if all(cell.packed) else f"  [dense fallback in {cell.packed.count(False)} batch(es)]")
               + (f"  [dense fallback in {cell.train_fallback_steps} of {cell.train_steps} train steps]"
                  if cell.train_fallback_steps else ""))
    if bench.interleave_rounds:
      interleave(group, timers, bench.interleave_rounds)
      for cell, cell_timers in zip(group, timers):
        if isinstance(cell_timers.get("train"), timing.StatefulCall):
          cell.train_steps, cell.train_fallback_steps = fallback_counts(cell_timers["train"])
      progress(f"T={frames} interleaved ({bench.interleave_rounds} rounds): " + "; ".join(
          f"ratio {c.ratio:g}{' ' + c.variant if c.variant else ''} " + ", ".join(f"{k} {v.seconds * 1e3:.1f} ms" for k, v in c.parts.items())
          for c in group))
    del timers
    cells += group
  return cells


def interleave(group: list[CellResult], timers: list[dict[str, Callable[[int], None]]], rounds: int) -> None:
  """Re-times every (cell, part) of `group` in `rounds` rounds; each round calls each of them in
  turn, as many calls as its first measurement had divided by `rounds` (at least one). The parts'
  timings are replaced by the pooled calls of all rounds (no warm-up: the first pass warmed them)."""
  pooled: dict[tuple[int, str], tuple[list[float], list[float]]] = {}
  for _ in range(rounds):
    for ci, (cell, cell_timers) in enumerate(zip(group, timers)):
      for name, call in cell_timers.items():
        first = cell.parts[name].timing
        n = max(1, round(len(first.seconds) / rounds))
        t = timing.time_calls(call, warmup=0, repeats=n, name=name, max_repeats=n)
        secs, cpu = pooled.setdefault((ci, name), ([], []))
        secs += t.seconds
        cpu += t.cpu_seconds
  for (ci, name), (secs, cpu) in pooled.items():
    part = group[ci].parts[name]
    group[ci].parts[name] = dataclasses.replace(
        part, timing=timing.Timing(name=name, seconds=tuple(secs), warmup=0, cpu_seconds=tuple(cpu)))

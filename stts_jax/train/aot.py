"""Ahead-of-time sizing of the train step: lower + compile from abstract shapes only.

`compile_train_step` builds the abstract TrainState (`nnx.eval_shape`, no weights allocated) and
an abstract batch, both as `ShapeDtypeStruct`s carrying the NamedShardings of the rules table on
the given mesh, then runs `jit(step).lower(...).compile()`. It reports XLA's per-device memory
(`memory_analysis`: arguments + temporaries; on CPU many bf16 buffers are upcast, so read it as
an upper bound for GPU/TPU) and FLOPs.

FLOPs: XLA's cost analysis counts the body of a `scan`/`while` loop once (stack_notes.md), so the
scanned compile undercounts stacked layers (and the gradient-accumulation scan). `flops` therefore
comes from lowering (no compile) a copy of the step with `scan_layers=False` for ONE microbatch
(grad_accum=1, batch B/A) and reading `Lowered.cost_analysis()`, which sees every layer, times A.
It is a global count for the whole step (all devices, forward + backward (+ remat) + optimizer).
A `lax.cond` counts as its most expensive branch: the packed-ViT path of STTS is counted as its
dense fallback (unpruned ViT cost after the soft block), so the ViT share is an upper bound.
`compiled_flops_per_device` is the scanned compile's own (undercounted) number, kept for reference.

Attention: the implementation each attention call site resolved to is recorded while the step is
lowered (`models.attention.record_choices`).

`report_json(report, ...)` is the machine-readable form behind `scripts/train.py --aot_json`.
"""

import dataclasses
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stts_jax import config as config_lib
from stts_jax.models import attention as attention_lib
from stts_jax.parallel import sharding
from stts_jax.train import loop
from stts_jax.train import step as step_lib
from stts_jax.train.config import TrainConfig


@dataclasses.dataclass
class AotReport:
  num_params: int
  num_devices: int
  mesh_shape: dict[str, int]
  flops: Optional[float]                 # global, all layers (unrolled lowering); None if skipped
  compiled_flops_per_device: float       # scanned compile (loop bodies counted once)
  argument_bytes: int                    # per device
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  compile_seconds: float
  batch_size: int = 0                    # global batch of one step
  grad_accum: int = 1
  batch_devices: int = 1                 # devices the batch axis is split over
  attention: list = dataclasses.field(default_factory=list)   # [{site, impl, asked, q, k, backend}]

  @property
  def micro_batch(self) -> int:
    """Examples per micro-batch (global)."""
    return self.batch_size // max(self.grad_accum, 1)

  @property
  def micro_batch_per_device(self) -> float:
    return self.micro_batch / max(self.batch_devices, 1)

  @property
  def per_device_bytes(self) -> int:
    """Arguments + temporaries per device (outputs alias the donated state)."""
    return self.argument_bytes + self.temp_bytes

  def summary(self) -> str:
    flops = "n/a" if self.flops is None else f"{self.flops:.4e} ({self.flops / self.num_devices:.4e} per device)"
    return "\n".join([
        f"mesh {self.mesh_shape} ({self.num_devices} devices), params {self.num_params:,}",
        f"FLOPs per step: {flops}",
        f"per-device memory: arguments {_size(self.argument_bytes)}, temporaries {_size(self.temp_bytes)}, "
        f"outputs {_size(self.output_bytes)} (aliased {_size(self.alias_bytes)}); arguments + temporaries "
        f"{_size(self.per_device_bytes)}",
        f"compile time {self.compile_seconds:.1f} s (scanned layers; compiled_flops_per_device="
        f"{self.compiled_flops_per_device:.4e}, undercounts scanned layers)",
        f"micro-batch {self.micro_batch} ({self.micro_batch_per_device:g} per device), attention: "
        + (", ".join(f"{a['site']} {a['impl']} q{tuple(a['q'])}" for a in self.attention) or "none logged"),
    ])


def _size(num_bytes: int) -> str:
  for unit, scale in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
    if num_bytes >= scale:
      return f"{num_bytes / scale:.3f} {unit}"
  return f"{num_bytes} B"


def abstract_batch(model_cfg: config_lib.ModelConfig, *, batch_size: int, num_frames: int,
                   seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Global-shape ShapeDtypeStructs of the device fields of a data-pipeline batch."""
  grid = model_cfg.vit.grid
  pix = model_cfg.vit.patch_size ** 2 * 3
  b, t, s = batch_size, num_frames, seq_len
  sds = jax.ShapeDtypeStruct
  return {"patches": sds((b, t, grid * grid, pix), jnp.uint8), "frame_mask": sds((b, t), jnp.bool_),
          "timestamps": sds((b, t), jnp.float32), "input_ids": sds((b, s), jnp.int32),
          "token_mask": sds((b, s), jnp.bool_), "target_ids": sds((b, s), jnp.int32),
          "loss_mask": sds((b, s), jnp.bool_)}


def abstract_packed_batch(model_cfg: config_lib.ModelConfig, *, rows: int, max_frames: int, seq_len: int,
                          max_videos: int, max_options: int = 6) -> dict[str, jax.ShapeDtypeStruct]:
  """Global-shape ShapeDtypeStructs of the device fields of an example-packed batch
  (`data/example_packing.py`): `rows` rows of `max_frames` frames, `seq_len` pruned tokens
  (S_in = seq_len + `budget.packed_dropped_bound`) and up to `max_videos` examples each."""
  from stts_jax.models import example_packing
  s_in = seq_len + example_packing.llm_dropped(model_cfg, max_frames)
  out = abstract_batch(model_cfg, batch_size=rows, num_frames=max_frames, seq_len=s_in)
  sds = jax.ShapeDtypeStruct
  b, v = rows, max_videos
  out.update({"frame_example": sds((b, max_frames), jnp.int32), "token_example": sds((b, s_in), jnp.int32),
              "positions": sds((b, s_in), jnp.int32), "example_frames": sds((b, v), jnp.int32),
              "example_tokens": sds((b, v), jnp.int32), "answer_index": sds((b, v), jnp.int32),
              "option_ids": sds((b, v, max_options), jnp.int32), "prompt_len": sds((b, v), jnp.int32),
              "valid": sds((b, v), jnp.bool_), "skipped": sds((b, v), jnp.bool_)})
  return out


def _lower(model_fn: Callable[[], nnx.Module], cfg: TrainConfig, mesh: jax.sharding.Mesh,
           rules: Sequence[tuple[str, Any]], batch: Mapping[str, jax.ShapeDtypeStruct],
           forward: Optional[step_lib.Forward]):
  graphdef, abs_state, shardings = loop.abstract_state(model_fn, cfg, mesh, rules)
  batch_sh = sharding.data_sharding(batch, mesh, rules)
  abs_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in batch.items()}
  step_fn = loop.make_step_fn(graphdef, shardings, batch_sh, mesh, rules, cfg, forward)
  with jax.set_mesh(mesh):
    lowered = step_fn.lower(abs_state, abs_batch)
  num_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abs_state["model"], nnx.Param)))
  return lowered, num_params


def compile_train_step(model_cfg: config_lib.ModelConfig, cfg: TrainConfig, mesh: jax.sharding.Mesh,
                       rules: Sequence[tuple[str, Any]], batch: Mapping[str, jax.ShapeDtypeStruct], *,
                       model_fn: Optional[Callable[[config_lib.ModelConfig], nnx.Module]] = None,
                       forward: Optional[step_lib.Forward] = None, count_flops: bool = True) -> AotReport:
  """Lowers and compiles the train step for `model_cfg` on `mesh` from abstract shapes only.

  model_fn(model_cfg) -> module (default: `Molmo2` with its STTS scorer, seed 0).
  count_flops: also lower (not compile) an unrolled copy (`scan_layers=False`) for the FLOP count.
  """
  model_fn = model_fn or _default_model_fn
  t0 = time.perf_counter()
  with attention_lib.record_choices() as choices:
    lowered, num_params = _lower(lambda: model_fn(model_cfg), cfg, mesh, rules, batch, forward)
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = None
  if count_flops:
    # One microbatch without the accumulation scan (its body would be counted once), times A.
    unrolled_cfg = dataclasses.replace(model_cfg, scan_layers=False)
    micro_cfg = dataclasses.replace(cfg, grad_accum=1)
    micro = {k: jax.ShapeDtypeStruct((v.shape[0] // cfg.grad_accum,) + tuple(v.shape[1:]), v.dtype)
             for k, v in batch.items()}
    unrolled, _ = _lower(lambda: model_fn(unrolled_cfg), micro_cfg, mesh, rules, micro, forward)
    unrolled_cost = unrolled.cost_analysis() or {}
    if isinstance(unrolled_cost, (list, tuple)):
      unrolled_cost = unrolled_cost[0] if unrolled_cost else {}
    flops = float(unrolled_cost.get("flops", 0.0)) * cfg.grad_accum
  return AotReport(
      num_params=num_params, num_devices=mesh.size, mesh_shape=dict(mesh.shape), flops=flops,
      compiled_flops_per_device=float(cost.get("flops", 0.0)),
      argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
      temp_bytes=int(mem.temp_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
      compile_seconds=seconds, batch_size=int(next(iter(batch.values())).shape[0]), grad_accum=cfg.grad_accum,
      batch_devices=_batch_devices(mesh, rules), attention=choices)


def _batch_devices(mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]]) -> int:
  spec = sharding.batch_spec(1, mesh, rules)
  axes = () if spec[0] is None else (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def git_commit() -> dict[str, Any]:
  """{"commit": HEAD, "dirty": uncommitted changes to tracked files} of the stts_jax checkout."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  def git(*args):
    try:
      return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ""
  return {"commit": git("rev-parse", "HEAD") or "unknown",
          "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def machine() -> dict[str, Any]:
  return {"host": platform.node(), "platform": platform.platform(), "processor": platform.machine(),
          "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
          "backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def report_json(report: AotReport, *, config: Optional[Mapping[str, Any]] = None,
                command: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Machine-readable AOT report: devices, mesh, micro-batch, per-device bytes, FLOPs, compile time,
  attention per call site, the config, git commit, machine and command. Bytes are XLA's
  `memory_analysis` per device (on CPU many bf16 buffers are upcast: an estimate for GPU/TPU)."""
  devices = jax.devices()
  return {
      "devices": {"count": report.num_devices, "platform": devices[0].platform,
                  "kind": devices[0].device_kind, "process_count": jax.process_count()},
      "mesh": report.mesh_shape,
      "batch": {"global": report.batch_size, "grad_accum": report.grad_accum, "micro_batch": report.micro_batch,
                "micro_batch_per_device": report.micro_batch_per_device, "batch_devices": report.batch_devices},
      "num_params": report.num_params,
      "bytes_per_device": {"argument": report.argument_bytes, "temp": report.temp_bytes,
                           "output": report.output_bytes, "alias": report.alias_bytes,
                           "argument_plus_temp": report.per_device_bytes},
      "gib_per_device": {"argument": report.argument_bytes / 1024 ** 3, "temp": report.temp_bytes / 1024 ** 3,
                         "argument_plus_temp": report.per_device_bytes / 1024 ** 3},
      "memory_note": "XLA memory_analysis; on CPU many bf16 buffers are upcast to float32, so CPU numbers "
                     "are an estimate (upper bound) for GPU/TPU",
      "flops": {"global": report.flops,
                "per_device": None if report.flops is None else report.flops / report.num_devices,
                "compiled_per_device_scanned": report.compiled_flops_per_device},
      "compile_seconds": report.compile_seconds,
      "attention": report.attention,
      "config": dict(config) if config is not None else None,
      "git": git_commit(),
      "machine": machine(),
      "command": list(command) if command is not None else list(sys.argv),
      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }


def _default_model_fn(model_cfg: config_lib.ModelConfig) -> nnx.Module:
  from stts_jax.models import vlm
  return vlm.Molmo2(model_cfg, rngs=nnx.Rngs(0))

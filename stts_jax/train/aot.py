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
"""

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stts_jax import config as config_lib
from stts_jax.train import loop, sharding
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
      compile_seconds=seconds)


def _default_model_fn(model_cfg: config_lib.ModelConfig) -> nnx.Module:
  from stts_jax.models import vlm
  return vlm.Molmo2(model_cfg, rngs=nnx.Rngs(0))

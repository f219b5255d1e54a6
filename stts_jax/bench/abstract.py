"""Abstract mode: the speedup STTS should give at real sizes, from shapes only (no weights).

For each frame count and row policy the Molmo2-4B STTS model (or any config) is lowered from
`ShapeDtypeStruct`s, unpruned and pruned, and XLA counts the FLOPs of
  * the train step (`stts_jax.train.loop.make_step_fn`: forward, backward, optimizer, with the
    config's remat), and
  * the inference prefill: vision part + decoder prefill (`stts_jax.bench.parts`).
XLA counts a scanned layer once, and lowering every one of the 25 ViT blocks and 36 decoder
layers unrolled is slow, so each program is lowered at three small depths -- (post-pruning ViT
blocks, decoder layers) = (2, 1), (3, 1), (2, 2), all with scan off -- and the count is
extrapolated linearly in depth, which is exact because the layers of a stack are identical:
  flops(v, l) = c + a v + b l,   a = f(3,1) - f(2,1),   b = f(2,2) - f(2,1).
(The ViT blocks before pruning, 0 .. prune_at+1, are always all present.) The predicted speedup
is the FLOP ratio unpruned / pruned; `memory` optionally compiles the full-depth scanned train
step for `memory_analysis()` (arguments + temporaries per device; an upper bound on CPU).
The paper measured 1.62x (train) / 1.61x (inference) at 128 frames and 2.25x / 2.22x at 256.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from stts_jax import config as config_lib
from stts_jax.bench import batches as batches_lib
from stts_jax.bench import costs
from stts_jax.bench import parts
from stts_jax.bench import runner
from stts_jax.bench import xla_count
from stts_jax.models import budget
from stts_jax.models import vlm
from stts_jax.train import aot
from stts_jax.train import loop
from stts_jax.parallel import sharding
from stts_jax.train.config import TrainConfig

PAPER_SPEEDUP = {"train": {128: 1.62, 256: 2.25}, "inference": {128: 1.61, 256: 2.22}}
DEPTHS = ((2, 1), (3, 1), (2, 2))


def depth_variant(cfg: config_lib.ModelConfig, post_blocks: int, llm_layers: int) -> config_lib.ModelConfig:
  """Same model with `post_blocks` ViT blocks after the soft block, `llm_layers` decoder layers, scan off.

  Taps move to (last block, first post block): which blocks are tapped does not change any cost."""
  if post_blocks < 2 or llm_layers < 1:
    raise ValueError("depth_variant: need post_blocks >= 2 and llm_layers >= 1")
  pre = cfg.stts.prune_at + 2
  taps = (pre + post_blocks - 1, pre)
  vit = dataclasses.replace(cfg.vit, num_layers=max(cfg.vit.num_layers, pre + post_blocks))
  adapter = dataclasses.replace(cfg.adapter, vit_layers=taps)
  llm = dataclasses.replace(cfg.llm, num_layers=llm_layers, rope_scaling_layers=None)
  return dataclasses.replace(cfg, vit=vit, adapter=adapter, llm=llm, scan_layers=False).validate()


def full_depth(cfg: config_lib.ModelConfig) -> tuple[int, int]:
  """(post-pruning ViT blocks, decoder layers) of the real model."""
  return max(cfg.adapter.vit_layers) + 1 - (cfg.stts.prune_at + 2), cfg.llm.num_layers


def extrapolate(counts: dict[tuple[int, int], float], depth: tuple[int, int]) -> float:
  """Linear extrapolation from the three `DEPTHS` counts to `depth` (module docstring)."""
  f21, f31, f22 = (counts[d] for d in DEPTHS)
  a, b = f31 - f21, f22 - f21
  c = f21 - 2 * a - b
  return c + a * depth[0] + b * depth[1]


def _abstract_llm_inputs(cfg: config_lib.ModelConfig, batch: int, length: int) -> tuple[Any, ...]:
  """Shapes of `parts.prefill_fn`'s inputs: embeds [B, S, E], positions, token mask, vision mask [B, S]."""
  sds = jax.ShapeDtypeStruct
  return (sds((batch, length, cfg.llm.hidden_size), jnp.dtype(cfg.dtype)), sds((batch, length), jnp.int32),
          sds((batch, length), jnp.bool_), sds((batch, length), jnp.bool_))


def count_programs(cfg: config_lib.ModelConfig, train_cfg: TrainConfig, *, frames: int, seq_len: int,
                   batch: int, mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]]) -> dict[str, float]:
  """XLA FLOPs (global) of the train step, the vision part and the prefill of one (unrolled) config."""
  model_fn = lambda: vlm.Molmo2(cfg, rngs=nnx.Rngs(0))
  graphdef, state = xla_count.abstract_model_state(model_fn)
  llm_graphdef, llm_state = nnx.split(nnx.merge(graphdef, state).llm)
  abs_batch = aot.abstract_batch(cfg, batch_size=batch, num_frames=frames, seq_len=seq_len)
  vision = xla_count.lowered_flops(parts.vision_fn(graphdef, parts.num_slots(cfg, frames)), state,
                                   abs_batch["patches"], abs_batch["frame_mask"])
  prefill = xla_count.lowered_flops(parts.prefill_fn(llm_graphdef, 0), llm_state,
                                    *_abstract_llm_inputs(cfg, batch, parts.llm_len(cfg, frames, seq_len)))
  ts_graphdef, ts_state, ts_sh = loop.abstract_state(model_fn, train_cfg, mesh, rules)
  batch_sh = sharding.data_sharding(abs_batch, mesh, rules)
  step = loop.make_step_fn(ts_graphdef, ts_sh, batch_sh, mesh, rules, train_cfg)
  shaped = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in abs_batch.items()}
  train = xla_count.lowered_flops(step, ts_state, shaped, mesh=mesh)
  return {"train": train, "vision": vision, "prefill": prefill}


def predict_cell(cfg: config_lib.ModelConfig, train_cfg: TrainConfig, *, frames: int, seq_len: int, batch: int,
                 mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]]) -> dict[str, float]:
  """Full-depth XLA FLOPs of one cell config by depth extrapolation, plus the analytic ones."""
  counts = {d: count_programs(depth_variant(cfg, *d), train_cfg, frames=frames, seq_len=seq_len, batch=batch,
                              mesh=mesh, rules=rules) for d in DEPTHS}
  depth = full_depth(cfg)
  out = {f"{k}_xla": extrapolate({d: counts[d][k] for d in DEPTHS}, depth) for k in ("train", "vision", "prefill")}
  fwd = costs.forward(cfg, frames, seq_len)
  s_llm = parts.llm_len(cfg, frames, seq_len)
  out["train_analytic"] = costs.train_step(cfg, fwd, batch)
  out["vision_analytic"] = costs.vision(fwd, batch)
  out["prefill_analytic"] = costs.prefill(cfg.llm, s_llm, s_llm + 1, batch)
  out["inference_xla"] = out["vision_xla"] + out["prefill_xla"]
  out["inference_analytic"] = out["vision_analytic"] + out["prefill_analytic"]
  return out


def memory_of(cfg: config_lib.ModelConfig, train_cfg: TrainConfig, *, frames: int, seq_len: int, batch: int,
              mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]]) -> aot.AotReport:
  """Compiles the full-depth scanned train step from shapes (H5's AOT path) for `memory_analysis()`."""
  abs_batch = aot.abstract_batch(cfg, batch_size=batch, num_frames=frames, seq_len=seq_len)
  return aot.compile_train_step(cfg, train_cfg, mesh, rules, abs_batch, count_flops=False)


def predict(base_cfg: config_lib.ModelConfig, train_cfg: TrainConfig, *, frames: Sequence[int] = (64, 128, 256),
            ratio: float = 0.5, row_policies: Sequence[str] = ("typical", "bound"), batch: Optional[int] = None,
            mesh: Optional[jax.sharding.Mesh] = None, rules: Optional[Sequence[tuple[str, Any]]] = None,
            memory: bool = False, timestamp_tokens: int = 4, text_tokens: int = 64,
            progress=print) -> list[dict[str, Any]]:
  """Rows of predicted speedups (FLOP ratios) per (frames, row policy); see the module docstring.

  batch defaults to one video per device of `mesh` (default: one device). Gradient accumulation is
  turned off (its microbatch loop would be counted once; FLOPs per video do not depend on it)."""
  mesh = mesh or runner.single_device_mesh()
  train_cfg = dataclasses.replace(train_cfg, grad_accum=1)
  rules = rules if rules is not None else sharding.make_rules()
  batch = batch or mesh.size
  rows = []
  for t in frames:
    seq_len = batches_lib.prompt_length(t, base_cfg.windows_per_frame, timestamp_tokens=timestamp_tokens,
                                        text_tokens=text_tokens)
    kw = dict(frames=t, seq_len=seq_len, batch=batch, mesh=mesh, rules=rules)
    base = runner.cell_model_config(base_cfg, t, 0.0, "typical")
    full = predict_cell(base, train_cfg, **kw)
    mem_full = memory_of(base, train_cfg, **kw) if memory else None
    for policy in row_policies:
      cfg = runner.cell_model_config(base_cfg, t, ratio, policy)
      pr = predict_cell(cfg, train_cfg, **kw)
      num_rows = budget.num_rows(t, base_cfg.windows_per_frame, ratio, cfg.stts.num_rows)
      row = {"frames": t, "ratio": ratio, "rows": policy, "num_rows": num_rows,
             "seq_len": seq_len, "llm_len": parts.llm_len(cfg, t, seq_len), "batch": batch}
      for k in ("train", "inference", "vision", "prefill"):
        row[f"{k}_flops_ratio"] = full[f"{k}_xla"] / pr[f"{k}_xla"]
        row[f"{k}_flops_ratio_analytic"] = full[f"{k}_analytic"] / pr[f"{k}_analytic"]
        row[f"{k}_tflops_unpruned"] = full[f"{k}_xla"] / 1e12
        row[f"{k}_tflops_pruned"] = pr[f"{k}_xla"] / 1e12
        row[f"{k}_xla_over_analytic_pruned"] = pr[f"{k}_xla"] / pr[f"{k}_analytic"]
        row[f"{k}_xla_over_analytic_unpruned"] = full[f"{k}_xla"] / full[f"{k}_analytic"]
      for k in ("train", "inference"):
        paper = PAPER_SPEEDUP[k].get(t)
        row[f"{k}_paper_speedup"] = paper
      if memory:
        mem = memory_of(cfg, train_cfg, **kw)
        row["train_mem_gib_unpruned"] = mem_full.per_device_bytes / 2 ** 30
        row["train_mem_gib_pruned"] = mem.per_device_bytes / 2 ** 30
      rows.append(row)
      progress(f"T={t} rows={policy} ({row['num_rows']}): train {row['train_flops_ratio']:.3f}x, "
               f"inference {row['inference_flops_ratio']:.3f}x (paper {row['train_paper_speedup']}, "
               f"{row['inference_paper_speedup']})")
  return rows

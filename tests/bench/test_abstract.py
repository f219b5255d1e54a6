"""Abstract mode: depth variants, linear depth extrapolation of XLA counts, plots."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from stts_jax.bench import abstract
from stts_jax.bench import batches
from stts_jax.bench import costs
from stts_jax.bench import plots
from stts_jax.bench import runner
from stts_jax.bench import xla_count
from stts_jax.models import video_forward
from stts_jax.testing import tiny

FRAMES = 3


def test_extrapolate_is_exact_on_a_linear_count():
  f = lambda v, l: 7.0 + 3.0 * v + 11.0 * l
  counts = {d: f(*d) for d in abstract.DEPTHS}
  assert abstract.extrapolate(counts, (20, 36)) == f(20, 36)


def test_depth_variant_keeps_the_pre_pruning_blocks():
  cfg = runner.cell_model_config(tiny.tiny_model_config(method="stts"), 4, 0.5, "typical")
  v = abstract.depth_variant(cfg, 3, 1)
  assert v.adapter.vit_layers == (cfg.stts.prune_at + 4, cfg.stts.prune_at + 2)
  assert v.llm.num_layers == 1 and not v.scan_layers
  assert abstract.full_depth(cfg) == (max(cfg.adapter.vit_layers) + 1 - cfg.stts.prune_at - 2, cfg.llm.num_layers)
  with pytest.raises(ValueError):
    abstract.depth_variant(cfg, 1, 1)


def _forward_count(cfg, seq_len):
  graphdef, state = xla_count.abstract_model_state(runner._model_fn(cfg, 0))
  batch = batches.video_batch(cfg, batch_size=1, num_frames=FRAMES, index=0)
  fields = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items() if k != "timestamps"}
  return xla_count.lowered_flops(lambda s, b: video_forward.forward_video(nnx.merge(graphdef, s), b).logits,
                                 state, fields)


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_depth_extrapolation_equals_the_full_unrolled_count(ratio):
  """XLA's count of the whole forward at full depth == extrapolation from the three small depths."""
  cfg = runner.cell_model_config(tiny.tiny_model_config(method="stts"), FRAMES, ratio, "typical")
  seq_len = batches.prompt_length(FRAMES, cfg.windows_per_frame)
  counts = {d: _forward_count(abstract.depth_variant(cfg, *d), seq_len) for d in abstract.DEPTHS}
  depth = abstract.full_depth(cfg)
  full = _forward_count(abstract.depth_variant(cfg, *depth), seq_len)
  assert abstract.extrapolate(counts, depth) == pytest.approx(full, rel=1e-6)
  analytic = costs.forward(cfg, FRAMES, seq_len).total
  assert abs(full / analytic - 1.0) < 0.10


def test_plots_are_written(tmp_path):
  rows = [{"frames": f, "ratio": r, "train_speedup": 1 + r * f / 64, "train_flops_ratio": 1 + r * f / 60,
           "ttft_speedup": 1.2, "ttft_flops_ratio": 1.3, "vision_ms": 10.0, "prefill_ms": 5.0,
           "train_ms": 40.0, "overhead_ms": 0.5 if r else None}
          for f in (8, 16) for r in (0.0, 0.5)]
  for r in rows:
    if r["ratio"] == 0.0:
      r.pop("train_speedup"), r.pop("ttft_speedup")
  paths = plots.write_all(rows, str(tmp_path))
  pred = plots.predicted_plot([{"frames": 128, "rows": "typical", "train_flops_ratio": 1.9,
                                "inference_flops_ratio": 1.9}], os.path.join(tmp_path, "p.png"))
  for p in paths + [pred]:
    assert os.path.getsize(p) > 10_000
    assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

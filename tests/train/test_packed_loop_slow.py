"""The training loop on example-packed rows: the tiny STTS Molmo2 on decoded videos (the data tests'
12-video set), packing on; SIGTERM after step 2 and a resume give the losses of an uninterrupted run
(the packer's state travels in the checkpoint), the fill metrics are logged, one compilation."""

import json

import numpy as np
import pytest
from flax import nnx

from stts_jax.data import pipeline
from stts_jax.models import example_packing
from stts_jax.parallel import sharding
from stts_jax.testing import tiny
from stts_jax.train import loop
from stts_jax.models import vlm
from tests.data.test_pipeline import IDS, cfg_for, dataset_dir  # noqa: F401  (fixture)
from tests.train import helpers


@pytest.mark.slow     # ~1-2 min on 2 cores (three runs of the tiny Molmo2 step)
def test_packed_training_resumes_exactly_and_logs_fill(dataset_dir, tmp_path):  # noqa: F811
  model_cfg = tiny.tiny_model_config(method="stts", ratio=0.5)
  data_cfg = cfg_for(dataset_dir, pack_examples=True, pack_seq_len=240, pack_max_frames=16, pack_max_videos=3,
                     batch_size=2, pack_lookahead=2)
  ratio = example_packing.llm_drop_ratio(model_cfg)
  cfg = helpers.train_cfg(num_steps=3, checkpoint_every=0, optim={"warmup_steps": 0, "learning_rate": 1e-3})
  mesh, rules = helpers.mesh_1(), sharding.make_rules()

  def run(it, wd):
    return loop.run(lambda: vlm.Molmo2(model_cfg, rngs=nnx.Rngs(0)), it, cfg, mesh, rules, str(wd))

  fresh = lambda: pipeline.train_iterator(data_cfg, IDS, llm_drop_ratio=ratio)   # noqa: E731
  full = run(fresh(), tmp_path / "full")
  first = run(helpers.SigtermAt(fresh(), at=2), tmp_path / "split")
  assert first.preempted
  second = run(fresh(), tmp_path / "split")
  hist = lambda r: [h for h in r.history if "loss" in h]   # noqa: E731
  np.testing.assert_allclose([h["loss"] for h in hist(first) + hist(second)], [h["loss"] for h in hist(full)],
                             rtol=1e-6)
  assert full.compilations == 1
  last = hist(full)[-1]
  assert 0 < last["pack_fill"] <= 1 and 0 < last["pack_frame_fill"] <= 1
  assert last["pack_examples_per_row"] >= 1 and last["examples_per_s"] > 0
  assert last["truncated_tokens"] == 0 and last["dense_fallback"] == 0
  records = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  assert all("pack_fill" in r for r in records if "loss" in r)

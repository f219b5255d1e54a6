"""Preemption (SIGTERM) after step k, resume, run to n == an uninterrupted n-step run."""

import json
import os

import numpy as np
import pytest

from stts_jax.train import loop, sharding
from tests.train import helpers, toy_model


@pytest.mark.multidevice
def test_sigterm_resume_matches_uninterrupted(tmp_path):
  cfg = helpers.train_cfg(num_steps=5, checkpoint_every=0, max_to_keep=2)
  mesh, rules = helpers.mesh_8(), sharding.make_rules()
  run = lambda it, wd: loop.run(helpers.toy_model_fn(), it, cfg, mesh, rules, str(wd),
                                forward=toy_model.toy_forward)
  full = run(helpers.batches(), tmp_path / "full")
  assert not full.preempted and len(full.history) == 5

  first = run(helpers.SigtermAt(helpers.batches(), at=2), tmp_path / "split")
  assert first.preempted
  assert [h["step"] for h in first.history] == [1.0, 2.0]
  second = run(helpers.batches(), tmp_path / "split")      # fresh iterator: position comes from ckpt
  assert not second.preempted
  assert [h["step"] for h in second.history] == [3.0, 4.0, 5.0]

  losses_full = [h["loss"] for h in full.history]
  losses_split = [h["loss"] for h in first.history + second.history]
  np.testing.assert_array_equal(losses_split, losses_full)
  a, b = helpers.flat_arrays(full.state), helpers.flat_arrays(second.state)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)

  # The checkpoint holds the data iterator position (one JSON per process) and the config.
  step2 = tmp_path / "split" / "checkpoints" / "2"
  it_state = json.loads((step2 / "data_iter" / "process_0-of-1.json").read_text())
  assert it_state == {"format": "json", "state": {"seed": 0, "index": 2}}
  lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4, 5]
  assert sorted(os.listdir(tmp_path / "split" / "checkpoints")) == ["2", "5"]

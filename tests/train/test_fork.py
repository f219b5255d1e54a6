"""`train.init_from`: a pruning run with `prune_start` = k that starts from the unpruned run's checkpoint
at step k ends in the state the full run ends in (`train/fork.py`)."""
import os

import numpy as np
import pytest
from flax import nnx

from stts_jax.models import video_forward, vlm
from stts_jax.parallel import sharding
from stts_jax.testing import synthetic_batches, tiny
from stts_jax.train import loop
from tests.train import helpers


def _run(workdir, method, ratio, **train):
  model_cfg = tiny.tiny_model_config(method=method, ratio=ratio)
  it = synthetic_batches.SyntheticBatches(model_cfg, batch_size=2, num_frames=4, seq_len=80, seed=0)
  cfg = helpers.train_cfg(num_steps=4, checkpoint_every=0, **train,
                          optim={"warmup_steps": 1, "learning_rate": 1e-3, "weight_decay": 0.1})
  return loop.run(lambda: vlm.Molmo2(model_cfg, rngs=nnx.Rngs(0)), it, cfg, helpers.mesh_1(),
                  sharding.make_rules(), str(workdir), forward=video_forward.forward_video)


@pytest.mark.parametrize("method,train", [
    ("stts", dict(aux_weight=0.0, policy_gradient=1.0, scorer_warmup_steps=2)),
    pytest.param("random", dict(aux_weight=0.0), marks=pytest.mark.slow)])   # 3 tiny-Molmo2 runs each
def test_pruned_run_started_from_the_unpruned_checkpoint_equals_the_full_run(tmp_path, method, train):
  full = _run(tmp_path / "full", method, 0.5, prune_start=2, **train)
  donor = _run(tmp_path / "unpruned", "none", 0.0, keep_checkpoint_steps=(2,))
  kept = tmp_path / "unpruned" / loop.KEPT_DIR
  assert sorted(os.listdir(kept)) == ["2"]
  forked = _run(tmp_path / "forked", method, 0.5, prune_start=2, init_from=str(kept), init_from_step=2, **train)
  steps = lambda result: [h for h in result.history if "loss" in h]   # without the warm-up's record
  # the donor's first two steps are the full run's (ratio 0), the forked run logs only its own steps
  np.testing.assert_array_equal([h["loss"] for h in steps(donor)[:2]], [h["loss"] for h in steps(full)[:2]])
  assert [h["step"] for h in steps(forked)] == [3.0, 4.0]
  np.testing.assert_array_equal([h["loss"] for h in steps(forked)], [h["loss"] for h in steps(full)[2:]])
  got, want = helpers.flat_arrays(forked.state), helpers.flat_arrays(full.state)
  assert got.keys() == want.keys()
  if method == "stts":   # the scorer's own leaves: init + weight decay only until step 2, then trained
    assert any(k.startswith("model/scorer/") for k in got)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert forked.compilations == 1   # pruned steps only


def test_init_from_config_is_checked():
  with pytest.raises(ValueError, match="init_from_step"):
    helpers.train_cfg(init_from="x", init_from_step=3, prune_start=2)
  with pytest.raises(ValueError, match="keep_checkpoint_steps"):
    helpers.train_cfg(keep_checkpoint_steps=(0,))


@pytest.mark.slow   # 4 tiny-Molmo2 runs
def test_init_from_needs_the_step_and_no_state_this_run_lacks(tmp_path):
  donor = tmp_path / "unpruned"
  _run(donor, "none", 0.0, keep_checkpoint_steps=(1,))
  with pytest.raises(FileNotFoundError, match="no checkpoint of step 2"):
    _run(tmp_path / "a", "stts", 0.5, prune_start=2, init_from=str(donor / loop.KEPT_DIR), init_from_step=2)
  # the source must not hold state this run lacks (here: an STTS run forked into an unpruned-method model)
  stts = tmp_path / "stts"
  _run(stts, "stts", 0.5, prune_start=1, keep_checkpoint_steps=(1,))
  with pytest.raises(ValueError, match="state this run lacks"):
    _run(tmp_path / "b", "random", 0.5, prune_start=1, init_from=str(stts / loop.KEPT_DIR), init_from_step=1)

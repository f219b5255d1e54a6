"""The scorer warm-up: fits the scorer alone, leaves everything else bit-identical, rewinds the data."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from stts_jax.models import vlm
from stts_jax.testing import synthetic_batches, tiny
from stts_jax.parallel import sharding
from stts_jax.train import loop, scorer_warmup
from stts_jax.train import config as train_config

from tests.train import helpers

STTS_CFG = tiny.tiny_model_config(method="stts", pool_init_std=32 ** -0.5)


def _params(model) -> dict[str, np.ndarray]:
  return {sharding.path_str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _batches(seed=0):
  return synthetic_batches.SyntheticBatches(STTS_CFG, batch_size=4, num_frames=3, seq_len=64, seed=seed)


def test_fits_the_aux_target_and_touches_only_the_scorer():
  model = vlm.Molmo2(STTS_CFG, rngs=nnx.Rngs(0))
  before = _params(model)
  summary = scorer_warmup.warm_up_scorer(model, _batches(), steps=40, learning_rate=3e-3)
  after = _params(model)
  assert summary["steps"] == 40
  assert summary["aux_loss_last"] < 0.3 * summary["aux_loss_first"], summary
  scorer_names = [k for k in before if k.startswith("scorer/")]
  assert scorer_names and all(not np.array_equal(before[k], after[k]) for k in scorer_names if "kernel" in k)
  for k in before:
    if not k.startswith("scorer/"):
      np.testing.assert_array_equal(before[k], after[k], err_msg=k)
  # the loss it reports is the model's own aux loss on those features
  batch = next(_batches(seed=5))
  loss, scores = scorer_warmup.scorer_aux_loss(model, jax.numpy.asarray(batch["patches"]),
                                               jax.numpy.asarray(batch["frame_mask"]))
  assert scores.shape == (4, 3, STTS_CFG.windows_per_frame) and 0 < float(loss) < summary["aux_loss_first"]


def test_bad_inputs_are_errors():
  dense = vlm.Molmo2(tiny.tiny_model_config(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no STTS scorer"):
    scorer_warmup.warm_up_scorer(dense, _batches(), steps=2, learning_rate=1e-3)
  model = vlm.Molmo2(STTS_CFG, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="ran out after 2 of 5"):
    scorer_warmup.warm_up_scorer(model, [next(_batches())] * 2, steps=5, learning_rate=1e-3)
  with pytest.raises(ValueError, match="scorer_warmup_steps"):
    train_config.TrainConfig(scorer_warmup_steps=-1).validate()
  # a config asking to warm up a model without a scorer is rejected before anything is built
  from configs import demo
  from stts_jax.train import main as train_main
  cfg = demo.get_config("method=none,runlocal=true")
  cfg.train.scorer_warmup_steps = 5
  with pytest.raises(ValueError, match="needs an STTS scorer, but model.stts.method is 'none'"):
    train_main.train_and_evaluate(cfg, "/nonexistent/never_created")


class _Recording(synthetic_batches.SyntheticBatches):
  fetched: list

  def __next__(self):
    self.fetched.append(self.index)
    return super().__next__()


@pytest.mark.multidevice
@pytest.mark.slow
def test_loop_warms_up_once_and_rewinds_the_data(tmp_path):
  cfg = helpers.train_cfg(num_steps=2, checkpoint_every=2, scorer_warmup_steps=4, scorer_warmup_lr=1e-2)
  data = _Recording(STTS_CFG, batch_size=8, num_frames=3, seq_len=64)
  data.fetched = []
  model_fn = lambda: vlm.Molmo2(STTS_CFG, rngs=nnx.Rngs(0))
  mesh, rules = helpers.mesh_8(), sharding.make_rules()
  result = loop.run(model_fn, data, cfg, mesh, rules, str(tmp_path))
  # warm-up read batches 0..3, then the main phase started again from batch 0
  assert data.fetched == [0, 1, 2, 3, 0, 1]
  first = result.history[0]
  assert first["step"] == 0 and first["scorer_warmup/steps"] == 4
  assert first["scorer_warmup/aux_loss_last"] < first["scorer_warmup/aux_loss_first"]
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    assert "scorer_warmup/aux_loss_last" in json.loads(f.readline())
  # the warmed-up state is back in the state's shardings, leaf by leaf
  graphdef, state, shardings = loop.init_state(model_fn, cfg, mesh, rules)
  warmed, _ = loop.warm_up_scorer(graphdef, state, shardings, _batches(), cfg, mesh, rules)
  for x, s in zip(jax.tree.leaves(warmed), jax.tree.leaves(shardings)):
    assert x.sharding == s
  assert len({str(s.spec) for s in jax.tree.leaves(shardings)}) > 1
  # a resumed run restores the warmed-up and trained scorer from the checkpoint: no second warm-up
  cfg3 = helpers.train_cfg(num_steps=3, checkpoint_every=2, scorer_warmup_steps=4, scorer_warmup_lr=1e-2)
  data.fetched = []
  resumed = loop.run(model_fn, data, cfg3, mesh, rules, str(tmp_path))
  assert data.fetched == [2] and [h["step"] for h in resumed.history] == [3]

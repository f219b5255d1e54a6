"""Mixed-ratio training (`train.stts_ratios`): step s runs at stts_ratios[s % n], one compilation per
ratio, and each step is the step a fixed-ratio run at that ratio would take."""
import numpy as np
import pytest
from flax import nnx

from stts_jax.models import video_forward, vlm
from stts_jax.parallel import sharding
from stts_jax.testing import synthetic_batches, tiny
from stts_jax.train import config as train_config
from stts_jax.train import loop
from tests.train import helpers


def _run(tmp_path, name, ratio, steps, stts_ratios=(), **train):
  model_cfg = tiny.tiny_model_config(method="stts", ratio=ratio)
  it = synthetic_batches.SyntheticBatches(model_cfg, batch_size=2, num_frames=4, seq_len=80, seed=0)
  cfg = helpers.train_cfg(num_steps=steps, stts_ratios=stts_ratios, checkpoint_every=0, **train,
                          optim={"warmup_steps": 0, "learning_rate": 1e-3})
  return loop.run(lambda: vlm.Molmo2(model_cfg, rngs=nnx.Rngs(0)), it, cfg, helpers.mesh_1(),
                  sharding.make_rules(), str(tmp_path / name), forward=video_forward.forward_video)


@pytest.mark.slow   # two tiny-Molmo2 runs, three step compiles
def test_mixed_ratio_training_cycles_the_ratios_with_one_compilation_each(tmp_path):
  mixed = _run(tmp_path, "mixed", 0.5, 4, stts_ratios=(0.25, 0.5))
  kept = [h["kept_ratio"] for h in mixed.history]
  assert mixed.compilations == 2
  # drop 0.25 keeps ~3/4 of the real windows, 0.5 ~1/2 (frame 0 always kept; real frames vary per batch)
  assert min(kept[0], kept[2]) > 0.7 and max(kept[1], kept[3]) < 0.6
  # step 1 at 0.25 is the first step of a fixed run at 0.25 (same init: the ratio is static config)
  fixed = _run(tmp_path, "fixed", 0.25, 1)
  np.testing.assert_allclose(mixed.history[0]["loss"], fixed.history[0]["loss"], rtol=1e-6)
  assert mixed.history[0]["kept_ratio"] == pytest.approx(fixed.history[0]["kept_ratio"])


@pytest.mark.slow   # several tiny-Molmo2 compiles: minutes on 2 CPU cores
def test_mixed_ratios_start_at_stts_ratios_start(tmp_path):
  """Steps before `stts_ratios_start` run at the model's ratio (the same compiled step as its turn in
  the cycle), then the cycle runs by step number."""
  late = _run(tmp_path, "late", 0.5, 4, stts_ratios=(0.25, 0.5), stts_ratios_start=2)
  kept = [h["kept_ratio"] for h in late.history]
  assert late.compilations == 2
  assert max(kept[0], kept[1], kept[3]) < 0.6 and kept[2] > 0.7   # 0.5, 0.5, then 0.25 (step 2), 0.5
  fixed = _run(tmp_path, "fixed", 0.5, 2)
  for got, want in zip(late.history[:2], fixed.history):
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
  with pytest.raises(ValueError, match="stts_ratios_start"):
    helpers.train_cfg(stts_ratios=(0.3,), stts_ratios_start=-1)


@pytest.mark.slow   # two tiny-Molmo2 runs; the unpruned prefix's equality is also in tests/train/test_fork.py
def test_steps_before_prune_start_run_unpruned_then_at_the_model_ratio(tmp_path):
  """`train.prune_start`: the first steps are those of the same model at ratio 0 (every window kept),
  then it prunes at its ratio; one compiled step per phase."""
  late = _run(tmp_path, "late", 0.5, 3, prune_start=2)
  kept = [h["kept_ratio"] for h in late.history]
  assert late.compilations == 2
  assert kept[:2] == [1.0, 1.0] and kept[2] < 0.6
  unpruned = _run(tmp_path, "unpruned", 0.0, 2)
  for got, want in zip(late.history[:2], unpruned.history):
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
  with pytest.raises(ValueError, match="prune_start"):
    helpers.train_cfg(prune_start=-1)
  with pytest.raises(ValueError, match="needs a pruning model"):
    loop.ratio_graphdefs(lambda: vlm.Molmo2(tiny.tiny_model_config(), rngs=nnx.Rngs(0)),
                         helpers.train_cfg(prune_start=3), None)


def test_stts_ratios_are_checked():
  with pytest.raises(ValueError, match="stts_ratios"):
    helpers.train_cfg(stts_ratios=(0.5, 1.0))
  cfg = helpers.train_cfg(stts_ratios=(0.3,))
  with pytest.raises(ValueError, match="needs a pruning model"):
    loop.ratio_graphdefs(lambda: vlm.Molmo2(tiny.tiny_model_config(), rngs=nnx.Rngs(0)), cfg, None)
  assert train_config.TrainConfig().stts_ratios == ()

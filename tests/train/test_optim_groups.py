"""Learning-rate groups: scorer, vision tower, the rest."""

import pytest

from stts_jax.train import optim
from stts_jax.train.config import OptimConfig, TrainConfig


def test_param_groups_and_their_peaks():
  o = OptimConfig()
  assert optim.param_group("scorer/mlp/kernel", o.scorer_pattern, o.vision_pattern) == "scorer"
  assert optim.param_group("vit/blocks/mlp/fc1/kernel", o.scorer_pattern, o.vision_pattern) == "vision"
  assert optim.param_group("adapter/image_projector/down_proj/kernel", o.scorer_pattern, o.vision_pattern) == "vision"
  assert optim.param_group("llm/layers/mlp/up_proj/kernel", o.scorer_pattern, o.vision_pattern) == "main"
  # The scorer pattern wins even inside the vision tower's path.
  assert optim.param_group("vit/scorer/kernel", o.scorer_pattern, o.vision_pattern) == "scorer"
  cfg = TrainConfig(num_steps=10, optim=OptimConfig(learning_rate=1e-3, scorer_learning_rate=2e-3,
                                                    vision_learning_rate=1e-4, min_lr_ratio=1.0))
  peaks = {k: float(s(5)) for k, s in optim.schedules(cfg).items()}
  assert peaks == pytest.approx({"main": 1e-3, "scorer": 2e-3, "vision": 1e-4})
  plain = {k: float(s(5)) for k, s in optim.schedules(TrainConfig(num_steps=10, optim=OptimConfig(
      learning_rate=1e-3, min_lr_ratio=1.0))).items()}
  assert plain == pytest.approx({"main": 1e-3, "scorer": 1e-3, "vision": 1e-3})
  with pytest.raises(ValueError, match="learning rates"):
    OptimConfig(vision_learning_rate=-1.0).validate()


def test_freeze_vit_blocks_holds_the_early_tower_and_leaves_the_clipping_norm():
  import jax
  import numpy as np
  from stts_jax.parallel import sharding
  rng = np.random.default_rng(0)
  arr = lambda *shape: rng.normal(size=shape).astype(np.float32)   # noqa: E731
  # the layout of Molmo2's parameter paths: a stacked ViT [L, ...], an unstacked one, the rest
  params = {"vit": {"patch_embedding": {"kernel": arr(12, 4), "bias": arr(4)}, "positional_embedding": arr(9, 4),
                    "blocks": {"mlp": {"fc1": {"kernel": arr(3, 4, 8), "bias": arr(3, 8)}}}},
            "model": {"vit": {"blocks": {"0": {"kernel": arr(4, 4)}, "2": {"kernel": arr(4, 4)}}}},
            "scorer": {"fc1": {"kernel": arr(4, 8)}}, "llm": {"layers": {"kernel": arr(2, 4, 4)}}}
  grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
  n = 2

  def step(freeze_blocks, g):
    tx = optim.make_tx(TrainConfig(num_steps=10, optim=OptimConfig(learning_rate=1e-2, weight_decay=0.1,
                                                                   clip_norm=1.0, freeze_vit_blocks=freeze_blocks)))
    updates, _ = tx.update(g, tx.init(params), params)
    return {sharding.path_str(p): np.asarray(u) for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]}

  frozen = step(n, grads)
  # the same step without freezing, on gradients whose early-tower entries are zero: same clipping norm
  masked = step(0, optim.zero_early_vit(n).update(grads, None)[0])
  assert not frozen["model/vit/blocks/0/kernel"].any() and frozen["model/vit/blocks/2/kernel"].any()
  for path, u in frozen.items():
    if "patch_embedding" in path or "positional_embedding" in path:
      assert not u.any(), path
    elif path.startswith("vit/blocks/"):
      assert not u[:n].any() and u[n:].any(), path      # weight decay would move frozen rows otherwise
      np.testing.assert_allclose(u[n:], masked[path][n:], rtol=1e-5, atol=1e-8)
    elif not path.startswith("model/"):
      assert u.any(), path
      np.testing.assert_allclose(u, masked[path], rtol=1e-5, atol=1e-8)
  with pytest.raises(ValueError, match="freeze_vit_blocks"):
    OptimConfig(freeze_vit_blocks=-1).validate()

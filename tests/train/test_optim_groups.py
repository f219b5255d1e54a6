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

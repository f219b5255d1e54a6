"""Optimizer: global-norm clipping, then AdamW with warmup + cosine, with a separate peak
learning rate for the scorer and frozen parts chosen by path regexes (OptimConfig)."""

import re
from typing import Any

import jax
import optax
from flax import nnx

from stts_jax.train import sharding
from stts_jax.train.config import TrainConfig


def schedule(peak: float, cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup 0 -> peak over `warmup_steps`, then cosine to `peak * min_lr_ratio`."""
  o = cfg.optim
  cosine = optax.cosine_decay_schedule(peak, cfg.decay_steps, alpha=o.min_lr_ratio)
  if o.warmup_steps == 0:
    return cosine
  warmup = optax.linear_schedule(0.0, peak, o.warmup_steps)
  return optax.join_schedules([warmup, cosine], [o.warmup_steps])


def schedules(cfg: TrainConfig) -> dict[str, optax.Schedule]:
  """{'main': ..., 'scorer': ...} learning-rate schedules."""
  o = cfg.optim
  scorer_peak = o.learning_rate if o.scorer_learning_rate is None else o.scorer_learning_rate
  return {"main": schedule(o.learning_rate, cfg), "scorer": schedule(scorer_peak, cfg)}


def trainable(cfg: TrainConfig):
  """NNX filter: the Params not matched by any `optim.freeze` regex."""
  freeze = tuple(cfg.optim.freeze)

  def not_frozen(path, _):
    return not sharding.matches(freeze, sharding.path_str(path))
  return nnx.All(nnx.Param, not_frozen)


def _labels(pattern: str):
  def label_tree(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "scorer" if re.search(pattern, sharding.path_str(p)) else "main", params)
  return label_tree


def _decay_mask(params: Any) -> Any:
  return jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, params)


def make_tx(cfg: TrainConfig) -> optax.GradientTransformation:
  """clip_by_global_norm -> multi_transform({main, scorer} AdamW). Frozen params never reach it
  (the NNX optimizer only holds `trainable(cfg)` params)."""
  o = cfg.optim
  sched = schedules(cfg)

  def adamw(lr):
    return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                       mask=_decay_mask)
  inner = optax.multi_transform({"main": adamw(sched["main"]), "scorer": adamw(sched["scorer"])},
                                _labels(o.scorer_pattern))
  if o.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), inner)
  return inner


def make_optimizer(model: nnx.Module, cfg: TrainConfig) -> nnx.Optimizer:
  return nnx.Optimizer(model, make_tx(cfg), wrt=trainable(cfg))

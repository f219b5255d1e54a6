"""Optimizer: global-norm clipping, then AdamW with warmup + cosine, with a separate peak
learning rate for the scorer and frozen parts chosen by path regexes (OptimConfig)."""

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from stts_jax.parallel import sharding
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
  """{'main': ..., 'scorer': ..., 'vision': ...} learning-rate schedules."""
  o = cfg.optim
  scorer_peak = o.learning_rate if o.scorer_learning_rate is None else o.scorer_learning_rate
  vision_peak = o.learning_rate if o.vision_learning_rate is None else o.vision_learning_rate
  return {"main": schedule(o.learning_rate, cfg), "scorer": schedule(scorer_peak, cfg),
          "vision": schedule(vision_peak, cfg)}


def trainable(cfg: TrainConfig):
  """NNX filter: the Params not matched by any `optim.freeze` regex."""
  freeze = tuple(cfg.optim.freeze)

  def not_frozen(path, _):
    return not sharding.matches(freeze, sharding.path_str(path))
  return nnx.All(nnx.Param, not_frozen)


def param_group(path: str, scorer_pattern: str, vision_pattern: str) -> str:
  """'scorer', 'vision' or 'main' (the scorer pattern wins)."""
  if re.search(scorer_pattern, path):
    return "scorer"
  return "vision" if re.search(vision_pattern, path) else "main"


def _labels(scorer_pattern: str, vision_pattern: str):
  def label_tree(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda p, _: param_group(sharding.path_str(p), scorer_pattern, vision_pattern), params)
  return label_tree


# The ViT at the root ("vit/...") or under a wrapper module ("model/vit/...", stage 0's tagger).
_VIT_EMBED = re.compile(r"(^|/)vit/(patch_embedding|positional_embedding)(/|$)")
_VIT_BLOCKS = re.compile(r"(^|/)vit/blocks/(?:(\d+)/)?")   # group 2: the block of an unstacked (List) tower


def zero_early_vit(num_blocks: int) -> optax.GradientTransformation:
  """Zeroes the ViT embeddings' and first `num_blocks` blocks' entries of a gradient or update tree
  (stacked blocks: rows 0..num_blocks-1 of the leading layer axis)."""

  def zero(path, x):
    name = sharding.path_str(path)
    if _VIT_EMBED.search(name):
      return jnp.zeros_like(x)
    m = _VIT_BLOCKS.search(name)
    if m is None:
      return x
    if m.group(2) is not None:
      return jnp.zeros_like(x) if int(m.group(2)) < num_blocks else x
    keep = (jnp.arange(x.shape[0]) >= num_blocks).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x, jnp.zeros((), x.dtype))

  return optax.stateless(lambda updates, params=None: jax.tree_util.tree_map_with_path(zero, updates))


def _decay_mask(params: Any) -> Any:
  return jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, params)


def make_tx(cfg: TrainConfig) -> optax.GradientTransformation:
  """clip_by_global_norm -> multi_transform({main, scorer, vision} AdamW). Frozen params never reach it
  (the NNX optimizer only holds `trainable(cfg)` params). `optim.freeze_vit_blocks` > 0: the early
  tower's gradients are zeroed before clipping and its updates after AdamW (weight decay included)."""
  o = cfg.optim
  sched = schedules(cfg)

  def adamw(lr):
    return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                       mask=_decay_mask)
  inner = optax.multi_transform({name: adamw(sched[name]) for name in ("main", "scorer", "vision")},
                                _labels(o.scorer_pattern, o.vision_pattern))
  parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
  parts.append(inner)
  if o.freeze_vit_blocks > 0:
    parts = [zero_early_vit(o.freeze_vit_blocks), *parts, zero_early_vit(o.freeze_vit_blocks)]
  return parts[0] if len(parts) == 1 else optax.chain(*parts)


def make_optimizer(model: nnx.Module, cfg: TrainConfig) -> nnx.Optimizer:
  return nnx.Optimizer(model, make_tx(cfg), wrt=trainable(cfg))

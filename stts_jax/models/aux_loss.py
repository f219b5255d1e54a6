"""Temporal similarity of windows: the training-free heuristic and the STTS aux loss (DESIGN.md 3.10, 3.11).

A window's vector v[t, w] is its M patch vectors (at block `prune_at`) concatenated and
L2-normalised; c[t, w] = cos(v[t-1, w], v[t, w]), with c[0, w] = 0 (the zero vector stands in for
the frame before frame 0, exactly as in the scorer's temporal context).
"""

from typing import Optional

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from stts_jax.models import windows as windows_lib

_NORM_EPS = 1e-12   # as torch.nn.functional.normalize
# Where the aux loss's gradient goes in training (`train.aux_gradient`, `video_forward.vit_scored`):
# "all" (the authors') into the scorer and the ViT blocks that make its input and target; "scorer"
# into the scorer's parameters only.
GRADIENT_MODES = ("all", "scorer")


def window_vectors(patch_features: Float[Array, "*B T P D"], grid_hw: tuple[int, int],
                   window: tuple[int, int]) -> Float[Array, "*B T W MD"]:
  """Per window: its M patches concatenated (row-major inside the window), L2-normalised, float32."""
  idx_wm = jnp.asarray(windows_lib.window_patch_index(grid_hw, window))
  x = jnp.take(patch_features.astype(jnp.float32), idx_wm, axis=-2)     # [..., T, W, M, D]
  x = x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, _NORM_EPS)


def cosine_to_previous(patch_features: Float[Array, "*B T P D"], grid_hw: tuple[int, int],
                       window: tuple[int, int], first: Optional[Bool[Array, "*B T"]] = None) -> Float[Array, "*B T W"]:
  """cos(v[t-1, w], v[t, w]) per window; 0 for frame 0 (and for every frame in `first`: the first
  frames of the videos of a packed row, whose previous frame belongs to another video)."""
  v = window_vectors(patch_features, grid_hw, window)
  cos = jnp.sum(v[..., 1:, :, :] * v[..., :-1, :, :], axis=-1)
  zeros = jnp.zeros((*cos.shape[:-2], 1, cos.shape[-1]), cos.dtype)
  out = jnp.concatenate([zeros, cos], axis=-2)
  if first is not None:
    out = jnp.where(first[..., None], jnp.zeros((), out.dtype), out)
  return out


def heuristic_scores(patch_features: Float[Array, "*B T P D"], grid_hw: tuple[int, int],
                     window: tuple[int, int], first: Optional[Bool[Array, "*B T"]] = None) -> Float[Array, "*B T W"]:
  """Training-free baseline: 1 - cosine to the same window of the previous frame (1 for frame 0 and
  for the frames in `first`)."""
  return 1.0 - cosine_to_previous(patch_features, grid_hw, window, first)


def temporal_aux_loss_batched(scores: Float[Array, "B T W"], patch_features: Float[Array, "B T P D"],
                              frame_mask: Bool[Array, "B T"], grid_hw: tuple[int, int],
                              window: tuple[int, int],
                              prunable: Optional[Bool[Array, "B"]] = None,
                              first: Optional[Bool[Array, "B T"]] = None) -> Float[Array, ""]:
  """Mean of (s - (1 - cos))^2 over every real (t >= 1, w) pair of the batch; 0 if there is none.

  A pair counts when frames t-1 and t are both real (and, with `first` for packed rows of several
  videos, t does not start a video). The target is *not* detached, so the loss also trains the ViT
  blocks that produce `patch_features`.
  """
  t = scores.shape[1]
  target_btw = heuristic_scores(patch_features, grid_hw, window, first)
  pair_bt = frame_mask & jnp.roll(frame_mask, 1, axis=1) & (jnp.arange(t) >= 1)
  if first is not None:
    pair_bt = pair_bt & ~first
  if prunable is not None:
    pair_bt = pair_bt & prunable[:, None]
  sq_btw = jnp.square(scores.astype(jnp.float32) - target_btw)
  weight_btw = jnp.broadcast_to(pair_bt[:, :, None], sq_btw.shape).astype(jnp.float32)
  total = jnp.sum(weight_btw)
  return jnp.sum(sq_btw * weight_btw) / jnp.maximum(total, 1.0)


def temporal_aux_loss(scores: Float[Array, "T W"], patch_features: Float[Array, "T P D"],
                      grid_hw: tuple[int, int], window: tuple[int, int]) -> Float[Array, ""]:
  """Aux loss of one video (all frames real): mean over t >= 1 and w of (s - (1 - cos))^2; 0 for T=1."""
  t = scores.shape[0]
  return temporal_aux_loss_batched(scores[None], patch_features[None], jnp.ones((1, t), bool),
                                   grid_hw, window)

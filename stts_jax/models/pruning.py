"""Which windows to keep (global per-video budget) and the soft attention bias (DESIGN.md 3.5, 3.6, 3.11).

Scores are per window, `[T, W]` for one video or `[B, T, W]` for a batch; a higher score means
more important. `frame_mask [B, T]` marks real frames (padding frames come after them): padding
frames are never kept, never counted in a budget and never candidates for dropping.
"""

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from stts_jax.models import budget
from stts_jax.models import windows as windows_lib

RESCALE_MIN = math.exp(-2.0)   # smallest rescaled score s'; log(s') = -2 is the strongest key bias
RESCALE_EPS = 1e-6             # added to (max - min), as in the released checkpoints' training code
SCOPES = ("window_row", "frame")


def budget_keep_mask_batched(scores: Float[Array, "B T W"], frame_mask: Bool[Array, "B T"], ratio: float,
                             prunable: Optional[Bool[Array, "B"]] = None) -> Bool[Array, "B T W"]:
  """Keep mask of a batch of videos: per video, drop the `dropped(t_b)` lowest-scoring windows.

  t_b = number of real frames of video b (`budget.num_dropped`). Candidates are the windows of real
  frames 1..t_b-1; frame 0 is never dropped. Ties go by flat index t*W + w, lower index dropped
  first (a stable sort). Samples with `prunable[b] == False` (images) keep every real frame.
  """
  b, t, w = scores.shape
  table_t = jnp.asarray(budget.dropped_table(t, w, ratio), jnp.int32)
  frames_b = jnp.sum(frame_mask, axis=-1, dtype=jnp.int32)
  n_drop_b = table_t[frames_b]
  if prunable is not None:
    n_drop_b = jnp.where(prunable, n_drop_b, 0)
  later_t = jnp.arange(t) >= 1
  candidate_btw = jnp.broadcast_to((frame_mask & later_t)[:, :, None], (b, t, w))
  key_bn = jnp.where(candidate_btw, scores.astype(jnp.float32), jnp.inf).reshape(b, t * w)
  order_bn = jnp.argsort(key_bn, axis=-1, stable=True)
  rank_bn = jnp.zeros_like(order_bn).at[jnp.arange(b)[:, None], order_bn].set(
      jnp.broadcast_to(jnp.arange(t * w, dtype=order_bn.dtype), (b, t * w)))
  drop_btw = (rank_bn < n_drop_b[:, None]).reshape(b, t, w) & candidate_btw
  return frame_mask[:, :, None] & ~drop_btw


def budget_keep_mask(scores: Float[Array, "T W"], ratio: float) -> Bool[Array, "T W"]:
  """Keep mask of one video whose T frames are all real (DESIGN.md 3.5)."""
  t = scores.shape[0]
  return budget_keep_mask_batched(scores[None], jnp.ones((1, t), bool), ratio)[0]


def random_scores(rng: jax.Array, shape: tuple[int, ...]) -> Float[Array, "..."]:
  """Uniform(0, 1) scores for the random-pruning baseline (same budget as STTS)."""
  return jax.random.uniform(rng, shape, jnp.float32)


def rescale_scores(scores: Float[Array, "*B T W"], grid_hw: tuple[int, int], window: tuple[int, int],
                   scope: str = "window_row") -> Float[Array, "*B T W"]:
  """Min-max rescale into [e^-2, 1): over each row of windows ("window_row") or each frame ("frame").

  s' = e^-2 + (s - min) * (1 - e^-2) / (max - min + 1e-6); a constant group maps to e^-2.
  Gradients flow through min and max as well. Frame 0 is not special-cased here.
  """
  if scope not in SCOPES:
    raise ValueError(f"bias rescale scope must be one of {SCOPES}, got {scope!r}")
  rows, cols = windows_lib.window_grid(grid_hw, window)
  lead = scores.shape[:-1]
  s = scores.astype(jnp.float32).reshape(*lead, rows, cols)
  axes = (-1,) if scope == "window_row" else (-2, -1)
  lo = jnp.min(s, axis=axes, keepdims=True)
  hi = jnp.max(s, axis=axes, keepdims=True)
  out = RESCALE_MIN + (s - lo) * (1.0 - RESCALE_MIN) / (hi - lo + RESCALE_EPS)
  return out.reshape(*lead, rows * cols)


def scores_to_patch_bias_batched(scores: Float[Array, "B T W"], frame_mask: Bool[Array, "B T"],
                                 grid_hw: tuple[int, int], window: tuple[int, int],
                                 scope: str = "window_row",
                                 prunable: Optional[Bool[Array, "B"]] = None,
                                 first: Optional[Bool[Array, "B T"]] = None) -> Float[Array, "B T P"]:
  """Additive key bias log(s') per patch for block prune_at+1 (DESIGN.md 3.6).

  Frame 0 (every frame in `first`: the first frame of each video of a packed row), padding frames and
  non-prunable samples get bias 0 (s' = 1)."""
  t = scores.shape[1]
  s_btw = rescale_scores(scores, grid_hw, window, scope)
  biased_bt = frame_mask & (jnp.arange(t) >= 1)
  if first is not None:
    biased_bt = biased_bt & ~first
  if prunable is not None:
    biased_bt = biased_bt & prunable[:, None]
  bias_btw = jnp.where(biased_bt[:, :, None], jnp.log(s_btw), 0.0)
  patch_window = jnp.asarray(windows_lib.patch_window_index(grid_hw, window))
  return jnp.take(bias_btw, patch_window, axis=-1)


def scores_to_patch_bias(scores: Float[Array, "T W"], grid_hw: tuple[int, int], window: tuple[int, int],
                         scope: str = "window_row") -> Float[Array, "T P"]:
  """Key bias `[T, P]` of one video (all frames real); frame 0 gets 0."""
  t = scores.shape[0]
  return scores_to_patch_bias_batched(scores[None], jnp.ones((1, t), bool), grid_hw, window, scope)[0]


def keep_patch_mask(keep_mask: Bool[Array, "*B T W"], grid_hw: tuple[int, int],
                    window: tuple[int, int]) -> Bool[Array, "*B T P"]:
  """Window keep mask copied to the window's patches."""
  patch_window = jnp.asarray(windows_lib.patch_window_index(grid_hw, window))
  return jnp.take(keep_mask, patch_window, axis=-1)


def num_kept(keep_mask: Bool[Array, "B T W"]) -> Int[Array, "B"]:
  """Kept windows per video."""
  return jnp.sum(keep_mask, axis=(1, 2), dtype=jnp.int32)

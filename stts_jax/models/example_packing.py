"""Example packing on the model side: several whole examples (videos + prompts) in one row.

The host packs examples into rows (`stts_jax/data/example_packing.py`); a packed batch is the usual
batch with the frame axis and the token axis shared by up to V examples, plus who owns what
(F = frame budget per row, S_in = row input length, V = most examples per row):
  patches         uint8 [B, F, P, I]  each example's frames, contiguous, in example order; padding after
  frame_mask      bool  [B, F]
  frame_example   int32 [B, F]        example slot 0..V-1 of each frame, -1 on padding frames
  input_ids, token_mask, target_ids, loss_mask  [B, S_in]: each example's *unpruned* prompt,
                                      contiguous, in the same example order
  token_example   int32 [B, S_in]     example slot of each token, -1 on padding
  example_frames  int32 [B, V]        frames of each slot (its shape carries V)
What keeps every example apart, so that a packed row computes what one row per example computes:
  * ViT: every block attends within a frame, so frames of different videos never mix; the packed
    ViT rows after pruning are planned per video (`packing.make_plan(..., video_ids)`).
  * Scorer, heuristic, aux loss and the soft-block bias treat the first frame of each video
    (`first_frames`) as frame 0: zeros as its previous frame, no aux pair, no bias.
  * STTS budget per video (`budget_keep_mask_packed`): dropped(t_v) of the video's own frame count.
  * LLM: pruned windows' tokens leave the row, which is compacted from S_in to
    S_in - `budget.packed_dropped_bound(F)` tokens; the mask is (causal OR vision of the same
    example) AND same example (`attention.llm_mask(..., example_ids)`); positions restart at 0 for
    every example (`segment_positions`).
  * Loss: per token over the answer tokens, normalised by the batch's answer-token count, as
    without packing.
Static sizes: adapter window slots per row `budget.packed_kept_bound(F, V)`; packed ViT rows per row
`budget.packed_num_rows`.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from stts_jax.models import budget

PACKED_KEYS = ("frame_example", "token_example", "example_frames")


def is_packed(batch) -> bool:
  """True for a batch of example-packed rows (it carries `token_example`)."""
  return "token_example" in batch


def first_frames(frame_mask: Bool[Array, "B T"], video_ids: Optional[Int[Array, "B T"]] = None
                 ) -> Bool[Array, "B T"]:
  """Real frames that start a video: frame 0, and (packed rows) a frame whose video differs from
  the previous frame's."""
  frame_mask = jnp.asarray(frame_mask, bool)
  t = frame_mask.shape[1]
  starts = jnp.broadcast_to(jnp.arange(t) == 0, frame_mask.shape)
  if video_ids is not None:
    v = jnp.asarray(video_ids, jnp.int32)
    starts = starts | (v != jnp.roll(v, 1, axis=1))
  return frame_mask & starts


def segment_positions(example_ids: Int[Array, "B S"]) -> Int[Array, "B S"]:
  """Position of each token within its example: 0 at the example's first token, then +1 per token
  (examples are contiguous). Padding (-1) continues counting; it is masked anyway."""
  ex = jnp.asarray(example_ids, jnp.int32)
  b, s = ex.shape
  idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  starts = jnp.concatenate([jnp.ones((b, 1), bool), ex[:, 1:] != ex[:, :-1]], axis=1)
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_idx


def budget_keep_mask_packed(scores: Float[Array, "B T W"], frame_mask: Bool[Array, "B T"],
                            video_ids: Int[Array, "B T"], num_videos: int, ratio: float) -> Bool[Array, "B T W"]:
  """`pruning.budget_keep_mask_batched` for rows of several videos: each video drops the
  dropped(t_v) lowest-scoring windows of its own frames 1..t_v-1, ties by its own flat index
  (the row's flat index f*W + w keeps each video's t*W + w order)."""
  b, t, w = scores.shape
  frame_mask = jnp.asarray(frame_mask, bool)
  vid = jnp.where(frame_mask, jnp.asarray(video_ids, jnp.int32), -1)
  table_t = jnp.asarray(budget.dropped_table(t, w, ratio), jnp.int32)
  onehot_bvt = vid[:, None, :] == jnp.arange(num_videos)[None, :, None]
  frames_bv = jnp.sum(onehot_bvt, axis=-1, dtype=jnp.int32)
  n_drop_bv = table_t[frames_bv]
  candidate_bt = frame_mask & ~first_frames(frame_mask, vid)
  candidate_bn = jnp.broadcast_to(candidate_bt[:, :, None], (b, t, w)).reshape(b, t * w)
  # Group of each window: its video if it is a candidate, else num_videos (sorted last, never dropped).
  group_bn = jnp.where(candidate_bn, jnp.broadcast_to(vid[:, :, None], (b, t, w)).reshape(b, t * w), num_videos)
  key_bn = jnp.where(candidate_bn, scores.astype(jnp.float32).reshape(b, t * w), jnp.inf)
  # Lexicographic (group, score, flat index): stable sort by score, then stable sort by group.
  order_bn = jnp.argsort(key_bn, axis=-1, stable=True)
  order_bn = jnp.take_along_axis(
      order_bn, jnp.argsort(jnp.take_along_axis(group_bn, order_bn, axis=1), axis=-1, stable=True), axis=1)
  rank_bn = jnp.zeros_like(order_bn).at[jnp.arange(b)[:, None], order_bn].set(
      jnp.broadcast_to(jnp.arange(t * w, dtype=order_bn.dtype), (b, t * w)))
  # Rank within the group: minus the number of windows in earlier groups.
  per_group_bg = jnp.sum(group_bn[:, None, :] == jnp.arange(num_videos + 1)[None, :, None], axis=-1,
                         dtype=rank_bn.dtype)
  group_start_bg = jnp.cumsum(per_group_bg, axis=-1) - per_group_bg
  rank_in_group = rank_bn - jnp.take_along_axis(group_start_bg, group_bn, axis=1)
  n_drop_bn = jnp.take_along_axis(jnp.concatenate([n_drop_bv, jnp.zeros((b, 1), jnp.int32)], axis=1), group_bn,
                                  axis=1)
  drop_btw = (candidate_bn & (rank_in_group < n_drop_bn)).reshape(b, t, w)
  return frame_mask[:, :, None] & ~drop_btw


def llm_drop_ratio(cfg) -> float:
  """The ratio at which the LLM side drops windows (`ModelConfig`): what the host packer sizes rows by."""
  st = cfg.stts
  return float(st.ratio) if (st.prunes and st.llm_prune) else 0.0


def llm_slots(cfg, frames: int, videos: int) -> int:
  """Static adapter window slots of a packed row: the kept bound when the LLM side is pruned, else F*W."""
  st = cfg.stts
  w = cfg.windows_per_frame
  return budget.packed_kept_bound(frames, videos, w, st.ratio) if (st.prunes and st.llm_prune) else frames * w


def llm_dropped(cfg, frames: int) -> int:
  """Static tokens the model removes from a packed row (S_in -> S_in - this)."""
  st = cfg.stts
  return budget.packed_dropped_bound(frames, cfg.windows_per_frame, st.ratio) if (st.prunes and st.llm_prune) else 0


def vit_rows(cfg, frames: int, videos: int) -> int:
  """Packed ViT rows of a packed row (`budget.packed_num_rows`; `stts.num_rows` None: F)."""
  st = cfg.stts
  return budget.packed_num_rows(frames, videos, cfg.windows_per_frame, st.ratio, st.num_rows)


__all__ = ["PACKED_KEYS", "is_packed", "first_frames", "segment_positions", "budget_keep_mask_packed",
           "llm_drop_ratio", "llm_slots", "llm_dropped", "vit_rows"]

"""Packing kept patches into dense rows for the ViT blocks after pruning (DESIGN.md 3.7, 3.8).

Per video, each frame's kept patches go into rows of P slots, first-fit decreasing by kept count
(ties by frame index; frames with nothing kept disappear). A frame keeps its patches in their
original order, contiguously from its start slot. Attention inside a row is block-diagonal per
frame through segment ids: slot s of a row holds frame t -> segment id t; an empty slot gets the
unique id T + s, so it attends only to itself (no fully masked softmax rows, no NaNs) and nothing
real ever attends to it.

A frame that ends up alone in its row is refilled with all of its patches (the slots exist anyway;
the released checkpoints were trained this way): its kept patches then attend to the whole frame.
`attend` (kept or refilled) is the per-frame set of patches that take part in attention; only
`keep` patches are scattered back, with zeros elsewhere, for the adapter.

The row count R is static (`budget.num_rows`; the proof of the default bound is in `budget.py`).
Assignment runs over T candidate rows, so it always succeeds; if a video needs more than R rows,
`PackPlan.overflow[b]` is set and the packed rows of that batch are incomplete: callers must not
use them (`video_forward` switches to the exact dense masked path; nothing kept is ever lost).
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int


@struct.dataclass
class PackPlan:
  """Where every patch of every frame goes. Flat indices: frame side t*P + p, row side r*P + s.

  Fields are typed `Any` (shapes in the comments): jax rebuilds pytrees with placeholder leaves.
  """
  src_brp: Any   # int32 [B, R, P]; source t*P + p of each row slot, -1 if empty
  segment_ids_brp: Any   # int32 [B, R, P]; frame t, or T + s for an empty slot s
  dest_btp: Any   # int32 [B, T, P]; row slot r*P + s of each attending patch, -1 otherwise
  keep_btp: Any   # bool [B, T, P]; kept patches (scattered back)
  attend_btp: Any   # bool [B, T, P]; kept or refilled (take part in attention)
  rows_used_b: Any   # int32 [B]; rows first-fit decreasing needs
  overflow_b: Any   # bool [B]; rows_used > R: packed rows incomplete, do not use

  @property
  def fits(self) -> jax.Array:
    """Scalar bool: every video of the batch fits into the static rows."""
    return ~jnp.any(self.overflow_b)


def ffd_assign(counts_t: Int[Array, "T"], capacity: int,
               video_t: Optional[Int[Array, "T"]] = None) -> tuple[Int[Array, "T"], Int[Array, "T"]]:
  """First-fit decreasing: (row of each frame or -1 if empty, start slot in its row).

  Frames are taken by decreasing count, ties by increasing frame index; each goes to the first of
  T candidate rows where it fits (one always exists: at most T frames of size <= capacity).
  video_t (example-packed rows: several videos, contiguous along T): each video is packed on its own,
  in video order, into rows after the previous videos' rows, so a video's rows (and which of its
  frames end up alone and refilled) are exactly those it gets as the only video of a row, shifted.
  """
  t = counts_t.shape[0]
  order = jnp.argsort(-counts_t, stable=True)
  if video_t is not None:
    # Lexicographic (video, -count, frame): a stable sort by video of the count order.
    order = order[jnp.argsort(video_t[order], stable=True)]
    video_o = video_t[order].astype(jnp.int32)
  else:
    video_o = jnp.zeros((t,), jnp.int32)

  def place(carry, xs):
    fill_r, base, current, used_rows = carry
    frame, video = xs
    c = counts_t[frame]
    # A new video starts on the first row no earlier video uses (one video: base stays 0).
    base = jnp.where(video != current, used_rows, base)
    row = jnp.argmax((jnp.arange(t) >= base) & (fill_r + c <= capacity))
    start = fill_r[row]
    used = c > 0
    fill_r = fill_r.at[row].add(jnp.where(used, c, 0))
    used_rows = jnp.where(used, jnp.maximum(used_rows, row + 1), used_rows)
    return (fill_r, base, video, used_rows), (jnp.where(used, row, -1), jnp.where(used, start, 0))

  init = (jnp.zeros((t,), counts_t.dtype), jnp.zeros((), jnp.int32), video_o[0], jnp.zeros((), jnp.int32))
  _, (row_o, start_o) = jax.lax.scan(place, init, (order, video_o))
  row_t = jnp.zeros((t,), jnp.int32).at[order].set(row_o.astype(jnp.int32))
  start_t = jnp.zeros((t,), jnp.int32).at[order].set(start_o.astype(jnp.int32))
  return row_t, start_t


def _plan_one(keep_tp: Bool[Array, "T P"], num_rows: int, video_t: Optional[Int[Array, "T"]] = None):
  t, p = keep_tp.shape
  counts_t = jnp.sum(keep_tp, axis=-1, dtype=jnp.int32)
  row_t, start_t = ffd_assign(counts_t, p, video_t)
  placed_t = row_t >= 0
  frames_per_row = jnp.zeros((t,), jnp.int32).at[jnp.where(placed_t, row_t, t)].add(1, mode="drop")
  lone_t = placed_t & (frames_per_row[jnp.clip(row_t, 0)] == 1)
  attend_tp = keep_tp | lone_t[:, None]
  slot_tp = start_t[:, None] + jnp.cumsum(attend_tp, axis=-1, dtype=jnp.int32) - 1
  dest_tp = jnp.where(attend_tp, row_t[:, None] * p + slot_tp, -1)
  rows_used = jnp.max(row_t) + 1
  # Row side: scatter each attending patch's own index into its slot (slots beyond R are dropped).
  target = jnp.where(attend_tp & (dest_tp < num_rows * p), dest_tp, num_rows * p).reshape(-1)
  src = jnp.full((num_rows * p,), -1, jnp.int32).at[target].set(
      jnp.arange(t * p, dtype=jnp.int32), mode="drop")
  slot_s = jnp.arange(num_rows * p, dtype=jnp.int32) % p
  seg = jnp.where(src >= 0, src // p, t + slot_s)
  return (src.reshape(num_rows, p), seg.reshape(num_rows, p), dest_tp, attend_tp, rows_used,
          rows_used > num_rows)


def make_plan(keep_patch_mask: Bool[Array, "B T P"], num_rows: int,
              video_ids: Optional[Int[Array, "B T"]] = None) -> PackPlan:
  """Plans the packing of a batch of videos into `num_rows` rows each (see module docstring).

  video_ids: for example-packed rows (several videos along T, -1 on padding frames): each video is
  planned on its own (`ffd_assign`), its rows following the previous videos' rows."""
  if num_rows < 1:
    raise ValueError(f"packing needs at least one row, got num_rows={num_rows}")
  if video_ids is None:
    src, seg, dest, attend, used, over = jax.vmap(lambda k: _plan_one(k, num_rows))(keep_patch_mask)
  else:
    src, seg, dest, attend, used, over = jax.vmap(lambda k, v: _plan_one(k, num_rows, v))(
        keep_patch_mask, jnp.asarray(video_ids, jnp.int32))
  return PackPlan(src_brp=src, segment_ids_brp=seg, dest_btp=dest, keep_btp=keep_patch_mask,
                  attend_btp=attend, rows_used_b=used, overflow_b=over)


def pack(hidden: Float[Array, "B T P D"], plan: PackPlan) -> Float[Array, "B R P D"]:
  """Gathers attending patches into rows; empty slots are zeros."""
  b, t, p, d = hidden.shape
  r = plan.src_brp.shape[1]
  src = plan.src_brp.reshape(b, r * p)
  rows = jnp.take_along_axis(hidden.reshape(b, t * p, d), jnp.clip(src, 0)[..., None], axis=1)
  rows = jnp.where((src >= 0)[..., None], rows, jnp.zeros((), hidden.dtype))
  return rows.reshape(b, r, p, d)


def unpack(rows: Float[Array, "B R P D"], plan: PackPlan) -> Float[Array, "B T P D"]:
  """Scatters rows back to frames: kept patches get their row output, everything else zeros."""
  b, r, p, d = rows.shape
  t = plan.dest_btp.shape[1]
  dest = jnp.clip(plan.dest_btp, 0, r * p - 1).reshape(b, t * p)
  out = jnp.take_along_axis(rows.reshape(b, r * p, d), dest[..., None], axis=1)
  keep = plan.keep_btp.reshape(b, t * p, 1)
  return jnp.where(keep, out, jnp.zeros((), rows.dtype)).reshape(b, t, p, d)


def dense_segment_ids(plan: PackPlan) -> Int[Array, "B T P"]:
  """Segment ids for the unpacked fallback: attending patches 0, others unique (1 + p, self only)."""
  p = plan.attend_btp.shape[-1]
  return jnp.where(plan.attend_btp, 0, 1 + jnp.arange(p, dtype=jnp.int32))

"""LLM-side pruning: drop the `<im_patch>` tokens of dropped windows from a prompt (DESIGN.md 3.9).

Layout contract (data pipeline): every real frame contributes exactly W `<im_patch>` tokens, frames
in order, windows row-major, so the k-th `<im_patch>` of sample b is window (k // W, k % W);
padding frames contribute none. Timestamps, frame start/end markers and all text stay.

Kept tokens move to the front in their original order and get contiguous positions 0.. (what the
model sees when the pruned tokens never existed). The output length is static (`out_len`, normally
`budget.pruned_seq_len`: S minus the bucket's dropped count). If a sample still has more tokens
than that (possible only if its unpruned prompt would not fit S with T frames, see `budget.py`),
the tail is cut and reported in `num_truncated`; callers should treat a non-zero count as a data
error. A position whose next token was pruned gets the next *surviving* token as its target (the
token that follows it in the pruned sequence); other targets are taken as given.
"""

from typing import Any

import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Int


@struct.dataclass
class CompactedSequence:
  input_ids_bs: Any   # int32 [B, S]
  token_mask_bs: Any   # bool [B, S]
  target_ids_bs: Any   # int32 [B, S]
  loss_mask_bs: Any   # bool [B, S]
  src_bs: Any   # int32 [B, S]; original position of each output slot, -1 for padding
  num_truncated_b: Any   # int32 [B]; kept tokens that did not fit into the static length


def patch_window_of_tokens(input_ids: Int[Array, "B S"], token_mask: Bool[Array, "B S"],
                           image_patch_id: int) -> tuple[Bool[Array, "B S"], Int[Array, "B S"]]:
  """(is `<im_patch>`, flat window index t*W + w of that token); the index is 0 elsewhere."""
  is_patch = (input_ids == image_patch_id) & token_mask
  k = jnp.cumsum(is_patch, axis=-1, dtype=jnp.int32) - 1
  return is_patch, jnp.where(is_patch, k, 0)


def token_keep_mask(input_ids: Int[Array, "B S"], token_mask: Bool[Array, "B S"],
                    keep_mask: Bool[Array, "B T W"], image_patch_id: int) -> Bool[Array, "B S"]:
  """Real tokens that survive: everything except `<im_patch>` tokens of dropped windows."""
  b, t, w = keep_mask.shape
  is_patch, k = patch_window_of_tokens(input_ids, token_mask, image_patch_id)
  kept_window = jnp.take_along_axis(keep_mask.reshape(b, t * w), jnp.clip(k, 0, t * w - 1), axis=1)
  return token_mask & (~is_patch | kept_window)


def compact(input_ids: Int[Array, "B S"], token_mask: Bool[Array, "B S"], target_ids: Int[Array, "B S"],
            loss_mask: Bool[Array, "B S"], keep_bs: Bool[Array, "B S"], out_len: int,
            pad_id: int) -> CompactedSequence:
  """Moves the tokens with `keep_bs` to the front (stable) and cuts to `out_len`."""
  b, s = input_ids.shape
  if not 0 < out_len <= s:
    raise ValueError(f"compact: out_len {out_len} must be in (0, {s}]")
  order = jnp.argsort(~keep_bs, axis=-1, stable=True)[:, :out_len].astype(jnp.int32)
  n_keep = jnp.sum(keep_bs, axis=-1, dtype=jnp.int32)
  valid = jnp.arange(out_len)[None, :] < n_keep[:, None]
  # The target of position s is token s+1; it is still the next token only if s+1 survives.
  next_pruned = jnp.concatenate([token_mask[:, 1:] & ~keep_bs[:, 1:], jnp.zeros((b, 1), bool)], axis=1)
  take = lambda x: jnp.take_along_axis(x, order, axis=1)
  ids_out = jnp.where(valid, take(input_ids), pad_id)
  next_ids = jnp.concatenate([ids_out[:, 1:], jnp.full((b, 1), pad_id, ids_out.dtype)], axis=1)
  targets = jnp.where(take(next_pruned), next_ids, take(target_ids))
  return CompactedSequence(
      input_ids_bs=ids_out,
      token_mask_bs=valid,
      target_ids_bs=jnp.where(valid, targets, 0),
      loss_mask_bs=valid & take(loss_mask),
      src_bs=jnp.where(valid, order, -1),
      num_truncated_b=jnp.maximum(n_keep - out_len, 0),
  )


def prune_sequence(input_ids: Int[Array, "B S"], token_mask: Bool[Array, "B S"],
                   target_ids: Int[Array, "B S"], loss_mask: Bool[Array, "B S"],
                   keep_mask: Bool[Array, "B T W"], image_patch_id: int, out_len: int,
                   pad_id: int) -> CompactedSequence:
  """Drops dropped windows' `<im_patch>` tokens and compacts to the static length `out_len`."""
  keep_bs = token_keep_mask(input_ids, token_mask, keep_mask, image_patch_id)
  return compact(input_ids, token_mask, target_ids, loss_mask, keep_bs, out_len, pad_id)

"""Cross-entropy of the answer tokens without [B, S, V] logits.

The train loss reads logits only where `loss_mask` is True (the answer tokens: tens to hundreds of
the S ~ 10k positions of the authors' recipe), so the LM head runs only there:

  gathered  the first K loss positions of each example (K = `TrainConfig.max_answer_tokens`, static)
            are gathered from the final hidden states [B, S, E] -> [B, K, E]; logits [B, K, V].
  chunked   the whole sequence in chunks of K positions (`lax.scan`, each chunk rematerialised in the
            backward pass): logits [B, K, V] per chunk, never [B, S, V].
`answer_cross_entropy` takes `gathered` when every example of the (micro)batch has at most K loss
positions and `chunked` otherwise (`lax.cond`; the same sum over all loss positions): an unusually
long answer costs time, never a dropped loss token. The chunked branch is itself rematerialised, so
a step that takes the gathered branch keeps no residual of it (under autodiff `lax.cond` carries the
residuals of both branches).

Numerics equal the full-logits path (`full_cross_entropy(Decoder.logits(hidden))`): the head is the
same dot in the hidden states' dtype (as `layers.Linear` with the decoder's compute dtype), the
cross-entropy is float32.

Sharding: the [B, K, V] logits are constrained to ("act_loss_batch", None, "act_loss_vocab")
(parallel/sharding.py: batch over `data`, vocab over `tensor` x `fsdp`). The gathered hidden states are
tiny, so they are all-gathered over the FSDP axis instead of the LM head, and each device computes a
vocab slice: logsumexp and the target logit are reductions over the sharded vocab axis (the target
logit is a masked sum, not a gather), so no device ever holds a full vocab row of logits.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from stts_jax.models import partitioning

LOGITS_NAMES = ("act_loss_batch", None, "act_loss_vocab")


def full_cross_entropy(logits_bsv: Float[Array, "B S V"], target_ids_bs: Int[Array, "B S"],
                       loss_mask_bs: Bool[Array, "B S"]) -> Float[Array, ""]:
  """Sum of float32 cross entropy over positions where `loss_mask` is True (full logits given)."""
  logits = logits_bsv.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, target_ids_bs[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.sum(jnp.where(loss_mask_bs, logz - target, 0.0))


def head_logits(hidden_bke: Float[Array, "B K E"], head_ev: Float[Array, "E V"]) -> Float[Array, "B K V"]:
  """The LM head on a few positions: dot in the hidden states' dtype, float32 result, vocab-sharded."""
  dtype = hidden_bke.dtype
  # The head resharded to the logits' vocab split (E whole, V over act_loss_vocab) before the dot: with
  # the stored [E/fsdp, V] layout, SPMD computed the head's gradient from all-gathered full-vocab
  # logit gradients ([B*K, V] float32 on every device).
  head_ev = partitioning.constrain(head_ev, (None, "act_loss_vocab"))
  logits = jnp.dot(hidden_bke, head_ev.astype(dtype)).astype(jnp.float32)
  return partitioning.constrain(logits, LOGITS_NAMES)


def _token_ce(logits_bkv: Float[Array, "B K V"], target_bk: Int[Array, "B K"]) -> Float[Array, "B K"]:
  logz = jax.nn.logsumexp(logits_bkv, axis=-1)
  # A masked sum over the vocab instead of take_along_axis: a reduction over the (sharded) vocab
  # axis, where a gather would first all-gather the vocab.
  vocab = jax.lax.broadcasted_iota(jnp.int32, (1, 1, logits_bkv.shape[-1]), 2)
  return logz - jnp.sum(jnp.where(vocab == target_bk[..., None], logits_bkv, 0.0), axis=-1)


def _ce_sum(logits_bkv: Float[Array, "B K V"], target_bk: Int[Array, "B K"],
            mask_bk: Bool[Array, "B K"]) -> Float[Array, ""]:
  return jnp.sum(jnp.where(mask_bk, _token_ce(logits_bkv, target_bk), 0.0))


def answer_positions(loss_mask_bs: Bool[Array, "B S"], k: int) -> tuple[Int[Array, "B K"], Bool[Array, "B K"]]:
  """Indices of each example's first `k` loss positions in sequence order, padded; valid mask."""
  s = loss_mask_bs.shape[1]
  k = min(k, s)
  order = jnp.argsort(~loss_mask_bs, axis=-1, stable=True)[:, :k].astype(jnp.int32)
  valid = jnp.arange(k)[None, :] < jnp.sum(loss_mask_bs, axis=-1)[:, None]
  return order, valid


def gathered_cross_entropy(hidden_bse: Float[Array, "B S E"], head_ev: Float[Array, "E V"],
                           target_ids_bs: Int[Array, "B S"], loss_mask_bs: Bool[Array, "B S"], *,
                           max_tokens: int) -> Float[Array, ""]:
  """CE sum over each example's first `max_tokens` loss positions (exact iff none has more)."""
  return jnp.sum(_gathered_token_ce(hidden_bse, head_ev, target_ids_bs, loss_mask_bs, max_tokens))


def _gathered_token_ce(hidden_bse, head_ev, target_ids_bs, loss_mask_bs, max_tokens: int) -> Float[Array, "B K"]:
  """CE of each example's first `max_tokens` loss positions; 0 at padding slots."""
  idx_bk, valid_bk = answer_positions(loss_mask_bs, max_tokens)
  hidden_bke = jnp.take_along_axis(hidden_bse, idx_bk[..., None], axis=1)
  target_bk = jnp.take_along_axis(target_ids_bs.astype(jnp.int32), idx_bk, axis=1)
  return jnp.where(valid_bk, _token_ce(head_logits(hidden_bke, head_ev), target_bk), 0.0)


def chunked_cross_entropy(hidden_bse: Float[Array, "B S E"], head_ev: Float[Array, "E V"],
                          target_ids_bs: Int[Array, "B S"], loss_mask_bs: Bool[Array, "B S"], *,
                          chunk: int) -> Float[Array, ""]:
  """CE sum over every loss position, `chunk` positions at a time (logits [B, chunk, V] per step).

  No padding copy of the hidden states: the last chunk starts at S - chunk and skips the positions
  an earlier chunk already counted.
  """
  b, s, _ = hidden_bse.shape
  chunk = min(chunk, s)
  num_chunks = -(-s // chunk)
  target_ids_bs = target_ids_bs.astype(jnp.int32)

  @jax.checkpoint
  def one(head, i):
    start = jnp.minimum(i * chunk, s - chunk)
    h = jax.lax.dynamic_slice_in_dim(hidden_bse, start, chunk, axis=1)
    t = jax.lax.dynamic_slice_in_dim(target_ids_bs, start, chunk, axis=1)
    m = jax.lax.dynamic_slice_in_dim(loss_mask_bs, start, chunk, axis=1)
    fresh = (start + jnp.arange(chunk)) >= i * chunk
    return _ce_sum(head_logits(h, head), t, m & fresh[None, :])

  def body(total, i):
    return total + one(head_ev, i), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(num_chunks, dtype=jnp.int32))
  return total


def example_cross_entropy(hidden_bse: Float[Array, "B S E"], head_ev: Float[Array, "E V"],
                          target_ids_bs: Int[Array, "B S"], loss_mask_bs: Bool[Array, "B S"], *,
                          max_tokens: int) -> Float[Array, "B"]:
  """Mean CE per answer token of each example over its first `max_tokens` loss positions (0 for an
  example without any): the per-video reward of `train.policy_gradient`. Example-packed rows (several
  examples per row) get one value per row."""
  total_b = jnp.sum(_gathered_token_ce(hidden_bse, head_ev, target_ids_bs, loss_mask_bs, max_tokens), axis=-1)
  count_b = jnp.minimum(jnp.sum(loss_mask_bs, axis=-1), min(max_tokens, loss_mask_bs.shape[1]))
  return total_b / jnp.maximum(count_b, 1).astype(jnp.float32)


def answer_cross_entropy(hidden_bse: Float[Array, "B S E"], head_ev: Float[Array, "E V"],
                         target_ids_bs: Int[Array, "B S"], loss_mask_bs: Bool[Array, "B S"], *,
                         max_tokens: int) -> tuple[Float[Array, ""], Any]:
  """(CE sum over all loss positions, fell_back): gathered when every example has <= `max_tokens`
  loss positions, else chunked over the whole sequence (module docstring). fell_back: float32 1.0
  if the chunked branch ran."""
  s = hidden_bse.shape[1]
  if max_tokens >= s:   # every position fits: nothing to fall back to
    return gathered_cross_entropy(hidden_bse, head_ev, target_ids_bs, loss_mask_bs,
                                  max_tokens=s), jnp.zeros((), jnp.float32)
  fits = jnp.all(jnp.sum(loss_mask_bs, axis=-1) <= max_tokens)
  gathered = lambda *a: gathered_cross_entropy(*a, max_tokens=max_tokens)   # noqa: E731
  chunked = jax.checkpoint(lambda *a: chunked_cross_entropy(*a, chunk=max_tokens))
  ce = jax.lax.cond(fits, gathered, chunked, hidden_bse, head_ev, target_ids_bs, loss_mask_bs)
  return ce, jnp.logical_not(fits).astype(jnp.float32)

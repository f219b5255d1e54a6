"""KV-cache prefill and decoding of the Molmo2 decoder on an already-built (pruned) input sequence.

Layout. The prefill sequence is the pruned, compacted prompt `[B, S']`: each row's real tokens come
first (right padding, `token_mask` False), with its own positions `0..n_b-1`. The static cache has
`S' + N` slots (N = max_new_tokens). The prefill writes slots `[0, S')`; generated token t of every
row goes to slot `S' + t` (one scalar cache index for the whole batch) with position `n_b + t`
(per row). Padding slots between a row's last prompt token and `S'` are invalid cache entries:
no query ever attends to them, and RoPE only sees true positions, so each row computes exactly
what it would compute alone and unpadded. Different prompt lengths and different keep patterns
in one batch therefore need no re-alignment.

Sampling: `temperature == 0` is greedy (argmax); otherwise categorical over `logits / temperature`
with the key `fold_in(rng, t)` at step t, restricted to the nucleus when `top_p < 1` (the smallest
set of most likely tokens whose probability reaches `top_p`; the most likely token always stays).
A row stops after emitting one of `stop_ids`; later slots hold `pad_id`. The loop
(`lax.while_loop`) ends after N tokens or when every row stopped.
"""

from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from stts_jax.models import llm as llm_lib


@struct.dataclass
class LLMInputs:
  """What the decoder sees at prefill: the pruned prompt, right-padded to the static S'."""
  embeds_bse: Float[Array, "B S E"]
  positions_bs: Int[Array, "B S"]
  token_mask_bs: Bool[Array, "B S"]
  vision_mask_bs: Bool[Array, "B S"]


@struct.dataclass
class Prefill:
  """State after the prompt. `cache` has S' + N slots; `prefill_len` = S' (static)."""
  cache: Any
  logits_bv: Float[Array, "B V"]          # next-token logits after each row's last prompt token
  next_pos_b: Int[Array, "B"]             # position of each row's first generated token
  prompt_len_b: Int[Array, "B"]           # real tokens in each row's pruned prompt
  prefill_len: int = struct.field(pytree_node=False, default=0)


@struct.dataclass
class Generation:
  """tokens_bn: generated ids (the stop token included, `pad_id` after it);
  num_tokens_b: tokens before the stop token (N if none); stopped_b: a stop token was emitted;
  logits_bnv: the distribution each token was drawn from (only with `return_logits`)."""
  tokens_bn: Int[Array, "B N"]
  num_tokens_b: Int[Array, "B"]
  stopped_b: Bool[Array, "B"]
  logits_bnv: Optional[Float[Array, "B N V"]] = None


def last_token_index(token_mask_bs: Bool[Array, "B S"]) -> Int[Array, "B"]:
  """Index of each row's last real token (0 for an empty row)."""
  s = token_mask_bs.shape[1]
  idx = jnp.where(token_mask_bs, jnp.arange(s, dtype=jnp.int32)[None], -1)
  return jnp.maximum(jnp.max(idx, axis=1), 0)


def prefill(llm: llm_lib.Decoder, inputs: LLMInputs, max_new_tokens: int) -> Prefill:
  """Runs the prompt through the decoder into a fresh cache of `S' + max_new_tokens` slots."""
  if max_new_tokens < 1:
    raise ValueError(f"prefill: max_new_tokens must be >= 1, got {max_new_tokens}")
  b, s, _ = inputs.embeds_bse.shape
  cache = llm.init_cache(b, s + max_new_tokens)
  hidden_bse, cache = llm(inputs.embeds_bse, inputs.positions_bs, inputs.token_mask_bs, inputs.vision_mask_bs,
                          cache=cache, cache_index=0)
  last_b = last_token_index(inputs.token_mask_bs)
  hidden_b1e = jnp.take_along_axis(hidden_bse, last_b[:, None, None], axis=1)
  logits_bv = llm.logits(hidden_b1e)[:, 0].astype(jnp.float32)
  last_pos_b = jnp.take_along_axis(inputs.positions_bs, last_b[:, None], axis=1)[:, 0]
  return Prefill(cache=cache, logits_bv=logits_bv, next_pos_b=(last_pos_b + 1).astype(jnp.int32),
                 prompt_len_b=jnp.sum(inputs.token_mask_bs, axis=1, dtype=jnp.int32), prefill_len=s)


def sample(logits_bv: Float[Array, "B V"], rng: jax.Array, temperature: float,
           top_p: float = 1.0) -> Int[Array, "B"]:
  """Greedy (temperature 0) or temperature sampling, optionally from the top-p nucleus."""
  if temperature == 0.0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  scaled_bv = logits_bv.astype(jnp.float32) / temperature
  if top_p < 1.0:
    sorted_bv = jnp.sort(scaled_bv, axis=-1)[:, ::-1]
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv        # mass of strictly more likely tokens
    kept_b = jnp.sum(before_bv < top_p, axis=-1)                # >= 1: the top token always stays
    cutoff_b1 = jnp.take_along_axis(sorted_bv, (kept_b - 1)[:, None], axis=-1)
    scaled_bv = jnp.where(scaled_bv >= cutoff_b1, scaled_bv, -jnp.inf)
  return jax.random.categorical(rng, scaled_bv, axis=-1).astype(jnp.int32)


def decode(llm: llm_lib.Decoder, state: Prefill, *, max_new_tokens: int, stop_ids: Sequence[int], pad_id: int,
           temperature: float = 0.0, rng: Optional[jax.Array] = None, active_b: Optional[Bool[Array, "B"]] = None,
           return_logits: bool = False, top_p: float = 1.0) -> Generation:
  """Generates up to `max_new_tokens` tokens per row from `state` (see the module docstring).

  active_b: rows to generate for (e.g. the batch's `valid`); inactive rows emit only `pad_id`.
  """
  n = max_new_tokens
  b, v = state.logits_bv.shape
  if state.cache.max_len < state.prefill_len + n - 1:
    raise ValueError(f"decode: cache of {state.cache.max_len} slots cannot hold {state.prefill_len} + {n} tokens")
  if temperature < 0:
    raise ValueError(f"decode: temperature must be >= 0, got {temperature}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"decode: top_p must be in (0, 1], got {top_p}")
  rng = jax.random.key(0) if rng is None else rng
  stop = jnp.asarray(tuple(stop_ids) or (-1,), jnp.int32)
  active_b = jnp.ones((b,), bool) if active_b is None else active_b

  def emit(t, logits_bv, carry):
    tokens_bn, logits_bnv, done_b, num_b = carry
    tok_b = sample(logits_bv, jax.random.fold_in(rng, t), temperature, top_p)
    tok_b = jnp.where(done_b, pad_id, tok_b)
    is_stop_b = jnp.isin(tok_b, stop) & ~done_b
    tokens_bn = jax.lax.dynamic_update_slice_in_dim(tokens_bn, tok_b[:, None], t, axis=1)
    if logits_bnv is not None:
      logits_bnv = jax.lax.dynamic_update_slice_in_dim(logits_bnv, logits_bv[:, None], t, axis=1)
    num_b = num_b + (~done_b & ~is_stop_b).astype(jnp.int32)
    return tok_b, (tokens_bn, logits_bnv, done_b | is_stop_b, num_b)

  logits0 = jnp.zeros((b, n, v), jnp.float32) if return_logits else None
  init = (jnp.full((b, n), pad_id, jnp.int32), logits0, ~active_b, jnp.zeros((b,), jnp.int32))
  tok_b, outs = emit(0, state.logits_bv, init)
  ones_b1 = jnp.ones((b, 1), bool)
  # NNX variables cannot cross trace levels: the decoder's state rides in the loop carry (unchanged)
  # and the module is rebuilt from it inside the body.
  graphdef, llm_state = nnx.split(llm)

  def cond(carry):
    t, _, _, outs, _ = carry
    return (t < n) & ~jnp.all(outs[2])

  def body(carry):
    t, cache, tok_b, outs, params = carry
    llm = nnx.merge(graphdef, params)
    embeds_b1e = llm.embed(tok_b[:, None])
    positions_b1 = (state.next_pos_b + t - 1)[:, None]
    hidden_b1e, cache = llm(embeds_b1e, positions_b1, ones_b1, ~ones_b1, cache=cache,
                            cache_index=state.prefill_len + t - 1)
    logits_bv = llm.logits(hidden_b1e)[:, 0].astype(jnp.float32)
    tok_b, outs = emit(t, logits_bv, outs)
    return t + 1, cache, tok_b, outs, params

  _, _, _, (tokens_bn, logits_bnv, done_b, num_b), _ = jax.lax.while_loop(
      cond, body, (jnp.asarray(1, jnp.int32), state.cache, tok_b, outs, llm_state))
  # Active rows only become done by emitting a stop token.
  return Generation(tokens_bn=tokens_bn, num_tokens_b=num_b, stopped_b=done_b & active_b, logits_bnv=logits_bnv)


def option_logprobs(logits_bv: Float[Array, "B V"], option_ids_bk: Int[Array, "B K"]) -> Float[Array, "B K"]:
  """log p(option letter | prompt) for each option; -inf where `option_ids` is -1 (no option)."""
  logp_bv = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
  got = jnp.take_along_axis(logp_bv, jnp.clip(option_ids_bk, 0, logits_bv.shape[-1] - 1), axis=1)
  return jnp.where(option_ids_bk >= 0, got, -jnp.inf)


__all__ = ["Generation", "LLMInputs", "Prefill", "decode", "last_token_index", "option_logprobs", "prefill",
           "sample"]

"""Qwen3-style decoder of Molmo2 (GQA, rotate-half RoPE, q/k RMSNorm, SwiGLU) with a static KV cache.

Numerics follow transformers' `Molmo2TextModel`: RMSNorm in float32 (`x * rsqrt(mean(x^2) + eps)`,
cast back, times a plain weight), q/k norm per head (`qwen3`) or over the whole projection (`olmo`)
before RoPE, softmax in float32, `norm_after` (OLMo-style: the norm is applied to each sublayer's
output before the residual add). The embedding table has `vocab_size + additional_vocab_size` rows;
the untied `lm_head` scores only the first `vocab_size`.

Attention rule (prefill and decode alike; `models/attention.py`): query i may see key j iff
  (j is at or before i in the sequence/cache  OR  both i and j are vision tokens)
  AND  i and j belong to the same example (`example_ids`; one per row unless packed)  AND  j is a real token.
The vision overlay reproduces HF's `mm_token_type_ids` block mask; at decode the caller passes
`vision_mask=False` for the new token, as HF drops the overlay on decode steps.

A padding query (token_mask False) sees no key and gets a zero attention output; HF computes
something there. Only padding positions differ. The implementation is `attention` (config
`model.attention`): the mask above is not expressible by segment ids alone, so `auto` runs the
`blockwise` kernel (or the `xla` reference for small calls).

`Decoder.__call__` returns the final-normed hidden states; `Decoder.logits(hidden)` applies `lm_head`.

Parameters (kernels are torch weights transposed; `layers.*` stacked on a leading L axis when scanned):
  embed_tokens.embedding [V + extra, E] ("vocab", "embed");  lm_head.kernel [E, V] ("embed", "vocab")
  layers.input_layernorm.scale / post_attention_layernorm.scale [E];  norm.scale [E]
  layers.self_attn.q_proj.kernel [E, N*H] ("embed", "q_heads"), k_proj/v_proj [E, K*H] ("embed", "kv_heads"),
    biases iff attention_bias; o_proj.kernel [N*H, E] (never a bias)
  layers.self_attn.q_norm.scale / k_norm.scale: [H] (qwen3, per head) or [N*H] / [K*H] (olmo)
  layers.mlp.{gate,up}_proj.kernel [E, F] ("embed", "mlp"), down_proj.kernel [F, E]
"""

from typing import Any, Optional, Union

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from stts_jax import config as config_lib
from stts_jax.models import attention as attention_lib
from stts_jax.models import layers
from stts_jax.models import partitioning
from stts_jax.models import rope

_INIT = nnx.initializers.normal(0.02)
_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@flax.struct.dataclass
class KVCache:
  """Static-size decoder cache. k/v: `[L, B, T, K, H]`; `valid`/`vision`: `[B, T]` bool per slot
  (slot filled by a real token / by a vision token). Fields are typed `Any` because jax rebuilds the
  pytree with placeholder leaves (the runtime type checker would reject them)."""
  k: Any
  v: Any
  valid: Any
  vision: Any

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


def prefill_mask(token_mask_bs: Bool[Array, "B S"], vision_mask_bs: Bool[Array, "B S"]) -> Bool[Array, "B S S"]:
  """The dense prefill mask (tests): (causal OR both vision) AND same example AND both real tokens."""
  return attention_lib.llm_mask(token_mask_bs, vision_mask_bs).dense()


class Attention(nnx.Module):
  """Self-attention with q/k RMSNorm before RoPE; o_proj never has a bias."""

  def __init__(self, cfg: config_lib.LLMConfig, *, dtype, param_dtype, attention: str = "xla",
               attention_block: int = attention_lib.DEFAULT_BLOCK, rngs: nnx.Rngs):
    e, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
    self.impl, self.block = attention, attention_block
    self.qk_norm_type = cfg.qk_norm_type
    kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=_INIT, rngs=rngs)
    bias = cfg.attention_bias
    self.q_proj = layers.Linear(e, n * h, names=("embed", "q_heads"), use_bias=bias, **kw)
    self.k_proj = layers.Linear(e, k * h, names=("embed", "kv_heads"), use_bias=bias, **kw)
    self.v_proj = layers.Linear(e, k * h, names=("embed", "kv_heads"), use_bias=bias, **kw)
    self.o_proj = layers.Linear(n * h, e, names=("q_heads", "embed"), use_bias=False, **kw)
    per_head = cfg.qk_norm_type == "qwen3"
    kw = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_norm = layers.RMSNorm(h if per_head else n * h, **kw)
    self.k_norm = layers.RMSNorm(h if per_head else k * h, **kw)

  def project_qkv(self, x_bse, cos_bsh, sin_bsh):
    """-> q `[B, S, N, H]`, k/v `[B, S, K, H]` with norms and RoPE applied to q and k."""
    b, s, _ = x_bse.shape
    q, k, v = self.q_proj(x_bse), self.k_proj(x_bse), self.v_proj(x_bse)
    if self.qk_norm_type == "olmo":
      q, k = self.q_norm(q), self.k_norm(k)
    q = q.reshape(b, s, self.num_heads, self.head_dim)
    k = k.reshape(b, s, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, s, self.num_kv_heads, self.head_dim)
    if self.qk_norm_type == "qwen3":
      q, k = self.q_norm(q), self.k_norm(k)
    q = partitioning.constrain(rope.apply_rope(q, cos_bsh, sin_bsh), ("act_batch", "act_seq", "act_heads", None))
    k = rope.apply_rope(k, cos_bsh, sin_bsh)
    return q, k, v

  def __call__(self, x_bse, cos_bsh, sin_bsh, mask: attention_lib.AttentionMask, kv_cache=None,
               cache_index=None):
    q, k, v = self.project_qkv(x_bse, cos_bsh, sin_bsh)
    if kv_cache is not None:
      k_cache, v_cache = kv_cache
      k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), cache_index, axis=1)
    out = attention_lib.attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, scale=self.head_dim ** -0.5,
                                  impl=self.impl, block_q=self.block, block_k=self.block)
    b, s = x_bse.shape[:2]
    return self.o_proj(out.reshape(b, s, -1)), (k, v)


class DecoderLayer(nnx.Module):
  """Pre-norm (or `norm_after`) attention + SwiGLU block."""

  def __init__(self, cfg: config_lib.LLMConfig, *, dtype, param_dtype, attention: str = "xla",
               attention_block: int = attention_lib.DEFAULT_BLOCK, rngs: nnx.Rngs):
    self.norm_after = cfg.norm_after
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.self_attn = Attention(cfg, attention=attention, attention_block=attention_block, **kw)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.mlp = layers.SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size, in_name="embed",
                             hidden_name="mlp", out_name="embed", **kw)

  def __call__(self, h_bse, rope_tables, use_scaled, allowed_bst, kv_cache=None, cache_index=None):
    cos_s, sin_s, cos_u, sin_u = rope_tables
    cos = jnp.where(use_scaled, cos_s, cos_u)
    sin = jnp.where(use_scaled, sin_s, sin_u)
    x = h_bse if self.norm_after else self.input_layernorm(h_bse)
    x, new_kv = self.self_attn(x, cos, sin, allowed_bst, kv_cache, cache_index)
    h_bse = h_bse + (self.input_layernorm(x) if self.norm_after else x)
    x = self.mlp(h_bse if self.norm_after else self.post_attention_layernorm(h_bse))
    h_bse = h_bse + (self.post_attention_layernorm(x) if self.norm_after else x)
    h_bse = partitioning.constrain(h_bse, ("act_batch", "act_seq", "act_embed"))
    return h_bse, new_kv


def _maybe_remat(fn, remat: str):
  if remat == "none":
    return fn
  return nnx.remat(fn, policy=_REMAT_POLICIES[remat])


class Decoder(nnx.Module):
  """Molmo2 text model plus `lm_head`. Layers are `nnx.vmap`-stacked and run with `nnx.scan`
  (`scan_layers=True`) or kept as a list; both give identical results."""

  def __init__(self, cfg: config_lib.LLMConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               scan_layers: bool = True, remat: str = "none", attention: str = "xla",
               attention_block: int = attention_lib.DEFAULT_BLOCK, rngs: nnx.Rngs):
    cfg.validate()
    if remat not in ("none", *_REMAT_POLICIES):
      raise ValueError(f"Decoder: remat must be none|full|dots, got {remat!r}")
    self.cfg = cfg
    self.dtype = dtype
    self.scan_layers = scan_layers
    self.remat = remat
    self.embed_tokens = nnx.Embed(cfg.embed_rows, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                  embedding_init=partitioning.with_names(_INIT, ("vocab", "embed")), rngs=rngs)

    def make_layer(r):
      return DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, attention=attention,
                          attention_block=attention_block, rngs=r)

    if scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_stack(r):
        return make_layer(r)
      self.layers = make_stack(rngs)
    else:
      self.layers = nnx.List([make_layer(rngs) for _ in range(cfg.num_layers)])
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
    self.lm_head = layers.Linear(cfg.hidden_size, cfg.vocab_size, names=("embed", "vocab"), use_bias=False,
                                 dtype=dtype, param_dtype=param_dtype, kernel_init=_INIT, rngs=rngs)

  def embed(self, input_ids_bs: Int[Array, "B S"]) -> Float[Array, "B S E"]:
    """Token embeddings (ids may be in the additional-vocab block); `nnx.Embed`'s numerics.

    Sharded (under activation rules), the lookup runs on the table resharded to its embedding
    width, [V, E/fsdp], with the ids of the whole batch: every device gathers its width slice for all
    tokens and the result goes back to batch-sharded rows. On the stored [V/fsdp, E] layout SPMD
    all-gathered the float32 table for the lookup and scatter-added its gradient into a full
    [V, E] float32 buffer on every device (1.45 GiB at Molmo2-4B).
    """
    emb = self.embed_tokens
    table = partitioning.constrain(emb.embedding[...], (None, "embed"))
    if emb.dtype is not None:
      table = table.astype(emb.dtype)
    lead = (None,) * input_ids_bs.ndim
    ids = partitioning.constrain(input_ids_bs, lead)
    out = partitioning.constrain(jnp.take(table, ids, axis=0), lead + ("embed",))
    return partitioning.constrain(out, ("act_batch",) + lead[1:] + (None,))

  def logits(self, hidden_bse: Float[Array, "B S E"]) -> Float[Array, "B S V"]:
    """lm_head over the base vocabulary (`vocab_size` columns)."""
    return self.lm_head(hidden_bse)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """Empty cache: zeros, every slot invalid."""
    cfg = self.cfg
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or self.dtype
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, max_len), bool), vision=jnp.zeros((batch, max_len), bool))

  def _rope_tables(self, positions_bs):
    """(cos, sin) of the scaled and of the unscaled RoPE, each `[B, S, H]`."""
    cfg = self.cfg
    inv_s, factor_s = rope.inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    inv_u, _ = rope.inv_frequencies(cfg.head_dim, cfg.rope_theta, None)
    cos_s, sin_s = rope.rope_tables(positions_bs, inv_s, factor_s)
    cos_u, sin_u = rope.rope_tables(positions_bs, inv_u, 1.0)
    return cos_s, sin_s, cos_u, sin_u

  def __call__(self, embeds_bse: Float[Array, "B S E"], positions_bs: Int[Array, "B S"],
               token_mask_bs: Bool[Array, "B S"], vision_mask_bs: Bool[Array, "B S"], *,
               cache: Optional[KVCache] = None, cache_index: Union[int, Int[Array, ""], None] = None,
               example_ids_bs: Optional[Int[Array, "B S"]] = None
               ) -> tuple[Float[Array, "B S E"], Optional[KVCache]]:
    """Runs the decoder on input embeddings.

    Without `cache`: attention over the S given tokens; returns (hidden `[B, S, E]`, None).
    With `cache` (from `init_cache`) and `cache_index` (int32 scalar, first slot to write): the S new
    keys/values are written at slots `[cache_index, cache_index + S)`, queries attend to every valid
    filled slot up to their own (plus vision slots, if the query is vision); returns (hidden, new cache).
    example_ids_bs: example of each token of a packed sequence (prefill without cache only; default one
    example per row).
    """
    h = partitioning.constrain(embeds_bse.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))
    tables = self._rope_tables(positions_bs)
    use_scaled = jnp.asarray(rope.layer_uses_scaled_rope(self.cfg))
    if cache is None:
      allowed = attention_lib.llm_mask(token_mask_bs, vision_mask_bs, example_ids_bs)
      kv = None
      new_cache = None
    else:
      if cache_index is None:
        raise ValueError("Decoder: `cache_index` is required with `cache`")
      cache_index = jnp.asarray(cache_index, jnp.int32)
      valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, token_mask_bs, cache_index, axis=1)
      vision = jax.lax.dynamic_update_slice_in_dim(cache.vision, vision_mask_bs, cache_index, axis=1)
      if example_ids_bs is not None:
        raise ValueError("Decoder: example_ids_bs (packed sequences) is for prefill without a cache")
      allowed = attention_lib.decode_mask(token_mask_bs, vision_mask_bs, cache_index, valid, vision)
      kv = (cache.k, cache.v)
      new_cache = KVCache(k=cache.k, v=cache.v, valid=valid, vision=vision)

    def run_layer(layer, h, scaled, kv_l):
      return layer(h, tables, scaled, allowed, kv_l, cache_index)

    run_layer = _maybe_remat(run_layer, self.remat)
    if self.scan_layers:
      @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0),
                transform_metadata={nnx.PARTITION_NAME: "layers"})
      def scan_fn(h, layer, scaled, kv_l):
        h, new_kv = run_layer(layer, h, scaled, kv_l)
        return h, (new_kv if kv_l is not None else None)
      h, new_kv = scan_fn(h, self.layers, use_scaled, kv)
    else:
      new_k, new_v = [], []
      for i, layer in enumerate(self.layers):
        kv_l = None if kv is None else (kv[0][i], kv[1][i])
        h, (k_l, v_l) = run_layer(layer, h, use_scaled[i], kv_l)
        new_k.append(k_l)
        new_v.append(v_l)
      new_kv = None if kv is None else (jnp.stack(new_k), jnp.stack(new_v))
    if new_cache is not None:
      new_cache = new_cache.replace(k=new_kv[0], v=new_kv[1])
    return self.norm(h), new_cache

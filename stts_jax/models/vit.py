"""Molmo2 vision tower (SigLIP-so400m style) in Flax NNX, with per-range block execution.

Parameter layout (names match the HF checkpoint modules; kernels are torch weights transposed):
  patch_embedding.kernel     [I, D]  ("patch_in", "vit_embed"); I = 14*14*3 = 588 flattened in
                                      (pixel_row, pixel_col, channel) order, channel fastest
  patch_embedding.bias       [D]     ("vit_embed",)
  positional_embedding       [P, D]  ("vit_pos", "vit_embed"); added to the embedded patches
  blocks.*  one pre-LN encoder block, stacked on a leading `L` axis ("layers") when scan_layers:
    layer_norm1.{scale,bias}             [D]      ("norm",)
    self_attn.q_proj.kernel              [D, N*H] ("vit_embed", "vit_heads"); bias [N*H] ("vit_heads",)
    self_attn.{k,v}_proj.kernel          [D, K*H] ("vit_embed", "vit_heads"); bias [K*H] ("vit_heads",)
    self_attn.o_proj.kernel              [N*H, D] ("vit_heads", "vit_embed"); bias [D] ("vit_embed",)
    layer_norm2.{scale,bias}             [D]      ("norm",)
    mlp.fc1.kernel [D, F] ("vit_embed", "vit_mlp"), bias [F] ("vit_mlp",)
    mlp.fc2.kernel [F, D] ("vit_mlp", "vit_embed"), bias [D] ("vit_embed",)
  K kv heads (default N) serve N/K query heads each (transformers' `repeat_kv`); N*H need not be D.
  No final norm. Block l maps the output of block l-1 (or the embeddings for l = 0) to its output;
  HF `hidden_states[l + 1]` is the output of block l.
"""

from collections.abc import Sequence
from typing import Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from stts_jax.config import ViTConfig
from stts_jax.models import attention as attention_lib
from stts_jax.models import layers
from stts_jax.models import partitioning

_ACT_NAMES = ("act_batch", "act_patches", "act_vit_embed")
REMAT_POLICIES = ("none", "full", "dots")


class ViTMLP(nnx.Module):
  """fc1 -> GELU (tanh approximation) -> fc2, both with bias."""

  def __init__(self, cfg: ViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = layers.Linear(cfg.hidden_size, cfg.intermediate_size, names=("vit_embed", "vit_mlp"), **kw)
    self.fc2 = layers.Linear(cfg.intermediate_size, cfg.hidden_size, names=("vit_mlp", "vit_embed"), **kw)

  def __call__(self, x: Float[Array, "*batch D"]) -> Float[Array, "*batch D"]:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class VisionAttention(nnx.Module):
  """transformers' `Molmo2VisionAttention` (ViT self-attention and the adapter's pooling attention).

  q_proj `[C, N*H]`, k_proj/v_proj `[C, K*H]` named `(in_name, heads_name)`, o_proj `[N*H, out]` named
  `(heads_name, out_name)`; biases if `use_bias`. Query head n reads kv head n // (N/K) (`repeat_kv`),
  scale `head_dim ** -0.5`, no positional encoding. `impl`/`block` select the attention
  implementation for `AttentionMask` call sites (the ViT); dense masks (the adapter's few keys) always
  use the einsum reference.
  """

  def __init__(self, in_features: int, num_heads: int, head_dim: int, out_features: int, *,
               num_kv_heads: Optional[int] = None, in_name: Optional[str], heads_name: Optional[str],
               out_name: Optional[str], use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
               impl: str = "xla", block: int = attention_lib.DEFAULT_BLOCK, rngs: nnx.Rngs):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_kv_heads < 1 or num_heads % num_kv_heads:
      raise ValueError(f"VisionAttention: {num_heads} heads not a multiple of {num_kv_heads} kv heads")
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.impl = impl
    self.block = block
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    names = (in_name, heads_name)
    self.q_proj = layers.Linear(in_features, num_heads * head_dim, names=names, **kw)
    self.k_proj = layers.Linear(in_features, num_kv_heads * head_dim, names=names, **kw)
    self.v_proj = layers.Linear(in_features, num_kv_heads * head_dim, names=names, **kw)
    self.o_proj = layers.Linear(num_heads * head_dim, out_features, names=(heads_name, out_name), **kw)

  def __call__(self, x_bsc: Float[Array, "*batch Sq C"],
               kv_bsc: Optional[Float[Array, "*batch Sk C"]] = None, *,
               bias: Optional[Float[Array, "..."]] = None,
               mask: Union[Bool[Array, "..."], attention_lib.AttentionMask, None] = None
               ) -> Float[Array, "*batch Sq out"]:
    """Self-attention over `x` (or cross-attention to `kv`).

    With `mask` an `AttentionMask` (the ViT): `x` is `[B, S, C]`, `bias` a per-key bias `[B, S]`, and
    the configured implementation runs. Otherwise bias/mask are dense, broadcastable to
    `[*batch, N, Sq, Sk]` (`layers.dot_product_attention`).
    """
    kv_bsc = x_bsc if kv_bsc is None else kv_bsc
    q = self.q_proj(x_bsc).reshape(*x_bsc.shape[:-1], self.num_heads, self.head_dim)
    k = self.k_proj(kv_bsc).reshape(*kv_bsc.shape[:-1], self.num_kv_heads, self.head_dim)
    v = self.v_proj(kv_bsc).reshape(*kv_bsc.shape[:-1], self.num_kv_heads, self.head_dim)
    scale = self.head_dim ** -0.5
    if isinstance(mask, attention_lib.AttentionMask):
      out = attention_lib.attention(q, k, v, mask, scale=scale, key_bias=bias, impl=self.impl,
                                    block_q=self.block, block_k=self.block)
    else:
      out = layers.dot_product_attention(q, k, v, scale=scale, bias=bias, mask=mask)
    return self.o_proj(out.reshape(*out.shape[:-2], -1))


class ViTBlock(nnx.Module):
  """Pre-LN encoder block: `h += o(attn(LN1 h))`, then `h += fc2(gelu(fc1(LN2 h)))`."""

  def __init__(self, cfg: ViTConfig, *, dtype, param_dtype, attention: str = "xla",
               attention_block: int = attention_lib.DEFAULT_BLOCK, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm1 = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
    self.self_attn = VisionAttention(
        cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.hidden_size, num_kv_heads=cfg.kv_heads,
        in_name="vit_embed", heads_name="vit_heads", out_name="vit_embed", use_bias=True, impl=attention,
        block=attention_block, **kw)
    self.layer_norm2 = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
    self.mlp = ViTMLP(cfg, **kw)

  def __call__(self, x_npd: Float[Array, "N P D"], bias: Optional[Float[Array, "N P"]],
               mask: attention_lib.AttentionMask) -> Float[Array, "N P D"]:
    x_npd = x_npd + self.self_attn(self.layer_norm1(x_npd), bias=bias, mask=mask).astype(x_npd.dtype)
    x_npd = x_npd + self.mlp(self.layer_norm2(x_npd)).astype(x_npd.dtype)
    return partitioning.constrain(x_npd, _ACT_NAMES)


def _remat(fn, remat: str, *, prevent_cse: bool):
  if remat == "none":
    return fn
  policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots" else None
  return jax.checkpoint(fn, policy=policy, prevent_cse=prevent_cse)


def _scan_blocks(graphdef, state, hidden, bias, mask, lo, *, length: int, remat: str):
  """Blocks lo..lo+length-1 of a stacked block state as one `lax.scan` over the sliced params."""
  if isinstance(lo, int):
    state = jax.tree.map(lambda a: jax.lax.slice_in_dim(a, lo, lo + length, axis=0), state)
  else:
    state = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, lo, length, axis=0), state)

  def body(x, layer_state):
    return nnx.merge(graphdef, layer_state)(x, bias, mask), None

  hidden, _ = jax.lax.scan(_remat(body, remat, prevent_cse=False), hidden, state)
  return hidden


# Eager calls (notebooks, tests) go through this cached jit: only the structure is static and `lo`
# is traced, so every range of the same length shares one compilation. Under an outer trace the
# plain function is used (static slices, nothing nested).
_scan_blocks_eager = jax.jit(_scan_blocks, static_argnames=("graphdef", "length", "remat"))


def attention_inputs(
    key_bias: Optional[Float[Array, "N P"]], segment_ids: Optional[Int[Array, "N P"]], shape: tuple[int, int],
) -> tuple[Optional[Float[Array, "N P"]], attention_lib.AttentionMask]:
  """Per-key bias (float32) and the call site's mask: packed rows (`segment_ids`: q sees k iff ids are
  equal and id[k] >= 0) or whole frames (`segment_ids` None) for `shape` = (N, P)."""
  bias = None if key_bias is None else key_bias.astype(jnp.float32)
  if segment_ids is None:
    return bias, attention_lib.vit_frames_mask(*shape)
  return bias, attention_lib.vit_rows_mask(segment_ids)


class VisionTransformer(nnx.Module):
  """The Molmo2 ViT; see the module docstring for the parameter layout.

  Args:
    cfg: sizes. `num_layers` (default `cfg.num_layers`) blocks are built; the VLM passes
      `max(adapter.vit_layers) + 1` so trailing checkpoint blocks are never built or run.
    dtype: compute dtype; param_dtype: storage dtype.
    attention: implementation name (`models/attention.py`); attention_block: its block length.
    scan_layers: stack the blocks (leading "layers" axis) and run ranges with `lax.scan`;
      otherwise an `nnx.List` of blocks run in a Python loop. Same numbers either way.
    remat: "none" | "full" | "dots" (`jax.checkpoint`, policy dots_with_no_batch_dims_saveable).
  """

  def __init__(self, cfg: ViTConfig, *, num_layers: Optional[int] = None, dtype=jnp.float32,
               param_dtype=jnp.float32, scan_layers: bool = True, remat: str = "none",
               attention: str = "xla", attention_block: int = attention_lib.DEFAULT_BLOCK,
               rngs: nnx.Rngs):
    cfg.validate()
    num_layers = cfg.num_layers if num_layers is None else num_layers
    if not 1 <= num_layers <= cfg.num_layers:
      raise ValueError(f"VisionTransformer: num_layers={num_layers} outside [1, {cfg.num_layers}]")
    if remat not in REMAT_POLICIES:
      raise ValueError(f"VisionTransformer: remat must be one of {REMAT_POLICIES}, got {remat!r}")
    self.cfg = cfg
    self.num_layers = num_layers
    self.scan_layers = scan_layers
    self.remat = remat
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    block_kw = dict(kw, attention=attention, attention_block=attention_block)
    self.patch_embedding = layers.Linear(cfg.patch_dim, cfg.hidden_size, names=("patch_in", "vit_embed"),
                                         rngs=rngs, **kw)
    self.positional_embedding = nnx.Param(partitioning.with_names(
        nnx.initializers.normal(cfg.position_init_std), ("vit_pos", "vit_embed"))(
            rngs.params(), (cfg.num_patches, cfg.hidden_size), param_dtype))
    if scan_layers:
      @nnx.split_rngs(splits=num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_blocks(block_rngs: nnx.Rngs) -> ViTBlock:
        return ViTBlock(cfg, rngs=block_rngs, **block_kw)
      self.blocks = make_blocks(rngs)
    else:
      self.blocks = nnx.List([ViTBlock(cfg, rngs=rngs, **block_kw) for _ in range(num_layers)])

  def embed(self, patches: Float[Array, "N P I"]) -> Float[Array, "N P D"]:
    """Linear patch embedding plus the learned positional embedding: `[N, P, I] -> [N, P, D]`."""
    n, p, i = patches.shape
    if p != self.cfg.num_patches or i != self.cfg.patch_dim:
      raise ValueError(f"ViT.embed: patches [N, P, I] = {patches.shape}; expected P={self.cfg.num_patches} "
                       f"(one per positional embedding) and I={self.cfg.patch_dim}")
    hidden = self.patch_embedding(patches)
    hidden = hidden + self.positional_embedding[...].astype(hidden.dtype)[None]
    return partitioning.constrain(hidden, _ACT_NAMES)

  def run_blocks(
      self, hidden: Float[Array, "N P D"], start: int, stop: int, *, taps: Sequence[int] = (),
      key_bias: Optional[Float[Array, "N P"]] = None, segment_ids: Optional[Int[Array, "N P"]] = None,
  ) -> tuple[Float[Array, "N P D"], dict[int, Float[Array, "N P D"]]]:
    """Runs blocks `start .. stop-1` (static ints) on `hidden` `[N, P, D]`.

    Returns the output of block `stop-1` (the input if start == stop) and `{i: output of block i}`
    for every `i` in `taps` with `start <= i < stop`.
    key_bias `[N, P]`: additive attention bias per key (same for every head and query).
    segment_ids `[N, P]`: query q sees key k iff ids equal and id[k] >= 0 (packed frames; -1 empty);
      a query with no visible key gets a zero attention output (no NaN).
    The positions P need not equal cfg.num_patches here (packed rows).
    """
    if not 0 <= start <= stop <= self.num_layers:
      raise ValueError(f"ViT.run_blocks: need 0 <= start <= stop <= {self.num_layers}, got {start}, {stop}")
    bias, mask = attention_inputs(key_bias, segment_ids, hidden.shape[:2])
    hidden = hidden.astype(self.dtype)
    ends = sorted({t + 1 for t in taps if start <= t < stop} | {stop})
    outputs: dict[int, jax.Array] = {}
    lo = start
    for hi in ends:
      if hi > lo:
        hidden = self._run_range(hidden, lo, hi, bias, mask)
      if hi > start and hi - 1 in taps:
        outputs[hi - 1] = hidden
      lo = hi
    return hidden, outputs

  def _run_range(self, hidden, lo: int, hi: int, bias, mask):
    if self.scan_layers:
      graphdef, state = nnx.split(self.blocks)
      traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((hidden, state, bias, mask)))
      if traced:
        return _scan_blocks(graphdef, state, hidden, bias, mask, lo, length=hi - lo, remat=self.remat)
      return _scan_blocks_eager(graphdef, state, hidden, bias, mask, jnp.int32(lo), length=hi - lo,
                                remat=self.remat)
    for block in self.blocks[lo:hi]:
      graphdef, state = nnx.split(block)

      def apply(x, block_state, graphdef=graphdef):
        return nnx.merge(graphdef, block_state)(x, bias, mask)

      hidden = _remat(apply, self.remat, prevent_cse=True)(hidden, state)
    return hidden

  def __call__(self, patches: Float[Array, "N P I"], taps: Sequence[int]) -> dict[int, Float[Array, "N P D"]]:
    """Embeds, runs blocks 0..max(taps) and returns `{l: output of block l}` for l in taps."""
    taps = tuple(taps)
    if not taps:
      raise ValueError("ViT: at least one tap (block index) is required")
    if min(taps) < 0 or max(taps) >= self.num_layers:
      raise ValueError(f"ViT: taps {taps} outside the {self.num_layers} built blocks")
    _, outputs = self.run_blocks(self.embed(patches), 0, max(taps) + 1, taps=taps)
    return outputs

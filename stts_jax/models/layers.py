"""Small shared layers: Linear with logical axis names, LayerNorm, RMSNorm, SwiGLU, attention.

Conventions (all modules here):
  * Parameters are stored in `param_dtype` and cast to the compute `dtype` at use.
  * Every parameter carries logical axis names (`partitioning.with_names`); the caller picks them.
  * Linear kernels are `[in, out]` (the transpose of a torch `nn.Linear.weight`).
  * Norm statistics and attention softmax run in float32 whatever `dtype` is.
"""

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from stts_jax.models import attention as attention_lib
from stts_jax.models import partitioning

DType = Any
AxisName = Optional[str]

MASK_VALUE = attention_lib.MASK_VALUE

default_kernel_init = nnx.initializers.lecun_normal()


class Linear(nnx.Module):
  """`y = x @ kernel + bias`. kernel `[in, out]` named `names`, bias `[out]` named `(names[1],)`."""

  def __init__(self, in_features: int, out_features: int, *, names: tuple[AxisName, AxisName],
               use_bias: bool = True, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
               kernel_init=default_kernel_init, rngs: nnx.Rngs):
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    self.kernel = nnx.Param(partitioning.with_names(kernel_init, names)(
        rngs.params(), (in_features, out_features), param_dtype))
    if use_bias:
      self.bias = nnx.Param(partitioning.with_names(nnx.initializers.zeros_init(), (names[1],))(
          rngs.params(), (out_features,), param_dtype))
    else:
      self.bias = None

  def __call__(self, x: Float[Array, "*batch in"]) -> Float[Array, "*batch out"]:
    if x.shape[-1] != self.in_features:
      raise ValueError(f"Linear: input width {x.shape[-1]} != in_features {self.in_features}")
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis with `scale` and `bias` (torch `nn.LayerNorm` weight/bias)."""

  def __init__(self, num_features: int, *, eps: float = 1e-6, name: AxisName = "norm",
               dtype: DType = jnp.float32, param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    del rngs  # deterministic init
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(partitioning.with_names(nnx.initializers.ones_init(), (name,))(
        jax.random.key(0), (num_features,), param_dtype))
    self.bias = nnx.Param(partitioning.with_names(nnx.initializers.zeros_init(), (name,))(
        jax.random.key(0), (num_features,), param_dtype))

  def __call__(self, x: Float[Array, "*batch d"]) -> Float[Array, "*batch d"]:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centered = x32 - mean
    var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    y = centered * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """HF/Qwen RMSNorm: `cast(x * rsqrt(mean(x^2) + eps), dtype) * scale` (plain weight, not 1+w)."""

  def __init__(self, num_features: int, *, eps: float = 1e-6, name: AxisName = "norm",
               dtype: DType = jnp.float32, param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(partitioning.with_names(nnx.initializers.ones_init(), (name,))(
        jax.random.key(0), (num_features,), param_dtype))

  def __call__(self, x: Float[Array, "*batch d"]) -> Float[Array, "*batch d"]:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


class SwiGLU(nnx.Module):
  """`down_proj(silu(gate_proj(x)) * up_proj(x))`, no biases (Molmo2 projector and LLM MLP)."""

  def __init__(self, in_features: int, hidden_features: int, out_features: int, *,
               in_name: AxisName, hidden_name: AxisName, out_name: AxisName,
               dtype: DType = jnp.float32, param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = Linear(in_features, hidden_features, names=(in_name, hidden_name), **kw)
    self.up_proj = Linear(in_features, hidden_features, names=(in_name, hidden_name), **kw)
    self.down_proj = Linear(hidden_features, out_features, names=(hidden_name, out_name), **kw)

  def __call__(self, x: Float[Array, "*batch in"]) -> Float[Array, "*batch out"]:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


# The dense reference lives with the other implementations; kept here under its old name.
dot_product_attention = attention_lib.dense_attention


class Attention(nnx.Module):
  """Multi-head attention with q/k/v/o projections (Molmo2VisionAttention; kv heads = heads).

  q_proj/k_proj/v_proj: `[in_features, N*H]` named `(in_name, heads_name)`,
  o_proj: `[N*H, out_features]` named `(heads_name, out_name)`; biases if `use_bias`.
  Scale `head_dim ** -0.5`, no positional encoding.
  """

  def __init__(self, in_features: int, num_heads: int, head_dim: int, out_features: int, *,
               in_name: AxisName, heads_name: AxisName, out_name: AxisName, use_bias: bool = True,
               dtype: DType = jnp.float32, param_dtype: DType = jnp.float32, impl: str = "xla",
               block: int = attention_lib.DEFAULT_BLOCK, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.impl = impl
    self.block = block
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    inner = num_heads * head_dim
    self.q_proj = Linear(in_features, inner, names=(in_name, heads_name), **kw)
    self.k_proj = Linear(in_features, inner, names=(in_name, heads_name), **kw)
    self.v_proj = Linear(in_features, inner, names=(in_name, heads_name), **kw)
    self.o_proj = Linear(inner, out_features, names=(heads_name, out_name), **kw)

  def __call__(self, x_bsc: Float[Array, "*batch Sq C"],
               kv_bsc: Optional[Float[Array, "*batch Sk C"]] = None, *,
               bias: Optional[Float[Array, "..."]] = None,
               mask: Union[Bool[Array, "..."], attention_lib.AttentionMask, None] = None
               ) -> Float[Array, "*batch Sq out"]:
    """Self-attention over `x` (or cross-attention to `kv`).

    With `mask` an `AttentionMask` (ViT call sites): `x` is `[B, S, C]`, `bias` a per-key bias `[B, S]`,
    and the configured implementation (`impl`) runs. Otherwise (pooling over a few keys) bias/mask are
    dense as in `dot_product_attention`.
    """
    kv_bsc = x_bsc if kv_bsc is None else kv_bsc
    heads = (self.num_heads, self.head_dim)
    q = self.q_proj(x_bsc).reshape(*x_bsc.shape[:-1], *heads)
    k = self.k_proj(kv_bsc).reshape(*kv_bsc.shape[:-1], *heads)
    v = self.v_proj(kv_bsc).reshape(*kv_bsc.shape[:-1], *heads)
    scale = self.head_dim ** -0.5
    if isinstance(mask, attention_lib.AttentionMask):
      out = attention_lib.attention(q, k, v, mask, scale=scale, key_bias=bias, impl=self.impl,
                                    block_q=self.block, block_k=self.block)
    else:
      out = dot_product_attention(q, k, v, scale=scale, bias=bias, mask=mask)
    return self.o_proj(out.reshape(*out.shape[:-2], -1))

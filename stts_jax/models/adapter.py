"""Molmo2 vision->language adapter: attention pooling over patch windows + SwiGLU projector.

Parameter layout (HF `multi_modal_projector.*`; kernels are torch weights transposed):
  image_pooling_2d.q_proj.kernel       [C, N*H] ("adapter_in", "vit_heads"), bias [N*H] ("vit_heads",)
  image_pooling_2d.{k,v}_proj.kernel   [C, K*H] ("adapter_in", "vit_heads"), bias [K*H] ("vit_heads",)
  image_pooling_2d.o_proj.kernel       [N*H, D] ("vit_heads", "vit_embed"), bias [D] ("vit_embed",)
  image_projector.{gate,up}_proj.kernel [D, F] ("vit_embed", "mlp")      (no biases)
  image_projector.down_proj.kernel      [F, E] ("mlp", "embed")
C = len(vit_layers) * D (the concatenated ViT taps), D = ViT width, F = projector hidden,
E = LLM width; N heads of width H and K kv heads (`vit.VisionAttention`; N*H need not be D).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from stts_jax.config import AdapterConfig
from stts_jax.models import layers
from stts_jax.models import vit as vit_lib


def concat_taps(taps: dict[int, Array], vit_layers: Sequence[int]) -> Float[Array, "*batch C"]:
  """Concatenates ViT block outputs on the last axis in config order (release: [24, 18])."""
  missing = [layer for layer in vit_layers if layer not in taps]
  if missing:
    raise KeyError(f"concat_taps: ViT block outputs {missing} missing; have {sorted(taps)}")
  return jnp.concatenate([taps[layer] for layer in vit_layers], axis=-1)


class Adapter(nnx.Module):
  """Pools `[N, P, C]` patch features into `[Q, E]` LLM embeddings (see module docstring)."""

  def __init__(self, cfg: AdapterConfig, *, vit_hidden: int, text_hidden: int, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.in_features = len(cfg.vit_layers) * vit_hidden
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.image_pooling_2d = vit_lib.VisionAttention(
        self.in_features, cfg.num_heads, cfg.head_dim, vit_hidden, num_kv_heads=cfg.kv_heads,
        in_name="adapter_in", heads_name="vit_heads", out_name="vit_embed", use_bias=True, **kw)
    self.image_projector = layers.SwiGLU(
        vit_hidden, cfg.intermediate_size, text_hidden, in_name="vit_embed", hidden_name="mlp",
        out_name="embed", **kw)

  def pool(self, features: Float[Array, "N P C"], pool_idx: Int[Array, "Q K"]) -> Float[Array, "Q D"]:
    """One attention step per output token over the patches it pools.

    features: `[N, P, C]` concatenated ViT taps of every frame/crop in the batch.
    pool_idx: `[Q, K]` global indices into the flattened `[N*P]` patch table, -1 = padding.
    Query = mean of the valid slots (sum / max(count, 1)); keys/values = the gathered slots with
    invalid ones masked out. A row without any valid slot returns zeros. Indices >= N*P are an
    error when `pool_idx` is concrete (under jit they would be clamped; callers keep them in range).
    """
    n, p, c = features.shape
    if c != self.in_features:
      raise ValueError(f"Adapter.pool: feature width {c} != {self.in_features} (len(vit_layers) * vit_hidden)")
    if not isinstance(pool_idx, jax.core.Tracer):
      top = int(np.max(np.asarray(pool_idx), initial=-1))
      if top >= n * p:
        raise ValueError(f"Adapter.pool: pool_idx max {top} out of range for {n}x{p} patches")
    flat_sc = features.reshape(n * p, c).astype(self.dtype)
    valid_qk = pool_idx >= 0
    gathered_qkc = jnp.take(flat_sc, jnp.maximum(pool_idx, 0), axis=0, mode="clip")
    return self.pool_gathered(gathered_qkc, valid_qk)

  def pool_gathered(self, gathered_qkc: Float[Array, "Q K C"], valid_qk: Array) -> Float[Array, "Q D"]:
    """`pool` on already gathered slots `[Q, K, C]` (invalid slots any value; `valid_qk` [Q, K] bool).

    For callers that gather per example (`video_forward.pool_windows`: a batched gather keeps the
    batch axis sharded, where `pool`'s global indices into the whole batch's patch table make
    SPMD all-gather the features and the gradient of every example).
    """
    gathered_qkc = jnp.where(valid_qk[..., None], gathered_qkc.astype(self.dtype), 0).astype(self.dtype)
    count_q = jnp.maximum(valid_qk.sum(-1), 1).astype(jnp.float32)
    query_qc = (gathered_qkc.astype(jnp.float32).sum(1) / count_q[:, None]).astype(self.dtype)
    pooled = self.image_pooling_2d(query_qc[:, None, :], gathered_qkc, mask=valid_qk[:, None, None, :])
    return jnp.where(valid_qk.any(-1)[:, None], pooled[:, 0], 0).astype(self.dtype)

  def project(self, pooled: Float[Array, "Q D"]) -> Float[Array, "Q E"]:
    """SwiGLU projector `down(silu(gate(x)) * up(x))` into the LLM width."""
    return self.image_projector(pooled)

  def __call__(self, features: Float[Array, "N P C"], pool_idx: Int[Array, "Q K"]) -> Float[Array, "Q E"]:
    """`project(pool(features, pool_idx))`."""
    return self.project(self.pool(features, pool_idx))

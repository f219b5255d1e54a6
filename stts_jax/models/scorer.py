"""The STTS window scorer (DESIGN.md 3.1-3.4; checkpoint layout in issue 12).

hidden [.., T, P, D] (ViT output of block `prune_at`)
  -> windows [.., T, W, M, D] (3x3 patches, row-major)
  -> attention pooling per window: query = plain mean of its M patches, keys/values = the patches,
     N heads of width H = D / N, q/k/v/o projections with bias, no norm      -> [.., T, W, D]
  -> temporal context [previous frame's same window, this window]; zeros before frame 0 of each
     video (never another video's frame)                                      -> [.., T, W, 2D]
  -> MLP 2D -> F -> F -> 1, SiLU after the first two layers, sigmoid          -> scores [.., T, W]

Initialisation follows the authors: pooler weights normal(0, 0.02) (`stts.pool_init_std`), MLP weights truncated normal
with std sqrt(1 / fan_in) cut at -2 and +2 (absolute values, as torch.nn.init.trunc_normal_'s
a=-2, b=2), all biases zero.
"""

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from stts_jax.config import STTSConfig
from stts_jax.models import partitioning
from stts_jax.models import windows as windows_lib

MLP_TRUNC_BOUND = 2.0


def torch_trunc_normal(std: float, bound: float = MLP_TRUNC_BOUND):
  """Initializer: normal(0, std) truncated to [-bound, bound] in absolute units (torch semantics)."""
  def init(key, shape, dtype=jnp.float32):
    z = jax.random.truncated_normal(key, -bound / std, bound / std, shape, jnp.float32)
    return (z * std).astype(dtype)
  return init


def _linear(d_in: int, d_out: int, kernel_names, bias_names, kernel_init, *, dtype, param_dtype, rngs):
  return nnx.Linear(d_in, d_out, use_bias=True, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=partitioning.with_names(kernel_init, kernel_names),
                    bias_init=partitioning.with_names(nnx.initializers.zeros_init(), bias_names),
                    rngs=rngs)


class WindowScorer(nnx.Module):
  """Scores each window of each frame in (0, 1); see the module docstring."""

  def __init__(self, vit_hidden: int, cfg: STTSConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if vit_hidden % cfg.scorer_heads:
      raise ValueError(f"scorer: ViT width {vit_hidden} not divisible by stts.scorer_heads {cfg.scorer_heads}")
    d, f = vit_hidden, cfg.scorer_hidden
    self.hidden_size = d
    self.mlp_size = f
    self.num_heads = cfg.scorer_heads
    self.head_dim = d // cfg.scorer_heads
    self.dtype = dtype
    pool_init = nnx.initializers.normal(cfg.pool_init_std)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = _linear(d, d, ("vit_embed", "vit_heads"), ("vit_heads",), pool_init, **kw)
    self.k_proj = _linear(d, d, ("vit_embed", "vit_heads"), ("vit_heads",), pool_init, **kw)
    self.v_proj = _linear(d, d, ("vit_embed", "vit_heads"), ("vit_heads",), pool_init, **kw)
    self.o_proj = _linear(d, d, ("vit_heads", "vit_embed"), ("vit_embed",), pool_init, **kw)
    self.fc1 = _linear(2 * d, f, ("scorer_in", "scorer_mlp"), ("scorer_mlp",),
                       torch_trunc_normal(math.sqrt(1.0 / (2 * d))), **kw)
    self.fc2 = _linear(f, f, ("scorer_mlp", "scorer_mlp"), ("scorer_mlp",),
                       torch_trunc_normal(math.sqrt(1.0 / f)), **kw)
    self.fc3 = _linear(f, 1, ("scorer_mlp", None), (None,), torch_trunc_normal(math.sqrt(1.0 / f)), **kw)

  def pool(self, patches: Float[Array, "*B W M D"]) -> Float[Array, "*B W D"]:
    """Attention pooling of each window; the query is the plain mean of its M patches."""
    lead = patches.shape[:-2]
    n, h = self.num_heads, self.head_dim
    query = jnp.mean(patches, axis=-2)
    q = self.q_proj(query).reshape(*lead, n, h)
    k = self.k_proj(patches).reshape(*patches.shape[:-1], n, h)
    v = self.v_proj(patches).reshape(*patches.shape[:-1], n, h)
    logits = jnp.einsum("...nh,...mnh->...nm", q, k).astype(jnp.float32) * (h ** -0.5)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("...nm,...mnh->...nh", probs, v).reshape(*lead, n * h)
    return self.o_proj(out)

  def score_windows(self, features: Float[Array, "*B T W D"],
                    first: Optional[Bool[Array, "*B T"]] = None) -> Float[Array, "*B T W"]:
    """Temporal context + MLP + sigmoid on pooled window features of consecutive frames.

    first: frames that start a video (zeros as their previous frame); default frame 0 only. Packed
    rows (several videos along T) pass each video's first frame, so no video sees another's frame."""
    prev = jnp.concatenate([jnp.zeros_like(features[..., :1, :, :]), features[..., :-1, :, :]], axis=-3)
    if first is not None:
      prev = jnp.where(first[..., None, None], jnp.zeros((), prev.dtype), prev)
    x = jnp.concatenate([prev, features], axis=-1)
    x = jax.nn.silu(self.fc1(x))
    x = jax.nn.silu(self.fc2(x))
    logit = self.fc3(x)[..., 0].astype(jnp.float32)
    return jax.nn.sigmoid(logit)

  def __call__(self, hidden: Float[Array, "*B T P D"], grid_hw: tuple[int, int],
               window: tuple[int, int], first: Optional[Bool[Array, "*B T"]] = None) -> Float[Array, "*B T W"]:
    idx_wm = jnp.asarray(windows_lib.window_patch_index(grid_hw, window))
    patches = jnp.take(hidden, idx_wm, axis=-2)        # [.., T, W, M, D]
    return self.score_windows(self.pool(patches), first)


def window_scores(scorer: WindowScorer, hidden: Float[Array, "*B T P D"], grid_hw: tuple[int, int],
                  window: tuple[int, int], first: Optional[Bool[Array, "*B T"]] = None) -> Float[Array, "*B T W"]:
  """Scores in (0, 1) of every window; `hidden` is the ViT output of block `prune_at`.

  With a leading batch axis each video gets zeros as the previous frame of its own frame 0 (of each
  frame in `first`, for packed rows of several videos)."""
  if hidden.shape[-1] != scorer.hidden_size:
    raise ValueError(f"window_scores: hidden width {hidden.shape[-1]} != scorer width {scorer.hidden_size}")
  return scorer(hidden, grid_hw, window, first)

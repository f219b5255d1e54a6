"""Rotary position embeddings of the Molmo2 decoder (rotate-half convention).

The inverse frequencies are static: they depend only on the config, so they are computed once in
numpy (float32, the same operation order as transformers' `modeling_rope_utils`) and enter the traced
code as constants. Supported `rope_type`s: default, linear, llama3, yarn.

Layers listed in `LLMConfig.rope_scaling_layers` use the scaled table; the others use the plain
(default) table with the same theta. `layer_uses_scaled_rope` gives that choice per layer.
"""

import math
from typing import Optional

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from stts_jax import config as config_lib


def _default_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  return (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)


def _llama3_inv_freq(inv_freq: np.ndarray, s: config_lib.RopeScaling) -> np.ndarray:
  old_context = float(s.original_max_position_embeddings)
  low_wavelen = old_context / s.low_freq_factor
  high_wavelen = old_context / s.high_freq_factor
  wavelen = (2 * math.pi / inv_freq).astype(np.float32)
  scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(s.factor), inv_freq).astype(np.float32)
  smooth = ((old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
  smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_inv_freq(head_dim: int, theta: float, s: config_lib.RopeScaling) -> tuple[np.ndarray, float]:
  factor = s.factor
  attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0
  beta_fast = s.beta_fast or 32.0
  beta_slow = s.beta_slow or 1.0
  orig = s.original_max_position_embeddings

  def correction_dim(num_rotations):
    return (head_dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

  low = max(math.floor(correction_dim(beta_fast)), 0)
  high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
  extrapolation_weight = (1 - ramp).astype(np.float32)
  pos_freqs = np.power(np.float32(theta), np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
  extrapolated = np.float32(1.0) / pos_freqs
  interpolated = np.float32(1.0) / (np.float32(factor) * pos_freqs)
  inv_freq = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
  return inv_freq.astype(np.float32), float(attention_factor)


def inv_frequencies(head_dim: int, theta: float,
                    scaling: Optional[config_lib.RopeScaling]) -> tuple[np.ndarray, float]:
  """Returns (`inv_freq [H/2]` float32, attention scaling factor applied to cos/sin)."""
  if scaling is None or scaling.rope_type == "default":
    return _default_inv_freq(head_dim, theta), 1.0
  if scaling.rope_type == "linear":
    return (_default_inv_freq(head_dim, theta) / np.float32(scaling.factor)).astype(np.float32), 1.0
  if scaling.rope_type == "llama3":
    return _llama3_inv_freq(_default_inv_freq(head_dim, theta), scaling), 1.0
  if scaling.rope_type == "yarn":
    return _yarn_inv_freq(head_dim, theta, scaling)
  raise ValueError(f"unsupported rope_type {scaling.rope_type!r}")


def layer_uses_scaled_rope(cfg: config_lib.LLMConfig) -> np.ndarray:
  """`[L]` bool: True where a layer uses the scaled RoPE (all layers when `rope_scaling_layers` is None)."""
  if cfg.rope_scaling_layers is None:
    return np.ones((cfg.num_layers,), dtype=bool)
  flags = np.zeros((cfg.num_layers,), dtype=bool)
  for layer in cfg.rope_scaling_layers:
    if not 0 <= layer < cfg.num_layers:
      raise ValueError(f"rope_scaling_layers entry {layer} outside [0, {cfg.num_layers})")
    flags[layer] = True
  return flags


def rope_tables(positions_bs: Int[Array, "B S"], inv_freq: np.ndarray,
                attention_factor: float = 1.0) -> tuple[Float[Array, "B S H"], Float[Array, "B S H"]]:
  """cos/sin tables `[B, S, H]` (float32) for integer positions; frequencies duplicated `cat(f, f)`."""
  freqs_bsf = positions_bs.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  emb_bsh = jnp.concatenate([freqs_bsf, freqs_bsf], axis=-1)
  return jnp.cos(emb_bsh) * attention_factor, jnp.sin(emb_bsh) * attention_factor


def apply_rope(x_bsnh: Float[Array, "B S N H"], cos_bsh: Float[Array, "B S H"],
               sin_bsh: Float[Array, "B S H"]) -> Float[Array, "B S N H"]:
  """Rotate-half RoPE (first half vs second half of the head dim), computed in float32."""
  x = x_bsnh.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_bsh[:, :, None, :] + rotated * sin_bsh[:, :, None, :]
  return out.astype(x_bsnh.dtype)

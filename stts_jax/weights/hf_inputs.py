"""`molmo2_logits`: run a `Molmo2` on exactly the arrays transformers' Molmo2 forward takes.

Accepted keys (numpy arrays or anything `np.asarray` takes, e.g. CPU torch tensors):
  input_ids [B, S], attention_mask [B, S] (default ones), position_ids [B, S] (default arange(S) as
  HF forward), mm_token_type_ids [B, S] (value 1 = vision block; default: derived from input_ids like
  the HF processor), pixel_values_videos [N, P, 588] + video_token_pooling [Q, 9], pixel_values
  + image_token_pooling [Q, 4], where pixel_values is [total_crops, P, 588] as the HF image processor
  emits it (images of different crop counts concatenated) or [n_img, crops, P, 588].
Accepted and not needed by the computation: video_grids, image_grids, image_num_crops, labels,
use_cache, logits_to_keep=0, return_dict. Unknown keys raise, as do inputs_embeds / past_key_values.
Pooling rows without any valid index are dropped (HF drops their features too) and the number of
`<im_patch>` tokens must equal the number of remaining rows.
"""

from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from stts_jax.models import vlm

_USED = ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids", "pixel_values_videos",
         "video_token_pooling", "pixel_values", "image_token_pooling")
_NOT_NEEDED = ("video_grids", "image_grids", "image_num_crops", "labels", "use_cache", "logits_to_keep",
               "return_dict")
_UNSUPPORTED = ("inputs_embeds", "past_key_values", "mm_encoder_outputs")


@nnx.jit
def _forward(model, input_ids, attention_mask, position_ids, vision_mask, videos, video_pool, images, image_pool):
  return model(input_ids, attention_mask, pixel_values_videos=videos, video_token_pooling=video_pool,
               pixel_values=images, image_token_pooling=image_pool, position_ids=position_ids,
               vision_mask=vision_mask)


def _valid_rows(pool: Optional[np.ndarray]) -> Optional[np.ndarray]:
  if pool is None:
    return None
  pool = np.asarray(pool).astype(np.int32)
  return pool[(pool >= 0).any(-1)]


def molmo2_logits(model: vlm.Molmo2, **hf_inputs) -> np.ndarray:
  """Logits `[B, S, V]` (float32 numpy) for HF-style inputs; see the module docstring."""
  unknown = sorted(set(hf_inputs) - set(_USED) - set(_NOT_NEEDED) - set(_UNSUPPORTED))
  if unknown:
    raise ValueError(f"molmo2_logits: unknown inputs {unknown}")
  for key in _UNSUPPORTED:
    if hf_inputs.get(key) is not None:
      raise ValueError(f"molmo2_logits: {key} is not supported")
  if hf_inputs.get("logits_to_keep") not in (None, 0):
    raise ValueError("molmo2_logits: logits_to_keep must be 0 (all positions)")
  arrays = {k: None if hf_inputs.get(k) is None else np.asarray(hf_inputs[k]) for k in _USED}
  input_ids = arrays["input_ids"]
  if input_ids is None or input_ids.ndim != 2:
    raise ValueError("molmo2_logits: input_ids [B, S] is required")
  input_ids = input_ids.astype(np.int32)
  mask = np.ones(input_ids.shape, bool) if arrays["attention_mask"] is None else arrays["attention_mask"] != 0
  videos, images = arrays["pixel_values_videos"], arrays["pixel_values"]
  if videos is not None and images is not None:
    raise ValueError("molmo2_logits: pixel_values and pixel_values_videos are provided at the same time")
  video_pool, image_pool = _valid_rows(arrays["video_token_pooling"]), _valid_rows(arrays["image_token_pooling"])
  if (videos is None) != (video_pool is None) or (images is None) != (image_pool is None):
    raise ValueError("molmo2_logits: pixel values and their token pooling must come together")
  num_features = sum(p.shape[0] for p in (video_pool, image_pool) if p is not None)
  num_patch_tokens = int((input_ids == model.config.tokens.image_patch).sum())
  if num_features != num_patch_tokens:
    raise ValueError(f"molmo2_logits: {num_patch_tokens} <im_patch> tokens but {num_features} pooled features")
  types = arrays["mm_token_type_ids"]
  vision_mask = None if types is None else jnp.asarray(types == 1)
  positions = arrays["position_ids"]
  if positions is not None:
    positions = jnp.asarray(np.broadcast_to(positions, input_ids.shape), jnp.int32)
  as_f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)  # noqa: E731
  as_i32 = lambda x: None if x is None else jnp.asarray(x, jnp.int32)  # noqa: E731
  logits = _forward(model, jnp.asarray(input_ids), jnp.asarray(mask), positions, vision_mask, as_f32(videos),
                    as_i32(video_pool), as_f32(images), as_i32(image_pool))
  return np.asarray(logits, np.float32)

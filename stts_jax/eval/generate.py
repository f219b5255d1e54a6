"""Generation with STTS pruning: the pruned prefill of `video_forward`, then KV-cache decoding.

Two stages, so each can be jitted and timed on its own (one compilation per (method, ratio, T)):
  vision   `vision_stage(model, patches, frame_mask, rng)`: ViT + scoring + budget + packing
           (`video_forward.vit_features_video`) and the adapter on the kept windows
           (`video_forward.pool_windows`) -> `VisionFeatures`.
  prefill  `llm_inputs(model, input_ids, token_mask, vision)`: the pruned, compacted prompt
           sequence exactly as `video_forward.llm_forward` builds it (the `<im_patch>` tokens of
           dropped windows removed, static length S' = S - dropped(T), positions 0..n_b-1, features
           added at the remaining `<im_patch>` tokens, vision-block mask), then `decoding.prefill`.
Then `decoding.decode` (see that module for the cache layout of rows with different lengths).

`prompt_only(batch)` cuts a data-pipeline batch (prompt + answer) to the generation prompt:
tokens at or after `prompt_len` are removed. `model_variant(model, method=..., ratio=...)` gives
the same parameters under other STTS settings (the config is static module metadata).
"""

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import struct
from jaxtyping import Array, Bool, Float, Int, Shaped

from stts_jax.eval import decoding
from stts_jax.models import pruning
from stts_jax.models import video_forward as vf
from stts_jax.models import vlm


@struct.dataclass
class VisionFeatures:
  """Output of the vision stage: pooled kept windows `[B, K, E]` in (t, w) order (K static)."""
  feats_bke: Float[Array, "B K E"]
  keep_mask_btw: Bool[Array, "B T W"]
  scores_btw: Float[Array, "B T W"]
  packed: Bool[Array, ""]


@struct.dataclass
class PrefillOutput:
  state: decoding.Prefill
  keep_mask_btw: Bool[Array, "B T W"]  # kept windows
  num_kept_b: Int[Array, "B"]        # kept windows (LLM vision tokens) per video
  num_truncated_b: Int[Array, "B"]   # prompt tokens cut by the static length (0 for valid data)


def model_variant(model: vlm.Molmo2, **stts_overrides) -> vlm.Molmo2:
  """A Molmo2 sharing `model`'s parameters with `config.stts` fields replaced (`model` unchanged).

  Another `ratio` drops a `num_rows` sized for the model's ratio unless given (`ModelConfig.with_stts`).
  """
  graphdef, state = nnx.split(model)
  out = nnx.merge(graphdef, state)
  out.config = model.config.with_stts(**stts_overrides)
  if out.config.stts.method == "stts" and out.config.stts.prunes and out.scorer is None:
    raise ValueError("model_variant: method 'stts' needs a trained scorer, but this model has none "
                     "(train or load an STTS checkpoint)")
  return out


def prompt_only(batch: Mapping[str, Any], pad_id: int) -> dict[str, np.ndarray]:
  """Host-side: `input_ids`/`token_mask` cut at `prompt_len` (answer removed, `pad_id` after it)."""
  ids = np.asarray(batch["input_ids"], np.int32)
  plen = np.asarray(batch["prompt_len"], np.int64)
  keep = np.asarray(batch["token_mask"], bool) & (np.arange(ids.shape[1])[None, :] < plen[:, None])
  out = dict(batch)
  out["input_ids"] = np.where(keep, ids, pad_id).astype(np.int32)
  out["token_mask"] = keep
  return out


def vision_stage(model: vlm.Molmo2, patches: Shaped[Array, "B T P I"], frame_mask: Bool[Array, "B T"],
                 rng: Optional[jax.Array] = None) -> VisionFeatures:
  """ViT with pruning and the adapter on the kept windows (`video_forward` pieces)."""
  return _adapted(model, vf.vit_features_video(model, patches, frame_mask, rng, deterministic=True))


def vision_stage_scored(model: vlm.Molmo2, scored: vf.ScoredVision, frame_mask: Bool[Array, "B T"]) -> VisionFeatures:
  """`vision_stage` from a `video_forward.vit_scored` output: the blocks after pruning at the model's
  ratio, then the adapter. Same result as `vision_stage` on the patches that gave `scored`."""
  features, keep, packed = vf.vit_pruned(model, scored, frame_mask)
  return _adapted(model, vf.VisionOutput(features, keep, scored.scores_btw, jnp.zeros((), jnp.float32), packed))


def _adapted(model: vlm.Molmo2, vision: vf.VisionOutput) -> VisionFeatures:
  """The adapter on the kept windows of a ViT output."""
  return VisionFeatures(feats_bke=vf.llm_window_features(model, vision), keep_mask_btw=vision.keep_mask_btw,
                        scores_btw=vision.scores_btw.astype(jnp.float32), packed=vision.packed)


def llm_inputs(model: vlm.Molmo2, input_ids: Int[Array, "B S"], token_mask: Bool[Array, "B S"],
               vision: VisionFeatures) -> tuple[decoding.LLMInputs, Int[Array, "B"]]:
  """The decoder input of `video_forward.llm_forward` for a prompt: (inputs `[B, S']`, truncated)."""
  dec = vf.decoder_inputs(model, input_ids, token_mask, vision.keep_mask_btw, vision.feats_bke)
  return decoding.LLMInputs(embeds_bse=dec.embeds, positions_bs=dec.positions, token_mask_bs=dec.token_mask,
                            vision_mask_bs=dec.vision_mask), dec.num_truncated


def prefill_stage(model: vlm.Molmo2, input_ids: Int[Array, "B S"], token_mask: Bool[Array, "B S"],
                  vision: VisionFeatures, max_new_tokens: int) -> PrefillOutput:
  """Pruned prompt -> decoder prefill into a cache of S' + max_new_tokens slots."""
  inputs, truncated = llm_inputs(model, input_ids, token_mask, vision)
  state = decoding.prefill(model.llm, inputs, max_new_tokens)
  return PrefillOutput(state=state, keep_mask_btw=vision.keep_mask_btw,
                       num_kept_b=pruning.num_kept(vision.keep_mask_btw), num_truncated_b=truncated)


def stop_ids_for(model: vlm.Molmo2, extra: Sequence[int] = ()) -> tuple[int, ...]:
  """`<|im_end|>` (end of the assistant turn) plus `extra`."""
  return tuple(dict.fromkeys((model.config.tokens.chat_end, *extra)))


def generate(model: vlm.Molmo2, batch: Mapping[str, Any], *, max_new_tokens: int, temperature: float = 0.0,
             stop_ids: Optional[Sequence[int]] = None, rng: Optional[jax.Array] = None,
             pruning_rng: Optional[jax.Array] = None, return_logits: bool = False
             ) -> tuple[decoding.Generation, PrefillOutput]:
  """Eager (un-jitted) end-to-end generation for one batch; wrap in `nnx.jit` or use `Predictor`.

  batch: `patches`, `frame_mask`, `input_ids`, `token_mask` (the prompt only: see `prompt_only`),
  optionally `valid` (rows to generate for).
  """
  vision = vision_stage(model, jnp.asarray(batch["patches"]), jnp.asarray(batch["frame_mask"], bool), pruning_rng)
  pre = prefill_stage(model, jnp.asarray(batch["input_ids"], jnp.int32), jnp.asarray(batch["token_mask"], bool),
                      vision, max_new_tokens)
  active = jnp.asarray(batch["valid"], bool) if "valid" in batch else None
  gen = decoding.decode(model.llm, pre.state, max_new_tokens=max_new_tokens,
                        stop_ids=stop_ids_for(model) if stop_ids is None else tuple(stop_ids),
                        pad_id=model.config.tokens.pad, temperature=temperature, rng=rng, active_b=active,
                        return_logits=return_logits)
  return gen, pre


__all__ = ["PrefillOutput", "VisionFeatures", "generate", "llm_inputs", "model_variant", "prefill_stage",
           "prompt_only", "stop_ids_for", "vision_stage"]

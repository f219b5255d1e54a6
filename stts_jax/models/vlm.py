"""Molmo2 composition: ViT -> adapter -> features added at `<im_patch>` tokens -> decoder -> logits.

Mirrors transformers' `Molmo2ForConditionalGeneration.forward` (no pruning here):
  1. frames/crops `[N, P, I]` through the ViT up to the deepest adapter tap;
  2. taps concatenated in config order, pooled by the adapter with global indices `[Q, K]` (-1 pad)
     into `[Q, E]`;
  3. feature q is ADDED to the embedding of the q-th `<im_patch>` token in flattened (batch, seq) order;
  4. decoder with the vision-block mask: tokens whose id is in `TokenIds.vision_type_ids`
     (HF's `mm_token_type_ids == 1`) attend to each other bidirectionally.
The pieces (`vision_features`, `merge_vision`, `vision_token_mask`) are separate so the STTS video
path can reuse them with its own feature computation.

Submodules: `vit`, `adapter`, `llm`, and `scorer` (None unless an STTS scorer is attached).
"""

from typing import Optional

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int, Shaped

from stts_jax import config as config_lib
from stts_jax.models import adapter as adapter_lib
from stts_jax.models import llm as llm_lib
from stts_jax.models import scorer as scorer_lib
from stts_jax.models import vit as vit_lib


def vision_token_mask(input_ids_bs: Int[Array, "B S"], tokens: config_lib.TokenIds) -> Bool[Array, "B S"]:
  """True at tokens of mm_token_type 1 (patches, frame/image start/end, columns, low-res markers)."""
  return jnp.isin(input_ids_bs, jnp.asarray(tokens.vision_type_ids, jnp.int32))


def merge_vision(embeds_bse: Float[Array, "B S E"], input_ids_bs: Int[Array, "B S"],
                 features_qe: Float[Array, "Q E"], image_patch_id: int) -> Float[Array, "B S E"]:
  """Adds feature q to the q-th `<im_patch>` embedding (flattened batch-major order).

  Static shapes: each patch token's rank is `cumsum(is_patch) - 1`; features are gathered by rank.
  The caller guarantees the number of `<im_patch>` tokens equals Q (checked by `molmo2_logits`);
  surplus patch tokens would reuse the last feature, surplus features are ignored.
  """
  b, s, e = embeds_bse.shape
  is_patch = (input_ids_bs == image_patch_id).reshape(b * s)
  rank = jnp.cumsum(is_patch.astype(jnp.int32)) - 1
  gathered = jnp.take(features_qe, jnp.clip(rank, 0, features_qe.shape[0] - 1), axis=0)
  added = jnp.where(is_patch[:, None], gathered.astype(embeds_bse.dtype), 0)
  return embeds_bse + added.reshape(b, s, e)


def default_positions(attention_mask_bs: Shaped[Array, "B S"]) -> Int[Array, "B S"]:
  """HF forward's default: `arange(S)` for every row (padding included)."""
  b, s = attention_mask_bs.shape
  return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))


class Molmo2(nnx.Module):
  """The Molmo2 video/image VLM. Only ViT blocks `0 .. max(adapter.vit_layers)` are built."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.config = cfg
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    stack = dict(scan_layers=cfg.scan_layers, remat=cfg.remat, attention=cfg.attention,
                 attention_block=cfg.attention_block)
    self.vit = vit_lib.VisionTransformer(cfg.vit, num_layers=max(cfg.adapter.vit_layers) + 1, **stack, **common)
    self.adapter = adapter_lib.Adapter(cfg.adapter, vit_hidden=cfg.vit.hidden_size,
                                       text_hidden=cfg.llm.hidden_size, **common)
    self.llm = llm_lib.Decoder(cfg.llm, **stack, **common)
    # Slot for the STTS window scorer (stts_jax.models.scorer.WindowScorer when cfg.stts.method == "stts").
    # STTS: built last, so the other parameters' initialisation does not depend on the method.
    self.scorer = (scorer_lib.WindowScorer(cfg.vit.hidden_size, cfg.stts, **common)
                   if cfg.stts.method == "stts" else None)

  def vision_features(self, patches_npi: Float[Array, "N P I"], pool_idx_qk: Int[Array, "Q K"]
                      ) -> Float[Array, "Q E"]:
    """Frames/crops `[N, P, I]` -> ViT taps -> concat -> adapter pooling/projection `[Q, E]`."""
    taps = self.vit(patches_npi, self.config.adapter.vit_layers)
    features_npc = adapter_lib.concat_taps(taps, self.config.adapter.vit_layers)
    return self.adapter(features_npc, pool_idx_qk)

  def vision_mask(self, input_ids_bs: Int[Array, "B S"]) -> Bool[Array, "B S"]:
    return vision_token_mask(input_ids_bs, self.config.tokens)

  def merge_vision(self, embeds_bse: Float[Array, "B S E"], input_ids_bs: Int[Array, "B S"],
                   features_qe: Float[Array, "Q E"]) -> Float[Array, "B S E"]:
    return merge_vision(embeds_bse, input_ids_bs, features_qe, self.config.tokens.image_patch)

  def __call__(self, input_ids: Int[Array, "B S"], attention_mask: Shaped[Array, "B S"], *,
               pixel_values_videos: Optional[Float[Array, "N P I"]] = None,
               video_token_pooling: Optional[Int[Array, "Q K"]] = None,
               pixel_values: Optional[Float[Array, "*crops P I"]] = None,
               image_token_pooling: Optional[Int[Array, "Q K"]] = None,
               position_ids: Optional[Int[Array, "B S"]] = None,
               vision_mask: Optional[Bool[Array, "B S"]] = None) -> Float[Array, "B S V"]:
    """HF-shaped forward -> logits `[B, S, V]`.

    pixel_values_videos `[N, P, I]` (all frames of all videos) with video_token_pooling `[Q, 9]`, or
    pixel_values with image_token_pooling `[Q, 4]` (global patch indices, -1 padding; every row must
    have a valid slot). pixel_values is `[total_crops, P, I]` as the HF processor emits it (every
    image's crops, images of different crop counts concatenated) or `[n_img, crops, P, I]`. position_ids default to `arange(S)`;
    vision_mask (HF `mm_token_type_ids == 1`) defaults to the ids in `tokens.vision_type_ids`.
    """
    if pixel_values is not None and pixel_values_videos is not None:
      raise ValueError("Molmo2: pass pixel_values or pixel_values_videos, not both")
    embeds = self.llm.embed(input_ids)
    if pixel_values_videos is not None:
      if video_token_pooling is None:
        raise ValueError("Molmo2: pixel_values_videos needs video_token_pooling")
      embeds = self.merge_vision(embeds, input_ids, self.vision_features(pixel_values_videos, video_token_pooling))
    if pixel_values is not None:
      if image_token_pooling is None:
        raise ValueError("Molmo2: pixel_values needs image_token_pooling")
      if pixel_values.ndim not in (3, 4):
        raise ValueError(f"Molmo2: pixel_values must be [crops, P, I] or [images, crops, P, I], got shape "
                         f"{pixel_values.shape}")
      crops_npi = pixel_values.reshape(-1, *pixel_values.shape[-2:])
      features = self.vision_features(crops_npi, image_token_pooling)
      embeds = self.merge_vision(embeds, input_ids, features)
    positions = default_positions(attention_mask) if position_ids is None else position_ids
    vision = self.vision_mask(input_ids) if vision_mask is None else vision_mask
    hidden, _ = self.llm(embeds, positions.astype(jnp.int32), attention_mask != 0, vision)
    return self.llm.logits(hidden)


def with_attention(model: Molmo2, attention: str, block: Optional[int] = None) -> Molmo2:
  """A Molmo2 sharing `model`'s parameters whose ViT and LLM attention run `attention` (any name of
  `models.attention.IMPLEMENTATIONS`), with blockwise block length `block` if given; `model` is
  unchanged. The implementation is a static attribute of each attention module, so a loaded or
  trained model can be evaluated with every implementation."""
  import dataclasses
  graphdef, state = nnx.split(model)
  out = nnx.merge(graphdef, state)
  block = model.config.attention_block if block is None else block
  out.config = dataclasses.replace(model.config, attention=attention, attention_block=block).validate()
  for _, node in nnx.iter_graph(out):
    # ViT attention (vit.VisionAttention) and LLM attention (llm.Attention) carry `impl`; the adapter's and
    # scorer's pooling over a few keys always use the dense einsum and ignore it.
    if isinstance(node, nnx.Module) and hasattr(node, "impl") and hasattr(node, "block"):
      node.impl, node.block = attention, block
  return out

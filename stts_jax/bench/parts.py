"""The timed parts of one benchmark cell, as pure functions `(state, *inputs) -> outputs`.

Each builder takes the graphdef of the module it runs (the Molmo2 model, its decoder or its
scorer) and returns a function of that module's state, so the same function can be compiled
with real parameters (timing) or lowered with an abstract, unrolled copy (XLA FLOP count).

  vision    patches -> ViT (scorer, budget, soft bias, packing when pruning) -> adapter on the
            kept windows: what the LLM needs, `video_forward.vit_features_video` + `pool_windows`
  prefill   the (pruned) prompt embeddings through the decoder into a KV cache, last-token logits
            (`stts_jax.eval.decoding.prefill`)
  decode    `tokens` greedy decode steps from that cache (`decoding.decode`, no stop tokens)
  overhead  the STTS-only work of a pruned training step, alone: scorer forward + backward, aux
            loss, soft bias, budget, packing plan, pack + unpack (forward and backward) and the
            LLM-side compaction and slot selection
  train     the full train step (`stts_jax.train.loop.make_step_fn`), built in `runner.py`
`llm_inputs` (untimed) turns the vision output into the decoder's inputs exactly as
`video_forward.llm_forward` does before its decoder call.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from stts_jax.config import ModelConfig
from stts_jax.eval import decoding
from stts_jax.models import aux_loss as aux_lib
from stts_jax.models import budget
from stts_jax.models import packing
from stts_jax.models import pruning
from stts_jax.models import scorer as scorer_lib
from stts_jax.models import sequence
from stts_jax.models import video_forward as vf
from stts_jax.models.vlm import vision_token_mask


@struct.dataclass
class VisionResult:
  features_bke: Any   # [B, K, E] pooled kept windows (K = num_slots)
  valid_bk: Any       # [B, K]
  keep_mask_btw: Any  # [B, T, W]
  packed: Any         # bool scalar: packed rows used (False: dense fallback or unpruned)


def num_slots(cfg: ModelConfig, num_frames: int) -> int:
  """Adapter slots per video: kept windows of the T bucket when the LLM side is pruned, else T*W."""
  w = cfg.windows_per_frame
  if cfg.stts.prunes and cfg.stts.llm_prune:
    return budget.num_kept(num_frames, w, cfg.stts.ratio)
  return num_frames * w


def llm_len(cfg: ModelConfig, num_frames: int, seq_len: int) -> int:
  """S' of the decoder: S - dropped(T) when the LLM side is pruned, else S."""
  if cfg.stts.prunes and cfg.stts.llm_prune:
    return budget.pruned_seq_len(seq_len, num_frames, cfg.windows_per_frame, cfg.stts.ratio)
  return seq_len


def vision_fn(graphdef: Any, slots: int):
  def vision(state, patches, frame_mask):
    model = nnx.merge(graphdef, state)
    out = vf.vit_features_video(model, patches, frame_mask)
    feats, valid = vf.pool_windows(model, out, slots)
    return VisionResult(feats, valid, out.keep_mask_btw, jnp.asarray(out.packed))
  return vision


def llm_inputs_fn(graphdef: Any, out_len: int):
  """(state, batch fields, vision result) -> `decoding.LLMInputs` of length `out_len` (untimed)."""
  def llm_inputs(state, input_ids, token_mask, target_ids, loss_mask, vision: VisionResult):
    model = nnx.merge(graphdef, state)
    cfg = model.config
    ids, mask = input_ids, token_mask
    if out_len != input_ids.shape[1]:
      comp = sequence.prune_sequence(input_ids, token_mask, target_ids, loss_mask, vision.keep_mask_btw,
                                     cfg.tokens.image_patch, out_len, cfg.tokens.pad)
      ids, mask = comp.input_ids_bs, comp.token_mask_bs
    embeds = vf.merge_per_sample(model.llm.embed(ids), ids, mask, vision.features_bke, cfg.tokens.image_patch)
    b, s = ids.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return decoding.LLMInputs(embeds_bse=embeds, positions_bs=positions, token_mask_bs=mask,
                              vision_mask_bs=vision_token_mask(ids, cfg.tokens))
  return llm_inputs


def prefill_fn(llm_graphdef: Any, new_tokens: int):
  """(llm state, embeds [B, S, E], positions, token mask, vision mask [B, S]) -> `decoding.Prefill`.

  The decoder inputs travel as plain arrays: jit rebuilds argument pytrees with placeholder leaves
  when lowering, which the runtime shape checks of `decoding.LLMInputs` would reject."""
  def prefill(llm_state, embeds_bse, positions_bs, token_mask_bs, vision_mask_bs):
    inputs = decoding.LLMInputs(embeds_bse=embeds_bse, positions_bs=positions_bs, token_mask_bs=token_mask_bs,
                                vision_mask_bs=vision_mask_bs)
    return decoding.prefill(nnx.merge(llm_graphdef, llm_state), inputs, new_tokens + 1)
  return prefill


def llm_input_arrays(inputs: decoding.LLMInputs) -> tuple[Any, Any, Any, Any]:
  return inputs.embeds_bse, inputs.positions_bs, inputs.token_mask_bs, inputs.vision_mask_bs


def prefill_arrays(state: decoding.Prefill) -> tuple[Any, Any, Any, Any]:
  return state.cache, state.logits_bv, state.next_pos_b, state.prompt_len_b


def decode_fn(llm_graphdef: Any, new_tokens: int, pad_id: int, prefill_len: int):
  """`new_tokens` decoder steps (the first generated token comes from the prefill logits); the
  prefill state comes in as `prefill_arrays` (see `prefill_fn`)."""
  def decode(llm_state, cache, logits_bv, next_pos_b, prompt_len_b):
    state = decoding.Prefill(cache=cache, logits_bv=logits_bv, next_pos_b=next_pos_b, prompt_len_b=prompt_len_b,
                             prefill_len=prefill_len)
    gen = decoding.decode(nnx.merge(llm_graphdef, llm_state), state, max_new_tokens=new_tokens + 1,
                          stop_ids=(), pad_id=pad_id)
    return gen.tokens_bn
  return decode


def keep_mask_fn(graphdef: Any):
  """(state, patches, frame_mask) -> keep mask `[B, T, W]` of the cell's method (the vision part's own
  keep mask; no packing). Used to size the packed rows for the "fit" row policy."""
  def keep(state, patches, frame_mask):
    model = nnx.merge(graphdef, state)
    st = model.config.stts
    grid_hw, window = (model.config.vit.grid, model.config.vit.grid), tuple(st.window)
    hidden = prune_hidden_fn(graphdef)(state, patches)
    if st.method == "stts":
      scores = scorer_lib.window_scores(model.scorer, hidden, grid_hw, window)
    elif st.method == "heuristic":
      scores = aux_lib.heuristic_scores(hidden, grid_hw, window)
    else:
      scores = pruning.random_scores(jax.random.key(st.random_seed), hidden.shape[:2] + (model.config.windows_per_frame,))
    return pruning.budget_keep_mask_batched(scores, frame_mask, st.ratio)
  return keep


def rows_needed_fn(cfg: ModelConfig, num_frames: int):
  """keep mask `[B, T, W]` -> rows first-fit decreasing needs, per video `[B]`."""
  grid_hw, window = (cfg.vit.grid, cfg.vit.grid), tuple(cfg.stts.window)
  return lambda keep: packing.make_plan(pruning.keep_patch_mask(keep, grid_hw, window), num_frames).rows_used_b


def prune_hidden_fn(graphdef: Any):
  """(state, patches) -> ViT hidden after block prune_at `[B, T, P, D]` (untimed input of overhead)."""
  def hidden(state, patches):
    model = nnx.merge(graphdef, state)
    b, t, p, i = patches.shape
    h = model.vit.embed(vf.normalize_patches(patches).reshape(b * t, p, i))
    h, _ = model.vit.run_blocks(h, 0, model.config.stts.prune_at + 1)
    return h.reshape(b, t, p, -1)
  return hidden


def overhead_fn(scorer_graphdef: Any, cfg: ModelConfig, num_frames: int, seq_len: int, *, train: bool = True):
  """STTS-only work of one pruned step (module docstring); `train` adds the backward pass."""
  st = cfg.stts
  grid_hw, window = (cfg.vit.grid, cfg.vit.grid), tuple(st.window)
  w = cfg.windows_per_frame
  rows = budget.num_rows(num_frames, w, st.ratio, st.num_rows)
  out_len = llm_len(cfg, num_frames, seq_len)
  slots = num_slots(cfg, num_frames)
  n_post_taps = sum(1 for x in cfg.adapter.vit_layers if x >= st.prune_at + 2)

  def work(scorer_state, hidden_btpd, frame_mask, input_ids, token_mask, target_ids, loss_mask):
    scorer = nnx.merge(scorer_graphdef, scorer_state)
    scores = scorer_lib.window_scores(scorer, hidden_btpd, grid_hw, window)
    aux = aux_lib.temporal_aux_loss_batched(scores, hidden_btpd, frame_mask, grid_hw, window)
    bias = pruning.scores_to_patch_bias_batched(scores, frame_mask, grid_hw, window, st.bias_rescale_scope)
    keep = pruning.budget_keep_mask_batched(jax.lax.stop_gradient(scores), frame_mask, st.ratio)
    plan = packing.make_plan(pruning.keep_patch_mask(keep, grid_hw, window), rows)
    rows_brpd = packing.pack(hidden_btpd, plan)
    back = sum(jnp.mean(packing.unpack(rows_brpd * (k + 1.0), plan)) for k in range(max(n_post_taps, 1)))
    comp = sequence.prune_sequence(input_ids, token_mask, target_ids, loss_mask, keep, cfg.tokens.image_patch,
                                   out_len, cfg.tokens.pad)
    slots_bk, _ = vf.kept_window_slots(keep, slots)
    loss = aux + jnp.mean(bias) + back
    return loss, (comp.input_ids_bs, slots_bk, plan.fits)

  def overhead(scorer_state, hidden_btpd, frame_mask, input_ids, token_mask, target_ids, loss_mask):
    args = (frame_mask, input_ids, token_mask, target_ids, loss_mask)
    if not train:
      return work(scorer_state, hidden_btpd, *args)
    grad = jax.value_and_grad(work, argnums=(0, 1), has_aux=True)
    return grad(scorer_state, hidden_btpd, *args)
  return overhead

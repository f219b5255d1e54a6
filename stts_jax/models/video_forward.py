"""The STTS video forward of Molmo2 (DESIGN.md 3 and 4): a plain, jit-able function of (model, batch).

Batch (numpy or jax arrays; produced by the data pipeline):
  patches     uint8 [B, T, P, I]  flattened patches, (pixel_row, pixel_col, channel); normalised here
                                  exactly as HF: x * (1/255), then (x - 0.5) / 0.5, float32.
                                  (Floating-point patches are taken as already normalised.)
  frame_mask  bool  [B, T]        real frames; padding frames come after them
  input_ids   int32 [B, S]        full unpruned prompt; each real frame has exactly W `<im_patch>`
  token_mask  bool  [B, S]        non-padding tokens
  target_ids  int32 [B, S]        next token of each position
  loss_mask   bool  [B, S]        answer positions

Vision side (`vit_features_video`), with pruning (method != "none" and ratio > 0):
  embed -> blocks 0..prune_at on all frames -> scores [B, T, W] (stts: scorer; heuristic: 1 - cosine;
  random: uniform from `rng`) -> per-video budget keep mask -> block prune_at+1 on all tokens, with
  the key bias log(s') for "stts" -> pack kept patches into R rows per video -> blocks up to
  max(adapter taps) on the packed rows (segment ids) -> taps scattered back to [B, T, P, D] (zeros
  for dropped patches). If some video of the batch needs more than R rows, that batch runs the same
  blocks unpacked, one frame per row with the identical attention sets (exact, only slower).
  Without pruning: all blocks on all frames, as Molmo2.__call__. The pruned path is `vit_scored` (up to
  the soft block: nothing there depends on the drop ratio) followed by `vit_pruned` (keep mask onwards).
Adapter: only kept windows are pooled, K = num_kept(T bucket) static slots per video, in (t, w)
  order (slots past a shorter video's count are padding rows).
LLM side (`llm_forward`): the `<im_patch>` tokens of dropped windows leave the sequence, which is
  compacted to S' = S - dropped(T bucket) with contiguous positions (`sequence.py`; `budget.py`
  explains why every sample of the bucket fits); feature j of a sample is added to its j-th
  remaining `<im_patch>`. Without pruning (or with `stts.llm_prune=False`) the sequence is unchanged.

Example-packed rows (several examples per row, `models/example_packing.py`): the same path with T the
row's frame budget F; frames know their video (`frame_example`), so the scorer, budget, aux loss, bias
and packed ViT rows work per video, and the LLM sees each example within its own segment.

Randomness: method "random" draws from `rng` (one key, or a `[B]` array of keys: one per video), or
from `stts.random_seed` when `rng` is None.
Molmo2 has no dropout; `deterministic=False` only makes a missing `rng` an error for "random".
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int, Shaped

from stts_jax.models import adapter as adapter_lib
from stts_jax.models import aux_loss as aux_lib
from stts_jax.models import budget
from stts_jax.models import example_packing
from stts_jax.models import packing
from stts_jax.models import partitioning
from stts_jax.models import pruning
from stts_jax.models import scorer as scorer_lib
from stts_jax.models import selection_policy
from stts_jax.models import sequence
from stts_jax.models import windows as windows_lib
from stts_jax.models.vlm import vision_token_mask

BATCH_KEYS = ("patches", "frame_mask", "input_ids", "token_mask", "target_ids", "loss_mask")


@struct.dataclass
class VisionOutput:
  features_btpc: Any   # float [B, T, P, C]; concatenated adapter taps; zeros at dropped patches
  keep_mask_btw: Any   # bool [B, T, W]; kept windows (all real frames' windows when unpruned)
  scores_btw: Any   # float [B, T, W]; window scores (zeros when unpruned)
  aux_loss: Any   # float scalar; temporal aux loss ("stts" only, else 0)
  packed: Any   # bool scalar; pruned: False iff this batch ran the dense ViT fallback (unpruned: False)
  selection_logp: Any = None   # float [B]; log p of each video's sampled drop order (`policy_temperature`)


@struct.dataclass
class VideoOutput:
  logits: Any   # float [B, S, V]; S = S' (pruned length) or S; None with logits=False
  target_ids: Any   # int32 [B, S]
  loss_mask: Any   # bool [B, S]
  token_mask: Any   # bool [B, S]
  aux_loss: Any   # float scalar
  keep_mask: Any   # bool [B, T, W]
  scores: Any   # float [B, T, W]
  num_kept: Any   # int32 [B]; kept windows per video
  num_truncated: Any   # int32 [B]; LLM tokens cut by the static length (0 for valid data)
  packed: Any   # bool scalar
  example_ids: Any = None   # int32 [B, S]; example slot of each token (example-packed rows only, -1 padding)
  hidden: Any = None   # float [B, S, E]; final-normed decoder output (logits=False only)
  lm_head: Any = None   # float [E, V]; the LM head kernel, logits = hidden @ lm_head (logits=False only)
  selection_logp: Any = None   # float [B]; as VisionOutput (training with `policy_temperature` only)


def normalize_patches(patches: Shaped[Array, "*B P I"]) -> Float[Array, "*B P I"]:
  """uint8 -> float32 as HF: x * (1/255), then (x - 0.5) / 0.5. Floats pass through as float32."""
  if jnp.issubdtype(patches.dtype, jnp.floating):
    return patches.astype(jnp.float32)
  x = patches.astype(jnp.float32) * jnp.float32(1.0 / 255.0)
  return (x - jnp.float32(0.5)) / jnp.float32(0.5)


def _check_batch(batch: dict[str, Any]):
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise KeyError(f"forward_video: batch is missing {missing}; needs {list(BATCH_KEYS)}")


def _scores(model, method: str, hidden_btpd, rng, grid_hw, window, deterministic: bool, first=None):
  b, t = hidden_btpd.shape[:2]
  w = windows_lib.window_patch_index(grid_hw, window).shape[0]
  if method == "stts":
    if model.scorer is None:
      raise ValueError("stts.method is 'stts' but the model has no scorer (build Molmo2 with that config)")
    return scorer_lib.window_scores(model.scorer, hidden_btpd, grid_hw, window, first)
  if method == "heuristic":
    return aux_lib.heuristic_scores(hidden_btpd, grid_hw, window, first)
  if method == "random":
    if rng is None:
      if not deterministic:
        raise ValueError("forward_video: method 'random' in training mode needs an `rng`")
      rng = jax.random.key(model.config.stts.random_seed)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.ndim == 1:   # typed keys, one per video (eval)
      return jax.vmap(lambda k: pruning.random_scores(k, (t, w)))(rng)
    return pruning.random_scores(rng, (b, t, w))
  raise ValueError(f"unknown pruning method {method!r}")


def run_vit_rows(model, hidden_bnpd: Float[Array, "B N P D"], start: int, stop: int, *, taps=(),
                 key_bias_bnp: Optional[Float[Array, "B N P"]] = None,
                 segment_ids_bnp: Optional[Int[Array, "B N P"]] = None, chunk: Optional[int] = None
                 ) -> tuple[Float[Array, "B N P D"], dict[int, Float[Array, "B N P D"]]]:
  """`model.vit.run_blocks` on N rows (frames or packed rows) of each of B examples.

  chunk (default `model.config.vit_chunk`; None: all rows at once): rows of every example that run
  together, each chunk rematerialised (`jax.checkpoint` in a `lax.map`). Rows never attend across rows,
  so chunks are independent and the result is the same; the backward pass then holds one chunk's
  per-layer activations instead of all N rows' (at 64 frames per device these set the step's peak), at
  the price of one more forward pass through these blocks. Chunks split each example's rows, so the
  batch axis (sharded over devices) stays whole in every chunk. Padding rows: zeros, segment -1.
  """
  b, n, p, d = hidden_bnpd.shape
  chunk = model.config.vit_chunk if chunk is None else chunk
  flat = lambda x: None if x is None else x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])   # noqa: E731

  def run(h, kb, seg):
    rows = h.shape[1]
    out, outs = model.vit.run_blocks(flat(h), start, stop, taps=taps, key_bias=flat(kb), segment_ids=flat(seg))
    return out.reshape(b, rows, p, -1), {k: v.reshape(b, rows, p, -1) for k, v in outs.items()}

  if not chunk or chunk >= n:
    return run(hidden_bnpd, key_bias_bnp, segment_ids_bnp)
  k = -(-n // chunk)
  pad = k * chunk - n

  def to_chunks(x, value):
    if x is None:
      return None
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
    return jnp.moveaxis(x.reshape(b, k, chunk, *x.shape[2:]), 1, 0)    # [k, B, chunk, ...]

  out, outs = jax.lax.map(jax.checkpoint(lambda xs: run(*xs)),
                          (to_chunks(hidden_bnpd, 0), to_chunks(key_bias_bnp, 0), to_chunks(segment_ids_bnp, -1)))
  back = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, k * chunk, *x.shape[3:])[:, :n]   # noqa: E731
  return back(out), {t: back(v) for t, v in outs.items()}


@struct.dataclass
class ScoredVision:
  """The part of the pruned ViT forward that no drop ratio changes (`vit_scored`).

  Everything up to the keep mask: the scores, and the soft block's output (its key bias comes from
  the scores alone). An adaptive budget computes it once per video and runs only `vit_pruned` per
  bucket."""
  hidden_btpd: Any   # float [B, T, P, D]; output of block prune_at+1 (input of the blocks after pruning)
  taps: Any   # {layer: float [B, T, P, D]}; adapter taps at layers <= prune_at+1
  scores_btw: Any   # float [B, T, W]; window scores (padding frames: whatever the method gives)


def vit_scored(model, patches: Shaped[Array, "B T P I"], frame_mask: Bool[Array, "B T"],
               rng: Optional[jax.Array] = None, *, deterministic: bool = True,
               video_ids: Optional[Int[Array, "B T"]] = None,
               aux_gradient: str = "all") -> tuple[ScoredVision, Float[Array, ""]]:
  """Embed, blocks 0..prune_at, scores, then the soft block prune_at+1 on every token -> (scored, aux loss).

  Needs a pruning config (`stts.prunes`); the drop ratio plays no part. aux_gradient (`aux_lib.GRADIENT_MODES`):
  where the aux loss's gradient goes. "all" (the authors'): into the scorer and, through its target and
  the scorer's input, into the ViT blocks 0..prune_at. "scorer": into the scorer's parameters only (the
  loss is taken on a second scorer pass over stop-gradient features, same values); the soft bias and
  everything after it still train the whole model through the task loss."""
  if aux_gradient not in aux_lib.GRADIENT_MODES:
    raise ValueError(f"aux_gradient must be one of {aux_lib.GRADIENT_MODES}, got {aux_gradient!r}")
  cfg = model.config
  st = cfg.stts
  b, t, p, i = patches.shape
  grid_hw, window = (cfg.vit.grid, cfg.vit.grid), tuple(st.window)
  taps = tuple(cfg.adapter.vit_layers)
  hidden = model.vit.embed(normalize_patches(patches).reshape(b * t, p, i))
  hidden = hidden.reshape(b, t, p, hidden.shape[-1])
  soft = st.prune_at + 1
  hidden_btpd, outs = run_vit_rows(model, hidden, 0, soft, taps=taps)
  # Example-packed rows: the first frame of every video plays frame 0's part (no previous frame).
  first = None if video_ids is None else example_packing.first_frames(frame_mask, video_ids)
  scores = _scores(model, st.method, hidden_btpd, rng, grid_hw, window, deterministic, first)
  if st.method == "stts":
    aux_hidden, aux_scores = hidden_btpd, scores
    if aux_gradient == "scorer":
      # The non-detached loss can shrink the early features' frame-to-frame change itself (its target
      # and the scorer's input), which can erase a small event before the later blocks see it.
      aux_hidden = jax.lax.stop_gradient(hidden_btpd)
      aux_scores = _scores(model, st.method, aux_hidden, rng, grid_hw, window, deterministic, first)
    aux = aux_lib.temporal_aux_loss_batched(aux_scores, aux_hidden, frame_mask, grid_hw, window, first=first)
    key_bias = pruning.scores_to_patch_bias_batched(scores, frame_mask, grid_hw, window, st.bias_rescale_scope,
                                                    first=first)
  else:
    aux, key_bias = jnp.zeros((), jnp.float32), None
  hidden_btpd, soft_outs = run_vit_rows(model, hidden_btpd, soft, soft + 1, taps=taps, key_bias_bnp=key_bias)
  outs.update(soft_outs)
  return ScoredVision(hidden_btpd, outs, scores), aux


def vit_pruned(model, scored: ScoredVision, frame_mask: Bool[Array, "B T"], *,
               video_ids: Optional[Int[Array, "B T"]] = None, num_videos: int = 1
               ) -> tuple[Float[Array, "B T P C"], Bool[Array, "B T W"], Bool[Array, ""]]:
  """The rest of the pruned ViT at the model's drop ratio -> (adapter taps concatenated, keep mask, packed)."""
  cfg = model.config
  st = cfg.stts
  b, t = frame_mask.shape
  w = cfg.windows_per_frame
  if video_ids is None:
    keep = pruning.budget_keep_mask_batched(scored.scores_btw, frame_mask, st.ratio)
    rows = budget.num_rows(t, w, st.ratio, st.num_rows)
  else:
    keep = example_packing.budget_keep_mask_packed(scored.scores_btw, frame_mask, video_ids, num_videos, st.ratio)
    rows = example_packing.vit_rows(cfg, t, num_videos)
  post, fits = vit_after_prune(model, scored.hidden_btpd, keep, num_rows=rows, video_ids=video_ids)
  features = adapter_lib.concat_taps({**scored.taps, **post}, tuple(cfg.adapter.vit_layers))
  return features, keep, fits


_EXPLORE_STREAM = 0x5E1EC7   # folded into the step's rng: exploration draws apart from other uses
_POLICY_STREAM = 0x9011C7   # likewise for the sampled keep masks of `policy_temperature`


def explore_selection(scores_btw: Float[Array, "B T W"], rng: jax.Array, prob: float,
                      video_ids: Optional[Int[Array, "B T"]] = None, num_videos: int = 1) -> Float[Array, "B T W"]:
  """Scores for the keep mask with exploration: each video (a row, or a video of an example-packed row)
  takes Uniform(0, 1) scores instead of its own with probability `prob`, so its keep mask is random pruning
  at the same budget. Why: a scorer held to a misleading target keeps dropping the event, and a model that
  never sees the event gives its scorer no signal to keep it; a share of random selections lets the task
  loss (through the soft bias, which still uses the scorer's own scores) find what matters."""
  b, t, w = scores_btw.shape
  k_video, k_scores = jax.random.split(rng)
  explore_bv = jax.random.uniform(k_video, (b, num_videos)) < prob
  explore_bt = explore_bv[:, :1] if video_ids is None else jnp.take_along_axis(explore_bv, video_ids, axis=1)
  explore_bt = jnp.broadcast_to(explore_bt, (b, t))
  random_btw = pruning.random_scores(k_scores, (b, t, w))
  return jnp.where(explore_bt[:, :, None], random_btw, scores_btw.astype(jnp.float32)).astype(scores_btw.dtype)


def vit_features_video(model, patches: Shaped[Array, "B T P I"], frame_mask: Bool[Array, "B T"],
                       rng: Optional[jax.Array] = None, *, deterministic: bool = True,
                       video_ids: Optional[Int[Array, "B T"]] = None, num_videos: int = 1,
                       aux_gradient: str = "all", random_selection: float = 0.0,
                       policy_temperature: float = 0.0) -> VisionOutput:
  """The ViT half of the STTS forward (module docstring): features for the adapter plus the keep mask.

  Pruned: `vit_scored` then `vit_pruned`. video_ids / num_videos: example-packed rows
  (`frame_example`, V); None: one video per row. aux_gradient: as `vit_scored`. random_selection
  (training only, `train.random_selection`): each video's keep mask comes from random scores instead
  of its own with this probability (`explore_selection`). policy_temperature (training only, learned
  scorer, `train.policy_gradient`): each video's keep mask is a sample from the scorer's ranking at
  this temperature (`selection_policy`), and `selection_logp` holds its log-probability."""
  cfg = model.config
  b, t, p, i = patches.shape
  if not cfg.stts.prunes:
    taps = tuple(cfg.adapter.vit_layers)
    hidden = model.vit.embed(normalize_patches(patches).reshape(b * t, p, i))
    _, outs = run_vit_rows(model, hidden.reshape(b, t, p, hidden.shape[-1]), 0, max(taps) + 1, taps=taps)
    features = adapter_lib.concat_taps(outs, taps)
    keep = jnp.broadcast_to(frame_mask[:, :, None], (b, t, cfg.windows_per_frame))
    zero = jnp.zeros((), jnp.float32)
    return VisionOutput(features, keep, jnp.zeros((b, t, cfg.windows_per_frame), jnp.float32), zero,
                        jnp.asarray(False))
  scored, aux = vit_scored(model, patches, frame_mask, rng, deterministic=deterministic, video_ids=video_ids,
                           aux_gradient=aux_gradient)
  selected = scored
  sampling = policy_temperature > 0 and not deterministic and cfg.stts.method == "stts"
  if sampling:
    if rng is None or video_ids is not None or random_selection > 0:
      raise ValueError("vit_features_video: policy_temperature in training needs an `rng`, one video per row "
                       "(no example packing) and no random_selection")
    keys = selection_policy.sample_keys(scored.scores_btw, jax.random.fold_in(rng, _POLICY_STREAM),
                                        policy_temperature)
    selected = dataclasses.replace(scored, scores_btw=keys)
  if random_selection > 0 and not deterministic:
    if rng is None:
      raise ValueError("vit_features_video: random_selection in training mode needs an `rng`")
    selected = dataclasses.replace(scored, scores_btw=explore_selection(
        scored.scores_btw, jax.random.fold_in(rng, _EXPLORE_STREAM), random_selection, video_ids, num_videos))
  features, keep, fits = vit_pruned(model, selected, frame_mask, video_ids=video_ids, num_videos=num_videos)
  logp = None
  if sampling:
    logp = selection_policy.drop_log_prob(scored.scores_btw, selected.scores_btw, keep, frame_mask,
                                          policy_temperature)
  return VisionOutput(features, keep, scored.scores_btw.astype(jnp.float32), aux, fits, logp)


def vit_after_prune(model, hidden_btpd: Float[Array, "B T P D"], keep_mask: Bool[Array, "B T W"], *,
                    num_rows: int, video_ids: Optional[Int[Array, "B T"]] = None
                    ) -> tuple[dict[int, Float[Array, "B T P D"]], Bool[Array, ""]]:
  """Blocks prune_at+2 .. max(taps) on the kept patches -> ({tap: [B, T, P, D], zeros at dropped}, packed).

  Packed into `num_rows` rows per video when every video fits, else (same batch, exact same
  attention sets) one frame per row with a block mask, `num_rows` frames per video at a time: never
  loses a kept token, and the fallback's memory stays that of the packed path.
  With `num_rows >= T` packing cannot save work (as many rows as frames): unless `stts.packing` is
  "always", the frames then run as they are, one per row with the plan's attention sets, chosen
  statically: no pack/unpack, no `cond`, no fallback (docs/benchmark.md compares both at ratio 0.3).
  `packed` is then True as well: it means "not the dense fallback".
  video_ids: example-packed rows; each video is planned on its own (`packing.make_plan`).
  """
  cfg = model.config
  b, t, p, d = hidden_btpd.shape
  grid_hw, window = (cfg.vit.grid, cfg.vit.grid), tuple(cfg.stts.window)
  start, last = cfg.stts.prune_at + 2, max(cfg.adapter.vit_layers) + 1
  post_taps = tuple(x for x in cfg.adapter.vit_layers if x >= start)
  plan = packing.make_plan(pruning.keep_patch_mask(keep_mask, grid_hw, window), num_rows, video_ids)

  def packed_path(hidden_btpd):
    rows_brpd = packing.pack(hidden_btpd, plan)
    _, o = run_vit_rows(model, rows_brpd, start, last, taps=post_taps, segment_ids_bnp=plan.segment_ids_brp)
    return {k: packing.unpack(v, plan) for k, v in o.items()}

  def dense_path(hidden_btpd):
    # Frames in chunks of at most `num_rows` per video (each frame its own row), each chunk
    # rematerialised: the fallback's backward pass holds no more rows than the packed path's.
    chunk = min(num_rows, t, model.config.vit_chunk or t)
    _, o = run_vit_rows(model, hidden_btpd, start, last, taps=post_taps,
                        segment_ids_bnp=packing.dense_segment_ids(plan), chunk=chunk)
    keep_btp1 = plan.keep_btp[..., None]
    return {k: jnp.where(keep_btp1, v, jnp.zeros((), v.dtype)) for k, v in o.items()}

  if num_rows >= t and cfg.stts.packing == "auto":
    return dense_path(hidden_btpd), jnp.asarray(True)
  fits = plan.fits
  # The rare fallback is rematerialised: under autodiff `lax.cond` carries the residuals of both
  # branches (zeros for the one not taken), so without it every packed training step would also
  # write the dense path's activations as zeros (measured: ~20% of a pruned train step).
  return jax.lax.cond(fits, packed_path, jax.checkpoint(dense_path), hidden_btpd), fits


def kept_window_slots(keep_mask: Bool[Array, "B T W"], num_slots: int) -> tuple[Int[Array, "B K"], Bool[Array, "B K"]]:
  """Flat window ids t*W + w of each video's kept windows in order, padded to `num_slots`; valid mask."""
  b, t, w = keep_mask.shape
  flat = keep_mask.reshape(b, t * w)
  order = jnp.argsort(~flat, axis=-1, stable=True)[:, :num_slots].astype(jnp.int32)
  valid = jnp.arange(num_slots)[None, :] < jnp.sum(flat, axis=-1)[:, None]
  return order, valid


def pool_windows(model, vision: VisionOutput, num_slots: int,
                 slots: Optional[tuple[Int[Array, "B K"], Bool[Array, "B K"]]] = None
                 ) -> tuple[Float[Array, "B K E"], Bool[Array, "B K"]]:
  """Adapter on the kept windows only: `num_slots` per video, in (t, w) order; padding slots -> 0.
  slots: `kept_window_slots(vision.keep_mask_btw, num_slots)` if the caller has it already."""
  cfg = model.config
  b, t, p, c = vision.features_btpc.shape
  w = cfg.windows_per_frame
  idx_wm = jnp.asarray(windows_lib.window_patch_index((cfg.vit.grid, cfg.vit.grid), tuple(cfg.stts.window)))
  slots_bk, valid_bk = slots if slots is not None else kept_window_slots(vision.keep_mask_btw, num_slots)
  m = idx_wm.shape[-1]
  # Per-example indices into that example's [T*P] patches and a batched gather: the batch axis stays
  # sharded (indices into the whole batch's [B*T*P] table made SPMD gather, and scatter-add the
  # gradient of, every example's features on every device).
  local_bkm = (slots_bk // w)[..., None] * p + idx_wm[slots_bk % w]
  local_bkm = jnp.where(valid_bk[..., None], local_bkm, 0)
  flat_bnc = partitioning.constrain(vision.features_btpc.reshape(b, t * p, c).astype(model.adapter.dtype),
                                    ("act_batch", None, None))
  gathered = jnp.take_along_axis(flat_bnc, local_bkm.reshape(b, num_slots * m, 1), axis=1)
  gathered = partitioning.constrain(gathered, ("act_batch", None, None)).reshape(b * num_slots, m, c)
  valid_qm = jnp.broadcast_to(valid_bk[..., None], (b, num_slots, m)).reshape(b * num_slots, m)
  feats = model.adapter.project(model.adapter.pool_gathered(gathered, valid_qm))
  return feats.reshape(b, num_slots, -1), valid_bk


def selection_gate(vision: VisionOutput, slots_bk: Int[Array, "B K"], weight: float) -> Float[Array, "B K"]:
  """1 + weight * (s - stop_gradient(s)) per kept-window slot (`kept_window_slots`; s: the window's
  score, `vision.scores_btw`; padding slots: any value, their features are 0). Exactly 1 in value; its
  gradient is weight x (how much the loss would change if the window's feature were scaled up), so the
  scorer learns which of the windows it kept the answer uses. The soft bias alone only tells it how
  block prune_at+1 should attend."""
  b, t, w = vision.keep_mask_btw.shape
  s_bk = jnp.take_along_axis(vision.scores_btw.reshape(b, t * w).astype(jnp.float32), slots_bk, axis=1)
  return 1.0 + weight * (s_bk - jax.lax.stop_gradient(s_bk))


def llm_window_features(model, vision: VisionOutput, num_slots: Optional[int] = None,
                        selection_gradient: float = 0.0) -> Float[Array, "B K E"]:
  """Pooled window features in the order of the LLM sequence's `<im_patch>` tokens (feature j goes to
  the j-th one, `merge_per_sample`).

  LLM-side pruning on: the sequence keeps only the kept windows' tokens, so the features are the kept
  windows compacted in (t, w) order (K = num_kept(T)). `stts.llm_prune=False`: every window keeps its
  token (K = T*W), so kept window (t, w) must land on token t*W + w and a dropped window's token gets a
  zero feature; compacted features would shift later windows onto earlier, dropped windows' tokens.
  num_slots: static slots (default `num_llm_slots` of the T bucket; example-packed rows pass
  `example_packing.llm_slots`).
  selection_gradient (training, `train.selection_gradient`; learned scorer only): each kept window's
  feature is multiplied by 1 + g * (s - stop_gradient(s)), its own score s: the value stays the
  feature, and the task loss reaches the score of every window the LLM reads (`selection_gate`).
  """
  if num_slots is None:
    num_slots = num_llm_slots(model.config, vision.keep_mask_btw.shape[1])
  # One argsort of the keep mask serves the pooling, the selection gate and the token placement.
  slots_bk, valid_bk = kept_window_slots(vision.keep_mask_btw, num_slots)
  feats, _ = pool_windows(model, vision, num_slots, slots=(slots_bk, valid_bk))
  st = model.config.stts
  if selection_gradient > 0 and st.method == "stts":
    feats = feats * selection_gate(vision, slots_bk, selection_gradient)[..., None].astype(feats.dtype)
  if st.prunes and not st.llm_prune:
    b, k, _ = feats.shape
    target_bk = jnp.where(valid_bk, slots_bk, k)   # padding slots (zero features) go to a spare column
    placed = jnp.zeros((b, k + 1, feats.shape[-1]), feats.dtype)
    placed = placed.at[jnp.arange(b)[:, None], target_bk].set(feats)
    feats = placed[:, :k]
  return feats


def merge_per_sample(embeds_bse: Float[Array, "B S E"], input_ids: Int[Array, "B S"],
                     token_mask: Bool[Array, "B S"], feats_bke: Float[Array, "B K E"],
                     image_patch_id: int) -> Float[Array, "B S E"]:
  """Adds feature j of sample b to the j-th `<im_patch>` embedding of sample b."""
  is_patch = (input_ids == image_patch_id) & token_mask
  rank = jnp.cumsum(is_patch, axis=-1, dtype=jnp.int32) - 1
  k = feats_bke.shape[1]
  gathered = jnp.take_along_axis(feats_bke, jnp.clip(rank, 0, k - 1)[..., None], axis=1)
  return embeds_bse + jnp.where(is_patch[..., None], gathered.astype(embeds_bse.dtype), 0)


def num_llm_slots(cfg, num_frames: int) -> int:
  """Static kept-window slots per video on the LLM side: num_kept(T) when pruning reaches it, else T*W."""
  st = cfg.stts
  w = cfg.windows_per_frame
  return budget.num_kept(num_frames, w, st.ratio) if (st.prunes and st.llm_prune) else num_frames * w


@struct.dataclass
class DecoderInputs:
  """What the decoder sees for a (possibly pruned) sequence of static length S' (or S)."""
  input_ids: Any   # int32 [B, S']
  embeds: Any   # float [B, S', E]; token embeddings + pooled features at the `<im_patch>` tokens
  positions: Any   # int32 [B, S']; contiguous 0.. (pruned tokens take no position)
  token_mask: Any   # bool [B, S']
  vision_mask: Any   # bool [B, S']; mm-type-1 tokens (bidirectional block at prefill)
  target_ids: Any   # int32 [B, S'] (zeros when no targets were given)
  loss_mask: Any   # bool [B, S']
  num_truncated: Any   # int32 [B]; tokens cut by the static length (0 for valid data)
  example_ids: Any = None   # int32 [B, S']; example slot of each token (example-packed rows; -1 padding)


def decoder_inputs(model, input_ids: Int[Array, "B S"], token_mask: Bool[Array, "B S"],
                   keep_mask_btw: Bool[Array, "B T W"], feats_bke: Float[Array, "B K E"],
                   target_ids: Optional[Int[Array, "B S"]] = None,
                   loss_mask: Optional[Bool[Array, "B S"]] = None,
                   example_ids: Optional[Int[Array, "B S"]] = None) -> DecoderInputs:
  """Drops pruned windows' `<im_patch>` tokens (static S' = S - dropped(T)), merges the kept
  windows' features and builds positions and the vision mask. Shared by training and generation.

  example_ids: example-packed rows (`token_example`): the row is compacted to
  S' = S - `budget.packed_dropped_bound(F)` instead, the ids follow their tokens, and positions
  restart at 0 for every example (`example_packing.segment_positions`)."""
  cfg = model.config
  st = cfg.stts
  ids, token_mask = jnp.asarray(input_ids, jnp.int32), jnp.asarray(token_mask, bool)
  targets = jnp.zeros_like(ids) if target_ids is None else jnp.asarray(target_ids, jnp.int32)
  loss_mask = jnp.zeros_like(token_mask) if loss_mask is None else jnp.asarray(loss_mask, bool)
  b, s = ids.shape
  t = keep_mask_btw.shape[1]
  truncated = jnp.zeros((b,), jnp.int32)
  ex = None if example_ids is None else jnp.where(token_mask, jnp.asarray(example_ids, jnp.int32), -1)
  if st.prunes and st.llm_prune:
    if ex is None:
      out_len = budget.pruned_seq_len(s, t, cfg.windows_per_frame, st.ratio)
    else:
      out_len = s - example_packing.llm_dropped(cfg, t)
    comp = sequence.prune_sequence(ids, token_mask, targets, loss_mask, keep_mask_btw,
                                   cfg.tokens.image_patch, out_len, cfg.tokens.pad)
    ids, token_mask = comp.input_ids_bs, comp.token_mask_bs
    targets, loss_mask, truncated = comp.target_ids_bs, comp.loss_mask_bs, comp.num_truncated_b
    if ex is not None:
      ex = jnp.where(token_mask, jnp.take_along_axis(ex, jnp.clip(comp.src_bs, 0), axis=1), -1)
    s = out_len
  embeds = merge_per_sample(model.llm.embed(ids), ids, token_mask, feats_bke, cfg.tokens.image_patch)
  if ex is None:
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  else:
    positions = example_packing.segment_positions(ex)
  return DecoderInputs(input_ids=ids, embeds=embeds, positions=positions, token_mask=token_mask,
                       vision_mask=vision_token_mask(ids, cfg.tokens), target_ids=targets,
                       loss_mask=loss_mask, num_truncated=truncated, example_ids=ex)


def llm_forward(model, batch: dict[str, Any], vision: VisionOutput, *, logits: bool = True,
                selection_gradient: float = 0.0) -> VideoOutput:
  """The LLM half: pooled kept windows -> (pruned) sequence -> decoder -> logits.

  logits=False: no LM head; the output carries the final hidden states [B, S, E] and the head kernel
  [E, V] instead, for a loss that needs logits at a few positions only (train/loss.py).
  selection_gradient: as `llm_window_features`.
  """
  packed_rows = example_packing.is_packed(batch)
  if packed_rows:
    frames, videos = vision.keep_mask_btw.shape[1], batch["example_frames"].shape[1]
    feats = llm_window_features(model, vision, example_packing.llm_slots(model.config, frames, videos),
                                selection_gradient=selection_gradient)
  else:
    feats = llm_window_features(model, vision, selection_gradient=selection_gradient)
  dec = decoder_inputs(model, batch["input_ids"], batch["token_mask"], vision.keep_mask_btw, feats,
                       batch["target_ids"], batch["loss_mask"],
                       example_ids=batch["token_example"] if packed_rows else None)
  hidden, _ = model.llm(dec.embeds, dec.positions, dec.token_mask, dec.vision_mask, example_ids_bs=dec.example_ids)
  head = dict(logits=model.llm.logits(hidden)) if logits else dict(
      logits=None, hidden=hidden, lm_head=model.llm.lm_head.kernel[...])
  return VideoOutput(
      target_ids=dec.target_ids, loss_mask=dec.loss_mask,
      token_mask=dec.token_mask, aux_loss=vision.aux_loss, keep_mask=vision.keep_mask_btw,
      scores=vision.scores_btw, num_kept=pruning.num_kept(vision.keep_mask_btw),
      num_truncated=dec.num_truncated, packed=vision.packed, example_ids=dec.example_ids,
      selection_logp=vision.selection_logp, **head)


def forward_video(model, batch: dict[str, Any], *, rng: Optional[jax.Array] = None,
                  deterministic: bool = True, logits: bool = True, aux_gradient: str = "all",
                  random_selection: float = 0.0, selection_gradient: float = 0.0,
                  policy_temperature: float = 0.0) -> VideoOutput:
  """The full STTS video forward (module docstring). Static shapes: one compilation per (B, T, S).
  Example-packed batches (`token_example` present; `models/example_packing.py`) take the packed path.

  logits=False: hidden states and the LM head kernel instead of [B, S, V] logits (`llm_forward`).
  aux_gradient: where the aux loss's gradient goes (`vit_scored`; `train.aux_gradient`). random_selection:
  training-time exploration of the keep mask (`explore_selection`; `train.random_selection`).
  selection_gradient: the task loss's gradient to the kept windows' scores (`selection_gate`;
  `train.selection_gradient`). policy_temperature: sampled keep masks and their log-probability
  (`vit_features_video`; `train.policy_gradient`)."""
  _check_batch(batch)
  patches = jnp.asarray(batch["patches"])
  frame_mask = jnp.asarray(batch["frame_mask"], bool)
  if example_packing.is_packed(batch):
    missing = [k for k in example_packing.PACKED_KEYS if k not in batch]
    if missing:
      raise KeyError(f"forward_video: example-packed batch is missing {missing}")
    vision = vit_features_video(model, patches, frame_mask, rng, deterministic=deterministic,
                                video_ids=jnp.asarray(batch["frame_example"], jnp.int32),
                                num_videos=batch["example_frames"].shape[1], aux_gradient=aux_gradient,
                                random_selection=random_selection, policy_temperature=policy_temperature)
  else:
    vision = vit_features_video(model, patches, frame_mask, rng, deterministic=deterministic,
                                aux_gradient=aux_gradient, random_selection=random_selection,
                                policy_temperature=policy_temperature)
  return llm_forward(model, batch, vision, logits=logits, selection_gradient=selection_gradient)

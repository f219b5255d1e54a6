"""Public face of STTS (DESIGN.md section 3): the names the issues use, re-exported.

Single video (all frames real):
  budget_keep_mask(scores [T, W], ratio) -> bool [T, W]
  scores_to_patch_bias(scores [T, W], grid_hw, window, scope="window_row") -> key bias [T, P]
  temporal_aux_loss(scores [T, W], patch_features [T, P, D], grid_hw, window) -> scalar
  heuristic_scores(patch_features [T, P, D], grid_hw, window) -> [T, W]
  window_scores(scorer, hidden [T, P, D], grid_hw, window) -> [T, W]
Batched (leading B, `frame_mask [B, T]`, optional `prunable [B]`): the `*_batched` variants.
Static counts: `stts_jax.models.budget`; packing: `stts_jax.models.packing`;
LLM-side compaction: `stts_jax.models.sequence`; the full forward: `stts_jax.models.video_forward`.
"""

from stts_jax.models.aux_loss import cosine_to_previous
from stts_jax.models.aux_loss import heuristic_scores
from stts_jax.models.aux_loss import temporal_aux_loss
from stts_jax.models.aux_loss import temporal_aux_loss_batched
from stts_jax.models.pruning import budget_keep_mask
from stts_jax.models.pruning import budget_keep_mask_batched
from stts_jax.models.pruning import keep_patch_mask
from stts_jax.models.pruning import random_scores
from stts_jax.models.pruning import rescale_scores
from stts_jax.models.pruning import scores_to_patch_bias
from stts_jax.models.pruning import scores_to_patch_bias_batched
from stts_jax.models.scorer import WindowScorer
from stts_jax.models.scorer import window_scores

__all__ = [
    "WindowScorer",
    "budget_keep_mask",
    "budget_keep_mask_batched",
    "cosine_to_previous",
    "heuristic_scores",
    "keep_patch_mask",
    "random_scores",
    "rescale_scores",
    "scores_to_patch_bias",
    "scores_to_patch_bias_batched",
    "temporal_aux_loss",
    "temporal_aux_loss_batched",
    "window_scores",
]

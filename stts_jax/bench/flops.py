"""Analytic FLOPs of the Molmo2 video forward, unpruned and with STTS (DESIGN.md 3, 4).

Counted: matrix multiplies only, 2 FLOPs per multiply-add (norms, softmax, biases, activations, the
heuristic's cosines and gathers are ignored; they are well under 1% at Molmo2 sizes). One video of
T frames, P patches per frame, W windows of M patches, prompt length S.

ViT (patch embedding 588 -> D; blocks run: 0 .. max(adapter taps); width D, MLP Fv):
  embed            2 * T*P * 588 * D
  block, per token 2 * (4 D^2 + 2 D Fv) + 4 * L * D      L = keys per query: P (one frame / one row)
Scorer (method "stts"; per window, heads of the pooler total D, MLP hidden Fs):
  2 * (D^2 [q] + 2 M D^2 [k, v] + D^2 [o]) + 4 M D [attention] + 2 * (2D Fs + Fs^2 + Fs) [MLP]
Adapter (per pooled window; C = D * len(taps), pooling width D, projector hidden Fa, LLM width E):
  2 * (C D [q] + 2 M C D [k, v] + D^2 [o]) + 4 M D + 2 * (2 D Fa + Fa E)
LLM (per token; N, K heads of H, MLP F, vocab V; lm_head on every position as in training):
  2 * E (N H + 2 K H) + 2 N H E + 6 E F + 4 * S * N H [dense attention] + 2 E V

Unpruned forward: all blocks on T*P tokens, adapter on T*W windows, LLM on S tokens.
Pruned forward (ratio r, kept K = kept(T), rows R): blocks 0..prune_at+1 on T*P tokens; blocks
prune_at+2..max(taps) on R*P packed tokens (each row attends over L = P keys); scorer on T*W windows;
adapter on K windows; LLM on S' = S - dropped(T) tokens.

The design's prediction (DESIGN.md 1, 3.7-3.9: dropped tokens cost nothing beyond row padding):
  predicted = embed + pre-prune blocks + (1 - r) * post-prune blocks + scorer
              + (1 - r) * adapter + LLM(S - r*W*T)
with every term taken from the unpruned forward. `pruned_forward_flops` with R = ceil(K / W)
(`budget.min_rows`) matches it up to floor effects; the default row bound (`budget.row_bound`) is
the worst case and costs more ViT rows.
"""

import dataclasses
from typing import Optional

from stts_jax.config import LLMConfig, ModelConfig
from stts_jax.models import budget


@dataclasses.dataclass(frozen=True)
class ForwardFlops:
  """FLOPs of one video forward by part."""
  vit_embed: float
  vit_pre: float        # blocks 0 .. prune_at+1 (all blocks when unpruned)
  vit_post: float       # blocks after the soft block (0 when unpruned)
  scorer: float
  adapter: float
  llm: float
  seq_len: int
  vit_tokens_post: int

  @property
  def vit(self) -> float:
    return self.vit_embed + self.vit_pre + self.vit_post + self.scorer

  @property
  def total(self) -> float:
    return self.vit + self.adapter + self.llm


def vit_block_flops(cfg: ModelConfig, tokens: int, keys: int) -> float:
  d, f = cfg.vit.hidden_size, cfg.vit.intermediate_size
  return tokens * (2.0 * (4 * d * d + 2 * d * f) + 4.0 * keys * d)


def scorer_flops(cfg: ModelConfig, windows: int) -> float:
  d, f = cfg.vit.hidden_size, cfg.stts.scorer_hidden
  m = cfg.stts.window[0] * cfg.stts.window[1]
  per = 2.0 * (d * d + 2 * m * d * d + d * d) + 4.0 * m * d + 2.0 * (2 * d * f + f * f + f)
  return windows * per


def adapter_flops(cfg: ModelConfig, windows: int) -> float:
  d = cfg.vit.hidden_size
  c = d * len(cfg.adapter.vit_layers)
  fa, e = cfg.adapter.intermediate_size, cfg.llm.hidden_size
  m = cfg.adapter.video_pool[0] * cfg.adapter.video_pool[1]
  per = 2.0 * (c * d + 2 * m * c * d + d * d) + 4.0 * m * d + 2.0 * (2 * d * fa + fa * e)
  return windows * per


def llm_flops(cfg: LLMConfig, seq_len: int, with_head: bool = True) -> float:
  e, nh, kh = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  per_layer = 2.0 * e * (nh + 2 * kh) + 2.0 * nh * e + 6.0 * e * cfg.intermediate_size + 4.0 * seq_len * nh
  head = 2.0 * e * cfg.vocab_size if with_head else 0.0
  return seq_len * (cfg.num_layers * per_layer + head)


def _vit_blocks(cfg: ModelConfig) -> int:
  return max(cfg.adapter.vit_layers) + 1


def unpruned_forward_flops(cfg: ModelConfig, num_frames: int, seq_len: int) -> ForwardFlops:
  p, w = cfg.vit.num_patches, cfg.windows_per_frame
  tokens = num_frames * p
  return ForwardFlops(
      vit_embed=2.0 * tokens * cfg.vit.patch_dim * cfg.vit.hidden_size,
      vit_pre=_vit_blocks(cfg) * vit_block_flops(cfg, tokens, p),
      vit_post=0.0, scorer=0.0,
      adapter=adapter_flops(cfg, num_frames * w),
      llm=llm_flops(cfg.llm, seq_len), seq_len=seq_len, vit_tokens_post=0)


def pruned_forward_flops(cfg: ModelConfig, num_frames: int, seq_len: int, *, ratio: Optional[float] = None,
                         method: Optional[str] = None, num_rows: Optional[int] = None) -> ForwardFlops:
  """FLOPs of the STTS forward with the static shapes the implementation uses.

  `num_rows` defaults to the config's (`stts.num_rows` or the proven bound)."""
  ratio = cfg.stts.ratio if ratio is None else ratio
  method = cfg.stts.method if method is None else method
  if method == "none" or ratio == 0:
    return unpruned_forward_flops(cfg, num_frames, seq_len)
  p, w = cfg.vit.num_patches, cfg.windows_per_frame
  rows = budget.num_rows(num_frames, w, ratio, cfg.stts.num_rows if num_rows is None else num_rows)
  n_pre = cfg.stts.prune_at + 2
  n_post = _vit_blocks(cfg) - n_pre
  tokens = num_frames * p
  s_out = budget.pruned_seq_len(seq_len, num_frames, w, ratio)
  return ForwardFlops(
      vit_embed=2.0 * tokens * cfg.vit.patch_dim * cfg.vit.hidden_size,
      vit_pre=n_pre * vit_block_flops(cfg, tokens, p),
      vit_post=n_post * vit_block_flops(cfg, rows * p, p),
      scorer=scorer_flops(cfg, num_frames * w) if method == "stts" else 0.0,
      adapter=adapter_flops(cfg, budget.num_kept(num_frames, w, ratio)),
      llm=llm_flops(cfg.llm, s_out), seq_len=s_out, vit_tokens_post=rows * p)


def design_prediction(cfg: ModelConfig, num_frames: int, seq_len: int, ratio: float,
                      method: str = "stts") -> float:
  """The design's linear prediction of the pruned forward's FLOPs (module docstring)."""
  full = unpruned_forward_flops(cfg, num_frames, seq_len)
  p, w = cfg.vit.num_patches, cfg.windows_per_frame
  n_pre = cfg.stts.prune_at + 2
  block = vit_block_flops(cfg, num_frames * p, p)
  pre = n_pre * block
  post = full.vit_pre - pre
  kept = 1.0 - ratio
  scorer = scorer_flops(cfg, num_frames * w) if method == "stts" else 0.0
  s_pred = round(seq_len - ratio * w * num_frames)
  return (full.vit_embed + pre + kept * post + scorer + kept * full.adapter
          + llm_flops(cfg.llm, s_pred))

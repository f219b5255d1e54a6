"""Analytic FLOPs of the benchmark's parts, built on `stts_jax.bench.flops` (matmuls only, 2 per
multiply-add, per batch of `batch` identical-shape videos).

  vision          ViT (+ scorer when pruning) + adapter on the kept windows: `ForwardFlops.vit + adapter`
  prefill         decoder on the (pruned) prompt of S tokens writing a cache of S + N slots; every query
                  attends over all S + N slots (the static cache), lm_head on the last position only
  decode (token)  one new token attending over the S + N cache slots, lm_head on it
  train step      forward + backward = 3x the forward, minus the input gradient of the patch
                  embedding (pixels need none); `remat` adds recomputed forwards of the layer stacks
  stts overhead   scorer forward + backward (3x `flops.scorer_flops`); packing, budget and sequence
                  compaction are gathers/sorts with no matmuls (0 here; their time is measured)
"""

from stts_jax.bench import flops as flops_lib
from stts_jax.config import LLMConfig, ModelConfig


def forward(cfg: ModelConfig, num_frames: int, seq_len: int) -> flops_lib.ForwardFlops:
  """The video forward of one sample with the cell's config (its method, ratio and num_rows)."""
  if not cfg.stts.prunes:
    return flops_lib.unpruned_forward_flops(cfg, num_frames, seq_len)
  return flops_lib.pruned_forward_flops(cfg, num_frames, seq_len)


def _llm_layer_dense(cfg: LLMConfig) -> float:
  e, nh, kh = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return 2.0 * e * (nh + 2 * kh) + 2.0 * nh * e + 6.0 * e * cfg.intermediate_size


def prefill(cfg: LLMConfig, seq_len: int, cache_len: int, batch: int = 1) -> float:
  """Decoder over `seq_len` tokens against a `cache_len`-slot cache, logits of the last token."""
  nh = cfg.num_heads * cfg.head_dim
  per_layer = seq_len * (_llm_layer_dense(cfg) + 4.0 * cache_len * nh)
  return batch * (cfg.num_layers * per_layer + 2.0 * cfg.hidden_size * cfg.vocab_size)


def decode_token(cfg: LLMConfig, cache_len: int, batch: int = 1) -> float:
  """One generated token per sample (attention over all `cache_len` slots)."""
  nh = cfg.num_heads * cfg.head_dim
  per_layer = _llm_layer_dense(cfg) + 4.0 * cache_len * nh
  return batch * (cfg.num_layers * per_layer + 2.0 * cfg.hidden_size * cfg.vocab_size)


def vision(fwd: flops_lib.ForwardFlops, batch: int = 1) -> float:
  return batch * (fwd.vit + fwd.adapter)


def train_step(cfg: ModelConfig, fwd: flops_lib.ForwardFlops, batch: int = 1) -> float:
  """3x forward minus the patch embedding's input gradient; `cfg.remat == "full"` recomputes the ViT
  blocks and decoder layers (not the lm_head) once more in the backward pass ("dots" keeps matmul
  outputs: no extra matmuls)."""
  total = 3.0 * fwd.total - fwd.vit_embed
  if cfg.remat == "full":
    head = 2.0 * cfg.llm.hidden_size * cfg.llm.vocab_size * fwd.seq_len
    total += fwd.vit_pre + fwd.vit_post + fwd.llm - head
  return batch * total


def stts_overhead(cfg: ModelConfig, num_frames: int, batch: int = 1, train: bool = True) -> float:
  """Scorer FLOPs (x3 with its backward in training); 0 when the method has no scorer."""
  if not cfg.stts.prunes or cfg.stts.method != "stts":
    return 0.0
  return batch * (3.0 if train else 1.0) * flops_lib.scorer_flops(cfg, num_frames * cfg.windows_per_frame)

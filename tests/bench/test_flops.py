import dataclasses

import pytest

from stts_jax.bench import flops
from stts_jax.config import ModelConfig, STTSConfig
from stts_jax.models import budget
from stts_jax.testing.tiny import tiny_model_config


def _molmo2(**stts):
  return ModelConfig(stts=STTSConfig(method="stts", **stts)).validate()


def test_hand_counts_tiny():
  cfg = tiny_model_config(method="stts")
  # ViT block: D=32, F=64, 81 patches -> per token 2*(4*32*32 + 2*32*64) + 4*81*32
  assert flops.vit_block_flops(cfg, 1, 81) == 2 * (4096 + 4096) + 10368
  # LLM: E=64, N*H=64, K*H=32, F=128, V=512, 2 layers
  per_layer = 2 * 64 * (64 + 64) + 2 * 64 * 64 + 6 * 64 * 128 + 4 * 10 * 64
  assert flops.llm_flops(cfg.llm, 10) == 10 * (2 * per_layer + 2 * 64 * 512)
  full = flops.unpruned_forward_flops(cfg, 4, 60)
  assert full.vit_embed == 2 * 4 * 81 * 588 * 32
  assert full.vit_pre == 6 * flops.vit_block_flops(cfg, 4 * 81, 81)   # blocks 0..5 (max tap 5)
  assert full.adapter == flops.adapter_flops(cfg, 36)


def test_molmo2_ratio_half_matches_design_within_2_percent():
  cfg = _molmo2()
  t, s = 64, 64 * (81 + 6) + 64            # frames, markers and timestamps, question
  w = cfg.windows_per_frame
  pred = flops.design_prediction(cfg, t, s, 0.5)
  pruned = flops.pruned_forward_flops(cfg, t, s, ratio=0.5, num_rows=budget.min_rows(t, w, 0.5))
  full = flops.unpruned_forward_flops(cfg, t, s)
  assert abs(pruned.total / pred - 1) < 0.02
  assert pruned.seq_len == s - 2592 and pruned.vit_tokens_post == 32 * 729
  # both halves get cheaper; numbers for the report
  speed = full.total / pruned.total
  assert 1.5 < speed < 2.2
  assert full.vit / pruned.vit > 1.4 and full.llm / pruned.llm > 1.6
  # the worst-case row bound costs ViT time but never LLM time
  worst = flops.pruned_forward_flops(cfg, t, s, ratio=0.5)
  assert worst.vit_tokens_post == budget.row_bound(t, w, 0.5) * 729
  assert worst.llm == pruned.llm and worst.vit > pruned.vit


def test_none_and_ratio_zero_are_unpruned():
  cfg = _molmo2()
  full = flops.unpruned_forward_flops(cfg, 8, 900)
  assert flops.pruned_forward_flops(cfg, 8, 900, ratio=0.0) == full
  assert flops.pruned_forward_flops(cfg, 8, 900, method="none") == full
  rnd = flops.pruned_forward_flops(cfg, 8, 900, method="random", ratio=0.5)
  stts = flops.pruned_forward_flops(cfg, 8, 900, method="stts", ratio=0.5)
  assert rnd.scorer == 0 and stts.scorer > 0 and stts.total - rnd.total == stts.scorer

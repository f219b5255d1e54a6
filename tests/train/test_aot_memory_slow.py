"""AOT memory before vs after issue 17 on a shallow Molmo2-4B (real widths and vocab, 2 LLM layers,
14 ViT layers, 16 frames, sequence 2048) on 8 virtual devices, micro-batch 1 per device (slow: four
compiles of ~1 min each).

before = attention xla + full [S, V] logits; after = attention auto (blockwise here) + answer-only
logits. The full logits alone are S' x V float32 per example (S' = pruned length), so dropping them
must save at least that; the after step must need less than the before step in total.
"""

import sys

import pytest

from stts_jax.models import budget
from stts_jax.train import main as train_main

GIB = 1024 ** 3


def _report(arg: str):
  sys.path.insert(0, ".")
  from configs import molmo2_4b_stts
  cfg = molmo2_4b_stts.get_config(f"frames=16,seq=2048,vit_layers=14,llm_layers=2,fsdp=8,batch=8,accum=1,pack=false,{arg}")
  return train_main.aot_from_config(cfg, count_flops=False)


@pytest.mark.slow
@pytest.mark.multidevice
def test_after_needs_less_memory_than_before():
  before = _report("attention=xla,loss=full")
  logits_only = _report("attention=xla,loss=answer")
  after = _report("attention=auto,loss=answer")
  seq = 2048 - budget.num_dropped(16, 81, 0.5)
  full_logits = seq * 151936 * 4   # one example's float32 [S', V] per device
  assert before.argument_bytes == after.argument_bytes   # same parameters and optimizer state
  assert before.temp_bytes - logits_only.temp_bytes >= full_logits
  assert after.temp_bytes < logits_only.temp_bytes
  assert after.argument_bytes + after.temp_bytes < 0.8 * (before.argument_bytes + before.temp_bytes)
  assert {a["site"]: a["impl"] for a in after.attention}.get("llm") == "blockwise"

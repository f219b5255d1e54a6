"""Generation benchmark (`stts_jax.bench.generation`): rows, one compilation per stage, STTS prunes."""

import json
import os

import pytest

from stts_jax.bench import generation


@pytest.mark.slow   # generation benchmark compiles prefill and decode per variant
def test_generation_tiny_two_frames(tmp_path):
  out = generation.run(str(tmp_path), models=("tiny",), frames=(2,), rounds=2, min_seconds=0.0,
                       max_new_tokens=4)
  rows = out["rows"]
  assert [(r["model"], r["frames"], r["method"]) for r in rows] == [("tiny", 2, "none"), ("tiny", 2, "stts")]
  for r in rows:
    for k in generation.CSV_COLUMNS:
      assert k in r, k
    assert (r["compiles_vision"], r["compiles_prefill"], r["compiles_decode"]) == (1, 1, 1)
    assert r["compiles_while_timing"] == 0
    assert r["generated_tokens"] == 4 and r["first_token_matches_decode"]
    assert r["ttft_ms"] >= r["vision_ms"] + r["prefill_ms"] > 0 and r["decode_tok_s"] > 0
  none, stts = rows
  assert none["vision_tokens_kept"] == none["vision_tokens_total"] == 18
  assert stts["vision_tokens_kept"] < stts["vision_tokens_total"]
  assert stts["llm_prompt_tokens"] == none["llm_prompt_tokens"] - (18 - stts["vision_tokens_kept"])
  assert none["ttft_speedup"] == 1.0
  checks = out["checks"]
  assert all(c["ok"] for k, c in checks.items() if not k.startswith("stts_ttft_speedup")), checks
  with open(os.path.join(tmp_path, "generation.json")) as f:
    saved = json.load(f)
  assert saved["commit"]["commit"] and saved["command"] and saved["environment"]["backend"] == "cpu"
  assert [len(c["seconds"]["ttft"]) for c in saved["cells"]] == [2, 2]
  with open(os.path.join(tmp_path, "generation.csv")) as f:
    assert f.readline().strip().split(",") == list(generation.CSV_COLUMNS)

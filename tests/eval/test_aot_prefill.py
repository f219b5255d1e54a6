"""AOT sizing of the inference stages (`eval/aot_prefill.py`) on the tiny model, from shapes only."""
import json

import pytest

from stts_jax.eval import aot_prefill
from stts_jax.models import attention as attention_lib
from stts_jax.models import budget
from stts_jax.testing import tiny

T = 4
N = 8


@pytest.fixture(scope="module")
def results():
  out = {}
  for method, stages in (("none", aot_prefill.STAGES), ("stts", aot_prefill.ALL_STAGES)):
    cfg = tiny.tiny_model_config(method=method, ratio=0.5)
    seq = aot_prefill.prompt_seq_len(T, cfg.windows_per_frame)
    out[method] = aot_prefill.compile_inference(cfg, num_frames=T, seq_len=seq, max_new_tokens=N, stages=stages)
  return out


def test_prompt_seq_len():
  # BOS + 384 frames x (81 pooled tokens + <frame_start>/<frame_end> + 8 timestamp tokens) + 128 text.
  assert aot_prefill.prompt_seq_len(384) == 1 + 384 * 91 + 128


def test_report_fields_are_present_and_positive(results):
  for method, r in results.items():
    json.dumps(r)   # JSON-friendly as returned
    assert set(r["stages"]) == set(aot_prefill.ALL_STAGES if method == "stts" else aot_prefill.STAGES)
    for name, st in r["stages"].items():
      for key in ("argument", "output", "temp"):
        assert st["bytes"][key] > 0, (method, name, key)
      assert st["compile_seconds"] > 0 and st["input_bytes"] > 0
      assert st["attention"], (method, name)   # every stage attends somewhere
      assert all(a["impl"] in attention_lib.IMPLEMENTATIONS and a["asked"] == "auto" for a in st["attention"])
      # The whole state is resident in every stage, even the parameters the program does not read.
      assert r["stage_totals_bytes"][name]["resident_args"] >= r["param_bytes"] > 0
    assert r["num_params"] > 0 and r["kv_cache_bytes"] > 0
    assert r["peak_bytes"] >= r["args_plus_temps_bytes"] > 0
    assert r["peak_gib"] > 0 and r["args_plus_temps_gib"] > 0
    assert r["peak_stage"] in aot_prefill.STAGES and r["peak_all_bytes"] >= r["peak_bytes"]
    sh = r["shapes"]
    assert (sh["frames"], sh["batch"], sh["max_new_tokens"]) == (T, 1, N)
    assert sh["seq_len"] == aot_prefill.prompt_seq_len(T, 9)
    assert sh["cache_slots"] == sh["pruned_seq_len"] + N
    row = aot_prefill.summary_row(method, r)
    assert row["prefill temps"] > 0 and row["args+temps GiB"] > 0


def test_pruning_shortens_the_prefill(results):
  none, stts = results["none"], results["stts"]
  w = 9
  assert none["shapes"]["pruned_seq_len"] == none["shapes"]["seq_len"]
  assert none["shapes"]["kept_windows"] == T * w and none["shapes"]["vit_packed_rows"] is None
  assert stts["shapes"]["pruned_seq_len"] == stts["shapes"]["seq_len"] - budget.num_dropped(T, w, 0.5)
  assert stts["shapes"]["pruned_seq_len"] < none["shapes"]["pruned_seq_len"]
  assert stts["shapes"]["kept_windows"] == budget.num_kept(T, w, 0.5)
  assert stts["kv_cache_bytes"] < none["kv_cache_bytes"]
  assert stts["stages"]["prefill"]["bytes"]["temp"] <= none["stages"]["prefill"]["bytes"]["temp"]
  # The prefill's attention runs over the pruned prompt against its S' + N cache slots.
  (llm,) = stts["stages"]["prefill"]["attention"]
  assert (llm["site"], llm["q"][1], llm["k"][1]) == ("decode", stts["shapes"]["pruned_seq_len"],
                                                     stts["shapes"]["cache_slots"])
  assert {a["site"] for a in stts["stages"]["vision"]["attention"]} == {"vit_frames", "vit_rows"}
  assert {a["site"] for a in none["stages"]["vision"]["attention"]} == {"vit_frames"}


def test_unknown_stage_is_an_error():
  with pytest.raises(ValueError, match="stages"):
    aot_prefill.compile_inference(tiny.tiny_model_config(), num_frames=T, seq_len=64, stages=("train",))

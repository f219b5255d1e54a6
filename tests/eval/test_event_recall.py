"""Event recall and accuracy split by it (stts_jax/experiments/event_recall.py)."""
import json
import math
import os

import numpy as np
import pytest

from stts_jax.experiments import event_recall
from tests.eval import helpers


def test_summarize_splits_accuracy_by_event_kept():
  correct = {"a": True, "b": False, "c": True, "d": True, "e": False}
  kept = {"a": True, "b": True, "c": False, "d": False, "e": False, "z": True}   # z: not scored
  qtypes = {"a": "when", "b": "where", "c": "when", "d": "where", "e": "when"}
  s = event_recall.summarize(correct, kept, qtypes, resamples=500)
  assert s["n"] == 5 and s["n_kept"] == 2 and s["n_dropped"] == 3
  assert s["event_recall"] == pytest.approx(0.4) and s["accuracy"] == pytest.approx(0.6)
  assert s["accuracy_event_kept"] == pytest.approx(0.5) and s["accuracy_event_dropped"] == pytest.approx(2 / 3)
  lo, hi = s["accuracy_event_dropped_ci"]
  assert 0.0 <= lo <= 2 / 3 <= hi <= 1.0
  assert s["by_qtype"]["when"]["n"] == 3 and s["by_qtype"]["where"]["accuracy_event_dropped"] == 1.0
  none_dropped = event_recall.summarize({"a": True}, {"a": True}, {"a": "when"}, resamples=10)
  assert math.isnan(none_dropped["accuracy_event_dropped"])


def test_parse_rows_and_manifest_errors(tmp_path):
  rows = event_recall.parse_rows("stts=runs/a/stts:stts, heur=/x:y/heuristic:heuristic", 0.7)
  assert rows[1] == event_recall.Row("heur", "/x:y/heuristic", "heuristic", 0.7)
  with pytest.raises(ValueError, match="expected name=CHECKPOINT:method"):
    event_recall.parse_rows("stts")
  with pytest.raises(ValueError, match="method must be"):
    event_recall.parse_rows("a=b:scorer")
  cfg = helpers.make_mc_dataset(str(tmp_path), n=2, frames=2, split="val")
  with pytest.raises(ValueError, match=r"val.jsonl:1: no event_frames"):
    event_recall.read_events(cfg, "val")


def test_evaluate_model_on_a_small_manifest(tmp_path, stts_model):
  cfg = helpers.make_mc_dataset(str(tmp_path), n=8, frames=4, split="val")
  path = os.path.join(str(tmp_path), "val.jsonl")
  recs = [json.loads(x) for x in open(path)]
  for i, r in enumerate(recs):   # events on frame 0 (never dropped) for even ids, on frame 3 otherwise
    r.update(event_frames=[0] if i % 2 == 0 else [3], event_window=i % 4, qtype="when" if i < 4 else "where")
  with open(path, "w") as f:
    f.write("\n".join(json.dumps(r) for r in recs) + "\n")
  events = event_recall.read_events(cfg, "val")
  full = event_recall.evaluate_model(stts_model, "none", 0.5, cfg, "val", events, resamples=100)
  assert full["n"] == 8 and full["event_recall"] == 1.0 and full["n_dropped"] == 0
  assert full["accuracy"] == pytest.approx(full["likelihood_accuracy"])
  pruned = event_recall.evaluate_model(stts_model, "stts", 0.7, cfg, "val", events, resamples=100)
  assert pruned["n"] == 8 and pruned["accuracy"] == pytest.approx(pruned["likelihood_accuracy"])
  assert pruned["by_qtype"]["when"]["n"] == 4
  # frame 0 is never dropped: every even question keeps its event; at 0.7 of 4 frames x 9 windows,
  # 25 of the 27 later windows go, so most frame-3 events are dropped
  assert pruned["n_kept"] >= 4 and pruned["n_dropped"] >= 1 and pruned["n_kept"] + pruned["n_dropped"] == 8
  md = event_recall.markdown({"split": "val", "num_questions": 8, "rows": [dict(pruned, name="stts", method="stts", ratio=0.7)]})
  assert "| stts | stts @0.7 |" in md
  assert np.isfinite(pruned["score_others_median"]) and f"{pruned['score_others_median']:.4f} |" in md
  assert np.isfinite(pruned["event_recall"])


def test_init_row_scores_untrained_features(tmp_path):
  from stts_jax.data import default_dataset
  cfg = helpers.make_mc_dataset(str(tmp_path), n=4, frames=4, split="val")
  path = os.path.join(str(tmp_path), "val.jsonl")
  recs = [dict(json.loads(x), event_frames=[2], event_window=4, qtype="when") for x in open(path)]
  with open(path, "w") as f:
    f.write("\n".join(json.dumps(r) for r in recs) + "\n")
  from stts_jax.testing import tiny
  model_cfg = tiny.tiny_model_config(method="heuristic", ratio=0.5)
  assert model_cfg.tokens == default_dataset.tiny_token_ids()
  res = event_recall.evaluate_row(event_recall.Row("h", event_recall.INIT, "heuristic"), model_cfg, cfg, "val",
                                  event_recall.read_events(cfg, "val"), resamples=50)
  assert res["n"] == 4 and res["checkpoint"] == "init" and 0.0 <= res["event_recall"] <= 1.0
  with pytest.raises(ValueError, match="scorer weights"):
    event_recall.evaluate_row(event_recall.Row("s", event_recall.INIT, "stts"), tiny.tiny_model_config(method="stts"),
                              cfg, "val", event_recall.read_events(cfg, "val"))


def test_event_score_contrast():
  s = np.full((4, 9), 0.1)
  s[0] = 1.0                    # frame 0 (never a change) stays out of both numbers
  s[2, 5], s[3, 5] = 0.7, 0.4
  s[1, :3] = 0.3
  event, others = event_recall.event_score_contrast(s, [2, 3], 5)
  assert event == pytest.approx(0.7) and others == pytest.approx(0.1)
  event0, others0 = event_recall.event_score_contrast(s, [0], 5)
  assert np.isnan(event0) and others0 == pytest.approx(0.1)

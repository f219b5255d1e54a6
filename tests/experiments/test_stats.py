"""Paired bootstrap over test questions (stts_jax/experiments/stats.py): hand-computed cases, pairing
by example id, question-level resampling across seeds, and the interval's width against the normal
approximation."""

import math

import numpy as np
import pytest

from stts_jax.experiments import stats

KEY = "multiple_choice/likelihood_accuracy"


def _rows(correct):
  return {f"q{i:03d}": bool(c) for i, c in enumerate(correct)}


def test_correctness_reads_scored_records_of_the_metric():
  cell = {"records": {"multiple_choice": {"likelihood": [
      {"example_id": "a", "status": "scored", "correct": True},
      {"example_id": "b", "status": "skipped", "correct": None},
      {"example_id": "c", "status": "scored", "correct": False}],
      "generate": [{"example_id": "a", "status": "scored", "correct": False}]}}}
  assert stats.correctness(cell, KEY) == {"a": True, "c": False}
  assert stats.correctness(cell, "multiple_choice/generate_accuracy") == {"a": False}
  assert stats.correctness(None, KEY) is None
  assert stats.correctness({"records": {}}, KEY) is None          # an old results.json without records


def test_identical_and_opposite_rows_give_degenerate_intervals():
  a = [_rows([1, 0, 1, 1, 0])]
  same = stats.paired_bootstrap(a, a, [0], resamples=500)
  assert same["pooled"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "n_questions": 5, "n_pairs": 5}
  ones, zeros = [_rows([1] * 7), _rows([1] * 7)], [_rows([0] * 7), _rows([0] * 7)]
  out = stats.paired_bootstrap(ones, zeros, [3, 4], resamples=500)
  assert out["pooled"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0, "n_questions": 7, "n_pairs": 14}
  assert [p["seed"] for p in out["per_seed"]] == [3, 4] and out["per_seed"][1]["mean"] == 1.0


def test_pairs_by_example_id_and_drops_questions_scored_by_one_row_only():
  a = {"q1": True, "q2": True, "q3": False, "q4": True}
  b = {"q3": True, "q2": False, "q1": True}         # other order; q4 missing (skipped in b)
  diff, defined, ids = stats.paired_differences([a], [b])
  assert ids == ["q1", "q2", "q3"]
  np.testing.assert_array_equal(diff, [[0.0, 1.0, -1.0]])
  assert defined.all()
  out = stats.paired_bootstrap([a], [b], [0], resamples=200)["pooled"]
  assert out["mean"] == 0.0 and out["n_questions"] == 3
  with pytest.raises(ValueError, match="same non-zero number of seeds"):
    stats.paired_differences([a, a], [b])


def test_seeds_of_one_question_are_resampled_together():
  # Per question, seed 0 favours a and seed 1 favours b by the same amount: every question's pooled
  # difference is 0, so resampling questions (not (seed, question) pairs) gives a zero-width interval.
  q = 60
  first = np.arange(q) % 2 == 0
  a = [_rows(first), _rows(~first)]
  b = [_rows(~first), _rows(first)]
  out = stats.paired_bootstrap(a, b, [0, 1], resamples=1000)
  assert out["pooled"]["mean"] == 0.0 and out["pooled"]["lo"] == 0.0 and out["pooled"]["hi"] == 0.0
  assert out["pooled"]["n_pairs"] == 2 * q
  # each seed alone: a difference of +-1 on every question, mean 0 with a wide interval
  for p in out["per_seed"]:
    assert p["mean"] == 0.0 and p["lo"] < -0.15 and p["hi"] > 0.15


def test_interval_matches_the_normal_approximation_and_is_reproducible():
  rng = np.random.default_rng(1)
  q = 900
  a = rng.random(q) < 0.8
  b = np.where(rng.random(q) < 0.9, a, ~a)           # b disagrees with a on ~10 % of the questions
  d = a.astype(float) - b.astype(float)
  out = stats.paired_bootstrap([_rows(a)], [_rows(b)], [0], resamples=4000, seed=7)["pooled"]
  assert math.isclose(out["mean"], d.mean())
  half = 1.96 * d.std(ddof=1) / math.sqrt(q)
  assert out["lo"] == pytest.approx(d.mean() - half, abs=0.15 * half)
  assert out["hi"] == pytest.approx(d.mean() + half, abs=0.15 * half)
  again = stats.paired_bootstrap([_rows(a)], [_rows(b)], [0], resamples=4000, seed=7)["pooled"]
  assert again == out
  # a higher level widens the interval
  wide = stats.paired_bootstrap([_rows(a)], [_rows(b)], [0], resamples=4000, seed=7, level=0.99)["pooled"]
  assert wide["lo"] < out["lo"] and wide["hi"] > out["hi"]


def test_no_shared_question_gives_no_interval():
  out = stats.paired_bootstrap([{"a": True}], [{"b": False}], [0], resamples=100)
  assert out["pooled"] is None and out["per_seed"][0]["mean"] is None

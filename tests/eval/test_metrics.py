"""QA metrics: normalisation, letter parsing, accuracy with skipped examples."""
import math

import pytest

from stts_jax.eval import metrics


def test_normalize_and_exact_match():
  assert metrics.normalize_answer("  The Red, car! ") == "red car"
  assert metrics.normalize_answer("An apple") == "apple"
  assert metrics.exact_match("the blue.", "Blue")
  assert metrics.exact_match("green", ["red", "GREEN"])
  assert not metrics.exact_match("greenish", "green")
  with pytest.raises(ValueError, match="no reference"):
    metrics.exact_match("x", [])


@pytest.mark.parametrize("text,expected", [
    ("B", 1), ("b", 1), ("B.", 1), ("(C)", 2), ("C. blue", 2), ("Answer: D", 3), ("The answer is A", 0),
    ("E", -1), ("", -1), ("blue", 2), ("maybe", -1), ("Blue.", 2)])
def test_parse_letter(text, expected):
  assert metrics.parse_letter(text, 4, ("red", "green", "blue", "yellow")) == expected


def test_parse_letter_rejects_bad_option_count():
  with pytest.raises(ValueError, match="num_options"):
    metrics.parse_letter("A", 0)


def test_accuracy_excludes_skipped_and_reports_them():
  acc = metrics.Accuracy()
  acc.add("a", True)
  acc.add("b", False)
  acc.add("c", True)
  acc.skip("d", "video missing")
  assert acc.summary() == {"accuracy": 2 / 3, "correct": 2, "scored": 3, "skipped": 1}
  assert acc.skipped_examples() == [{"example_id": "d", "error": "video missing"}]
  with pytest.raises(ValueError, match="twice"):
    acc.add("a", True)
  with pytest.raises(ValueError, match="reason"):
    acc.skip("e", "")
  assert math.isnan(metrics.Accuracy().accuracy)

"""QA metrics on the host: answer normalisation, letter parsing, and an accuracy accumulator that
keeps every example's outcome, including the ones that could not be evaluated.

Denominator rule: an example counts once it was scored. Examples whose video was corrupt or missing
(`status="skipped"`, with the reason) are listed per example and counted, never scored, so they are
excluded from the denominator; `Accuracy.summary()` always reports how many there were.
"""

import dataclasses
import re
import string
from collections.abc import Sequence
from typing import Any, Optional

LETTERS = string.ascii_uppercase
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
# A letter answer: optional "(" / "option" / "answer:", the letter, then a word boundary.
_LETTER = re.compile(r"^\s*(?:the\s+)?(?:answer|option)?\s*(?:is)?\s*[:\-]?\s*\(?([A-Za-z])\)?(?:[\s.:,)]|$)",
                     re.IGNORECASE)


def normalize_answer(text: str) -> str:
  """SQuAD-style normalisation: lowercase, punctuation -> space, drop articles, collapse spaces."""
  text = text.lower().translate(_PUNCT)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str] | str) -> bool:
  """Normalised exact match against one or several references."""
  refs = [references] if isinstance(references, str) else list(references)
  if not refs:
    raise ValueError("exact_match: no reference answers")
  pred = normalize_answer(prediction)
  return any(pred == normalize_answer(r) for r in refs)


def parse_letter(text: str, num_options: int, options: Optional[Sequence[str]] = None) -> int:
  """Option index named by a generated answer, or -1.

  Accepts "B", "B.", "(B)", "B. red", "Answer: B"; letters beyond `num_options` are rejected.
  If no letter is found and `options` are given, an answer equal (normalised) to exactly one
  option's text selects it.
  """
  if num_options < 1 or num_options > len(LETTERS):
    raise ValueError(f"parse_letter: num_options must be in [1, {len(LETTERS)}], got {num_options}")
  m = _LETTER.match(text)
  if m:
    idx = LETTERS.find(m.group(1).upper())
    if 0 <= idx < num_options:
      return idx
  if options:
    norm = normalize_answer(text)
    hits = [i for i, o in enumerate(options[:num_options]) if normalize_answer(o) == norm]
    if len(hits) == 1:
      return hits[0]
  return -1


@dataclasses.dataclass
class Record:
  """One example's outcome. status: "scored" | "skipped" (video corrupt/missing, `error` says why)."""
  example_id: str
  status: str
  correct: Optional[bool] = None
  prediction: Any = None
  target: Any = None
  error: str = ""
  extra: dict = dataclasses.field(default_factory=dict)


class Accuracy:
  """Accumulates per-example records; accuracy = correct / scored (skipped ones excluded)."""

  def __init__(self):
    self.records: list[Record] = []
    self._seen: set[str] = set()

  def _add(self, rec: Record) -> None:
    if rec.example_id in self._seen:
      raise ValueError(f"Accuracy: example {rec.example_id!r} recorded twice")
    self._seen.add(rec.example_id)
    self.records.append(rec)

  def add(self, example_id: str, correct: bool, *, prediction: Any = None, target: Any = None,
          **extra) -> None:
    self._add(Record(str(example_id), "scored", bool(correct), prediction, target, extra=extra))

  def skip(self, example_id: str, error: str) -> None:
    """An example that could not be evaluated (e.g. its video is corrupt); `error` is required."""
    if not error:
      raise ValueError(f"Accuracy.skip({example_id!r}): a reason is required")
    self._add(Record(str(example_id), "skipped", error=error))

  @property
  def num_scored(self) -> int:
    return sum(r.status == "scored" for r in self.records)

  @property
  def num_correct(self) -> int:
    return sum(bool(r.correct) for r in self.records if r.status == "scored")

  @property
  def num_skipped(self) -> int:
    return sum(r.status == "skipped" for r in self.records)

  @property
  def accuracy(self) -> float:
    """Correct / scored; NaN when nothing was scored (never a silent 0)."""
    n = self.num_scored
    return self.num_correct / n if n else float("nan")

  def summary(self) -> dict[str, float]:
    return {"accuracy": self.accuracy, "correct": self.num_correct, "scored": self.num_scored,
            "skipped": self.num_skipped}

  def skipped_examples(self) -> list[dict[str, str]]:
    return [{"example_id": r.example_id, "error": r.error} for r in self.records if r.status == "skipped"]


__all__ = ["Accuracy", "Record", "exact_match", "normalize_answer", "parse_letter"]

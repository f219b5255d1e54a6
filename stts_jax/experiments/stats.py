"""Paired bootstrap over test questions: the intervals behind the main job's accuracy checks.

A comparison is two table rows (e.g. STTS vs unpruned) evaluated on the same test questions by the
same training seeds. Each row gives, per seed, a 0/1 correctness per question; the eval results
already hold it (`results.json`: cell["records"][evaluator][mode], one record per example with its
`example_id`, `status` and `correct`). Questions are paired by example id within a seed:

  diff_sq[s, q] = correct_a[s, q] - correct_b[s, q]      defined where both rows scored q in seed s
  statistic     = mean of diff_sq over the defined (s, q)  (the pooled accuracy difference)

Resampling unit: the question. A bootstrap draw takes Q questions with replacement and each drawn
question brings all its seeds' pairs (a hard question is hard for every seed, so the seeds' pairs of
one question are not independent draws). `resamples` draws from a fixed numpy seed; the interval is
the (1 - level) / 2 and (1 + level) / 2 percentiles. Per seed: the same on that seed's pairs alone.
The interval covers which test questions were drawn, not how training would vary across seeds; the
per-seed values show that spread.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

_CHUNK = 1000   # draws per vectorised batch: a [1000, Q] index array (Q = 898: ~7 MB)


@dataclasses.dataclass(frozen=True)
class Interval:
  """Mean difference (a - b, as a fraction) and its bootstrap percentile interval over `n_questions`
  questions (`n_pairs` (seed, question) pairs)."""
  mean: float
  lo: float
  hi: float
  n_questions: int
  n_pairs: int

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def correctness(cell: Optional[Mapping[str, Any]], metric_key: str) -> Optional[dict[str, bool]]:
  """{example_id: correct} of the scored examples of one eval cell, or None when the cell or its
  per-example records are missing.

  metric_key: the accuracy metric of the table, "<evaluator>/<mode>_accuracy" (e.g.
  "multiple_choice/likelihood_accuracy"); its records are cell["records"][evaluator][mode].
  """
  if cell is None:
    return None
  evaluator, name = metric_key.split("/", 1)
  mode = name[:-len("_accuracy")] if name.endswith("_accuracy") else name
  records = cell.get("records", {}).get(evaluator, {}).get(mode)
  if not records:
    return None
  return {r["example_id"]: bool(r["correct"]) for r in records if r.get("status") == "scored"}


def paired_differences(a: Sequence[Mapping[str, bool]],
                       b: Sequence[Mapping[str, bool]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Per-seed correctness of two rows -> (diff_sq float64 [S, Q], defined_sq bool [S, Q], question ids [Q]).

  a[s], b[s]: {example_id: correct} of seed s. Q: the questions scored by both rows in at least one
  seed (sorted ids); diff_sq is 0 where undefined.
  """
  if len(a) != len(b) or not a:
    raise ValueError(f"paired bootstrap: need the same non-zero number of seeds per row, got {len(a)} and {len(b)}")
  ids = sorted(set().union(*(set(x) & set(y) for x, y in zip(a, b))))
  col = {q: i for i, q in enumerate(ids)}
  diff = np.zeros((len(a), len(ids)), np.float64)
  defined = np.zeros((len(a), len(ids)), bool)
  for s, (x, y) in enumerate(zip(a, b)):
    for q in set(x) & set(y):
      diff[s, col[q]] = float(x[q]) - float(y[q])
      defined[s, col[q]] = True
  return diff, defined, ids


def bootstrap(diff_sq: np.ndarray, defined_sq: np.ndarray, *, resamples: int = 10000, seed: int = 0,
              level: float = 0.95) -> Optional[Interval]:
  """Question-resampling bootstrap of the pooled mean of diff_sq [S, Q] over defined_sq [S, Q] (module
  docstring); None when no pair is defined."""
  total_q = np.where(defined_sq, diff_sq, 0.0).sum(0)     # [Q] sum over the question's seeds
  count_q = defined_sq.sum(0).astype(np.float64)          # [Q] its defined pairs
  keep = count_q > 0
  total_q, count_q = total_q[keep], count_q[keep]
  q = total_q.size
  if q == 0:
    return None
  rng = np.random.default_rng(seed)
  draws = []
  for start in range(0, resamples, _CHUNK):
    idx = rng.integers(0, q, size=(min(_CHUNK, resamples - start), q))
    draws.append(total_q[idx].sum(1) / count_q[idx].sum(1))
  lo, hi = np.percentile(np.concatenate(draws), [50 * (1 - level), 50 * (1 + level)])
  return Interval(mean=float(total_q.sum() / count_q.sum()), lo=float(lo), hi=float(hi), n_questions=int(q),
                  n_pairs=int(count_q.sum()))


def paired_bootstrap(a: Sequence[Mapping[str, bool]], b: Sequence[Mapping[str, bool]], seeds: Sequence[int], *,
                     resamples: int = 10000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
  """a - b pooled over seeds and per seed.

  a[i], b[i]: {example_id: correct} of the two rows for training seed seeds[i].
  Returns {"pooled": Interval dict or None, "per_seed": [{"seed", Interval fields...}], "resamples",
  "level"}; None entries where the rows share no scored question.
  """
  diff, defined, _ = paired_differences(a, b)
  pooled = bootstrap(diff, defined, resamples=resamples, seed=seed, level=level)
  per_seed = []
  for i, s in enumerate(seeds):
    one = bootstrap(diff[i:i + 1], defined[i:i + 1], resamples=resamples, seed=seed, level=level)
    per_seed.append({"seed": int(s), **(one.to_dict() if one else {"mean": None, "lo": None, "hi": None})})
  return {"pooled": pooled.to_dict() if pooled else None, "per_seed": per_seed, "resamples": int(resamples),
          "level": float(level)}


__all__ = ["Interval", "bootstrap", "correctness", "paired_bootstrap", "paired_differences"]

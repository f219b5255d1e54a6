import itertools

import pytest

from stts_jax.models import budget


def _ffd_rows(counts, capacity):
  """Plain-Python first-fit decreasing (ties by frame index)."""
  fills = []
  for c in sorted([c for c in counts if c > 0], reverse=True):
    for i, f in enumerate(fills):
      if f + c <= capacity:
        fills[i] += c
        break
    else:
      fills.append(c)
  return len(fills)


@pytest.mark.parametrize("t,w,ratio,dropped", [
    (1, 81, 0.5, 0),            # one frame: never pruned
    (2, 81, 0.5, 81),
    (8, 9, 0.5, 36),
    (64, 81, 0.5, 2592),        # the released recipe
    (10, 9, 0.3, 27),           # 0.3 * 90 = 27 exactly, not 26 through binary rounding
    (3, 9, 0.3, 8),             # floor(8.1)
    (2, 9, 0.9, 9),             # capped at W * (T - 1)
    (5, 4, 0.95, 16),           # floor(19) capped at 16
    (0, 9, 0.5, 0),
    (7, 81, 0.0, 0),
])
def test_num_dropped_hand_cases(t, w, ratio, dropped):
  assert budget.num_dropped(t, w, ratio) == dropped
  assert budget.num_kept(t, w, ratio) == w * t - dropped


def test_bad_ratio_is_an_error():
  with pytest.raises(ValueError, match="ratio"):
    budget.num_dropped(4, 9, 1.0)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.8, 0.95, 0.99])
@pytest.mark.parametrize("w", [4, 9, 81])
def test_kept_and_row_bound_non_decreasing_in_frames(ratio, w):
  kept = [budget.num_kept(t, w, ratio) for t in range(1, 70)]
  assert all(a <= b for a, b in zip(kept, kept[1:]))
  bounds = [budget.ffd_row_bound(t, budget.num_kept(t, w, ratio), w) for t in range(1, 70)]
  assert all(a <= b for a, b in zip(bounds, bounds[1:]))
  assert budget.row_bound(69, w, ratio) == bounds[-1]


def test_dropped_table():
  assert budget.dropped_table(4, 9, 0.5) == (0, 0, 9, 13, 18)


@pytest.mark.parametrize("w,t,ratio", [(4, 5, 0.5), (4, 5, 0.3), (9, 4, 0.5), (9, 4, 0.7), (5, 5, 0.45),
                                       (6, 5, 0.2)])
def test_row_bound_holds_and_is_tight_over_every_keep_pattern(w, t, ratio):
  """Exhaustive: every vector of per-frame kept counts the budget can produce (frame 0 full)."""
  kept = budget.num_kept(t, w, ratio)
  worst = 0
  for rest in itertools.product(range(w + 1), repeat=t - 1):
    if w + sum(rest) != kept:
      continue
    worst = max(worst, _ffd_rows((w,) + rest, w))
  bound = budget.ffd_row_bound(t, kept, w)
  assert worst <= bound
  assert worst >= bound - 1


def test_row_bound_molmo2_numbers():
  # 64 frames at 50%: 2592 kept windows; the worst case needs nearly every frame's row.
  assert budget.min_rows(64, 81, 0.5) == 32
  assert budget.row_bound(64, 81, 0.5) == 63
  # adversarial pattern: frame 0 full, 61 frames of 41 windows (no two share a row), one of 10
  counts = [81] + [41] * 61 + [10] + [0]
  assert sum(counts) == 2592
  assert _ffd_rows(counts, 81) == 62 <= budget.row_bound(64, 81, 0.5)
  assert budget.typical_num_rows(64, 81, 0.5) == 40
  assert budget.row_bound(64, 81, 0.8) <= 64


def test_num_rows_override_and_validation():
  assert budget.num_rows(8, 9, 0.5) == budget.row_bound(8, 9, 0.5)
  assert budget.num_rows(8, 9, 0.5, override=5) == 5
  assert budget.num_rows(8, 9, 0.5, override=100) == 8
  with pytest.raises(ValueError, match="num_rows"):
    budget.num_rows(8, 9, 0.5, override=3)   # 36 kept windows need >= 4 rows of 9


def test_pruned_seq_len():
  assert budget.pruned_seq_len(100, 8, 9, 0.5) == 64
  assert budget.pruned_seq_len(100, 1, 9, 0.5) == 100
  with pytest.raises(ValueError, match="too short"):
    budget.pruned_seq_len(36, 8, 9, 0.5)

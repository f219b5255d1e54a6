"""Static STTS budgets: Python ints that fix every pruned shape at trace time (DESIGN.md 3.5, 3.8, 4).

Nothing here touches arrays. All counts are in *windows* (one window = one LLM token = M patches);
a packed ViT row has P = W * M slots, i.e. room for W windows.

Budget of one video with `t` real frames (DESIGN.md 3.5):
  dropped(t) = min(floor(ratio * W * t), W * (t - 1))          kept(t) = W * t - dropped(t)
`ratio` is read as the exact decimal it prints as (`Fraction(str(0.3)) == 3/10`), so
floor(0.3 * 9 * 10) is 27 and never 26 because of binary rounding.

Videos shorter than their T bucket (padding frames at the end): the budget follows the video's
*real* frame count, so a video is pruned the same way whatever batch or bucket it lands in.
What stays static per (T bucket, ratio) are the slot counts derived from the bucket T:
  * `num_kept(T)` kept-window slots per video (the adapter pools exactly this many rows per video;
    a shorter video fills kept(t) <= kept(T) of them, the rest are padding rows),
  * `num_rows(T)` packed ViT rows per video (bound below, valid for every t <= T),
  * `pruned_seq_len(S, T) = S - dropped(T)` LLM positions per sample.
kept(t) and the row bound are non-decreasing in t, so the bucket T is the worst case. A video with
t < T frames removes dropped(t) <= dropped(T) tokens; it fits in the shorter sequence whenever its
unpruned prompt would also fit in S with T frames (dropped(T) - dropped(t) <= W * (T - t), the
tokens its missing frames would have used). The data pipeline sizes S for T frames, so this holds.

Packed-row bound (DESIGN.md 3.8). Frames are packed first-fit-decreasing into rows of capacity W
windows. Claim: rows_used <= row_bound(T) for every keep pattern produced by the budget.
  1. Frame 0 is always fully kept (W windows) and fills a row alone.
  2. First fit leaves at most one row filled to <= W/2: if rows i < j were both at most half full at
     the end, the first frame placed in row j (size <= fill(j) <= W/2) would have fit into row i
     (fill(i) <= W/2 at that time), and first fit would have put it there.
  3. So the other rows hold > W/2, i.e. >= h = W // 2 + 1 windows each, except one that holds >= 1:
     rows for frames 1.. <= (K' - 1) // h + 1 where K' = kept(T) - W is their total.
  4. Each nonempty frame takes at most one row: rows <= T.
  row_bound(T) = min(T, 1 + ((K' - 1) // h + 1 if K' > 0 else 0)).
The bound is tight up to one row (frames of h windows each cannot share a row). At ratio 0.5 it is
close to T: the worst case leaves no ViT saving. Configs that want the speed set `stts.num_rows`
smaller (e.g. `typical_num_rows`); a video that then needs more rows is never truncated: the
forward falls back, for that batch, to the exact dense masked computation (`video_forward`).
"""

import fractions
import math
from typing import Optional


def _ratio(ratio: float) -> fractions.Fraction:
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
  return fractions.Fraction(str(ratio))


def num_dropped(num_frames: int, windows: int, ratio: float) -> int:
  """Windows dropped from a video of `num_frames` real frames: min(floor(r*W*T), W*(T-1))."""
  if num_frames < 0 or windows <= 0:
    raise ValueError(f"num_frames must be >= 0 and windows > 0, got {num_frames}, {windows}")
  if num_frames == 0:
    return 0
  return min(math.floor(_ratio(ratio) * windows * num_frames), windows * (num_frames - 1))


def num_kept(num_frames: int, windows: int, ratio: float) -> int:
  """Windows kept from a video of `num_frames` real frames (frame 0 always among them)."""
  return windows * num_frames - num_dropped(num_frames, windows, ratio)


def dropped_table(num_frames: int, windows: int, ratio: float) -> tuple[int, ...]:
  """dropped(t) for t = 0..num_frames (indexed by a video's real frame count inside jit)."""
  return tuple(num_dropped(t, windows, ratio) for t in range(num_frames + 1))


def ffd_row_bound(num_frames: int, kept_windows: int, windows: int) -> int:
  """Proven bound on first-fit-decreasing rows for `kept_windows` spread over `num_frames` frames,
  frame 0 fully kept (see the module docstring)."""
  if num_frames <= 0 or kept_windows <= 0:
    return 0
  rest = kept_windows - windows
  half = windows // 2 + 1
  rest_rows = (rest - 1) // half + 1 if rest > 0 else 0
  return min(num_frames, 1 + rest_rows)


def row_bound(num_frames: int, windows: int, ratio: float) -> int:
  """Packed rows that always suffice for a video of up to `num_frames` frames at `ratio`."""
  return max((ffd_row_bound(t, num_kept(t, windows, ratio), windows)
              for t in range(1, num_frames + 1)), default=0)


def min_rows(num_frames: int, windows: int, ratio: float) -> int:
  """Rows a full video needs at the very least: ceil(kept(T) / W)."""
  return -(-num_kept(num_frames, windows, ratio) // windows)


def typical_num_rows(num_frames: int, windows: int, ratio: float, slack: float = 0.125) -> int:
  """A speed-oriented row count: the minimum plus `slack` * T spare rows, capped by the bound.

  Not a guarantee; when a batch needs more, the forward takes the dense fallback (exact)."""
  extra = math.ceil(slack * num_frames)
  return min(row_bound(num_frames, windows, ratio), min_rows(num_frames, windows, ratio) + extra)


def num_rows(num_frames: int, windows: int, ratio: float, override: Optional[int] = None) -> int:
  """Packed rows per video: `override` (config `stts.num_rows`) or the proven bound."""
  if override is None:
    return row_bound(num_frames, windows, ratio)
  if override < min_rows(num_frames, windows, ratio):
    raise ValueError(f"stts.num_rows={override} is below ceil(kept/W) = "
                     f"{min_rows(num_frames, windows, ratio)}: full videos could never fit")
  return min(override, num_frames)


def pruned_seq_len(seq_len: int, num_frames: int, windows: int, ratio: float) -> int:
  """Static LLM length after dropping pruned windows' tokens: S - dropped(T bucket)."""
  out = seq_len - num_dropped(num_frames, windows, ratio)
  if out <= 0:
    raise ValueError(f"sequence length {seq_len} too short for {num_frames} frames of {windows} tokens")
  return out


# ----------------------------------------------------------------------------------------------
# Example packing (several videos per LLM row; stts_jax/models/example_packing.py, DESIGN.md 7)
# ----------------------------------------------------------------------------------------------
# A packed row holds up to V videos with F frames in all. Every video keeps its own budget
# (dropped(t_v) above), so the row's static sizes are bounds over all the ways to split F frames
# between at most V videos.

def packed_dropped_bound(frames: int, windows: int, ratio: float) -> int:
  """Most windows the videos of one packed row (F frames in all) can drop: floor(ratio * W * F).

  sum_v dropped(t_v) <= sum_v floor(r W t_v) <= floor(r W sum_v t_v) <= floor(r W F). The host puts
  the row's *unpruned* tokens into `seq_len + packed_dropped_bound(F)` slots and the model compacts
  them back to `seq_len`: both sides use this one number."""
  if frames < 0 or windows <= 0:
    raise ValueError(f"frames must be >= 0 and windows > 0, got {frames}, {windows}")
  return math.floor(_ratio(ratio) * windows * frames)


def packed_kept_bound(frames: int, videos: int, windows: int, ratio: float) -> int:
  """Most windows the videos of one packed row can keep: max over splits of <= F frames into <= V
  videos of sum_v kept(t_v) (a small dynamic programme; kept(t) is not linear in t: a 1-frame
  video keeps all W). The adapter pools this many window slots per row."""
  if frames < 0 or videos < 1:
    raise ValueError(f"frames must be >= 0 and videos >= 1, got {frames}, {videos}")
  kept = [num_kept(t, windows, ratio) for t in range(frames + 1)]
  best = [0] * (frames + 1)            # best[f]: most kept with at most f frames, videos so far
  for _ in range(videos):
    best = [max(best[f - t] + kept[t] for t in range(f + 1)) for f in range(frames + 1)]
  return best[frames]


def packed_num_rows(frames: int, videos: int, windows: int, ratio: float, per_video_rows: Optional[int],
                    slack: float = 0.125) -> int:
  """Packed ViT rows of one packed LLM row (F frames of up to V videos).

  per_video_rows None (the config asks for the proven bound): F rows, which always suffice (each
  frame with a kept window takes at most one row). Otherwise a speed-oriented count like
  `typical_num_rows`: ceil(kept bound / W) plus `slack` * F, at most F; a row that needs more takes
  the exact dense fallback, as for single videos."""
  if per_video_rows is None:
    return frames
  least = -(-packed_kept_bound(frames, videos, windows, ratio) // windows)
  return min(frames, least + math.ceil(slack * frames))

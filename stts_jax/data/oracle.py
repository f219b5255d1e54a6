"""Cheap oracle check of a video-QA set with a known event window: does pruning keep it?

A pixel-space stand-in for the pruning baselines of DESIGN.md section 3 (11): windows are the
3x3-patch pooling windows; the 1 - cosine heuristic compares each window's normalised pixels
((x/255 - 0.5) / 0.5, patches concatenated, L2-normalised) with the same window of the previous
frame; random scores are uniform. The budget rule is the model's: per video drop
min(floor(ratio*W*T), W*(T-1)) windows with the lowest scores, frame 0 always kept, ties drop
the lower flat index first. An event counts as kept if any of its (frame, window) survives.
`keep_rates` works on any clips with (event frames, event window), e.g. those of
`default_dataset.render_clip`: at ratio 0.5 the heuristic keeps the default variant's event in
about 89 % of the clips (random: about 58 %), the hard variant's in about 50 % (random: 53-55 %),
the recolour variant's in about 19 % (random: about 50 %).
"""

import math
from collections.abc import Sequence
from typing import Optional

import numpy as np
from jaxtyping import Bool, Float32, UInt8

from stts_jax.data import preprocess


def window_vectors(frames: UInt8[np.ndarray, "T H W 3"], patch_size: int,
                   pool: tuple[int, int]) -> Float32[np.ndarray, "T Wn F"]:
  """Normalised pixels of every pooling window, L2-normalised: [T, W, M*patch*patch*3]."""
  t, h, w, _ = frames.shape
  patches = preprocess.normalize(preprocess.patchify(frames, patch_size))          # [T, P, D]
  idx = preprocess.pooling_index((h // patch_size, w // patch_size), pool)        # [W, M]
  v = patches[:, idx].reshape(t, idx.shape[0], -1)
  return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-6)


def heuristic_scores(frames: UInt8[np.ndarray, "T H W 3"], patch_size: int,
                     pool: tuple[int, int]) -> Float32[np.ndarray, "T Wn"]:
  """1 - cos(previous frame's window, this window); frame 0 gets +inf (never dropped)."""
  v = window_vectors(frames, patch_size, pool)
  scores = np.full(v.shape[:2], np.inf, np.float32)
  scores[1:] = 1.0 - np.sum(v[1:] * v[:-1], axis=-1)
  return scores


def num_dropped(num_frames: int, windows: int, ratio: float) -> int:
  return min(int(math.floor(ratio * windows * num_frames)), windows * (num_frames - 1))


def keep_mask(scores: Float32[np.ndarray, "T Wn"], ratio: float) -> Bool[np.ndarray, "T Wn"]:
  """Drops the lowest-scoring windows of the video (frame 0 kept; ties: lower flat index first)."""
  t, w = scores.shape
  flat = scores.reshape(-1).astype(np.float64).copy()
  flat[:w] = np.inf
  order = np.argsort(flat, kind="stable")
  keep = np.ones(t * w, bool)
  keep[order[:num_dropped(t, w, ratio)]] = False
  return keep.reshape(t, w)


def event_kept(keep: Bool[np.ndarray, "T Wn"], frames: Sequence[int], window: int) -> bool:
  return bool(any(keep[f, window] for f in frames))


def keep_rates(clips: Sequence[np.ndarray], events: Sequence[tuple[Sequence[int], int]], *, ratio: float = 0.5,
               patch_size: int = 14, pool: tuple[int, int] = (3, 3), seed: int = 0,
               random_trials: int = 4) -> dict[str, float]:
  """Fraction of clips whose event window survives heuristic / random pruning at `ratio`."""
  rng = np.random.default_rng(seed)
  heur = rand = 0.0
  for clip, (frames, window) in zip(clips, events):
    scores = heuristic_scores(np.asarray(clip), patch_size, pool)
    heur += event_kept(keep_mask(scores, ratio), frames, window)
    for _ in range(random_trials):
      r = rng.random(scores.shape).astype(np.float32)
      rand += event_kept(keep_mask(r, ratio), frames, window) / random_trials
  n = max(len(clips), 1)
  return {"heuristic": heur / n, "random": rand / n, "clips": len(clips)}


def event_from_extra(extra: dict) -> Optional[tuple[list[int], int]]:
  """(event frames, event window) stored in a default-dataset manifest line, if any."""
  if "event_frames" not in extra:
    return None
  return list(extra["event_frames"]), int(extra["event_window"])


__all__ = ["window_vectors", "heuristic_scores", "num_dropped", "keep_mask", "event_kept", "keep_rates",
           "event_from_extra"]

"""Window geometry: which patches of a frame form each pooling window (one LLM token).

Windows are row-major over the window grid; patches inside a window are row-major (dy, dx).
This is the Molmo2 video pooling layout (3x3 windows on a 27x27 grid -> 81 windows of 9).
"""

import numpy as np


def window_grid(grid_hw: tuple[int, int], window: tuple[int, int]) -> tuple[int, int]:
  """(rows, cols) of windows; requires exact division (Molmo2 video: 27 % 3 == 0)."""
  gh, gw = grid_hw
  wh, ww = window
  if gh % wh or gw % ww:
    raise ValueError(f"patch grid {grid_hw} is not divisible by window {window}")
  return gh // wh, gw // ww


def window_patch_index(grid_hw: tuple[int, int], window: tuple[int, int]) -> np.ndarray:
  """Patch indices of each window, int32 [W, M] (W windows, M = wh*ww patches each)."""
  gh, gw = grid_hw
  wh, ww = window
  rows, cols = window_grid(grid_hw, window)
  r = (np.arange(rows)[:, None, None, None] * wh + np.arange(wh)[None, None, :, None])
  c = (np.arange(cols)[None, :, None, None] * ww + np.arange(ww)[None, None, None, :])
  idx = r * gw + c                                   # [rows, cols, wh, ww]
  return idx.reshape(rows * cols, wh * ww).astype(np.int32)


def patch_window_index(grid_hw: tuple[int, int], window: tuple[int, int]) -> np.ndarray:
  """Inverse map: the window of each patch, int32 [P]."""
  idx = window_patch_index(grid_hw, window)
  out = np.empty(grid_hw[0] * grid_hw[1], np.int32)
  out[idx.reshape(-1)] = np.repeat(np.arange(idx.shape[0], dtype=np.int32), idx.shape[1])
  return out

"""Molmo2 frame preprocessing on the host (numpy): resize, patchify, pooling index, normalise.

- Resize: every frame goes straight to `size x size` (no aspect ratio, crop or pad) with
  bilinear interpolation, `align_corners=False`, no antialiasing, computed in float32 and
  rounded half-to-even and clamped back to uint8. This reproduces
  `torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False)`
  followed by `.round().clamp(0, 255)` -- what the transformers Molmo2 video processor does.
  (Do not use `jax.image.resize`: it antialiases when downsampling.)
- Patchify: patches row-major over the patch grid, each flattened (pixel_row, pixel_col,
  channel) with the channel fastest -> [T, P, patch*patch*3].
- Pooling index: each pooled token's patch indices, windows row-major, patches row-major inside
  a window, -1 padding split `pad // 2` before and `(pad + 1) // 2` after (Molmo2 layout).
- Normalise: (x / 255 - 0.5) / 0.5; the model does it itself, this is for reference and tests.
"""

import numpy as np
from jaxtyping import Float32, Int32, UInt8


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
  """float32 fused multiply-add a * b + c with one rounding (the product is exact in float64)."""
  out = np.multiply(a, b, dtype=np.float64)
  out += c
  return out.astype(np.float32)


def _axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Source indices (i0, i1) and float32 weights (w0, w1) along one axis, as ATen computes them.

  ATen (UpSample.h): scale = float(in) / out; src = max(scale * (dst + 0.5) - 0.5, 0) in float32
  (contracted to one FMA by the compiler in the CPU kernels); i0 = min(floor(src), in - 1),
  i1 = min(i0 + 1, in - 1); w1 = clamp(src - i0, 0, 1), w0 = 1 - w1. Equal sizes copy.
  """
  if in_size == out_size:
    idx = np.arange(out_size, dtype=np.int64)
    return idx, idx, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size).astype(np.float32) + np.float32(0.5)
  src = _fma32(np.full(out_size, scale, np.float32), dst, np.full(out_size, -0.5, np.float32))
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
  w0 = (np.float32(1.0) - w1).astype(np.float32)
  return i0, i1, w0, w1


def _lerp32(w0: np.ndarray, a: np.ndarray, w1: np.ndarray, b: np.ndarray) -> np.ndarray:
  """w0 * a + w1 * b as the ATen CPU kernel evaluates it: fma(w0, a, float32(w1 * b))."""
  return _fma32(w0, a, np.multiply(w1, b, dtype=np.float32))


def resize_frames(frames: UInt8[np.ndarray, "T H W 3"], size: int) -> UInt8[np.ndarray, "T S S 3"]:
  """Bilinear resize to `size x size` (align_corners=False, no antialias), uint8 round/clamp.

  Bit-exact with torch 2.13 CPU `F.interpolate(x.float(), mode="bilinear", align_corners=False,
  antialias=False).round().clamp(0, 255)` on NCHW input (tested), including its FMA rounding.
  Each needed source row is interpolated along x once, then rows are blended along y.
  """
  t, h, w, c = frames.shape
  if (h, w) == (size, size):
    return np.ascontiguousarray(frames)
  y0, y1, wy0, wy1 = _axis_weights(h, size)
  x0, x1, wx0, wx1 = _axis_weights(w, size)
  rows = np.unique(np.concatenate([y0, y1]))
  sel = frames[:, rows]                                               # [T, U, W, 3] uint8
  along_x = _lerp32(wx0[None, None, :, None], sel[:, :, x0].astype(np.float32),
                    wx1[None, None, :, None], sel[:, :, x1].astype(np.float32))   # [T, U, S, 3]
  r0, r1 = np.searchsorted(rows, y0), np.searchsorted(rows, y1)
  out = _lerp32(wy0[None, :, None, None], along_x[:, r0], wy1[None, :, None, None], along_x[:, r1])
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def patchify(frames: UInt8[np.ndarray, "T H W C"], patch_size: int) -> UInt8[np.ndarray, "T P D"]:
  """[T, H, W, C] -> [T, (H/p)*(W/p), p*p*C]; patches row-major, (pixel_row, pixel_col, C) inside."""
  t, h, w, c = frames.shape
  if h % patch_size or w % patch_size:
    raise ValueError(f"frame size {h}x{w} is not divisible by patch_size {patch_size}")
  gh, gw = h // patch_size, w // patch_size
  x = frames.reshape(t, gh, patch_size, gw, patch_size, c).transpose(0, 1, 3, 2, 4, 5)
  return np.ascontiguousarray(x.reshape(t, gh * gw, patch_size * patch_size * c))


def pooling_index(grid_hw: tuple[int, int], pool_hw: tuple[int, int]) -> Int32[np.ndarray, "W M"]:
  """Patch indices of each pooled token within one frame, int32 [W, M], -1 for padding."""
  gh, gw = grid_hw
  ph, pw = pool_hw
  pad_h = (-gh) % ph
  pad_w = (-gw) % pw
  grid = np.arange(gh * gw, dtype=np.int32).reshape(gh, gw)
  grid = np.pad(grid, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)), constant_values=-1)
  rows, cols = grid.shape[0] // ph, grid.shape[1] // pw
  return np.ascontiguousarray(grid.reshape(rows, ph, cols, pw).transpose(0, 2, 1, 3).reshape(rows * cols, ph * pw))


def pooled_grid(grid_hw: tuple[int, int], pool_hw: tuple[int, int]) -> tuple[int, int]:
  """(rows, cols) of pooled tokens per frame (ceil division, as the padded pooling index)."""
  return -(-grid_hw[0] // pool_hw[0]), -(-grid_hw[1] // pool_hw[1])


def video_pooling_index(num_frames: int, grid_hw: tuple[int, int], pool_hw: tuple[int, int],
                        offset: int = 0) -> Int32[np.ndarray, "TW M"]:
  """Global pooling index of a video, [T*W, M]: frame t's entries shifted by offset + t*P."""
  idx = pooling_index(grid_hw, pool_hw)
  per_frame = grid_hw[0] * grid_hw[1]
  shifts = offset + np.arange(num_frames, dtype=np.int32)[:, None, None] * per_frame
  out = np.where(idx[None] >= 0, idx[None] + shifts, -1)
  return out.reshape(-1, idx.shape[1]).astype(np.int32)


def normalize(patches: UInt8[np.ndarray, "*dims"]) -> Float32[np.ndarray, "*dims"]:
  """uint8 -> float32 in [-1, 1]: (x / 255 - 0.5) / 0.5 (Molmo2 mean = std = 0.5)."""
  return ((patches.astype(np.float32) * np.float32(1 / 255) - np.float32(0.5)) / np.float32(0.5))


def preprocess_frames(frames: UInt8[np.ndarray, "T H W 3"], image_size: int,
                      patch_size: int) -> UInt8[np.ndarray, "T P D"]:
  """Decoded RGB frames -> resized uint8 patches [T, P, patch*patch*3]."""
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
  return patchify(resize_frames(frames, image_size), patch_size)


__all__ = ["resize_frames", "patchify", "pooling_index", "pooled_grid", "video_pooling_index",
           "normalize", "preprocess_frames"]

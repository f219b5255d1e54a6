import numpy as np
import pytest

from stts_jax.models import windows


def test_window_patch_index_hand_computed_6x6():
  idx = windows.window_patch_index((6, 6), (3, 3))
  assert idx.shape == (4, 9)
  np.testing.assert_array_equal(idx[0], [0, 1, 2, 6, 7, 8, 12, 13, 14])
  np.testing.assert_array_equal(idx[1], [3, 4, 5, 9, 10, 11, 15, 16, 17])
  np.testing.assert_array_equal(idx[2], [18, 19, 20, 24, 25, 26, 30, 31, 32])
  inv = windows.patch_window_index((6, 6), (3, 3))
  assert inv[0] == 0 and inv[5] == 1 and inv[18] == 2 and inv[35] == 3


def test_molmo2_grid_covers_every_patch_once():
  idx = windows.window_patch_index((27, 27), (3, 3))
  assert idx.shape == (81, 9)
  assert sorted(idx.reshape(-1).tolist()) == list(range(729))


def test_indivisible_grid_is_an_error():
  with pytest.raises(ValueError, match="not divisible"):
    windows.window_grid((28, 27), (3, 3))

"""Unit tests of the notebook helpers that need no model (stts_jax/notebook_utils.py).

The model-running helpers (load_or_init, fit_scorer, run_methods, KeepMaskRecorder.__call__, train)
run inside the notebooks in tests/test_notebooks.py, which asserts on their outputs.
"""

import json

import numpy as np
import pytest

from stts_jax import config as config_lib
from stts_jax import notebook_utils as nbu
from stts_jax.data import default_dataset


def test_packaged_video_and_load_clip():
  path = nbu.packaged_video("carphone_pristine.mp4")
  assert path.endswith("carphone_pristine.mp4")
  with pytest.raises(FileNotFoundError, match="bikes.mp4"):
    nbu.packaged_video("nope.mp4")
  clip = nbu.load_clip("carphone_pristine.mp4", num_frames=4, image_size=42, patch_size=14)
  assert clip.frames_thwc.shape == (4, 42, 42, 3) and clip.frames_thwc.dtype == np.uint8
  assert clip.patches_tpi.shape == (4, 9, 14 * 14 * 3)
  # patch 4 (row 1, col 1) of frame 0 is pixels [14:28, 14:28], flattened (row, col, channel)
  np.testing.assert_array_equal(clip.patches_tpi[0, 4], clip.frames_thwc[0, 14:28, 14:28].reshape(-1))
  assert clip.timestamps.shape == (4,) and clip.timestamps[0] == 0 and np.all(np.diff(clip.timestamps) > 0)
  same = nbu.load_clip(path, num_frames=4, image_size=42, patch_size=14)     # a file path works too
  np.testing.assert_array_equal(same.frames_thwc, clip.frames_thwc)


def test_frame_change():
  frames = np.zeros((3, 4, 4, 3), np.uint8)
  frames[1] = 255
  frames[2, :2] = 255            # half the pixels go back to black
  change = nbu.frame_change(frames)
  assert np.isnan(change[0])
  np.testing.assert_allclose(change[1:], [1.0, 0.5])


def test_keep_by_ratio_budget_and_order():
  scores = np.array([[0.9, 0.8], [0.1, 0.7], [0.3, 0.2]], np.float32)   # T=3, W=2
  masks = nbu.keep_by_ratio(scores, [0.0, 0.5, 0.6])
  np.testing.assert_array_equal(masks[0.0], np.ones((3, 2), bool))
  # ratio 0.5: drop floor(3) = 3 of frames 1-2 (lowest: 0.1, 0.2, 0.3); frame 0 always kept
  np.testing.assert_array_equal(masks[0.5], [[True, True], [False, True], [False, False]])
  for r, keep in masks.items():
    assert keep.sum() == nbu.expected_kept(3, 2, r)
  assert nbu.expected_kept(8, 9, 0.5) == 36 and nbu.expected_kept(8, 9, 0.99) == 9


def test_ensure_dataset_reuses_a_complete_build(tmp_path):
  meta = {"spec": {"num_clips": [1, 1, 1]}, "counts": {}}
  (tmp_path / "meta.json").write_text(json.dumps(meta))
  got, reused = nbu.ensure_dataset(str(tmp_path), (5, 5, 5))
  assert reused and got == meta
  assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]     # nothing was built


def test_tiny_train_config_builds():
  cfg = nbu.tiny_train_config("/data/x", steps=4, batch=8, ratio=0.25, snapshot_every=2)
  sections = config_lib.build(cfg)
  assert sections["model"].stts.method == "stts" and sections["model"].stts.ratio == 0.25
  assert sections["train"].num_steps == 4 and sections["train"].eval_every == 2
  assert sections["train"].log_every == 4 and sections["train"].optim.warmup_steps == 0
  assert sections["data"].batch_size == 8 and sections["data"].path == "/data/x"
  sections["data"].check_model(sections["model"])


def test_recorder_reads_clips_and_events(tmp_path):
  spec = default_dataset.Spec(num_clips=(1, 1, 3))
  frames = np.random.default_rng(0).integers(0, 255, (3, 8, 126, 126, 3), dtype=np.uint8)
  np.save(tmp_path / "test_frames.npy", frames)
  lines = []
  for row, (ev_frames, ev_window) in enumerate([([1], 0), ([2, 3], 8), ([6], 4)]):
    meta = {"video": f"clips/test/{row}.mp4", "event_frames": ev_frames, "event_window": ev_window,
            "camera": "static", "movers": 0, "flicker_frames": [], "decoys": [], "face": 0,
            "quarter": ev_frames[0] // 2, "corner": -1}
    for ex in default_dataset.examples_for("test", row, meta, spec):
      lines.append(json.dumps(ex.to_json()))
  (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
  rec = nbu.KeepMaskRecorder(str(tmp_path), num_clips=2)
  np.testing.assert_array_equal(rec.frames, frames[:2])
  assert rec.events == [([1], 0), ([2, 3], 8)]
  np.testing.assert_allclose(rec.timestamps, np.arange(8) / 2)
  keep = np.ones((2, 8, 9), bool)
  keep[1, 2:4, 8] = False        # clip 1's event window dropped on both event frames
  assert rec.event_kept(keep) == 0.5
  keep[1, 3, 8] = True
  assert rec.event_kept(keep) == 1.0
  assert rec.steps == [] and rec.keep.shape == (0,)


def test_save_arrays_and_slider_fallback(tmp_path):
  path = nbu.save_arrays(str(tmp_path / "a" / "b.npz"), x=[1, 2], flag=True)
  with np.load(path) as z:
    np.testing.assert_array_equal(z["x"], [1, 2])
    assert bool(z["flag"])
  try:
    import ipywidgets  # noqa: F401
  except ImportError:
    assert nbu.ratio_slider(lambda ratio: None, [0.25, 0.5]) is None
  else:
    assert nbu.ratio_slider(lambda ratio: None, [0.25, 0.5]) is not None

"""The default dataset's hard variant (`Spec(variant="hard")`), and the default left unchanged."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from stts_jax.data import default_dataset, oracle, preprocess

HARD = default_dataset.Spec(variant="hard")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# sha256(frames bytes + sorted-key JSON metadata)[:16] of default clips, taken before the hard
# variant existed: adding it must leave every default clip byte-identical.
DEFAULT_CLIPS = {("train", 0): "ee371cd8943c5982", ("train", 7): "84a31ebb7af1b4e5",
                 ("val", 3): "6768647cff853cd1", ("test", 5): "f0b63b151b253397",
                 ("train", 123): "0eda637a4c15084e"}
CALM_TRAIN_2 = "5c168cc15fc4afa5"


def clip_hash(frames, meta):
  return hashlib.sha256(frames.tobytes() + json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def rendered(split, n, spec):
  clips, metas = [], []
  for i in range(n):
    frames, meta = default_dataset.render_clip(split, i, spec)
    clips.append(frames)
    metas.append(meta)
  return clips, metas


def test_default_clips_are_unchanged():
  for (split, i), want in DEFAULT_CLIPS.items():
    assert clip_hash(*default_dataset.render_clip(split, i, default_dataset.Spec())) == want, (split, i)
  assert clip_hash(*default_dataset.render_clip("train", 2, default_dataset.Spec(distractors=False))) == CALM_TRAIN_2
  assert dataclasses.asdict(default_dataset.Spec())["variant"] == "default"


def test_spec_checks_the_variant():
  with pytest.raises(ValueError, match="variant"):
    default_dataset.Spec(variant="harder")
  with pytest.raises(ValueError, match="distractors"):
    default_dataset.Spec(variant="hard", distractors=False)


def test_hard_rendering_is_deterministic_and_its_own_stream():
  a, meta_a = default_dataset.render_clip("val", 4, HARD)
  b, meta_b = default_dataset.render_clip("val", 4, HARD)
  np.testing.assert_array_equal(a, b)
  assert meta_a == meta_b and a.shape == (8, 126, 126, 3) and a.dtype == np.uint8
  default, _ = default_dataset.render_clip("val", 4, default_dataset.Spec())
  assert not np.array_equal(a, default)


def test_hard_heuristic_recall_is_near_random_and_far_below_default():
  """Pixel 1 - cos heuristic vs random at ratio 0.5 on the same 150 train indices of each variant."""
  rates = {}
  for name, spec in (("default", default_dataset.Spec()), ("hard", HARD)):
    clips, metas = rendered("train", 150, spec)
    rates[name] = oracle.keep_rates(clips, [(m["event_frames"], m["event_window"]) for m in metas], ratio=0.5)
  print(f"\nevent-window keep rate at 50% pruning: {rates}")
  assert rates["hard"]["heuristic"] <= 0.60
  assert rates["default"]["heuristic"] - rates["hard"]["heuristic"] >= 0.2
  assert 0.4 <= rates["hard"]["random"] <= 0.7


def test_hard_event_is_the_only_yellow_frame_and_metadata_agrees():
  """The framed picture sits on its event frames in its window, decoys keep out of it there, and
  a yellow-pixel detector finds the answer from the pixels alone."""
  windows = preprocess.pooling_index((9, 9), (3, 3))
  clips, metas = rendered("test", 40, HARD)
  for frames, meta in zip(clips, metas):
    ev, w = meta["event_frames"], meta["event_window"]
    assert 1 <= len(ev) <= 2 and ev[0] // 2 == ev[-1] // 2 == meta["quarter"]
    assert meta["corner"] == (default_dataset.CORNERS.index(w) if w in default_dataset.CORNERS else -1)
    assert meta["camera"] != "static" and all(0 <= t < 8 for t in meta["flicker_frames"])
    assert not any(t in ev and d == w for t, d in meta["decoys"])
    hoppers = np.array(meta["decoys"]).reshape(-1, 8, 2)          # [decoy, frame, (t, window)]
    assert 1 <= len(hoppers) <= 4 and (hoppers[:, :, 0] == np.arange(8)).all()
    assert (hoppers[:, 1:, 1] != hoppers[:, :-1, 1]).all()       # a different window every frame
    p = preprocess.patchify(frames, 14).reshape(8, 81, 14, 14, 3).astype(int)
    yellow = ((p[..., 0] > 190) & (p[..., 1] > 160) & (p[..., 2] < 90)).sum((2, 3))[:, windows].sum(-1)
    for t in ev:
      assert yellow[t, w] >= 400, (meta, yellow[t, w])     # the 36 px frame ring is ~620 px
    t, best = np.unravel_index(yellow.argmax(), yellow.shape)
    assert t in ev and best == w


def test_small_hard_build_through_the_script(tmp_path):
  out = str(tmp_path / "hard")
  res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_dataset.py"), "--variant", "hard",
                        "--out", out, "--clips", "24,8,8", "--workers", "1", "--notfds"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  printed = json.loads(res.stdout[res.stdout.index("{"):])
  with open(os.path.join(out, "meta.json")) as f:
    meta = json.load(f)
  assert meta["variant"] == meta["spec"]["variant"] == printed["variant"] == "hard"
  assert meta["spec"]["num_clips"] == [24, 8, 8]
  for split in default_dataset.SPLITS:
    rates = meta["oracle_keep_rate_50pct"][split]
    assert set(rates) == {"heuristic", "random", "clips"} and rates == printed["oracle_keep_rate_50pct"][split]
  assert meta["oracle_keep_rate_50pct"]["train"]["clips"] == 24
  lines = [json.loads(x) for x in open(os.path.join(out, "val.jsonl"))]
  frames = np.load(os.path.join(out, "val_frames.npy"))
  _, want = default_dataset.render_clip("val", lines[0]["row"], HARD)
  assert lines[0]["event_frames"] == want["event_frames"] and frames.shape == (8, 8, 126, 126, 3)

import json
import os

import numpy as np
import pytest

from stts_jax.data import default_dataset, oracle, pipeline, synth, video
from stts_jax.testing import tiny

SPEC = default_dataset.Spec(num_clips=(16, 6, 6))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("default"))
  meta = default_dataset.build(out, SPEC, workers=1, with_tfds=True)
  return out, meta


def read(out, split):
  return [json.loads(line) for line in open(os.path.join(out, f"{split}.jsonl"))]


def test_build_outputs_and_splits(built):
  out, meta = built
  assert meta["spec"]["num_clips"] == [16, 6, 6] and meta["tfds"]
  faces, videos_seen = {}, set()
  for split, n in zip(default_dataset.SPLITS, SPEC.num_clips):
    lines = read(out, split)
    rows = {x["row"] for x in lines}
    assert rows == set(range(n)) and meta["counts"][split]["clips"] == n
    assert len(lines) == meta["counts"][split]["examples"] == n + sum(x["qtype"] == "where" for x in lines)
    lo, hi = default_dataset.FACES[split]
    faces[split] = {x["face"] for x in lines}
    assert all(lo <= f < hi for f in faces[split])
    for x in lines:
      assert x["options"] == list(default_dataset.QUESTIONS[x["qtype"]][1])
      ans = x["options"].index(x["answer"])
      if x["qtype"] == "when":
        assert ans == x["event_frames"][0] // 2 == x["event_frames"][-1] // 2
      else:
        assert default_dataset.CORNERS[ans] == x["event_window"]
      assert os.path.isfile(os.path.join(out, x["video"])) and x["video"] not in videos_seen - {x["video"]}
    videos_seen |= {x["video"] for x in lines}
  assert not faces["train"] & faces["val"] and not faces["train"] & faces["test"]
  frames = np.load(os.path.join(out, "train_frames.npy"), mmap_mode="r")
  assert frames.shape == (16, 8, 126, 126, 3) and frames.dtype == np.uint8


def test_arrays_are_the_decoded_mp4s(built):
  out, _ = built
  frames = np.load(os.path.join(out, "val_frames.npy"), mmap_mode="r")
  for x in read(out, "val"):
    got, ts = video.sample_frames(os.path.join(out, x["video"]), 8, 2.0)
    np.testing.assert_array_equal(got, frames[x["row"]])
    np.testing.assert_array_equal(ts, np.arange(8, dtype=np.float32) / 2)


def test_arrays_format_equals_manifest_and_tfds_formats(built):
  out, _ = built
  ids = default_dataset.tiny_token_ids()
  def rows(fmt):
    cfg = default_dataset.data_config(out, format=fmt, batch_size=4, num_threads=1)
    res = {}
    for b in pipeline.eval_iterator(cfg, ids, "test"):
      for r in np.flatnonzero(b["valid"]):
        res[int(b["example_id"][r])] = {k: v[r] for k, v in b.items()}
    return res
  a, m, t = rows("arrays"), rows("manifest"), rows("tfds")
  assert sorted(a) == sorted(m) == sorted(t) == list(range(len(read(out, "test"))))
  for i in a:
    for k in a[i]:
      np.testing.assert_array_equal(a[i][k], m[i][k], err_msg=k)
      np.testing.assert_array_equal(a[i][k], t[i][k], err_msg=k)
  cfg = default_dataset.data_config(out)
  cfg.check_model(tiny.tiny_model_config())
  b = next(pipeline.train_iterator(cfg, ids))
  assert b["patches"].shape == (16, 8, 81, 588) and b["frame_mask"].all() and b["valid"].all()
  assert int(b["token_mask"].sum(1).max()) <= cfg.seq_len


def test_build_is_idempotent(built):
  out, meta = built
  stamp = os.path.getmtime(os.path.join(out, "train_frames.npy"))
  again = default_dataset.build(out, SPEC, workers=1, with_tfds=True)
  assert again == meta and os.path.getmtime(os.path.join(out, "train_frames.npy")) == stamp


def test_build_from_before_the_variant_field_is_reused(built):
  """A meta.json written before Spec.variant existed counts as the default variant: reused, not
  rebuilt, and the field is added so that later spec comparisons match."""
  out, meta = built
  assert meta["variant"] == meta["spec"]["variant"] == "default"
  stamp = os.path.getmtime(os.path.join(out, "train_frames.npy"))
  old = dict(meta, spec={k: v for k, v in meta["spec"].items() if k != "variant"})
  del old["variant"]
  with open(os.path.join(out, "meta.json"), "w") as f:
    json.dump(old, f)
  assert default_dataset.build(out, SPEC, workers=1, with_tfds=True) == meta
  with open(os.path.join(out, "meta.json")) as f:
    assert json.load(f) == meta
  assert os.path.getmtime(os.path.join(out, "train_frames.npy")) == stamp


def test_oracle_pruning_keeps_event_more_with_heuristic_than_random():
  """Pixel-space 1-cos heuristic vs random at 50 %: the event must matter, and distractors must
  leave the heuristic room to be beaten."""
  clips, events = [], []
  for i in range(160):
    frames, meta = default_dataset.render_clip("train", i, default_dataset.Spec())
    clips.append(frames)
    events.append((meta["event_frames"], meta["event_window"]))
  rates = oracle.keep_rates(clips, events, ratio=0.5)
  print(f"\noracle keep rate of the event window at 50% pruning: {rates}")
  assert 0.45 <= rates["random"] <= 0.7
  assert rates["heuristic"] >= rates["random"] + 0.2
  assert rates["heuristic"] <= 0.97


def test_oracle_budget_rule_hand_computed():
  scores = np.array([[0.0, 0.0], [0.5, 0.1], [0.1, 0.9]], np.float32)
  keep = oracle.keep_mask(scores, 0.5)          # drop min(floor(3), 4) = 3; frame 0 kept
  np.testing.assert_array_equal(keep, [[True, True], [False, False], [False, True]])
  assert oracle.num_dropped(8, 9, 0.5) == 36 and oracle.num_dropped(1, 9, 0.5) == 0


def test_calm_spec_has_no_distractors():
  spec = default_dataset.Spec(distractors=False)
  for i in range(12):
    frames, meta = default_dataset.render_clip("val", i, spec)
    assert frames.shape == (8, 126, 126, 3)
    assert meta["camera"] in ("video", "static", "pan") and meta["movers"] == 0
    assert meta["decoys"] == [] and meta["flicker_frames"] == []


def test_labels_match_the_visible_event_through_the_pipeline(built):
  """A hand-coded detector of the yellow frame answers from the batch pixels alone: the labels,
  the decode path and the batch layout agree (only yellow backgrounds could fool it)."""
  out, _ = built
  ids = default_dataset.tiny_token_ids()
  pool = default_dataset.data_config(out).pool
  from stts_jax.data import preprocess
  windows = preprocess.pooling_index((9, 9), pool)
  right = total = 0
  for split in ("train", "val", "test"):
    it = pipeline.eval_iterator(default_dataset.data_config(out, format="manifest", batch_size=8), ids, split)
    for b in it:
      for r in np.flatnonzero(b["valid"]):
        ex = it.example(b["example_id"][r])
        p = b["patches"][r].reshape(8, 81, 14, 14, 3).astype(int)
        yellow = ((p[..., 0] > 190) & (p[..., 1] > 160) & (p[..., 2] < 90)).sum((2, 3))[:, windows].sum(-1)
        t, w = np.unravel_index(yellow.argmax(), yellow.shape)
        if ex.extra["qtype"] == "when":
          pred = t // 2
        else:
          pred = default_dataset.CORNERS.index(w) if w in default_dataset.CORNERS else -1
        right += int(pred == b["answer_index"][r])
        total += 1
  assert total == sum(len(read(out, s)) for s in default_dataset.SPLITS)
  assert right / total >= 0.9, (right, total)


def test_reduce_contrast_pulls_towards_mid_grey():
  from stts_jax.data import synth
  x = np.array([[0, 128, 255]], np.uint8)
  np.testing.assert_array_equal(synth.reduce_contrast(x, 0.5), [[64, 128, 192]])
  np.testing.assert_array_equal(synth.reduce_contrast(x, 1.0), x)
  with pytest.raises(ValueError, match="contrast"):
    synth.reduce_contrast(x, 1.5)
  dim, _ = default_dataset.render_clip("train", 3, default_dataset.Spec(background_contrast=0.3))
  full, _ = default_dataset.render_clip("train", 3, default_dataset.Spec())
  assert dim.std() < full.std()

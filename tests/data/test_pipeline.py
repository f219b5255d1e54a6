import json
import logging
import os
import re

import numpy as np
import pytest

from stts_jax.data import default_dataset, pipeline, preprocess, prompt
from stts_jax.data.config import DataConfig
from tests.data import videos

IDS = default_dataset.tiny_token_ids()
QUESTION = "Where does the framed picture appear?"
OPTIONS = ["top left", "top right", "bottom left", "bottom right"]
N = 12


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
  """12 small real videos (several codecs, sizes, fps, lengths) + manifest + the tiny tokenizer."""
  root = tmp_path_factory.mktemp("ds")
  os.makedirs(root / "videos")
  kinds = ["h264_mp4", "vp9_webm", "mpeg4_mp4", "h264_mkv"]
  lines = []
  for i in range(N):
    n, fps = [(5, 2.0), (24, 10.0), (40, 25.0), (9, 1.0)][i % 4]
    h, w = [(40, 60), (126, 126), (58, 32), (96, 72)][i % 4]
    path = videos.write_video(str(root / "videos" / f"v{i}"), videos.moving_frames(n, h, w, seed=i), fps,
                              kinds[i % 4])
    lines.append({"id": f"ex{i}", "video": os.path.relpath(path, root), "question": QUESTION, "options": OPTIONS,
                  "answer": OPTIONS[i % 4]})
  with open(root / "train.jsonl", "w") as f:
    f.write("".join(json.dumps(x) + "\n" for x in lines))
  default_dataset.build_tokenizer(IDS).save(str(root / "tokenizer.json"))
  return str(root)


def cfg_for(path, **kw):
  base = dict(path=path, format="manifest", image_size=126, patch_size=14, max_frames=8, max_fps=2.0, seq_len=256,
              max_options=4, batch_size=4, num_threads=1, prefetch_buffer=1, eval_splits=("train",))
  base.update(kw)
  return DataConfig(**base).validate()


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_contract(dataset_dir):
  cfg = cfg_for(dataset_dir, num_epochs=1)
  it = pipeline.train_iterator(cfg, IDS)
  batches = list(it)
  assert len(batches) == N // 4
  b = batches[0]
  shapes = {"patches": ((4, 8, 81, 588), np.uint8), "frame_mask": ((4, 8), np.bool_),
            "timestamps": ((4, 8), np.float32), "input_ids": ((4, 256), np.int32), "token_mask": ((4, 256), np.bool_),
            "target_ids": ((4, 256), np.int32), "loss_mask": ((4, 256), np.bool_), "example_id": ((4,), np.int64),
            "answer_index": ((4,), np.int32), "option_ids": ((4, 4), np.int32), "prompt_len": ((4,), np.int32),
            "valid": ((4,), np.bool_), "skipped": ((4,), np.bool_)}
  assert set(b) == set(shapes)
  for k, (shape, dtype) in shapes.items():
    assert b[k].shape == shape and b[k].dtype == dtype, k
  tok = pipeline.make_processor(cfg, IDS).tok
  seen = []
  for b in batches:
    assert b["valid"].all() and not b["skipped"].any()
    for r in range(4):
      t = int(b["frame_mask"][r].sum())
      assert b["frame_mask"][r, :t].all() and not b["patches"][r, t:].any()
      ids = b["input_ids"][r]
      assert (ids == IDS.image_patch).sum() == 9 * t                  # W tokens per real frame
      assert (ids == IDS.frame_start).sum() == t
      n = int(b["token_mask"][r].sum())
      assert (ids[n:] == IDS.pad).all() and ids[0] == IDS.chat_end
      ex = int(b["example_id"][r])
      seen.append(ex)
      letter = "ABCD"[ex % 4]
      assert b["answer_index"][r] == ex % 4
      assert tok.decode(b["target_ids"][r][b["loss_mask"][r]]) == letter + "<|im_end|>"
      assert b["prompt_len"][r] == n - 2
      np.testing.assert_array_equal(b["option_ids"][r], [tok.token_to_id(c) for c in "ABCD"])
      np.testing.assert_allclose(b["timestamps"][r, 1:t] - b["timestamps"][r, :t - 1] > 0, True)
  assert sorted(seen) == list(range(N))


def test_resume_gives_exactly_the_next_batch(dataset_dir):
  cfg = cfg_for(dataset_dir, shuffle_seed=3)
  it = pipeline.train_iterator(cfg, IDS)
  take(it, 2)
  state = json.loads(json.dumps(it.get_state()))          # survives a JSON round trip
  expected = take(it, 4)                                  # crosses into the second epoch
  fresh = pipeline.train_iterator(cfg, IDS)
  fresh.set_state(state)
  assert_same_batches(take(fresh, 4), expected)
  epoch1 = [int(i) for b in take(pipeline.train_iterator(cfg, IDS), 3) for i in b["example_id"]]
  epoch2 = [int(i) for b in expected[1:4] for i in b["example_id"]]
  assert sorted(epoch1) == sorted(epoch2) == list(range(N)) and epoch1 != epoch2   # reshuffled per epoch


def test_processes_see_disjoint_shards(dataset_dir):
  cfg = cfg_for(dataset_dir, num_epochs=1, batch_size=4)
  ids = []
  for pi in range(2):
    it = pipeline.train_iterator(cfg, IDS, process_index=pi, process_count=2)
    batches = list(it)
    assert len(batches) == 3 and batches[0]["input_ids"].shape[0] == 2
    ids.append({int(i) for b in batches for i in b["example_id"]})
  assert ids[0].isdisjoint(ids[1]) and ids[0] | ids[1] == set(range(N))
  ev = [list(pipeline.eval_iterator(cfg_for(dataset_dir, batch_size=10), IDS, "train", process_index=pi,
                                    process_count=2)) for pi in range(2)]
  assert len(ev[0]) == len(ev[1]) == 2                    # 6 examples each, batches of 5 -> 2, padded
  got = [int(i) for b in ev[0] + ev[1] for i, v in zip(b["example_id"], b["valid"]) if v]
  assert sorted(got) == list(range(N))
  assert sum(int((~b["valid"]).sum()) for b in ev[0] + ev[1]) == 20 - N
  assert all(b["example_id"][~b["valid"]].tolist() == [-1] * int((~b["valid"]).sum()) for b in ev[0])


def bad_dataset(root, good_dir):
  os.makedirs(root, exist_ok=True)
  good = [json.loads(x) for x in open(os.path.join(good_dir, "train.jsonl"))][:6]
  for g in good:
    g["video"] = os.path.join(good_dir, g["video"])
  corrupt = os.path.join(root, "corrupt.mp4")
  with open(corrupt, "wb") as f:
    f.write(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
  lines = good[:2] + [{"id": "missing", "video": "nope.mp4", "question": QUESTION, "options": OPTIONS, "answer": "A"},
                      {"id": "corrupt", "video": corrupt, "question": QUESTION, "options": OPTIONS, "answer": "A"}]
  lines += good[2:6]
  with open(os.path.join(root, "train.jsonl"), "w") as f:
    f.write("".join(json.dumps(x) + "\n" for x in lines))
    f.write("{broken line\n")
  return root


def test_bad_inputs_are_skipped_counted_and_logged(dataset_dir, tmp_path, caplog):
  root = bad_dataset(str(tmp_path / "bad"), dataset_dir)
  cfg = cfg_for(root, tokenizer=os.path.join(dataset_dir, "tokenizer.json"), num_epochs=1, on_error="skip")
  with caplog.at_level(logging.WARNING):
    it = pipeline.train_iterator(cfg, IDS)
    batches = list(it)
  assert len(it.manifest_errors) == 1 and "train.jsonl:9: invalid JSON" in it.manifest_errors[0]
  assert len(batches) == 2 and it.num_skipped == 2
  skipped = np.concatenate([b["skipped"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  assert skipped.sum() == 2 and (valid == ~skipped).all()
  for b in batches:
    assert not b["loss_mask"][b["skipped"]].any() and not b["token_mask"][b["skipped"]].any()
  text = caplog.text
  assert "'missing'" in text and "nope.mp4: file not found" in text
  assert "'corrupt'" in text and "corrupt.mp4: cannot open as a video container" in text
  assert it.get_state()["num_skipped"] == 2


def test_bad_inputs_raise_when_asked(dataset_dir, tmp_path):
  root = bad_dataset(str(tmp_path / "bad"), dataset_dir)
  cfg = cfg_for(root, tokenizer=os.path.join(dataset_dir, "tokenizer.json"), on_error="raise")
  with pytest.raises(Exception, match=r"train\.jsonl:9: invalid JSON"):
    pipeline.train_iterator(cfg, IDS)
  os.remove(os.path.join(root, "train.jsonl"))
  bad_dataset(root, dataset_dir)
  lines = open(os.path.join(root, "train.jsonl")).read().splitlines()[:-1]
  open(os.path.join(root, "train.jsonl"), "w").write("\n".join(lines) + "\n")
  it = pipeline.eval_iterator(cfg, IDS, "train")
  with pytest.raises(pipeline.DataError, match=r"example 'missing' \(video .*nope\.mp4\): .*nope\.mp4: file not found"):
    list(it)


def test_tfds_source_equals_manifest_source(dataset_dir, tmp_path):
  from stts_jax.data import tfds_builder
  tfds_builder.build({"train": os.path.join(dataset_dir, "train.jsonl")}, str(tmp_path / "tfds"))
  cfg_m = cfg_for(dataset_dir)
  cfg_t = cfg_for(str(tmp_path), format="tfds", tokenizer=os.path.join(dataset_dir, "tokenizer.json"))
  def rows(cfg):
    out = {}
    for b in pipeline.eval_iterator(cfg, IDS, "train"):
      for r in range(b["valid"].shape[0]):
        if b["valid"][r]:
          out[int(b["example_id"][r])] = {k: v[r] for k, v in b.items()}
    return out
  m, t = rows(cfg_m), rows(cfg_t)
  ex_m = pipeline.eval_iterator(cfg_m, IDS, "train").example(5)
  ex_t = pipeline.eval_iterator(cfg_t, IDS, "train").example(5)
  assert ex_m.id == ex_t.id == "ex5" and ex_m.options == ex_t.options and ex_m.answer == ex_t.answer
  assert sorted(m) == sorted(t) == list(range(N))
  for i in m:
    for k in m[i]:
      np.testing.assert_array_equal(m[i][k], t[i][k], err_msg=f"{i} {k}")


@pytest.mark.slow
def test_worker_processes_match_in_process(dataset_dir):
  cfg0 = cfg_for(dataset_dir, shuffle_seed=1)
  cfg2 = cfg_for(dataset_dir, shuffle_seed=1, num_workers=2)
  want = take(pipeline.train_iterator(cfg0, IDS), 4)
  it = pipeline.train_iterator(cfg2, IDS)
  got = take(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  got += take(it, 2)
  it.close()
  assert_same_batches(got, want)
  it = pipeline.train_iterator(cfg2, IDS)
  it.set_state(state)
  assert_same_batches(take(it, 2), want[2:])
  it.close()


# ---- data errors vs code errors, and the skipped-fraction limit ---------------------------------------


@pytest.mark.parametrize("module, name", [(preprocess, "preprocess_frames"), (prompt, "format_question")])
def test_a_bug_in_our_own_transform_crashes_even_with_skip(dataset_dir, monkeypatch, module, name):
  def bug(*args, **kwargs):
    raise ValueError("bug in our own code")
  monkeypatch.setattr(module, name, bug)
  cfg = cfg_for(dataset_dir, num_epochs=1, on_error="skip")
  with pytest.raises(ValueError, match="bug in our own code") as err:
    next(pipeline.train_iterator(cfg, IDS))
  assert not isinstance(err.value, pipeline.DataError)       # propagated as is, not turned into bad data


def _record(**kw):
  rec = {"index": 3, "id": "r3", "video_name": "clip3.npy", "frames": np.zeros((4, 30, 40, 3), np.uint8),
         "fps": 2.0, "question": QUESTION, "options": OPTIONS, "answer": OPTIONS[1], "answer_index": 1}
  rec.update(kw)
  return rec


@pytest.mark.parametrize("bad, why", [
    (dict(question="far " * 300), r"prompt \+ answer are \d+ tokens .*more than data\.seq_len 256"),
    (dict(options=OPTIONS + ["middle"]), r"5 options exceed data\.max_options 4"),
    (dict(frames=np.zeros((4, 30, 40), np.uint8)), r"pre-decoded frames must be uint8 \[F, H, W, 3\]"),
    (dict(frames=np.zeros((4, 30, 40, 3), np.float32)), r"pre-decoded frames must be uint8"),
])
def test_problems_of_one_example_are_data_errors(dataset_dir, caplog, bad, why):
  proc = pipeline.make_processor(cfg_for(dataset_dir), IDS)
  assert proc(_record())["valid"]
  with caplog.at_level(logging.WARNING):
    out = proc(_record(**bad))
  assert out["skipped"] and not out["valid"] and out["example_id"] == 3 and not out["loss_mask"].any()
  assert re.search(r"example 'r3' \(video clip3\.npy\): " + why, caplog.text)
  strict = pipeline.make_processor(cfg_for(dataset_dir, on_error="raise"), IDS)
  with pytest.raises(pipeline.DataError, match=why):
    strict(_record(**bad))


def test_skipped_fraction_limit_lists_the_files(dataset_dir, tmp_path):
  root = bad_dataset(str(tmp_path / "bad"), dataset_dir)         # 8 examples, 2 bad videos (25%)
  tok = os.path.join(dataset_dir, "tokenizer.json")
  it = pipeline.train_iterator(cfg_for(root, tokenizer=tok, max_skipped_fraction=0.3), IDS)
  take(it, 5)
  it.check_skipped()                                              # below the limit: counted only
  assert it.num_seen == 20 and 4 <= it.num_skipped <= 6
  assert set(it.skipped_examples) == {f"missing ({root}/nope.mp4)", f"corrupt ({root}/corrupt.mp4)"}
  state = json.loads(json.dumps(it.get_state()))
  assert state["num_seen"] == 20 and state["skipped_examples"] == it.skipped_examples

  it = pipeline.train_iterator(cfg_for(root, tokenizer=tok, max_skipped_fraction=0.05), IDS)
  take(it, 4)
  it.check_skipped()                      # 16 < MIN_EXAMPLES_FOR_SKIP_CHECK examples: no verdict yet
  take(it, 1)
  with pytest.raises(pipeline.TooManySkippedError,
                     match=r"(?s)of 20 examples skipped .*max_skipped_fraction=0\.05.*nope\.mp4.*corrupt\.mp4"):
    it.check_skipped()
  it.check_skipped(num_skipped=1, num_seen=40)                   # other processes' sums decide
  with pytest.raises(pipeline.TooManySkippedError):
    pipeline.check_skipped_fraction(2, 20, 0.05, ["a", "b"], what="x")
  pipeline.check_skipped_fraction(1, 20, 0.05, ["a"], what="x")  # exactly 5%: allowed


@pytest.mark.slow          # compiles the toy model's init and step (~10 s on a shared CPU)
def test_training_stops_when_too_many_videos_are_bad(dataset_dir, tmp_path):
  from stts_jax.parallel import sharding
  from stts_jax.train import loop
  from tests.train import helpers, toy_model
  root = bad_dataset(str(tmp_path / "bad"), dataset_dir)         # 25% of the videos are bad
  cfg = cfg_for(root, tokenizer=os.path.join(dataset_dir, "tokenizer.json"), max_skipped_fraction=0.05)
  it = pipeline.train_iterator(cfg, IDS)
  with pytest.raises(pipeline.TooManySkippedError, match=r"(?s)of 20 examples skipped.*nope\.mp4.*corrupt\.mp4"):
    loop.run(helpers.toy_model_fn(), it, helpers.train_cfg(num_steps=8, checkpoint_every=0), helpers.mesh_1(),
             sharding.make_rules(), str(tmp_path / "wd"), forward=toy_model.toy_forward)
  logged = [json.loads(x) for x in open(tmp_path / "wd" / "metrics.jsonl")]
  assert [r["step"] for r in logged] == [1, 2, 3, 4, 5]           # stopped at the first check (20 examples)
  assert logged[-1]["data_skipped"] == it.num_skipped > 1

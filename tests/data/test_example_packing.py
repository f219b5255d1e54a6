"""Host-side example packing: whole examples, limits, determinism, exact resume, the real pipeline."""
import json

import numpy as np
import pytest

from stts_jax.data import example_packing as ep
from stts_jax.data import pipeline
from stts_jax.models import budget
from tests.data.test_pipeline import IDS, cfg_for, dataset_dir  # noqa: F401  (fixture)

W, T, S, K = 9, 8, 120, 4


def fake_example(i: int, frames: int, extra_tokens: int) -> dict:
  """A processed example (pipeline layout, tiny sizes) whose content encodes its index."""
  n = frames * (W + 2) + extra_tokens
  ex = {"patches": np.zeros((T, 2, 3), np.uint8), "frame_mask": np.zeros(T, bool),
        "timestamps": np.zeros(T, np.float32), "input_ids": np.zeros(S, np.int32), "token_mask": np.zeros(S, bool),
        "target_ids": np.zeros(S, np.int32), "loss_mask": np.zeros(S, bool),
        "example_id": np.int64(i), "answer_index": np.int32(i % 4), "option_ids": np.arange(K, dtype=np.int32),
        "prompt_len": np.int32(n - 2), "valid": np.bool_(True), "skipped": np.bool_(False)}
  ex["patches"][:frames] = (i % 250) + 1
  ex["frame_mask"][:frames] = True
  ex["timestamps"][:frames] = np.arange(frames) * 0.5
  ex["input_ids"][:n] = 1000 * i + np.arange(n)
  ex["token_mask"][:n] = True
  ex["target_ids"][:n - 1] = ex["input_ids"][1:n]
  ex["loss_mask"][n - 3:n - 1] = True
  return ex


class ListIterator:
  """A Grain-like iterator over a list with get_state/set_state (counts reads)."""

  def __init__(self, items):
    self.items, self.pos, self.reads = items, 0, 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.pos >= len(self.items):
      raise StopIteration
    self.pos += 1
    self.reads += 1
    return self.items[self.pos - 1]

  def get_state(self):
    return {"pos": self.pos}

  def set_state(self, state):
    self.pos = state["pos"]


def stream(n=200, seed=0):
  rng = np.random.default_rng(seed)
  return [fake_example(i, int(rng.integers(1, T + 1)), int(rng.integers(3, 30))) for i in range(n)]


def spec(**kw):
  base = dict(rows=3, seq_len=100, max_frames=12, max_videos=4, windows=W, llm_drop_ratio=0.5, lookahead=4, pad_id=7)
  base.update(kw)
  return ep.PackSpec(**base)


def run_all(packer):
  return list(packer)


def test_every_example_once_whole_and_within_limits():
  items = stream()
  sp = spec()
  batches = run_all(ep.ExamplePacker(ListIterator(items), sp))
  seen = []
  for b in batches:
    assert b["input_ids"].shape == (sp.rows, sp.input_len) and b["patches"].shape[:2] == (sp.rows, sp.max_frames)
    for r in range(sp.rows):
      slots = [j for j in range(sp.max_videos) if b["example_id"][r, j] >= 0]
      assert slots == list(range(len(slots)))          # slots filled in order
      assert b["frame_mask"][r].sum() <= sp.max_frames
      assert b["pack_tokens"][r] <= sp.seq_len
      pruned = 0
      for j in slots:
        i = int(b["example_id"][r, j])
        ex = items[i]
        t, n = int(ex["frame_mask"].sum()), int(ex["token_mask"].sum())
        # whole and contiguous: the example's tokens, frames and slot fields, unchanged
        np.testing.assert_array_equal(b["input_ids"][r][b["token_example"][r] == j], ex["input_ids"][:n])
        np.testing.assert_array_equal(b["target_ids"][r][b["token_example"][r] == j], ex["target_ids"][:n])
        np.testing.assert_array_equal(b["loss_mask"][r][b["token_example"][r] == j], ex["loss_mask"][:n])
        np.testing.assert_array_equal(b["positions"][r][b["token_example"][r] == j], np.arange(n))
        np.testing.assert_array_equal(b["patches"][r][b["frame_example"][r] == j], ex["patches"][:t])
        assert b["example_frames"][r, j] == t and b["example_tokens"][r, j] == n
        assert b["answer_index"][r, j] == ex["answer_index"]
        pruned += n - budget.num_dropped(t, W, 0.5)
        seen.append(i)
      assert pruned == b["pack_tokens"][r]
      assert b["token_mask"][r].sum() == sum(b["example_tokens"][r])
      # every token beyond the examples is padding
      assert not b["token_mask"][r][b["token_example"][r] < 0].any()
      assert (b["input_ids"][r][~b["token_mask"][r]] == sp.pad_id).all()
  assert sorted(seen) == list(range(len(items)))      # none dropped, none twice


def test_same_rows_every_step_and_fuller_than_padding():
  items = stream(300, seed=1)
  sp = spec(rows=2)
  batches = run_all(ep.ExamplePacker(ListIterator(items), sp))
  assert all(b["valid"].shape == (2, sp.max_videos) for b in batches)
  per_row = np.mean([b["valid"].sum() / 2 for b in batches[:-2]])
  assert per_row > 1.5      # several examples per row on average (one per row without packing)


def test_deterministic_and_resumes_exactly():
  items = stream(150, seed=2)
  sp = spec(lookahead=3)
  ref = run_all(ep.ExamplePacker(ListIterator(items), sp))
  for k in (0, 1, 3, 7):
    up = ListIterator(items)
    packer = ep.ExamplePacker(up, sp)
    for _ in range(k):
      next(packer)
    state = json.loads(json.dumps(packer.get_state()))   # JSON round trip, as Orbax stores it
    fresh = ep.ExamplePacker(ListIterator(items), sp)
    fresh.set_state(state)
    rest = run_all(fresh)
    assert len(rest) == len(ref) - k
    for a, b in zip(rest, ref[k:]):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_too_big_example_is_skipped_or_raises():
  items = [fake_example(0, 2, 3), fake_example(1, 8, 20), fake_example(2, 1, 3)]   # 1: 72 pruned tokens
  sp = spec(rows=1, seq_len=60, max_frames=8)
  batches = run_all(ep.ExamplePacker(ListIterator(items), sp))
  ids = [(int(i), bool(s)) for b in batches for i, s in zip(b["example_id"][0], b["skipped"][0]) if i >= 0]
  assert sorted(ids) == [(0, False), (1, True), (2, False)]
  with pytest.raises(ep.PackingError, match="example_id 1"):
    run_all(ep.ExamplePacker(ListIterator(items), sp, on_error="raise"))


def test_unpruned_rows_have_no_extra_slots():
  sp = spec(llm_drop_ratio=0.0)
  assert sp.input_len == sp.seq_len
  assert spec().input_len == 100 + budget.packed_dropped_bound(12, W, 0.5)


def test_pipeline_packing_resumes_exactly(dataset_dir):  # noqa: F811
  """The real pipeline (decoded videos, Grain) with packing on: a restored DataIterator continues
  with exactly the batches of an uninterrupted one."""
  cfg = cfg_for(dataset_dir, pack_examples=True, pack_seq_len=200, pack_max_frames=16, pack_max_videos=3,
                batch_size=2, pack_lookahead=2)
  it = pipeline.train_iterator(cfg, IDS, llm_drop_ratio=0.5)
  ref = [next(it) for _ in range(5)]
  for b in ref:
    assert b["input_ids"].shape == (2, 200 + budget.packed_dropped_bound(16, W, 0.5))
    assert b["patches"].shape[:2] == (2, 16)
  it2 = pipeline.train_iterator(cfg, IDS, llm_drop_ratio=0.5)
  next(it2), next(it2)
  state = json.loads(json.dumps(it2.get_state()))
  it3 = pipeline.train_iterator(cfg, IDS, llm_drop_ratio=0.5)
  it3.set_state(state)
  for a, b in zip([next(it3) for _ in range(3)], ref[2:]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert it3.num_seen == sum(int(np.sum(b["valid"] | b["skipped"])) for b in ref)
  with pytest.raises(ValueError, match="llm_drop_ratio"):
    pipeline.train_iterator(cfg, IDS)


def test_evaluation_never_packs(dataset_dir):  # noqa: F811
  """Generation and evaluation read `eval_iterator`, which ignores data.pack_examples: the same
  unpacked batches with packing on as off, so generation is unaffected."""
  on = cfg_for(dataset_dir, pack_examples=True, pack_seq_len=200, pack_max_frames=16)
  off = cfg_for(dataset_dir)
  a = list(pipeline.eval_iterator(on, IDS, "train"))
  b = list(pipeline.eval_iterator(off, IDS, "train"))
  assert len(a) == len(b) and "token_example" not in a[0]
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_recipe_config_packs_rows_of_9686_pruned_tokens():
  from configs import molmo2_4b_stts
  from stts_jax.data.config import build_data_config
  d = build_data_config(molmo2_4b_stts.get_config().data)
  assert d.pack_examples and d.packed_seq_len == 9686 and d.seq_len == 9686
  assert d.packed_max_frames == 128 and d.pack_max_videos == 8 and d.max_frames == 64
  assert not build_data_config(molmo2_4b_stts.get_config("pack=false").data).pack_examples

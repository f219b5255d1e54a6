"""The example-packing benchmark's stream scan (no compile): both layouts see the same examples."""
import numpy as np
import pytest

from stts_jax.bench import example_packing as bench
from stts_jax.data import default_dataset
from stts_jax.testing import tiny


@pytest.mark.slow   # ~13 s: builds 10 clips
def test_scan_packs_every_example_and_buckets_them(tmp_path):
  out = str(tmp_path / "varlen")
  default_dataset.build(out, default_dataset.Spec(variant="varlen", num_clips=(8, 1, 1)), workers=1, with_tfds=False)
  data_cfg = default_dataset.data_config(out, max_frames=32, seq_len=768, on_error="raise", num_threads=1)
  s = bench.Settings(num_examples=10, batch=2, rows=2, pack_seq_len=768, pack_frames=48, timing_batches=1)
  sc = bench.scan(tiny.tiny_model_config(method="stts", ratio=0.5), data_cfg, s)
  assert sc["frames"].shape[0] == 10 and sc["packed_steps"] >= 1
  assert 4 <= sc["frames"].min() and sc["frames"].max() <= 32
  assert 0 < sc["fill"] <= 1
  ex = next(e for exs in sc["per_bucket"].values() for e in exs)
  b = bench._pad_batch([ex, ex], 32, 768, 7)
  assert b["frame_mask"].sum() == 2 * ex["patches"].shape[0]
  np.testing.assert_array_equal(b["input_ids"][0, :ex["input_ids"].shape[0]], ex["input_ids"])


def test_frame_slots_from_a_result_dict():
  # two buckets (4 and 8 frames, batch 2) against 3 packed steps of 2 rows x 6 frames
  row = {"ratio": 0.5, "examples": 6, "frames_mean": 5.0,
         "buckets": {"4": {"steps": 1, "min_s": 0.4}, "8": {"steps": 2, "min_s": 1.0}},
         "packed": {"steps": 3, "min_s": 0.6}}
  result = {"settings": {"batch": 2, "rows": 2, "pack_frames": 6}, "rows": {"stts": row}}
  f = bench.frame_slots(result)["stts"]
  assert f["padding_slots"] == 1 * 2 * 4 + 2 * 2 * 8 == 40 and f["packing_slots"] == 3 * 2 * 6 == 36
  assert f["real_frames"] == 30 and f["ceiling"] == pytest.approx(40 / 30)
  assert f["padding_ms_per_slot"] == pytest.approx(1e3 * 2.4 / 40)
  assert f["packing_ms_per_slot"] == pytest.approx(1e3 * 1.8 / 36)

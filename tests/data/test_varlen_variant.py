"""The variable-length variant of the default dataset (4 to 32 frames per clip) and its packed stream."""
import numpy as np

from stts_jax.data import default_dataset, pipeline

SPEC = default_dataset.Spec(variant="varlen", num_clips=(6, 2, 2))


def test_varlen_clips_lengths_and_quarters():
  lengths = []
  for i in range(12):
    frames, meta = default_dataset.render_clip("train", i, SPEC)
    n = frames.shape[0]
    lengths.append(n)
    assert default_dataset.VARLEN_FRAMES[0] <= n <= default_dataset.VARLEN_FRAMES[1] and meta["num_frames"] == n
    q = meta["quarter"]
    assert all(q * n // 4 <= f < (q + 1) * n // 4 for f in meta["event_frames"])
    assert frames.dtype == np.uint8 and frames.shape[1:] == (126, 126, 3)
  assert len(set(lengths)) > 4
  # deterministic
  a, _ = default_dataset.render_clip("train", 3, SPEC)
  b, _ = default_dataset.render_clip("train", 3, SPEC)
  np.testing.assert_array_equal(a, b)


def test_varlen_build_reads_back_real_frames_and_packs(tmp_path):
  out = str(tmp_path / "varlen")
  default_dataset.build(out, SPEC, workers=1, with_tfds=False)
  cfg = default_dataset.data_config(out, max_frames=32, seq_len=640, batch_size=2, num_epochs=1, num_threads=1,
                                    prefetch_buffer=1)
  source, _ = pipeline.open_source(cfg, "train")
  for i in range(len(source)):
    rec = source[i]
    ex = source.example(i)
    assert rec["frames"].shape[0] == ex.extra["num_frames"]
  packed = dict(cfg.__dict__, pack_examples=True, pack_seq_len=400, pack_max_frames=48, pack_max_videos=4)
  from stts_jax.data.config import DataConfig
  it = pipeline.train_iterator(DataConfig(**packed).validate(), default_dataset.tiny_token_ids(), llm_drop_ratio=0.5)
  batches = list(it)
  ids = sorted(int(x) for b in batches for x in b["example_id"].ravel() if x >= 0)
  assert ids == list(range(len(source)))           # every example exactly once
  for b in batches:
    for r in range(b["valid"].shape[0]):
      for j in np.flatnonzero(b["valid"][r]):
        want = source.example(int(b["example_id"][r, j])).extra["num_frames"]
        assert b["example_frames"][r, j] == want

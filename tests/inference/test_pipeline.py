"""The ask pipeline: pruned generation == uncached pruned forward, static shapes, Orbax runs, errors."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("torch")
pytest.importorskip("transformers")

from stts_jax import config as config_lib  # noqa: E402
from stts_jax import inference  # noqa: E402
from stts_jax.data import default_dataset  # noqa: E402
from stts_jax.data import video as video_lib  # noqa: E402
from stts_jax.eval import predictor  # noqa: E402
from stts_jax.models import budget  # noqa: E402
from stts_jax.models import video_forward as vf  # noqa: E402
from tests.data import videos  # noqa: E402
from tests.inference import checkpoint_dirs  # noqa: E402

N = 6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return checkpoint_dirs.write_checkpoint(checkpoint_dirs.SETUPS[0], str(tmp_path_factory.mktemp("hf") / "ckpt"))


@pytest.fixture(scope="module")
def pipe(ckpt):
  return inference.Pipeline.from_checkpoint(ckpt, use_mesh=False, prune_at=1)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  d = tmp_path_factory.mktemp("clips")
  # 13 frames at 4 fps (capped at 2 fps) -> 6 sampled; 10 frames -> 5 sampled: both in frame bucket 8.
  return [videos.write_video(str(d / "a"), videos.moving_frames(13, 40, 56, seed=1), 4.0),
          videos.write_video(str(d / "b"), videos.moving_frames(10, 40, 40, seed=2), 4.0)]


@nnx.jit(static_argnames=())
def _forward(model, batch, rng):
  return vf.forward_video(model, batch, rng=rng)


@pytest.mark.parametrize("method", ["heuristic", pytest.param("random", marks=pytest.mark.slow)])
def test_pruned_generation_equals_uncached_pruned_forward(pipe, clips, method):
  video = pipe.load_video(clips[0])
  got = pipe.ask(video, "What moves?", method=method, ratio=0.5, max_new_tokens=N, seed=3)
  t, w = video.num_frames, pipe.windows
  assert got.vision_tokens == {"kept": budget.num_kept(t, w, 0.5), "total": t * w}
  assert len(got.token_ids) == N and not got.stopped
  # Uncached reference: prompt + generated tokens through the training forward (ViT, pruning,
  # compaction, decoder, all recomputed) with the same pruning key.
  model = inference.gen_lib.model_variant(pipe.model, method=method, ratio=0.5, num_rows=None)
  ids = pipe.builder.build(video.timestamps, "What moves?", None).input_ids
  n, s, tb = len(ids), got.seq_bucket, got.frame_bucket
  batch = {"patches": np.zeros((1, tb) + video.patches.shape[1:], np.uint8), "frame_mask": np.zeros((1, tb), bool),
           "input_ids": np.full((1, s), model.config.tokens.pad, np.int32), "token_mask": np.zeros((1, s), bool)}
  batch["patches"][0, :t] = video.patches
  batch["frame_mask"][0, :t] = True
  batch["input_ids"][0, :n] = ids
  batch["input_ids"][0, n:n + N] = got.token_ids
  batch["token_mask"][0, :n + N] = True
  batch["target_ids"] = batch["input_ids"]
  batch["loss_mask"] = batch["token_mask"]
  out = _forward(model, jax.tree.map(jnp.asarray, batch), jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(out.keep_mask)[0, :t], got.keep_mask)
  m = int(np.sum(out.token_mask[0]))          # pruned prompt + N generated tokens
  ref = np.argmax(np.asarray(out.logits[0, m - N - 1:m - 1]), -1)
  np.testing.assert_array_equal(ref, got.token_ids)


def test_one_compilation_per_bucket_and_reused_vision(pipe, clips):
  first = pipe.ask(clips[0], "Where is it?", method="heuristic", ratio=0.3, max_new_tokens=3)
  before = predictor.compile_counts()
  a = pipe.load_video(clips[0])
  assert pipe.load_video(clips[0]) is a                       # decoded once
  second = pipe.ask(a, "And then?", method="heuristic", ratio=0.3, max_new_tokens=3)
  assert second.timings_s["vision"] == 0.0 and second.timings_s["video_decode"] == 0.0   # features reused
  other = pipe.ask(clips[1], "Where is it?", method="heuristic", ratio=0.3, max_new_tokens=3)
  assert (first.frame_bucket, first.seq_bucket) == (other.frame_bucket, other.seq_bucket) == (8, 256)
  assert first.num_frames != other.num_frames
  assert predictor.compile_counts() == before                 # same buckets: nothing new compiled
  assert "compile" not in other.timings_s
  assert pipe.shapes_seen()["prefill"] >= 1
  with pytest.raises(inference.AskError, match="max_new_tokens"):
    pipe.ask(a, "x", max_new_tokens=0)


def test_orbax_run_with_saved_tokenizer_and_processor(tmp_path, clips):
  from tests.eval.test_runner import _save_orbax
  from stts_jax.testing import tiny
  cfg = tiny.tiny_model_config(method="stts", ratio=0.5)
  model = nnx.jit(lambda: inference.vlm.Molmo2(cfg, rngs=nnx.Rngs(0)))()
  run = str(tmp_path / "run")
  _save_orbax(model, run)
  data_cfg = default_dataset.data_config(str(tmp_path / "data"), max_frames=6)
  tok = default_dataset.build_tokenizer(cfg.tokens)
  inference.save_run_files(run, data_cfg, tok)
  with open(os.path.join(run, inference.PROCESSOR_FILE)) as f:
    assert json.load(f)["max_frames"] == 6
  pipe = inference.Pipeline.from_checkpoint(os.path.join(run, "checkpoints", "7"), use_mesh=False)
  assert pipe.model.config.stts.method == "stts" and pipe.settings.max_frames == 6   # the run's own settings
  got = pipe.ask(clips[0], "What moves?", max_new_tokens=4)
  assert got.method == "stts" and got.vision_tokens["kept"] < got.vision_tokens["total"]
  direct = inference.Pipeline(model, tok, pipe.settings).ask(clips[0], "What moves?", max_new_tokens=4)
  assert direct.token_ids == got.token_ids and np.array_equal(direct.keep_mask, got.keep_mask)


@pytest.mark.slow
@pytest.mark.multidevice
def test_mesh_over_local_devices_gives_the_same_answer(ckpt, pipe, clips):
  if jax.local_device_count() < 2:
    pytest.skip("needs several devices")
  sharded = inference.Pipeline.from_checkpoint(ckpt, use_mesh=True, prune_at=1)
  assert sharded.mesh is not None
  want = pipe.ask(clips[1], "What moves?", max_new_tokens=N)
  got = sharded.ask(clips[1], "What moves?", max_new_tokens=N)
  assert got.token_ids == want.token_ids


def test_sampling_is_seeded(pipe, clips):
  a = pipe.ask(clips[1], "What?", max_new_tokens=5, temperature=1.0, top_p=0.9, seed=1)
  b = pipe.ask(clips[1], "What?", max_new_tokens=5, temperature=1.0, top_p=0.9, seed=1)
  assert a.token_ids == b.token_ids


# ---------------------------------------------------------------------------------------------
# bad input: one clear error naming the file or field
# ---------------------------------------------------------------------------------------------
def test_bad_checkpoints_name_the_problem(ckpt, tmp_path):
  with pytest.raises(inference.AskError, match="does not exist"):
    inference.Pipeline.from_checkpoint(str(tmp_path / "nope"))
  with pytest.raises(inference.AskError, match="not a Molmo2 checkpoint"):
    inference.Pipeline.from_checkpoint(str(tmp_path))
  bad = tmp_path / "no_weights"
  bad.mkdir()
  shutil.copy(os.path.join(ckpt, "config.json"), bad / "config.json")
  with pytest.raises(inference.AskError, match="no \\*.safetensors"):
    inference.Pipeline.from_checkpoint(str(bad))
  no_tok = tmp_path / "no_tok"
  shutil.copytree(ckpt, no_tok)
  os.remove(no_tok / "tokenizer.json")
  with pytest.raises(inference.AskError, match="tokenizer.json"):
    inference.Pipeline.from_checkpoint(str(no_tok))
  other = tmp_path / "other"
  shutil.copytree(ckpt, other)
  cfg = json.loads((other / "config.json").read_text())
  (other / "config.json").write_text(json.dumps(dict(cfg, model_type="llava")))
  with pytest.raises(inference.AskError, match="model_type 'llava'"):
    inference.Pipeline.from_checkpoint(str(other))
  with pytest.raises(inference.AskError, match="--ratio"):
    inference.Pipeline.from_checkpoint(ckpt, method="random", ratio=1.0)
  with pytest.raises(inference.AskError, match="trained scorer"):
    inference.Pipeline.from_checkpoint(ckpt, method="stts", prune_at=1, use_mesh=False)


def test_processor_layouts(ckpt, tmp_path):
  hub = tmp_path / "hub"
  hub.mkdir()
  (hub / "video_preprocessor_config.json").write_text(json.dumps(
      {"num_frames": 16, "max_fps": 1, "size": {"height": 126, "width": 126}, "patch_size": 14,
       "pooling_size": [3, 3], "do_rescale": True, "do_normalize": True, "image_mean": [0.5] * 3}))
  s = inference.read_hf_processor(str(hub))
  assert (s.max_frames, s.max_fps, s.image_size, s.use_frame_special_tokens) == (16, 1.0, 126, True)
  (hub / "video_preprocessor_config.json").write_text(json.dumps({"size": {"height": 126, "width": 140}}))
  with pytest.raises(inference.AskError, match="video_preprocessor_config.json: size .* not square"):
    inference.read_hf_processor(str(hub))
  (hub / "video_preprocessor_config.json").write_text(json.dumps({"image_mean": [0.48, 0.45, 0.4]}))
  with pytest.raises(inference.AskError, match="image_mean"):
    inference.read_hf_processor(str(hub))
  s = inference.read_hf_processor(ckpt)
  assert (s.max_frames, s.max_fps, s.image_size) == (8, 2.0, 126)
  tok = default_dataset.build_tokenizer(default_dataset.tiny_token_ids())
  from stts_jax.testing import tiny
  model = nnx.eval_shape(lambda: inference.vlm.Molmo2(tiny.tiny_model_config(), rngs=nnx.Rngs(0)))
  with pytest.raises(inference.AskError, match="image size"):
    inference.Pipeline(model, tok, inference.ProcessorSettings(image_size=140))


def test_bad_videos_name_the_file(pipe, tmp_path):
  empty = tmp_path / "empty.mp4"
  empty.write_bytes(b"")
  junk = tmp_path / "junk.mp4"
  junk.write_bytes(b"not a video at all" * 10)
  for path, msg in ((tmp_path / "missing.mp4", "file not found"), (empty, "empty"), (junk, "cannot open")):
    with pytest.raises(video_lib.VideoError, match=msg) as e:
      pipe.load_video(str(path))
    assert str(path) in str(e.value)


def test_token_ids_come_from_the_tokenizer():
  tok = default_dataset.build_tokenizer(default_dataset.tiny_token_ids())
  base = config_lib.TokenIds.for_vocab(512, chat_start=1, chat_end=2, pad=3)
  ids = inference._token_ids_from_tokenizer(tok, base)
  assert (ids.chat_start, ids.chat_end, ids.pad) == (tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>"),
                                                     tok.token_to_id("<|endoftext|>"))

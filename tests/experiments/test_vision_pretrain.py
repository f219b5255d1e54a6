"""Stage 0 of the main job: window tags from the dataset metadata, targets, save/load/reuse, and a
short pretraining that must lower its loss and hand the tower to the model unchanged."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from stts_jax import config as config_lib
from stts_jax.data import default_dataset
from stts_jax.experiments import vision_pretrain as vp
from stts_jax.models import vlm


def test_window_tags_from_metadata():
  extra = {"event_frames": [2, 3], "event_window": 4, "decoys": [[0, 1], [3, 4], [7, 8], [9, 0]]}
  tags = vp.window_tags(extra, num_frames=8, windows_per_frame=9)
  assert tags.shape == (72,)
  expected = np.zeros(72, np.int32)
  expected[[0 * 9 + 1, 7 * 9 + 8]] = 2          # decoys (frame 9 is past the clip: ignored)
  expected[[2 * 9 + 4, 3 * 9 + 4]] = 1          # the event wins over a decoy in its window
  np.testing.assert_array_equal(tags, expected)
  # A shorter sampled clip only tags the frames it has.
  assert vp.window_tags(extra, num_frames=3, windows_per_frame=9).tolist().count(1) == 1


def test_targets_are_class_plus_position_codes():
  cfg = vp.PretrainConfig(code_scale=3.0, position_scale=1.0, seed=1)
  classes, positions = vp.target_codes(16, 9, cfg)
  assert classes.shape == (3, 16) and positions.shape == (9, 16)
  assert np.all(classes[0] == 0) and np.all(np.abs(classes[1:]) > 0)
  again = vp.target_codes(16, 9, cfg)
  np.testing.assert_array_equal(classes, again[0])
  tags = jnp.asarray([[0] * 9 + [1] + [0] * 7 + [2]])            # 2 frames of 9 windows
  t = np.asarray(vp.window_targets(tags, jnp.asarray(classes), jnp.asarray(positions)))
  np.testing.assert_allclose(t[0, 3], positions[3])
  np.testing.assert_allclose(t[0, 9], classes[1] + positions[0])
  np.testing.assert_allclose(t[0, 17], classes[2] + positions[8])
  with pytest.raises(ValueError, match="steps"):
    vp.PretrainConfig(steps=-1).validate()


def test_load_into_checks_names_and_shapes(tmp_path):
  cfg = demo.model_config("none")
  a = vlm.Molmo2(cfg, rngs=nnx.Rngs(0))
  b = vlm.Molmo2(cfg, rngs=nnx.Rngs(1))
  params = vp.vision_params(a)
  assert params and all(k.startswith(("vit/", "adapter/")) for k in params)
  path = str(tmp_path / "v.npz")
  vp.save(params, path, {"note": 1})
  loaded, meta = vp.load(path)
  assert meta == {"note": 1} and set(loaded) == set(params)
  llm_before = np.asarray(b.llm.embed_tokens.embedding[...]).copy()
  vp.load_into(b, loaded)
  for k, v in vp.vision_params(b).items():
    np.testing.assert_array_equal(v, params[k])
  np.testing.assert_array_equal(np.asarray(b.llm.embed_tokens.embedding[...]), llm_before)   # only the tower
  bad = dict(loaded)
  name = next(iter(bad))
  bad[name] = bad[name][..., :1]
  with pytest.raises(ValueError, match="shape"):
    vp.load_into(b, bad)
  missing = dict(loaded)
  missing.pop(name)
  with pytest.raises(ValueError, match="lacks"):
    vp.load_into(b, missing)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("vp_data"))
  default_dataset.build(out, default_dataset.Spec(num_clips=(24, 4, 4)), workers=1, with_tfds=False)
  return out


def test_pretraining_lowers_the_loss_and_is_reused(tiny_data, tmp_path):
  model_cfg = demo.model_config("stts")
  data_cfg = default_dataset.data_config(tiny_data, batch_size=4, seq_len=demo.SEQ_LEN)
  cfg = vp.PretrainConfig(steps=30, learning_rate=3e-3, batch_size=4)
  out = str(tmp_path / "tower")
  params, meta = vp.pretrain(model_cfg, data_cfg, cfg, out)
  assert meta["status"] == "trained" and os.path.isfile(os.path.join(out, vp.FILE))
  with open(os.path.join(out, "metrics.jsonl")) as f:
    hist = [json.loads(line) for line in f]
  assert [h["step"] for h in hist] == [10, 20, 30]
  assert hist[-1]["loss"] < 0.7 * hist[0]["loss"]
  # Reused without training when the settings match; other settings are an error.
  again, meta2 = vp.pretrain(model_cfg, data_cfg, cfg, out)
  assert meta2["status"] == "reused" and set(again) == set(params)
  for k in params:
    np.testing.assert_array_equal(again[k], params[k])
  with pytest.raises(ValueError, match="other settings"):
    vp.pretrain(model_cfg, data_cfg, dataclasses.replace(cfg, steps=31), out)
  # The STTS model (with a scorer) takes the tower as is.
  model = vp.load_into(vlm.Molmo2(model_cfg, rngs=nnx.Rngs(5)), params)
  assert model.scorer is not None
  assert config_lib.to_dict(model_cfg)["vit"]["position_init_std"] == 1.0


@pytest.mark.slow
def test_pruned_path_pretraining_trains_the_same_tower(tiny_data, tmp_path):
  """pruned_ratio: both paths regress the same parameters (the pruned one is a view sharing them)."""
  model_cfg = demo.model_config("stts")
  data_cfg = default_dataset.data_config(tiny_data, batch_size=4, seq_len=demo.SEQ_LEN)
  cfg = vp.PretrainConfig(steps=30, learning_rate=3e-3, batch_size=4, pruned_ratio=0.5)
  params, meta = vp.pretrain(model_cfg, data_cfg, cfg, str(tmp_path / "tower"))
  with open(tmp_path / "tower" / "metrics.jsonl") as f:
    hist = [json.loads(line) for line in f]
  assert {"loss", "event_recall", "pruned_loss", "pruned_event_recall"} <= set(hist[-1])
  assert hist[-1]["pruned_loss"] < 0.7 * hist[0]["pruned_loss"]
  assert 0.0 <= meta["final_pruned_event_recall"] <= 1.0
  dense, _ = vp.pretrain(model_cfg, data_cfg, dataclasses.replace(cfg, pruned_ratio=0.0), str(tmp_path / "dense"))
  assert set(dense) == set(params)
  assert any(not np.array_equal(dense[k], params[k]) for k in params)   # the pruned loss moved them
  with pytest.raises(ValueError, match="pruned_ratio"):
    vp.PretrainConfig(pruned_ratio=1.0).validate()


def test_freeze_vit_blocks_leaves_the_early_tower_at_its_init(tiny_data, tmp_path):
  model_cfg = demo.model_config("stts")
  data_cfg = default_dataset.data_config(tiny_data, batch_size=4, seq_len=demo.SEQ_LEN)
  cfg = vp.PretrainConfig(steps=3, learning_rate=3e-3, batch_size=4, freeze_vit_blocks=1)
  init, _ = vp.pretrain(model_cfg, data_cfg, dataclasses.replace(cfg, steps=0), str(tmp_path / "init"))
  params, _ = vp.pretrain(model_cfg, data_cfg, cfg, str(tmp_path / "tower"))
  early = [k for k in params if "patch_embedding" in k or "positional_embedding" in k]
  blocks = [k for k in params if "vit/blocks/" in k]
  assert early and blocks
  for k in early:
    np.testing.assert_array_equal(params[k], init[k])
  for k in blocks:   # stacked [L, ...]: row 0 at its init, later rows trained
    np.testing.assert_array_equal(params[k][0], init[k][0])
  assert any(not np.array_equal(params[k][1:], init[k][1:]) for k in blocks)
  with pytest.raises(ValueError, match="freeze_vit_blocks"):
    vp.PretrainConfig(freeze_vit_blocks=-1).validate()


@pytest.mark.slow   # two pretraining runs
def test_event_weight_weighs_event_windows_only(tiny_data, tmp_path):
  """event_weight = tag_weight is today's loss (bit-identical tower); another value moves the tower;
  towers saved without the field stay reusable (it is left out of the settings when 0)."""
  model_cfg = demo.model_config("stts")
  data_cfg = default_dataset.data_config(tiny_data, batch_size=4, seq_len=demo.SEQ_LEN)
  cfg = vp.PretrainConfig(steps=3, learning_rate=3e-3, batch_size=4)
  base, meta = vp.pretrain(model_cfg, data_cfg, cfg, str(tmp_path / "base"))
  assert "event_weight" not in meta["settings"]["pretrain"]
  same, _ = vp.pretrain(model_cfg, data_cfg, dataclasses.replace(cfg, event_weight=cfg.tag_weight),
                        str(tmp_path / "same"))
  heavy, meta_h = vp.pretrain(model_cfg, data_cfg, dataclasses.replace(cfg, event_weight=600.0),
                              str(tmp_path / "heavy"))
  assert meta_h["settings"]["pretrain"]["event_weight"] == 600.0
  for k in base:
    np.testing.assert_array_equal(same[k], base[k])
  assert any(not np.array_equal(heavy[k], base[k]) for k in base)
  with pytest.raises(ValueError, match="event_weight"):
    vp.PretrainConfig(event_weight=-1.0).validate()

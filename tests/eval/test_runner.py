"""The comparison runner: checkpoints in, identical results twice, one compilation per cell."""
import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from stts_jax import config as config_lib
from stts_jax.eval import checkpoints
from stts_jax.eval import config as eval_config
from stts_jax.eval import data as data_lib
from stts_jax.eval import runner
from stts_jax.models import budget
from tests.eval import helpers


def _save_orbax(model, workdir):
  from stts_jax.testing import synthetic_batches
  from stts_jax.train import checkpoint as ckpt_lib
  from stts_jax.train import step as step_lib
  from stts_jax.train.config import TrainConfig
  graphdef, state = nnx.split(model)
  ts = nnx.jit(lambda s: step_lib.TrainState(nnx.merge(graphdef, s), TrainConfig()))(state)
  saver = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  saver.save(7, nnx.state(ts), synthetic_batches.SyntheticBatches(model.config, 1, 1, 32),
             {"model": config_lib.to_dict(model.config)})
  saver.close()


def _params(model):
  return jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.mark.slow
def test_same_checkpoint_twice_identical_one_compilation_per_cell(stts_model, tmp_path):
  data_cfg = helpers.make_mc_dataset(str(tmp_path / "data"), n=6, frames=4, corrupt=(2,))
  _save_orbax(stts_model, str(tmp_path / "run"))
  ecfg = eval_config.EvalConfig(methods=("none", "random", "stts"), ratios=(0.5,), max_new_tokens=2).validate()
  results = []
  for _ in range(2):
    model, info = checkpoints.load_model(str(tmp_path / "run"), stts_model.config)
    assert info["format"] == "orbax" and info["step"] == 7
    assert all(np.array_equal(a, b) for a, b in zip(_params(model), _params(stts_model)))
    # fresh_scorer: the "stts" cell must be reported as not run, never evaluated with an untrained scorer.
    results.append(runner.evaluate(model, data_cfg, ecfg, progress=False, fresh_scorer=True))
  first, second = results
  cells = {c["method"]: c for c in first["cells"]}
  assert [(c["method"], c["ratio"], c["frames"]) for c in first["cells"]] == [
      ("none", 0.0, 4), ("random", 0.5, 4), ("stts", 0.5, 4)]
  assert "not run" in cells["stts"]["note"] and not cells["stts"]["metrics"]
  for name in ("none", "random"):
    c = cells[name]
    # 6 examples in batches of 4: 2 batches of different videos, one compilation per stage.
    assert c["num_batches"] == 2
    assert c["compilations"] == {"vision": 1, "prefill": 1, "decode": 1}
    assert c["metrics"]["multiple_choice/scored"] == 5 and c["metrics"]["multiple_choice/skipped"] == 1
    assert [s["example_id"] for s in c["skipped_examples"]] == ["ex2"]
  w = stts_model.config.windows_per_frame
  assert cells["none"]["metrics"]["multiple_choice/kept_tokens"] == 4 * w
  assert cells["random"]["metrics"]["multiple_choice/kept_tokens"] == budget.num_kept(4, w, 0.5)
  # The second evaluation (fresh load) compiles nothing and reproduces every prediction.
  for a, b in zip(first["cells"], second["cells"]):
    assert b["compilations"] in ({}, {"vision": 0, "prefill": 0, "decode": 0})
    assert a["records"] == b["records"]
    assert {k: v for k, v in a["metrics"].items()} == {k: v for k, v in b["metrics"].items()}

  json_path, md_path = runner.write_results(first, str(tmp_path / "out"))
  loaded = json.load(open(json_path))
  assert [c["method"] for c in loaded["cells"]] == ["none", "random", "stts"]
  table = open(md_path).read()
  assert "| none | 0 | 4 |" in table and "| random | 0.5 | 4 |" in table and "`ex2`" in table


def test_hf_directory_loads_with_the_same_params(stts_model, tmp_path):
  from stts_jax import weights
  weights.save_molmo2(stts_model, str(tmp_path / "hf"))
  model, info = checkpoints.load_model(str(tmp_path / "hf"), stts_model.config)
  assert info["format"] == "hf" and info["fresh_scorer"] == []
  assert all(np.allclose(a, b, atol=0) for a, b in zip(_params(model), _params(stts_model)))
  with pytest.raises(FileNotFoundError):
    checkpoints.load_model(str(tmp_path / "nope"), stts_model.config)


def test_cells_and_config():
  ecfg = eval_config.build_eval_config({"methods": ["none", "random", "heuristic"], "ratios": [0, 0.5],
                                        "frames": [8, 16]})
  assert ecfg.cells(8) == [("none", 0.0, 8), ("random", 0.5, 8), ("heuristic", 0.5, 8),
                           ("none", 0.0, 16), ("random", 0.5, 16), ("heuristic", 0.5, 16)]
  assert eval_config.EvalConfig(frames=()).cells(4)[0] == ("none", 0.0, 4)
  with pytest.raises(ValueError, match="unknown config keys"):
    eval_config.build_eval_config({"method": ["none"]})
  with pytest.raises(ValueError, match="eval.methods"):
    eval_config.build_eval_config({"methods": ["tome"]})
  with pytest.raises(ValueError, match="ratios"):
    eval_config.build_eval_config({"ratios": [1.0]})
  built = config_lib.build(ml_collections.ConfigDict({"eval": {"split": "val"}}))
  assert built["eval"].split == "val"
  # method_ratios: the named methods at their own ratios, the others at `ratios`
  own = eval_config.build_eval_config({"methods": ["none", "stts", "random"], "ratios": [0.25, 0.5, 0.75],
                                       "method_ratios": [["random", [0.5]]]})
  assert own.method_ratios == (("random", (0.5,)),)
  assert own.cells(8) == [("none", 0.0, 8), ("stts", 0.25, 8), ("stts", 0.5, 8), ("stts", 0.75, 8),
                          ("random", 0.5, 8)]
  with pytest.raises(ValueError, match="method_ratios"):
    eval_config.build_eval_config({"methods": ["none", "stts"], "method_ratios": [["random", [0.5]]]})
  with pytest.raises(ValueError, match="ratios"):
    eval_config.build_eval_config({"methods": ["random"], "method_ratios": [["random", [1.5]]]})


def test_with_frames_grows_the_sequence_for_test_time_scaling(tmp_path):
  cfg = helpers.make_mc_dataset(str(tmp_path), n=1, frames=4, size=42)
  w = cfg.windows_per_frame
  doubled = data_lib.with_frames(cfg, 8, max_fps=0.0)
  assert (doubled.max_frames, doubled.seq_len, doubled.max_fps) == (8, cfg.seq_len + 4 * (w + 10), None)
  assert data_lib.with_frames(cfg, 2).seq_len == cfg.seq_len


def test_scaling_pairs_and_markdown():
  mk = lambda m, r, f, acc, kept: runner.CellResult(  # noqa: E731
      m, r, f, metrics={"multiple_choice/likelihood_accuracy": acc, "multiple_choice/kept_tokens": kept,
                        "multiple_choice/scored": 10, "multiple_choice/skipped": 0},
      seconds={"vision": 0.2, "prefill": 0.1, "decode": 0.05} if m == "none" else
      {"vision": 0.1, "prefill": 0.05, "decode": 0.05})
  cells = [mk("none", 0.0, 8, 0.6, 72), mk("stts", 0.5, 8, 0.55, 36), mk("none", 0.0, 16, 0.7, 144),
           mk("stts", 0.5, 16, 0.65, 72)]
  pairs = runner.scaling_pairs(cells)
  assert [(p["cell"], p["base_cell"]) for p in pairs] == [("none@0x16f", "none@0x8f"), ("stts@0.5x16f", "none@0x8f")]
  assert pairs[1]["kept_tokens"] == pairs[1]["base_kept_tokens"] == 72
  results = {"split": "test", "num_examples": 10, "checkpoint": "ck", "cells": [dataclasses.asdict(c) for c in cells],
             "test_time_scaling": pairs, "skipped_examples": []}
  md = runner.markdown(results)
  assert "| stts | 0.5 | 8 | 55.0 | 10 | 0 | 36.0 | - | 100.0 | 50.0 | 50.0 | 2.00x |" in md
  assert "stts@0.5x16f: accuracy 65.0% with 72.0 vision tokens vs none@0x8f: 60.0% with 72.0" in md


@pytest.mark.slow
@pytest.mark.multidevice
def test_data_parallel_and_rebatched_predictions_equal_single_device(stts_model):
  """Random pruning is keyed by example id: one batch of 8 on 8 devices == two batches of 4 in
  another order on one device, example by example."""
  from stts_jax.eval import generate as gen_lib
  from stts_jax.eval import predictor as predictor_lib
  from stts_jax.parallel import mesh as mesh_lib
  from stts_jax.parallel import sharding
  from stts_jax.parallel.config import MeshConfig
  assert jax.device_count() == 8
  model = gen_lib.model_variant(stts_model, method="random", ratio=0.5)
  batch = helpers.video_batch(model.config, [4, 3, 2, 4, 1, 4, 3, 4], 4, seed=3)
  batch["option_ids"] = np.tile(np.arange(30, 34, dtype=np.int32), (8, 1))
  batch["example_id"] = np.arange(100, 108, dtype=np.int64)
  mesh_cfg = MeshConfig(data=-1, fsdp=1, tensor=1)
  parallel = predictor_lib.Predictor(max_new_tokens=3, mesh=mesh_lib.make_mesh(mesh_cfg),
                                     rules=sharding.make_rules(mesh_cfg))(model, batch, generate=True, step=0)
  single = predictor_lib.Predictor(max_new_tokens=3)
  order = np.array([5, 0, 7, 2, 1, 6, 3, 4])
  parts = [single(model, {k: v[order[i:i + 4]] for k, v in batch.items()}, generate=True, step=i // 4)
           for i in (0, 4)]
  rebatched = {k: np.concatenate([p[k] for p in parts])[np.argsort(order)] for k in parts[0] if k != "packed"}
  np.testing.assert_allclose(rebatched["option_logprobs"], parallel["option_logprobs"], atol=1e-5)
  for key in ("keep_mask", "tokens", "num_tokens", "num_kept", "prompt_tokens"):
    assert np.array_equal(rebatched[key], parallel[key]), key
  assert not np.array_equal(parallel["keep_mask"][0], parallel["keep_mask"][3])   # same T, other draw


@pytest.mark.slow   # evaluation compiles at two ratios
def test_variant_at_another_ratio_drops_a_row_count_sized_for_the_trained_ratio():
  """The demo STTS model packs 8 frames into 5 rows at ratio 0.5; at ratio 0.25 its 54 kept windows
  need 6, so the evaluation variant falls back to the proven bound instead of failing."""
  from configs import demo
  from stts_jax.eval import generate as gen_lib
  from stts_jax.models import video_forward as vf
  from stts_jax.models import vlm
  from stts_jax.testing import synthetic_batches
  model = vlm.Molmo2(demo.model_config("stts", 0.5), rngs=nnx.Rngs(0))
  assert model.config.stts.num_rows == 5
  same = gen_lib.model_variant(model, method="random", ratio=0.5)
  assert same.config.stts.num_rows == 5
  other = gen_lib.model_variant(model, method="stts", ratio=0.25)
  assert other.config.stts.num_rows is None and other.config.stts.ratio == 0.25
  assert gen_lib.model_variant(model, ratio=0.25, num_rows=7).config.stts.num_rows == 7
  batch = next(iter(synthetic_batches.SyntheticBatches(model.config, 1, 8, demo.SEQ_LEN)))
  vision = vf.vit_features_video(other, jax.numpy.asarray(batch["patches"]), jax.numpy.asarray(batch["frame_mask"]))
  frames = int(np.sum(batch["frame_mask"]))
  assert int(vision.keep_mask_btw.sum()) == budget.num_kept(frames, 9, 0.25)
  assert budget.num_kept(8, 9, 0.25) == 54 > 5 * 9

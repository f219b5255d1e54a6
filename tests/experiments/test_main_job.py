"""The main job: config plumbing, reuse rules, the report (table, checks, JSON, plots) on synthetic
stage outputs, the plotting helpers, and (slow) the whole job end to end under `runlocal`."""

import json
import math
import os

import ml_collections
import numpy as np
import pytest

from configs import demo
from stts_jax import config as config_lib
from stts_jax import viz
from stts_jax.experiments import main_job
from stts_jax.experiments import report as report_lib


def _job(tmp_path, **kw):
  cfg = demo.get_config(f"runlocal=true,data={tmp_path}/data")
  return main_job.make_job(cfg, str(tmp_path / "work"), say=lambda s: None, **kw)


def test_demo_config_builds_and_traces():
  import jax
  from flax import nnx
  from stts_jax.models import budget, vlm
  cfg = demo.get_config()
  model = config_lib.build_model_config(cfg.model)
  assert model.stts.method == "stts" and model.stts.ratio == 0.5
  # 8 frames x 9 windows: 36 kept windows fill 4 rows of 9; the demo packs into 5 (one spare row).
  assert budget.num_kept(8, model.windows_per_frame, 0.5) == 36
  assert model.stts.num_rows == budget.typical_num_rows(8, 9, 0.5) == 5
  abstract = nnx.eval_shape(lambda: vlm.Molmo2(model, rngs=nnx.Rngs(0)))
  assert abstract.scorer is not None
  assert jax.tree.leaves(nnx.state(abstract, nnx.Param))
  built = config_lib.build(cfg)
  assert set(built) >= {"model", "data", "train", "mesh", "eval", "job"}
  assert built["data"].seq_len == demo.SEQ_LEN and built["train"].num_steps == 400
  # The tower is pretrained (stage 0) and fine-tuned at a tenth of the LLM's rate, never frozen:
  # a frozen tower would let the unpruned run skip the ViT backward that STTS's scorer still needs.
  assert built["job"].vision_pretrain_steps == 200 and not built["train"].optim.freeze
  assert built["train"].optim.vision_learning_rate == pytest.approx(0.1 * built["train"].optim.learning_rate)
  assert model.vit.position_init_std == 1.0
  assert abs(model.stts.pool_init_std - model.vit.hidden_size ** -0.5) < 1e-9
  # the tower is also pretrained in the pruned path; the STTS scorer is warmed up before training
  assert built["job"].vision_pretrain_pruned_ratio == 0.5 and built["train"].scorer_warmup_steps == 300
  assert config_lib.build(demo.get_config("method=none"))["train"].scorer_warmup_steps == 0
  with pytest.raises(ValueError, match="unknown config arg"):
    demo.get_config("step=3")


def test_run_configs_seeds_steps_and_eval_cells(tmp_path):
  job = _job(tmp_path, seeds=[3, 4], steps=5)
  assert job.job.seeds == (3, 4) and job.train.num_steps == 5
  assert job.train.optim.warmup_steps == 0            # min(config warmup, steps // 10)
  un, st = main_job.run_config(job, 4, "unpruned"), main_job.run_config(job, 4, "stts")
  assert un["model"]["stts"]["method"] == "none" and un["model"]["stts"]["num_rows"] is None
  assert st["model"]["stts"]["method"] == "stts" and st["model"]["stts"]["num_rows"] == 5
  # only the STTS run has a scorer to warm up
  assert un["train"]["scorer_warmup_steps"] == 0 and st["train"]["scorer_warmup_steps"] == 4
  for c in (un, st):
    assert c["train"]["seed"] == 4 and c["data"]["shuffle_seed"] == 4 and c["train"]["num_steps"] == 5
    assert "job" not in c and "eval" not in c
    config_lib.build(ml_collections.ConfigDict(c))      # a valid training config on its own
  assert job.run_dir(4, "stts") == os.path.join(job.workdir, "seed4", "stts")
  cells_un = main_job.eval_config_for(job, "unpruned").cells(8)
  cells_st = main_job.eval_config_for(job, "stts").cells(8)
  assert cells_un == [("none", 0.0, 8), ("random", 0.5, 8), ("heuristic", 0.5, 8)]
  assert cells_st == [("none", 0.0, 8), ("stts", 0.5, 8), ("random", 0.5, 8), ("heuristic", 0.5, 8)]
  with pytest.raises(ValueError, match="pruned variant"):
    cfg = demo.get_config(f"runlocal=true,data={tmp_path}/data,method=none")
    main_job.make_job(cfg, str(tmp_path / "w2"))


def test_run_dir_trained_with_another_config_is_an_error(tmp_path):
  job = _job(tmp_path)
  run_dir = job.run_dir(0, "stts")
  os.makedirs(run_dir)
  cfg = main_job.run_config(job, 0, "stts")
  cfg["train"]["optim"]["learning_rate"] = 0.5
  with open(os.path.join(run_dir, "run_config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match=r"different config \(differs in \['train.optim.learning_rate'\]\)"):
    main_job.train(job, 0, "stts")


def test_read_history_keeps_the_last_entry_of_a_re_logged_step(tmp_path):
  lines = [{"step": 10, "ce": 3.0}, {"step": 20, "ce": 2.0}, {"step": 20, "ce": 1.5}, {"step": 10, "eval/x": 1.0}]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write("\n".join(json.dumps(x) for x in lines) + "\n")
  hist = main_job.read_history(str(tmp_path))
  assert hist == [{"step": 10, "ce": 3.0, "eval/x": 1.0}, {"step": 20, "ce": 1.5}]
  assert main_job.read_history(str(tmp_path / "missing")) == []


def test_dim_dropped_scales_exactly_the_dropped_windows():
  frames = np.full((2, 6, 6, 3), 200, np.uint8)
  keep = np.array([[True, False, True, True], [False, False, False, True]])
  out = viz.dim_dropped(frames, keep, grid=2, dim=0.5)
  assert out[0, :3, :3].min() == 200 and out[0, :3, 3:].max() == 100    # frame 0, window 1 dropped
  assert out[1, 3:, 3:].min() == 200 and out[1, :3, :].max() == 100
  with pytest.raises(ValueError, match="keep mask"):
    viz.dim_dropped(frames, keep[:, :3], grid=2)


# ---------------------------------------------------------------------------------------------
# report on synthetic stage outputs
# ---------------------------------------------------------------------------------------------
def _cell(method, ratio, acc, kept):
  return {"method": method, "ratio": ratio, "frames": 8, "note": "",
          "metrics": {report_lib.ACC_KEY: acc, "multiple_choice/kept_tokens": kept}}


def _evals(tmp_path, seeds, accs):
  out = {}
  for s in seeds:
    a = accs[s]
    out[f"seed{s}/unpruned"] = {"num_examples": 100, "checkpoint": str(tmp_path / f"seed{s}" / "unpruned"), "cells": [
        _cell("none", 0.0, a["none"], 72.0), _cell("random", 0.5, a["random_u"], 36.0),
        _cell("heuristic", 0.5, a["heuristic_u"], 36.0)]}
    out[f"seed{s}/stts"] = {"num_examples": 100, "checkpoint": str(tmp_path / f"seed{s}" / "stts"), "cells": [
        _cell("none", 0.0, a["stts"] + 0.01, 72.0), _cell("stts", 0.25, a["stts"] + 0.01, 54.0),
        _cell("stts", 0.5, a["stts"], 36.0), _cell("random", 0.5, a["random"], 36.0),
        _cell("random", 0.25, a["random"] + 0.1, 54.0), _cell("heuristic", 0.5, a["heuristic"], 36.0)]}
  return out


def _speed(train_stts=0.6):
  return {"key": {}, "train_step": {"median_s": {"unpruned": 1.0, "stts": train_stts}, "batch_size": 16},
          "prefill": {"median_s": {"unpruned": 0.5, "stts": 0.4, "random": 0.35, "heuristic": 0.38},
                      "batch_size": 32, "packed_rate": {"stts": 0.75}}}


def _report(tmp_path, train_stts=0.6):
  accs = {0: dict(none=0.95, stts=0.94, random=0.70, heuristic=0.90, random_u=0.60, heuristic_u=0.85),
          1: dict(none=0.97, stts=0.95, random=0.66, heuristic=0.88, random_u=0.62, heuristic_u=0.86)}
  job = {"max_accuracy_gap": 0.03, "min_gain_over_random": 0.05, "min_train_speedup": 1.3}
  return report_lib.build_report(
      job_info={"workdir": str(tmp_path), "ratio": 0.5, "method": "stts", "seeds": [0, 1], "steps": 10,
                "train_batch": 16, "job": job, "config": {}},
      env={"devices": 2}, dataset={"status": "reused"},
      runs={"seed0/stts": {"status": "trained"}}, evals=_evals(tmp_path, [0, 1], accs), speed=_speed(train_stts),
      wall={"train": 60.0, "total": 100.0})


def test_report_table_values_and_checks(tmp_path):
  rep = _report(tmp_path)
  rows = rep["table"]
  assert [(r["method"], r["weights"]) for r in rows] == [
      ("unpruned", "unpruned-trained"), ("STTS", "STTS-trained"), ("random", "STTS-trained"),
      ("heuristic", "STTS-trained"), ("random", "unpruned-trained"), ("heuristic", "unpruned-trained")]
  un, st = rows[0], rows[1]
  assert un["accuracy"]["values"] == [0.95, 0.97] and math.isclose(un["accuracy"]["mean"], 0.96)
  assert math.isclose(un["accuracy"]["std"], np.std([0.95, 0.97], ddof=1))
  assert st["kept_tokens"] == 36.0 and un["kept_tokens"] == 72.0
  assert math.isclose(st["train_speedup"], 1 / 0.6) and math.isclose(st["prefill_speedup"], 0.5 / 0.4)
  assert rows[2]["train_step_s"] is None and math.isclose(rows[2]["prefill_speedup"], 0.5 / 0.35)
  assert [c["passed"] for c in rep["checks"]] == [True, True, True]
  assert rep["checks"][0]["value"] == "-1.5 points"       # 94.5 vs 96.0
  assert rep["checks"][1]["value"] == "+26.5 points"      # 94.5 vs the better random row, 68.0
  sweep = {(c["method"], c["ratio"]): c["accuracy"]["mean"] for c in rep["accuracy_sweep"]["stts"]}
  assert math.isclose(sweep[("random", 0.25)], 0.78)
  failing = _report(tmp_path, train_stts=0.9)["checks"][2]
  assert not failing["passed"] and failing["value"] == "1.11x"


def test_report_files_and_console_text(tmp_path):
  rep = _report(tmp_path)
  rng = np.random.default_rng(0)
  keep = rng.random((8, 9)) < 0.5
  grid = [{"example_id": "test-00000-when", "question": "When?", "answer": "in the third quarter", "clip_row": 0,
           "frames": rng.integers(0, 255, (8, 126, 126, 3), dtype=np.uint8),
           "timestamps": [0.5 * t for t in range(8)], "event": ([4], 4),
           "keep": {"stts": keep, "heuristic": ~keep, "random": keep}, "scores": rng.random((8, 9))}]
  histories = {"seed0/unpruned": [{"step": s, "ce": 1.0 / s} for s in range(10, 60, 10)],
               "seed0/stts": [{"step": s, "ce": 1.2 / s} for s in range(10, 60, 10)]}
  files = report_lib.write_all(rep, histories, grid, str(tmp_path))
  assert set(files) == {"report", "table", "loss curves", "accuracy vs ratio", "speed", "keep masks 0"}
  for name, path in files.items():
    assert os.path.getsize(path) > 200, name
    if path.endswith(".png"):
      with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(files["report"]) as f:
    saved = json.load(f)
  assert saved["table"][1]["accuracy"]["values"] == [0.94, 0.95]
  assert saved["keep_mask_examples"][0]["kept_event"] == {"stts": bool(keep[4, 4]), "heuristic": bool(~keep[4, 4]),
                                                          "random": bool(keep[4, 4])}
  text = report_lib.console_text(rep, files)
  assert "| STTS @0.5" in text and "94.5 ± 0.7" in text and "1.67x / 1.25x" in text
  assert text.count("[PASS]") == 3 and files["report"] in text
  with open(files["table"]) as f:
    assert f.read().startswith("| method")


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_main_job_runlocal_end_to_end_and_rerun_reuses_everything(tmp_path):
  cfg = demo.get_config(f"runlocal=true,data={tmp_path}/data")
  lines = []
  rep = main_job.run(cfg, str(tmp_path / "work"), say=lines.append, progress=False)
  text = "\n".join(lines)
  assert [r["status"] for r in rep["runs"].values()] == ["trained", "trained"]
  assert rep["dataset"]["status"] == "built" and rep["num_test_examples"] == 16
  rows = rep["table"]
  assert len(rows) == 6 and rows[0]["kept_tokens"] == 72.0 and rows[1]["kept_tokens"] == 36.0
  for r in rows:
    assert 0.0 <= r["accuracy"]["mean"] <= 1.0 and r["prefill_s"] > 0
  assert rows[0]["train_step_s"] > 0 and rows[1]["train_step_s"] > 0
  assert len(rep["checks"]) == 3
  for path in rep["files"].values():
    assert os.path.isfile(path), path
    assert path in text
  assert "| method" in text and "Checks:" in text
  # Stage 0: one pretrained tower, recorded in both runs' configs and in the report.
  assert "vision tower: trained (4 steps" in text
  assert rep["job"]["vision_tower"]["steps"] == 4 and rep["job"]["vision_tower"]["status"] == "trained"
  assert "with 0.5 of the windows dropped" in text
  for run in ("unpruned", "stts"):
    with open(os.path.join(tmp_path, "work", "seed0", run, "run_config.json")) as f:
      assert json.load(f)["vision_tower"]["pretrain"]["pruned_ratio"] == 0.5
  stts_history = main_job.read_history(os.path.join(tmp_path, "work", "seed0", "stts"))
  assert stts_history[0]["step"] == 0 and stts_history[0]["scorer_warmup/steps"] == 4
  # Second run: every stage reuses what the first one wrote.
  lines2 = []
  rep2 = main_job.run(cfg, str(tmp_path / "work"), say=lines2.append, progress=False)
  assert [r["status"] for r in rep2["runs"].values()] == ["reused", "reused"]
  assert rep2["dataset"]["status"] == "reused"
  assert "reused" in "\n".join(lines2) and rep2["speed"] == rep["speed"]
  assert "vision tower: reused" in "\n".join(lines2)
  assert [r["accuracy"] for r in rep2["table"]] == [r["accuracy"] for r in rep["table"]]

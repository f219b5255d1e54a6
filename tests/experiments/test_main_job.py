"""The main job: config plumbing, reuse rules, the report (table, checks, JSON, plots) on synthetic
stage outputs, the plotting helpers, and (slow) the whole job end to end under `runlocal`."""

import dataclasses
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
  cfg = demo.get_config(f"runlocal=true,aux=2,data={tmp_path}/data")
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
  assert built["data"].seq_len == demo.SEQ_LEN and built["train"].num_steps == 1000
  # The default recipe trains the selection on the answer: no aux loss, sampled keep masks with the
  # REINFORCE term, the first 400 steps unpruned; each setting can be overridden.
  train = built["train"]
  assert (train.aux_weight, train.policy_gradient, train.prune_start) == (0.0, 1.0, 400)
  assert config_lib.build(demo.get_config("pg=0,prune_start=0,aux=0.5"))["train"].aux_weight == 0.5
  assert "policy_gradient" not in demo.get_config("pg=0").train
  # The aux recipe: aux weight 3, top-k keep masks, pruned from the first step; steps per dataset
  # variant (the hard one needs longer); an explicit `steps` wins.
  aux = config_lib.build(demo.get_config("recipe=aux"))["train"]
  assert (aux.num_steps, aux.aux_weight, aux.policy_gradient, aux.prune_start) == (600, 3.0, 0.0, 0)
  assert "prune_start" not in demo.get_config("recipe=aux").train    # recorded aux-recipe run configs unchanged
  assert config_lib.build(demo.get_config("recipe=aux,variant=hard"))["train"].num_steps == 1000
  assert config_lib.build(demo.get_config("variant=hard,steps=70"))["train"].num_steps == 70
  # A smoke run prunes from its first step.
  assert "prune_start" not in demo.get_config("runlocal=true").train
  with pytest.raises(ValueError, match="recipe"):
    demo.get_config("recipe=authors")
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
  assert un["train"]["aux_weight"] == 0.0 and st["train"]["aux_weight"] == job.train.aux_weight > 0
  for c in (un, st):
    assert c["train"]["seed"] == 4 and c["data"]["shuffle_seed"] == 4 and c["train"]["num_steps"] == 5
    assert "job" not in c and "eval" not in c
    config_lib.build(ml_collections.ConfigDict(c))      # a valid training config on its own
  assert job.run_dir(4, "stts") == os.path.join(job.workdir, "seed4", "stts")
  cells_un = main_job.eval_config_for(job, "unpruned").cells(8)
  cells_st = main_job.eval_config_for(job, "stts").cells(8)
  assert cells_un == [("none", 0.0, 8), ("random", 0.5, 8), ("heuristic", 0.5, 8)]
  assert cells_st == [("none", 0.0, 8), ("stts", 0.5, 8), ("random", 0.5, 8), ("heuristic", 0.5, 8)]
  # The sweep at eval_ratios: STTS alone in the first command; random and heuristic too with trained
  # baselines (the evidence run) or when asked.
  swept = [("none", 0.0, 8)] + [("stts", r, 8) for r in (0.25, 0.5, 0.75)]
  job.job = dataclasses.replace(job.job, eval_ratios=(0.25, 0.75))
  assert main_job.eval_config_for(job, "stts").cells(8) == swept + [("random", 0.5, 8), ("heuristic", 0.5, 8)]
  for flags in ({"trained_baselines": True}, {"sweep_baselines": True}):
    job.job = dataclasses.replace(job.job, **flags)
    assert main_job.eval_config_for(job, "stts").cells(8) == swept + [
        (m, r, 8) for m in ("random", "heuristic") for r in (0.25, 0.5, 0.75)]
    job.job = dataclasses.replace(job.job, trained_baselines=False, sweep_baselines=None)
  assert main_job.eval_config_for(job, "unpruned").cells(8) == cells_un
  with pytest.raises(ValueError, match="pruned variant"):
    cfg = demo.get_config(f"runlocal=true,data={tmp_path}/data,method=none")
    main_job.make_job(cfg, str(tmp_path / "w2"))


def test_trained_baseline_runs_change_only_the_method(tmp_path):
  job = _job(tmp_path)
  assert job.runs == ("unpruned", "stts")
  job = _job(tmp_path, trained_baselines=True)
  assert job.runs == ("unpruned", "stts", "random", "heuristic") and job.job.trained_baselines
  st = main_job.run_config(job, 0, "stts")
  for b in ("random", "heuristic"):
    c = main_job.run_config(job, 0, b)
    assert c["model"]["stts"]["method"] == b and c["train"]["scorer_warmup_steps"] == 0
    assert c["train"]["aux_weight"] == 0.0 and c["name"] == f"demo_{b}_seed0"
    # everything else is the STTS run's: ratio, packed rows, steps, data order, optimiser
    c["model"]["stts"]["method"], c["name"] = "stts", st["name"]
    c["train"].update(scorer_warmup_steps=4, aux_weight=st["train"]["aux_weight"])
    assert c == dict(st, train={k: v for k, v in st["train"].items() if k not in main_job.STTS_ONLY_TRAIN_KEYS})
    assert st["train"]["policy_gradient"] == 1.0 and "policy_gradient" not in c["train"]
    built = config_lib.build(ml_collections.ConfigDict(main_job.run_config(job, 0, b)))
    assert built["model"].stts.prunes and built["model"].stts.ratio == 0.5
    assert main_job.eval_config_for(job, b).cells(8) == [(b, 0.5, 8)]
  with pytest.raises(ValueError, match="unknown run"):
    main_job.run_config(job, 0, "oracle")


def test_pruned_runs_start_from_the_unpruned_runs_kept_checkpoint(tmp_path, monkeypatch):
  """`job.fork_pruned_runs`: the unpruned run keeps its step-`prune_start` checkpoint; a pruned run
  that has not started yet starts from it when it is there, and records that."""
  cfg = demo.get_config(f"runlocal=true,prune_start=3,data={tmp_path}/data")
  job = main_job.make_job(cfg, str(tmp_path / "work"), say=lambda s: None, trained_baselines=True)
  assert main_job.fork_settings(job, 0, "unpruned", None) == {"keep_checkpoint_steps": (3,)}
  assert "prune_start" not in main_job.run_config(job, 0, "unpruned")["train"]
  kept = {}
  monkeypatch.setattr(main_job, "checkpoint_steps", lambda d: kept.get(d, []))
  os.makedirs(job.run_dir(0, "stts"))
  assert main_job.fork_settings(job, 0, "stts", None) == {}        # the unpruned run kept nothing
  source = os.path.join(job.run_dir(0, "unpruned"), "kept_checkpoints")
  kept[source] = [3]
  for run in ("stts", "random", "heuristic"):
    os.makedirs(job.run_dir(0, run), exist_ok=True)
    assert main_job.fork_settings(job, 0, run, None) == {"init_from": source, "init_from_step": 3}
    assert main_job.read_fork(job.run_dir(0, run)) == {"init_from": source, "init_from_step": 3}
  assert main_job.fork_settings(job, 0, "stts", 3) == {}           # resuming: its own checkpoints
  off = main_job.make_job(ml_collections.ConfigDict(dict(cfg.to_dict(), job=dict(cfg.job, fork_pruned_runs=False))),
                          str(tmp_path / "work2"), say=lambda s: None)
  assert main_job.fork_settings(off, 0, "unpruned", None) == {} == main_job.fork_settings(off, 0, "stts", None)
  assert main_job.fork_settings(_job(tmp_path), 0, "unpruned", None) == {}   # prune_start 0: nothing to share


def test_aux_route_and_schedule_reach_the_stts_run_only_and_default_configs_stay_as_they_were(tmp_path):
  plain_train = demo.get_config(f"runlocal=true,pg=0,data={tmp_path}/data").train
  assert not set(main_job.STTS_ONLY_TRAIN_KEYS) & set(plain_train)
  cfg = demo.get_config(f"runlocal=true,pg=0,aux_gradient=scorer,aux_decay=5,explore=0.25,select_grad=2,data={tmp_path}/data")
  job = main_job.make_job(cfg, str(tmp_path / "work"), say=lambda s: None, trained_baselines=True)
  st = config_lib.build(ml_collections.ConfigDict(main_job.run_config(job, 0, "stts")))["train"]
  assert st.aux_gradient == "scorer" and st.aux_decay_steps == 5 and st.random_selection == 0.25
  assert st.selection_gradient == 2.0
  # the other runs have no aux loss: their configs (and workdirs) are those of the default route
  plain = main_job.make_job(demo.get_config(f"runlocal=true,pg=0,data={tmp_path}/data"), str(tmp_path / "plain"),
                            say=lambda s: None, trained_baselines=True)
  for run in ("unpruned", "random", "heuristic"):
    assert main_job.run_config(job, 0, run) == main_job.run_config(plain, 0, run)
  pg = main_job.make_job(demo.get_config(f"runlocal=true,pg=2,pg_temp=0.5,data={tmp_path}/data"),
                         str(tmp_path / "pg"), say=lambda s: None, trained_baselines=True)
  st = config_lib.build(ml_collections.ConfigDict(main_job.run_config(pg, 0, "stts")))["train"]
  assert st.policy_gradient == 2.0 and st.policy_temperature == 0.5
  for run in ("unpruned", "random", "heuristic"):
    assert main_job.run_config(pg, 0, run) == main_job.run_config(plain, 0, run)
  late = main_job.make_job(demo.get_config(f"runlocal=true,prune_start=5,data={tmp_path}/data"),
                           str(tmp_path / "late"), say=lambda s: None, trained_baselines=True)
  for run in ("stts", "random", "heuristic"):     # every pruned run starts unpruned; the unpruned run is as it was
    assert config_lib.build(ml_collections.ConfigDict(main_job.run_config(late, 0, run)))["train"].prune_start == 5
  assert main_job.run_config(late, 0, "unpruned") == main_job.run_config(plain, 0, "unpruned")


def test_mixed_config_trains_pruned_runs_at_the_buckets_and_leaves_fixed_configs_alone(tmp_path):
  fixed = demo.get_config(f"runlocal=true,data={tmp_path}/data")
  assert "stts_ratios" not in fixed.train      # recorded run configs of fixed-ratio workdirs unchanged
  cfg = demo.get_config(f"runlocal=true,mixed=true,data={tmp_path}/data")
  job = main_job.make_job(cfg, str(tmp_path / "work"), say=lambda s: None, trained_baselines=True)
  for run in ("stts", "random", "heuristic"):
    c = main_job.run_config(job, 0, run)
    assert tuple(c["train"]["stts_ratios"]) == (0.3, 0.5, 0.7, 0.85)
    assert config_lib.build(ml_collections.ConfigDict(c))["train"].stts_ratios == (0.3, 0.5, 0.7, 0.85)
  assert "stts_ratios" not in main_job.run_config(job, 0, "unpruned")["train"]
  assert "stts_ratios_start" not in cfg.train
  late = demo.get_config(f"runlocal=true,mixed=true,mixed_start=7,data={tmp_path}/data")
  job = main_job.make_job(late, str(tmp_path / "work2"), say=lambda s: None)
  late_stts = config_lib.build(ml_collections.ConfigDict(main_job.run_config(job, 0, "stts")))["train"]
  assert late_stts.stts_ratios_start == 7
  # the unpruned run does not depend on when the pruned runs start mixing: shared between workdirs
  assert main_job.run_config(job, 0, "unpruned") == main_job.run_config(
      main_job.make_job(fixed, str(tmp_path / "work3"), say=lambda s: None), 0, "unpruned")
  with pytest.raises(ValueError, match="mixed_start needs mixed=true"):
    demo.get_config("runlocal=true,mixed_start=7")


def test_train_only_trains_the_named_runs_per_seed_and_writes_their_curves(tmp_path, monkeypatch):
  """`train_only`: the dataset, stage 0 and the named runs of every seed, in that order, nothing else;
  train_only.json holds each run's summary and validation curve; unknown runs are refused."""
  cfg = demo.get_config(f"runlocal=true,data={tmp_path}/data")
  calls = []
  monkeypatch.setattr(main_job, "ensure_dataset", lambda job, progress: calls.append("dataset") or
                      {"path": "d", "spec": {"variant": "default"}, "status": "built"})
  monkeypatch.setattr(main_job, "pretrain_vision", lambda job, progress: calls.append("tower") or ("params", {}))

  def fake_train(job, seed, run, vision):
    assert vision == ("params", {})
    calls.append(f"seed{seed}/{run}")
    run_dir = job.run_dir(seed, run)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
      for step, acc in ((3, 0.25), (6, 0.5 + seed / 10)):
        f.write(json.dumps({"step": step, "eval/val_accuracy": acc}) + "\n")
    return {"workdir": run_dir, "status": "trained", "steps": 6}
  monkeypatch.setattr(main_job, "train", fake_train)
  out = main_job.train_only(cfg, str(tmp_path / "work"), ["stts"], seeds=(0, 1), say=lambda s: None,
                            compilation_cache=False, results_dir=str(tmp_path / "res"), command="python x.py")
  assert calls == ["dataset", "tower", "seed0/stts", "seed1/stts"]
  assert out["runs"]["seed1/stts"]["val_accuracy"] == [[3, 0.25], [6, 0.6]]
  assert out["command"] == "python x.py" and out["val_examples"] == cfg.job.val_examples
  with open(tmp_path / "work" / "train_only.json") as f:
    assert json.load(f) == json.loads(json.dumps(out))
  with open(tmp_path / "res" / "provenance.json") as f:
    assert json.load(f)["files"] == ["train_only.json"]
  for bad in ([], ["random"], ["stts", "scorer"]):     # random: a run only with trained baselines
    with pytest.raises(ValueError, match="train_only runs must be among"):
      main_job.train_only(cfg, str(tmp_path / "work"), bad, say=lambda s: None, compilation_cache=False)


def test_eval_cache_needs_per_question_records():
  cell = {"note": "", "records": {"multiple_choice": {"likelihood": [{"example_id": "a"}]}}}
  assert main_job._has_records({"cells": [cell, {"note": "not run: no scorer", "records": {}}]})
  assert not main_job._has_records({"cells": [dict(cell, records={})]})
  assert not main_job._has_records({"cells": [dict(cell, records={"multiple_choice": {}})]})


def test_job_config_rejects_bad_bootstrap_settings():
  from stts_jax.experiments.config import JobConfig
  job = JobConfig()
  assert job.strict and not job.trained_baselines and job.bootstrap_resamples == 10000
  assert job.min_gain_over_heuristic is None
  with pytest.raises(ValueError, match="bootstrap_resamples"):
    JobConfig(bootstrap_resamples=10).validate()
  with pytest.raises(ValueError, match="confidence_level"):
    JobConfig(confidence_level=1.0).validate()


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
Q = 200   # synthetic test questions


def _records(acc, seed):
  """Per-question outcomes with exactly round(acc * Q) correct; within a seed the rows' correct sets
  nest (same question order), so a row with a higher accuracy is right wherever a lower one is."""
  order = np.random.default_rng(seed).permutation(Q)
  return [{"example_id": f"test-{q:05d}", "status": "scored", "correct": bool(order[q] < round(acc * Q))}
          for q in range(Q)]


def _cell(method, ratio, acc, kept, seed=0):
  return {"method": method, "ratio": ratio, "frames": 8, "note": "",
          "metrics": {report_lib.ACC_KEY: acc, "multiple_choice/kept_tokens": kept},
          "records": {"multiple_choice": {"likelihood": _records(acc, seed)}}}


def _evals(tmp_path, seeds, accs, trained_baselines=False):
  out = {}
  for s in seeds:
    a = accs[s]
    c = lambda m, r, acc, kept: _cell(m, r, acc, kept, s)  # noqa: E731
    out[f"seed{s}/unpruned"] = {"num_examples": Q, "checkpoint": str(tmp_path / f"seed{s}" / "unpruned"), "cells": [
        c("none", 0.0, a["none"], 72.0), c("random", 0.5, a["random_u"], 36.0),
        c("heuristic", 0.5, a["heuristic_u"], 36.0)]}
    out[f"seed{s}/stts"] = {"num_examples": Q, "checkpoint": str(tmp_path / f"seed{s}" / "stts"), "cells": [
        c("none", 0.0, a["stts"] + 0.01, 72.0), c("stts", 0.25, a["stts"] + 0.01, 54.0),
        c("stts", 0.5, a["stts"], 36.0), c("random", 0.5, a["random"], 36.0),
        c("random", 0.25, a["random"] + 0.1, 54.0), c("heuristic", 0.5, a["heuristic"], 36.0)]}
    if trained_baselines:
      for b in ("random", "heuristic"):
        out[f"seed{s}/{b}"] = {"num_examples": Q, "checkpoint": str(tmp_path / f"seed{s}" / b),
                               "cells": [c(b, 0.5, a[f"{b}_t"], 36.0)]}
  return out


def _speed(train_stts=0.6):
  return {"key": {}, "train_step": {"median_s": {"unpruned": 1.0, "stts": train_stts}, "batch_size": 16},
          "prefill": {"median_s": {"unpruned": 0.5, "stts": 0.4, "random": 0.35, "heuristic": 0.38},
                      "batch_size": 32, "packed_rate": {"stts": 0.75}}}


ACCS = {0: dict(none=0.95, stts=0.95, random=0.70, heuristic=0.90, random_u=0.60, heuristic_u=0.85,
                random_t=0.80, heuristic_t=0.93),
        1: dict(none=0.97, stts=0.96, random=0.66, heuristic=0.88, random_u=0.62, heuristic_u=0.86,
                random_t=0.78, heuristic_t=0.94)}


def _report(tmp_path, train_stts=0.6, accs=None, trained_baselines=False, **job_kw):
  job = {"max_accuracy_gap": 0.03, "min_gain_over_random": 0.05, "min_train_speedup": 1.3,
         "bootstrap_resamples": 2000, **job_kw}
  return report_lib.build_report(
      job_info={"workdir": str(tmp_path), "ratio": 0.5, "method": "stts", "seeds": [0, 1], "steps": 10,
                "train_batch": 16, "job": job, "config": {}},
      env={"devices": 2}, dataset={"status": "reused"},
      runs={"seed0/stts": {"status": "trained"}},
      evals=_evals(tmp_path, [0, 1], accs or ACCS, trained_baselines), speed=_speed(train_stts),
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
  # STTS - unpruned: 0 and -2 of 200 questions -> pooled -0.5 points; per seed 0.0 / -1.0
  vs = un["vs_stts"]
  assert math.isclose(vs["pooled"]["mean"], -0.005) and vs["pooled"]["n_pairs"] == 2 * Q
  assert [p["mean"] for p in vs["per_seed"]] == [0.0, -0.01]
  assert vs["pooled"]["lo"] < -0.005 < vs["pooled"]["hi"] <= 0.0
  assert "vs_stts" not in st
  # STTS - random on the STTS weights: +25 and +30 points (nested correct sets: no question favours random)
  random_vs = rows[2]["vs_stts"]["pooled"]
  assert math.isclose(random_vs["mean"], 0.275) and 0.2 < random_vs["lo"] < 0.275 < random_vs["hi"] < 0.35
  assert [c["passed"] for c in rep["checks"]] == [True, True, True]
  parity, gain, speed = rep["checks"]
  assert parity["name"] == "STTS - unpruned >= -3 points at the 95% lower bound"
  assert parity["value"] == pytest.approx(vs["pooled"]["lo"] * 100) and parity["bound"] == -3.0
  assert "mean -0.5" in parity["detail"] and "per seed +0.0 / -1.0" in parity["detail"]
  # against random, the smallest lower bound over the training-free random rows decides: STTS weights
  # (68.0 %) beat the unpruned ones (61.0 %), so that row is the one reported
  assert gain["against"] == "random@stts" and gain["bound"] == 5.0
  assert gain["value"] == pytest.approx(rows[2]["vs_stts"]["pooled"]["lo"] * 100)
  assert speed["value"] == pytest.approx(1 / 0.6) and speed["bound"] == 1.3 and speed["unit"] == "x"
  sweep = {(c["method"], c["ratio"]): c["accuracy"]["mean"] for c in rep["accuracy_sweep"]["stts"]}
  assert math.isclose(sweep[("random", 0.25)], 0.78)
  failing = _report(tmp_path, train_stts=0.9)["checks"][2]
  assert not failing["passed"] and failing["value"] == pytest.approx(1 / 0.9)


def test_accuracy_checks_use_the_interval_bound_not_the_mean(tmp_path):
  # STTS 2.5 points below unpruned on average: within 3 points by the mean, but over 400 paired
  # answers the 95 % lower bound is below -3, so the parity check fails.
  accs = {s: dict(a, stts=a["none"] - 0.025) for s, a in ACCS.items()}
  rep = _report(tmp_path, accs=accs)
  parity = rep["checks"][0]
  assert math.isclose(rep["table"][0]["vs_stts"]["pooled"]["mean"], -0.025)
  assert parity["value"] < -3.0 and not parity["passed"]
  assert [c["name"] for c in report_lib.failed_checks(rep)] == [parity["name"]]
  # with a lower bound of 5 points, the same gap passes
  assert _report(tmp_path, accs=accs, max_accuracy_gap=0.05)["checks"][0]["passed"]
  # the heuristic check is off by default and uses the same rule when set
  assert len(rep["checks"]) == 3
  heur = _report(tmp_path, min_gain_over_heuristic=0.0)["checks"][2]
  assert heur["name"].startswith("STTS - heuristic pruning (training-free, every row) >= +0 points")
  assert heur["against"] == "heuristic@stts" and heur["passed"] == (heur["value"] >= 0.0)


def test_hard_variant_config_checks_the_heuristic_and_reports_parity(tmp_path, monkeypatch):
  from configs import demo
  from stts_jax.data import default_dataset
  from stts_jax.experiments import config as job_config
  cfg = demo.get_config("variant=hard,runlocal=true")
  built = []

  def fake_build(path, spec, **kw):
    built.append((path, spec))
    return {"spec": dataclasses.asdict(spec), "counts": {s: {"examples": 1} for s in default_dataset.SPLITS},
            "oracle_keep_rate_50pct": {"test": {"heuristic": 0.5, "random": 0.5}}}
  monkeypatch.setattr(default_dataset, "build", fake_build)
  main_job.ensure_dataset(main_job.make_job(cfg, str(tmp_path / "w"), say=lambda s: None), progress=False)
  assert built == [("data_cache/default_hard_runlocal", default_dataset.Spec(num_clips=(40, 8, 16), variant="hard"))]
  cfg = demo.get_config("variant=hard")
  job = job_config.build_job_config(cfg.job)
  assert cfg.data.path == "data_cache/default_hard" and job.dataset_variant == "hard"
  assert demo.get_config("").job.dataset_variant == "default"
  with pytest.raises(ValueError, match="variant"):
    demo.get_config("variant=easy")
  # The hard dataset's checks: STTS - heuristic and STTS - random at the lower bound; no parity check
  # (STTS - unpruned stays in the table and the comparison lines).
  rep = _report(tmp_path, max_accuracy_gap=job.max_accuracy_gap, min_gain_over_heuristic=job.min_gain_over_heuristic)
  names = [c["name"] for c in rep["checks"]]
  assert len(names) == 3 and not any("unpruned >=" in n for n in names)
  assert names[1].startswith("STTS - heuristic pruning") and rep["checks"][1]["bound"] == 5.0
  assert "vs_stts" in rep["table"][0]
  # The recolour variant: its own dataset dir, the hard variant's checks.
  cfg = demo.get_config("variant=recolour")
  rjob = job_config.build_job_config(cfg.job)
  assert cfg.data.path == "data_cache/default_recolour" and rjob.dataset_variant == "recolour"
  assert cfg.train.num_steps == demo.RECIPES["answer"]["steps"]["recolour"] == 1000
  assert (rjob.max_accuracy_gap, rjob.min_gain_over_heuristic) == (job.max_accuracy_gap, job.min_gain_over_heuristic)
  assert rjob.vision_pretrain_event_weight == 600.0 and job.vision_pretrain_event_weight == 0.0


def test_missing_per_question_records_fail_the_check(tmp_path):
  evals = _evals(tmp_path, [0, 1], ACCS)
  for c in evals["seed1/unpruned"]["cells"]:
    del c["records"]
  rep = report_lib.build_report(
      job_info={"workdir": str(tmp_path), "ratio": 0.5, "method": "stts", "seeds": [0, 1], "steps": 10,
                "train_batch": 16, "job": {"bootstrap_resamples": 500}, "config": {}},
      env={}, dataset={}, runs={}, evals=evals, speed=_speed(), wall={"total": 1.0})
  parity, gain, _ = rep["checks"]
  assert rep["table"][0]["vs_stts"] is None
  assert parity["value"] is None and not parity["passed"] and parity["detail"].startswith("missing: unpruned")
  # the random rows of the unpruned weights lack records too: the gain check cannot be decided either
  assert not gain["passed"] and "random (unpruned-trained)" in gain["detail"]


def test_trained_baselines_rows_and_checks(tmp_path):
  rep = _report(tmp_path, trained_baselines=True)
  rows = rep["table"]
  assert [(r["id"], r["weights"]) for r in rows[-2:]] == [
      ("random@random", "trained with random pruning"), ("heuristic@heuristic", "trained with heuristic pruning")]
  assert [r["trained_baseline"] for r in rows] == [False] * 6 + [True, True]
  assert rows[6]["accuracy"]["values"] == [0.80, 0.78] and rows[6]["prefill_s"] == 0.35
  assert math.isclose(rows[6]["vs_stts"]["pooled"]["mean"], 0.165)
  gain = rep["checks"][1]
  assert gain["name"].startswith("STTS - random pruning (trained with it) >=") and gain["against"] == "random@random"
  assert gain["value"] == pytest.approx(rows[6]["vs_stts"]["pooled"]["lo"] * 100)
  heur = _report(tmp_path, trained_baselines=True, min_gain_over_heuristic=0.0)["checks"][2]
  assert heur["against"] == "heuristic@heuristic"
  notes = "\n".join(report_lib.table_notes(rep))
  assert "Only STTS has a soft bias" in notes and "trained with random / heuristic pruning" in notes
  lines = report_lib.table_lines(rep)
  assert "trained with random pruning" in lines[-2] and "+16.5 [" in lines[-2]


def test_exit_status_is_nonzero_when_a_check_fails(tmp_path):
  said = []
  passing = _report(tmp_path)
  assert main_job.exit_status(passing, say=said.append) == 0 and said == ["All checks passed."]
  failing = _report(tmp_path, train_stts=0.9)           # 1.11x: the speedup check fails
  said.clear()
  assert main_job.exit_status(failing, say=said.append) == 1
  assert "1 check(s) FAILED: STTS train step >= 1.3x faster than unpruned" in said[0]
  # --no-strict (or job.strict False in the report) only reports
  assert main_job.exit_status(failing, strict=False, say=said.append) == 0 and "not strict" in said[-1]
  failing["job"]["job"]["strict"] = False
  assert main_job.exit_status(failing, say=said.append) == 0
  assert main_job.exit_status(failing, strict=True, say=said.append) == 1


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
  assert set(files) == {"report", "table", "val curves data", "val curves", "loss curves", "accuracy vs ratio",
                        "speed", "keep masks 0"}
  for name, path in files.items():
    assert os.path.getsize(path) > 200, name
    if path.endswith(".png"):
      with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(files["report"]) as f:
    saved = json.load(f)
  assert saved["table"][1]["accuracy"]["values"] == [0.95, 0.96]
  assert saved["table"][0]["vs_stts"]["pooled"]["n_questions"] == Q
  assert saved["checks"][0]["bound"] == -3.0 and saved["checks"][0]["passed"] is True
  assert saved["keep_mask_examples"][0]["kept_event"] == {"stts": bool(keep[4, 4]), "heuristic": bool(~keep[4, 4]),
                                                          "random": bool(keep[4, 4])}
  text = report_lib.console_text(rep, files)
  assert "| STTS @0.5" in text and "95.5 ± 0.7" in text and "1.67x / 1.25x" in text
  assert "95.0 / 96.0" in text and "-0.5 [" in text            # per-seed column; STTS - unpruned with its CI
  assert "Paired bootstrap over test questions (95% percentile intervals):" in text
  assert "STTS - unpruned (unpruned-trained): -0.5 [" in text and "per seed: seed 0 +0.0 [" in text
  assert text.count("[PASS]") == 3 and files["report"] in text and "(bound -3 points;" in text
  with open(files["table"]) as f:
    table = f.read()
  assert table.startswith("| method") and "Only STTS has a soft bias" in table and "Checks:" in table


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_only_then_the_whole_job_reuses_the_run(tmp_path):
  """A run trained alone is the run the whole job trains in that workdir: the job reuses it (same
  run config), and the run that trained its own unpruned steps records no fork."""
  cfg = demo.get_config(f"runlocal=true,prune_start=3,data={tmp_path}/data")
  work = str(tmp_path / "work")
  out = main_job.train_only(cfg, work, ["stts"], say=lambda s: None, progress=False)
  assert out["runs"]["seed0/stts"]["status"] == "trained" and "started_from" not in out["runs"]["seed0/stts"]
  assert [s for s, _ in out["runs"]["seed0/stts"]["val_accuracy"]] == [6]
  assert not os.path.exists(os.path.join(work, "seed0", "unpruned"))
  assert main_job.train_only(cfg, work, ["stts"], say=lambda s: None, progress=False)["runs"]["seed0/stts"][
      "status"] == "reused"
  rep = main_job.run(cfg, work, say=lambda s: None, progress=False)
  assert [(k, r["status"]) for k, r in rep["runs"].items()] == [("seed0/unpruned", "trained"), ("seed0/stts", "reused")]


@pytest.mark.slow
def test_main_job_runlocal_end_to_end_then_rerun_reuses_and_adds_trained_baselines(tmp_path):
  # prune_start 3 of 6 steps: every pruned run starts from the unpruned run's step-3 checkpoint
  cfg = demo.get_config(f"runlocal=true,prune_start=3,data={tmp_path}/data")
  lines = []
  rep = main_job.run(cfg, str(tmp_path / "work"), say=lines.append, progress=False,
                     results_dir=str(tmp_path / "results"), command="python scripts/main_job.py --smoke")
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
  kept = os.path.join(tmp_path, "work", "seed0", "unpruned", "kept_checkpoints")
  assert rep["runs"]["seed0/stts"]["started_from"] == {"init_from": kept, "init_from_step": 3}
  assert [h["step"] for h in stts_history if "loss" in h] == [4, 6]   # its own steps only (log_every 2)
  assert f"seed 0 stts: starts from {kept} step 3" in text
  # every comparison has its paired bootstrap on the 16 test questions, and the exit status follows the checks
  for r in rows[:1] + rows[2:]:
    assert r["vs_stts"]["pooled"]["n_questions"] == 16 and len(r["vs_stts"]["per_seed"]) == 1
  assert "Paired bootstrap over test questions" in text
  assert main_job.exit_status(rep, say=lines.append) == (1 if report_lib.failed_checks(rep) else 0)
  assert main_job.exit_status(rep, strict=False, say=lines.append) == 0
  # Validation: job.val_every (100) > 6 steps, so each run has its last-step point only; reported, not checked.
  assert {k: [s for s, _ in v["curve"]] for k, v in rep["validation"]["runs"].items()} == {
      "seed0/unpruned": [6], "seed0/stts": [6]}
  assert all(v["examples"] == 14 and v["stopped_rising"] is None for v in rep["validation"]["runs"].values())
  assert "Validation accuracy % (14 val questions, every 100 steps and the last;" in text
  # Result files with provenance (--results_dir)
  assert rep["command"] == "python scripts/main_job.py --smoke" and "commit" in rep and "host" in rep["machine"]
  with open(tmp_path / "results" / "provenance.json") as f:
    prov = json.load(f)
  assert prov["command"] == rep["command"] and prov["wall_seconds"] > 0 and "plots/val_curves.png" in prov["files"]
  assert {"report.json", "table.md", "speed.json", "val_curves.json"} <= set(prov["files"])
  assert all(os.path.isfile(tmp_path / "results" / f) for f in prov["files"])
  # Second run, with the trained baselines: every stage reuses what the first one wrote, and only the
  # random- and heuristic-pruning models are trained and evaluated.
  lines2 = []
  rep2 = main_job.run(cfg, str(tmp_path / "work"), say=lines2.append, progress=False, trained_baselines=True)
  assert [(k, r["status"]) for k, r in rep2["runs"].items()] == [
      ("seed0/unpruned", "reused"), ("seed0/stts", "reused"), ("seed0/random", "trained"),
      ("seed0/heuristic", "trained")]
  assert rep2["dataset"]["status"] == "reused"
  assert "reused" in "\n".join(lines2) and rep2["speed"] == rep["speed"]
  assert "vision tower: reused" in "\n".join(lines2)
  assert [r["accuracy"] for r in rep2["table"][:6]] == [r["accuracy"] for r in rep["table"]]
  assert [r["weights"] for r in rep2["table"][6:]] == ["trained with random pruning", "trained with heuristic pruning"]
  assert all(rep2["runs"][f"seed0/{r}"]["started_from"]["init_from_step"] == 3 for r in ("random", "heuristic"))
  assert rep2["checks"][1]["against"] == "random@random"
  assert [len(v["curve"]) for v in rep2["validation"]["runs"].values()] == [1, 1, 1, 1]
  assert rep2["validation"]["runs"]["seed0/stts"] == rep["validation"]["runs"]["seed0/stts"]   # kept, not re-run
  for run in ("random", "heuristic"):
    with open(os.path.join(tmp_path, "work", "seed0", run, "run_config.json")) as f:
      assert json.load(f)["model"]["stts"]["method"] == run
    with open(os.path.join(tmp_path, "work", "seed0", f"eval_{run}", "results.json")) as f:
      cells = json.load(f)["cells"]
    assert [(c["method"], c["ratio"]) for c in cells] == [(run, 0.5)]
    assert len(cells[0]["records"]["multiple_choice"]["likelihood"]) == 16

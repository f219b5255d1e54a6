"""Issue 19's validation curves in the main job: the plateau rule on hand-made curves, the report's
validation section and its optional check, the result files with provenance, the per-run validation
evaluator (one compilation, same numbers as the test evaluator) and (slow) the curves of every run
of a runlocal job, kept across a resume."""

import dataclasses
import json
import os
import shutil

import jax
import pytest
from flax import nnx

from configs import demo
from stts_jax import config as config_lib
from stts_jax import provenance
from stts_jax.eval import runner
from stts_jax.experiments import main_job
from stts_jax.experiments import report as report_lib
from stts_jax.experiments import validation as validation_lib
from stts_jax.experiments.config import JobConfig
from stts_jax.models import vlm
from tests.experiments import test_main_job as synthetic


def _curve(accs, every=50):
  return [(every * (i + 1), a) for i, a in enumerate(accs)]


def test_plateau_rule_on_hand_made_curves():
  rule = dict(chance=0.25, margin=0.10, window=2, tolerance=0.01)
  # rising: left chance (final 60 %) but the last two points average 20 points above the two before
  rising = validation_lib.plateau(_curve([0.25, 0.30, 0.40, 0.50, 0.60]), **rule)
  assert rising["left_chance_plateau"] and rising["stopped_rising"] is False and not rising["converged"]
  assert rising["last_mean"] == pytest.approx(0.55) and rising["previous_mean"] == pytest.approx(0.35)
  assert rising["rise"] == pytest.approx(0.20)
  assert rising["reason"] == "still rising: the last 2 points average +20.0 points over the 2 before"
  # flat after leaving chance: converged; best and final with their steps
  flat = validation_lib.plateau(_curve([0.25, 0.50, 0.61, 0.62, 0.615, 0.62]), **rule)
  assert flat["left_chance_plateau"] and flat["stopped_rising"] and flat["converged"] and flat["reason"] == ""
  assert (flat["best"], flat["best_step"], flat["final"], flat["final_step"]) == (0.62, 200, 0.62, 300)
  assert flat["rise"] == pytest.approx(0.6175 - 0.615)
  # at chance: flat, so "stopped rising", but never left the plateau (35 % is not above 25 + 10)
  at_chance = validation_lib.plateau(_curve([0.26, 0.24, 0.25, 0.25, 0.35]), **rule)
  assert not at_chance["left_chance_plateau"] and not at_chance["converged"]
  assert "final 35.0 % <= chance + margin 35.0 %" in at_chance["reason"]
  # a rise of exactly the tolerance has stopped; falling has stopped; too few points is undecided
  assert validation_lib.plateau(_curve([0.50, 0.50, 0.51, 0.51]), **rule)["stopped_rising"]
  assert validation_lib.plateau(_curve([0.70, 0.70, 0.60, 0.60]), **rule)["converged"]
  short = validation_lib.plateau(_curve([0.5, 0.6, 0.6]), **rule)
  assert short["stopped_rising"] is None and not short["converged"] and "3 points, the rule needs 4" in short["reason"]
  empty = validation_lib.plateau([], **rule)
  assert empty["points"] == 0 and not empty["converged"] and empty["reason"] == "no validation points"
  # the window and tolerance are the job's
  assert validation_lib.plateau(_curve([0.4, 0.5, 0.6]), chance=0.25, margin=0.1, window=1, tolerance=0.2)["converged"]


def test_job_config_validation_fields():
  job = JobConfig()
  assert job.val_every == 100 and job.val_examples == 256 and not job.require_converged
  assert (job.chance_margin, job.rise_window, job.rise_tolerance) == (0.10, 2, 0.01)
  with pytest.raises(ValueError, match="require_converged needs validation curves"):
    JobConfig(val_every=0, require_converged=True).validate()
  with pytest.raises(ValueError, match="val_every"):
    JobConfig(val_examples=0).validate()
  with pytest.raises(ValueError, match="rise_window"):
    JobConfig(rise_window=0).validate()


def _histories():
  def hist(accs, ce0):
    out = [{"step": s, "ce": ce0 / s, "aux_loss": 0.0 if ce0 == 1.0 else 1e-3} for s in range(10, 310, 10)]
    for (s, a) in _curve(accs):
      out[s // 10 - 1].update({validation_lib.VAL_ACC: a, "eval/val_scored": 256.0, "eval/val_seconds": 2.0 + s / 1000,
                               "eval/val_compilations": 2.0 if s == 50 else 0.0})
    return out
  # 3 of 4 converged: seed 0's STTS run still rises (last two 59.0 vs 52.5 before)
  return {"seed0/unpruned": hist([0.30, 0.55, 0.62, 0.62, 0.62, 0.62], 1.0),
          "seed0/stts": hist([0.25, 0.40, 0.50, 0.55, 0.58, 0.60], 1.2),
          "seed1/unpruned": hist([0.30, 0.56, 0.61, 0.615, 0.62, 0.62], 1.0),
          "seed1/stts": hist([0.26, 0.45, 0.59, 0.60, 0.60, 0.605], 1.1)}


def _report(tmp_path, **job_kw):
  rep = synthetic._report(tmp_path, **job_kw)
  job = {"max_accuracy_gap": 0.03, "min_gain_over_random": 0.05, "min_train_speedup": 1.3,
         "bootstrap_resamples": 500, "val_every": 50, **job_kw}
  return report_lib.build_report(
      job_info=dict(rep["job"], job=job), env={"devices": 2}, dataset={"status": "reused"},
      runs={"seed0/stts": {"status": "trained"}}, evals=synthetic._evals(tmp_path, [0, 1], synthetic.ACCS),
      speed=synthetic._speed(), wall={"total": 100.0}, histories=_histories(),
      provenance={"command": "python scripts/main_job.py --workdir w", "commit": {"commit": "abc", "dirty": False},
                  "machine": {"host": "h", "cpu_count": 2}, "date": "2026-01-01T00:00:00Z"})


def test_report_validation_section_and_the_optional_converged_check(tmp_path):
  rep = _report(tmp_path)
  val = rep["validation"]
  assert list(val["runs"]) == ["seed0/unpruned", "seed0/stts", "seed1/unpruned", "seed1/stts"]
  un, st = val["runs"]["seed0/unpruned"], val["runs"]["seed0/stts"]
  assert un["curve"] == [[50, 0.30], [100, 0.55], [150, 0.62], [200, 0.62], [250, 0.62], [300, 0.62]]
  assert un["method"] == "none" and un["converged"] and un["best_step"] == 150 and un["final_step"] == 300
  assert un["examples"] == 256 and un["recompilations"] == 0 and un["seconds_per_eval"] == pytest.approx(2.175)
  assert st["method"] == "stts" and st["left_chance_plateau"] and st["stopped_rising"] is False
  assert "stopped rising: mean of the last 2 val points <= mean of the 2 before + 1 points" in val["rule"]
  # reported, not checked, by default
  assert len(rep["checks"]) == 3 and rep["command"].startswith("python scripts/main_job.py")
  assert rep["commit"] == {"commit": "abc", "dirty": False} and rep["machine"]["cpu_count"] == 2
  text = report_lib.console_text(rep, {})
  assert "Validation accuracy % (256 val questions, every 50 steps and the last; rule:" in text
  assert ("seed0/unpruned (unpruned): best 62.0 @150, final 62.0 @300, rise +0.0 points; left chance plateau yes, "
          "stopped rising yes; curve 50:30.0 100:55.0 150:62.0 200:62.0 250:62.0 300:62.0") in text
  assert "seed0/stts (STTS): best 60.0 @300, final 60.0 @300, rise +6.5 points; left chance plateau yes, " \
         "stopped rising no" in text
  # with job.require_converged: one check over every run, failing on the ones still rising
  checked = _report(tmp_path, require_converged=True)
  conv = checked["checks"][-1]
  assert conv["name"] == "every run left the chance plateau and stopped rising on the validation split"
  assert not conv["passed"] and conv["unit"] == "runs" and conv["bound"] == 4
  assert conv["value"] == 3
  assert conv["detail"] == "seed0/stts: still rising: the last 2 points average +6.5 points over the 2 before"
  assert "[FAIL] every run left the chance plateau" in report_lib.console_text(checked, {})
  assert conv["name"] in [c["name"] for c in report_lib.failed_checks(checked)]


def test_results_dir_gets_the_files_with_provenance(tmp_path):
  rep = _report(tmp_path)
  rep.update(provenance.record("python scripts/main_job.py --results_dir 'a b'"))
  work = tmp_path / "work"
  rep["job"]["workdir"] = str(work)
  files = report_lib.write_all(rep, _histories(), [], str(work))
  assert os.path.isfile(files["val curves"]) and files["val curves"].endswith("plots/val_curves.png")
  with open(files["val curves data"]) as f:
    curves = json.load(f)
  assert curves["seed1/stts"]["val_accuracy"][-1] == [300, 0.605] and len(curves["seed1/stts"]["train_ce"]) == 30
  assert curves["seed1/stts"]["train_aux_loss"][0] == [10, 1e-3] and "train_aux_loss" not in curves["seed1/unpruned"]
  with open(work / "speed.json", "w") as f:
    json.dump({"key": {}}, f)
  out = tmp_path / "docs_results"
  written = main_job.copy_results(rep, str(out), wall_s=12.34)
  assert sorted(written) == ["plots/accuracy_vs_ratio.png", "plots/loss_curves.png", "plots/speed.png",
                             "plots/val_curves.png", "provenance.json", "report.json", "speed.json", "table.md",
                             "val_curves.json"]
  for path in written.values():
    assert os.path.getsize(path) > 0 and path.startswith(str(out))
  with open(out / "provenance.json") as f:
    prov = json.load(f)
  assert prov["command"] == "python scripts/main_job.py --results_dir 'a b'" and prov["wall_seconds"] == 12.3
  assert len(prov["commit"]["commit"]) == 40 and isinstance(prov["commit"]["dirty"], bool)
  assert prov["machine"]["host"] and prov["machine"]["cpu_count"] == os.cpu_count() and prov["machine"]["platform"]
  assert prov["machine"]["jax"] == jax.__version__ and prov["date"].endswith("Z") and prov["workdir"] == str(work)
  assert prov["files"] == sorted(k for k in written if k != "provenance.json")
  with open(out / "report.json") as f:
    saved = json.load(f)
  assert saved["command"] == prov["command"] and saved["commit"] == prov["commit"] and "validation" in saved
  with open(out / "table.md") as f:
    assert "Validation accuracy %" in f.read()


def test_val_eval_fn_compiles_once_and_matches_the_test_evaluator(tmp_path):
  cfg = demo.get_config(f"runlocal=true,data={tmp_path}/data")
  cfg.job.val_examples, cfg.job.dataset_workers = 10, 1      # 1 worker: no fork() of this JAX process
  job = main_job.make_job(cfg, str(tmp_path / "work"), say=lambda s: None, trained_baselines=True)
  main_job.ensure_dataset(job, progress=False)
  assert [validation_lib.val_method(job, r) for r in job.runs] == [("none", 0.0), ("stts", 0.5), ("random", 0.5),
                                                              ("heuristic", 0.5)]
  model = vlm.Molmo2(main_job.model_config_of(main_job.run_config(job, 0, "stts")), rngs=nnx.Rngs(0))
  fn = validation_lib.val_eval_fn(job, "stts")
  with jax.set_mesh(job.mesh):      # as the training loop calls it
    outs = [fn(model, step) for step in (2, 4, 6)]
  assert [o["val_scored"] for o in outs] == [10, 10, 10]
  assert [o["val_compilations"] for o in outs[1:]] == [0.0, 0.0]     # the first call compiled (or reused) both stages
  assert len({o["val_accuracy"] for o in outs}) == 1 and all(o["val_seconds"] > 0 for o in outs)
  # the test eval's runner on the validation split gives the same accuracy
  eval_cfg = dataclasses.replace(main_job.eval_config_for(job, "stts"), split="val", methods=("stts",),
                                 ratios=(0.5,), max_examples=10, warmup=0)
  res = runner.evaluate(model, job.data, eval_cfg, mesh=job.mesh, rules=job.rules, progress=False)
  assert res["cells"][0]["metrics"][report_lib.ACC_KEY] == outs[0]["val_accuracy"]
  # Same executables, except that under the loop's ambient mesh the Predictor's pruning key is placed
  # differently, so the vision stage has one executable per context (never one per evaluation).
  assert res["cells"][0]["compilations"]["prefill"] == 0 and res["cells"][0]["compilations"]["vision"] <= 1


@pytest.mark.slow
def test_runlocal_every_run_logs_its_val_curve_and_a_resume_keeps_it(tmp_path):
  cfg = demo.get_config(f"runlocal=true,data={tmp_path}/data")
  cfg.job.val_every, cfg.job.vision_pretrain_steps, cfg.job.dataset_workers = 2, 0, 1
  job = main_job.make_job(cfg, str(tmp_path / "work"), say=lambda s: None, trained_baselines=True)
  main_job.ensure_dataset(job, progress=False)
  for run in job.runs:
    summary = main_job.train(job, 0, run)
    hist = main_job.read_history(job.run_dir(0, run))
    val = [h for h in hist if validation_lib.VAL_ACC in h]
    assert [h["step"] for h in val] == [2, 4, 6], run       # every val_every steps and the last
    assert [h["eval/val_compilations"] for h in val[1:]] == [0.0, 0.0], run
    assert all(h["eval/val_scored"] == 14 for h in val) and summary["final_val_accuracy"] == val[-1][validation_lib.VAL_ACC]
    with open(os.path.join(job.run_dir(0, run), "run_config.json")) as f:
      assert json.load(f)["train"]["eval_every"] == 0        # the cadence is not part of the run's identity
  # Interrupted after the step-3 checkpoint: the resumed run re-logs 4 and 6 and keeps 2.
  stts_dir = job.run_dir(0, "stts")
  first = main_job.read_history(stts_dir)
  shutil.rmtree(os.path.join(stts_dir, "checkpoints", "6"))
  assert main_job.train(job, 0, "stts")["status"] == "resumed"
  again = main_job.read_history(stts_dir)
  assert [h["step"] for h in again if validation_lib.VAL_ACC in h] == [2, 4, 6]
  assert again[[h["step"] for h in again].index(2)][validation_lib.VAL_ACC] == first[[h["step"] for h in first].index(2)][
      validation_lib.VAL_ACC]
  histories = {f"seed0/{r}": main_job.read_history(job.run_dir(0, r)) for r in job.runs}
  val = validation_lib.validation(histories, config_lib.to_dict(job.job), "stts")
  assert all(r["points"] == 3 and r["recompilations"] == 0 for r in val["runs"].values())

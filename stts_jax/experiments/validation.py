"""Validation during training and its diagnostics: the main job decides on these curves, never on the
test split.

  val_eval_fn(job, run) -> eval_fn(model, step)    the training loop's hook (`train.eval_every`)
  validation(histories, job, method) -> {"rule", "runs": {key: curve + plateau verdicts}}
  validation_lines(report) / converged_check(val)  the report's text and the optional check

Every `job.val_every` steps (and at the last) a run evaluates its own method (`val_method`) at the
trained ratio on the first `job.val_examples` validation questions with the test eval's evaluator
(multiple-choice likelihood); the loop writes it to metrics.jsonl as `eval/val_accuracy`.
The plateau rule (`plateau`): LEFT THE CHANCE PLATEAU when the last val accuracy is above chance
(25 %, 4 options) + job.chance_margin (10 points); STOPPED RISING when the mean of the last
job.rise_window (2) val points is at most job.rise_tolerance (1 point) above the mean of the
rise_window points before them (fewer than 2 * rise_window points: undecided, not stopped);
CONVERGED when both hold. Reported always; a check only with job.require_converged.
"""

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from stts_jax.eval import data as eval_data
from stts_jax.eval import evaluators as evaluators_lib
from stts_jax.eval import generate as gen_lib
from stts_jax.eval import predictor as predictor_lib
from stts_jax.experiments.config import job_settings

VAL_ACC = "eval/val_accuracy"     # what the loop writes for val_eval_fn's val_accuracy
CHANCE = 0.25                     # the default dataset's questions have 4 options
LABELS = {"none": "unpruned", "stts": "STTS", "random": "random", "heuristic": "heuristic"}


def val_method(job: Any, run: str) -> tuple[str, float]:
  """(method, ratio) a run is validated with: its own method at the trained ratio."""
  if run == "unpruned":
    return "none", 0.0
  return (job.model.stts.method if run == "stts" else run), job.ratio


def val_eval_fn(job: Any, run: str) -> Callable[[Any, int], dict[str, float]]:
  """The training loop's `eval_fn(model, step)` of one run: multiple-choice likelihood accuracy of
  `val_method(run)` on the first `job.val_examples` questions of the validation split, with the
  evaluator and `Predictor` of the test eval (module-level jits: the first call compiles the vision
  and prefill stages, later calls reuse them). Returns val_accuracy, val_scored (questions scored),
  val_seconds and val_compilations (new executables in this call; 0 after the first)."""
  method, ratio = val_method(job, run)
  cache: dict[str, eval_data.EvalData] = {}

  def eval_fn(model, step: int) -> dict[str, float]:
    t0 = time.perf_counter()
    if "data" not in cache:    # built on the first call: a reused run reads nothing
      cache["data"] = eval_data.EvalData(dataclasses.replace(job.data, batch_size=job.eval.batch_size or job.data.batch_size),
                                         job.model.tokens, "val", max_examples=job.job.val_examples)
    data = cache["data"]
    before = predictor_lib.compile_counts()
    # A fresh Predictor per call: it holds no reference to the training state the next step donates.
    predictor = predictor_lib.Predictor(max_new_tokens=job.eval.max_new_tokens, mesh=job.mesh, rules=job.rules)
    ev = evaluators_lib.from_name("multiple_choice", predictor, data=data, mesh=job.mesh, modes=("likelihood",))
    metrics = dict(ev.run(gen_lib.model_variant(model, method=method, ratio=ratio)))
    data.check_skipped(f"validation of {run} at step {step}")
    after = predictor_lib.compile_counts()
    return {"val_accuracy": metrics["likelihood_accuracy"], "val_scored": metrics["scored"],
            "val_compilations": float(sum(after[k] - before[k] for k in after)),
            "val_seconds": time.perf_counter() - t0}
  return eval_fn


def plateau(curve: Sequence[Sequence[float | int]], *, chance: float = CHANCE, margin: float = 0.10,
            window: int = 2, tolerance: float = 0.01) -> dict[str, Any]:
  """The plateau rule (module docstring) on one curve [(step, accuracy), ...] in step order.
  left_chance_plateau: final > chance + margin. stopped_rising: mean(last `window`) - mean(the
  `window` before) <= tolerance; None with fewer than 2 * window points. converged: both True."""
  acc = [float(a) for _, a in curve]
  out: dict[str, Any] = {"points": len(acc), "final": acc[-1] if acc else None,
                         "final_step": int(curve[-1][0]) if acc else None,
                         "best": max(acc) if acc else None,
                         "best_step": int(curve[int(np.argmax(acc))][0]) if acc else None,
                         "left_chance_plateau": bool(acc and acc[-1] > chance + margin),
                         "last_mean": None, "previous_mean": None, "rise": None, "stopped_rising": None}
  if len(acc) >= 2 * window:
    last, prev = float(np.mean(acc[-window:])), float(np.mean(acc[-2 * window:-window]))
    # 1e-12: a rise of exactly the tolerance counts as stopped despite float rounding
    out.update(last_mean=last, previous_mean=prev, rise=last - prev,
               stopped_rising=bool(last - prev <= tolerance + 1e-12))
  out["converged"] = bool(out["left_chance_plateau"] and out["stopped_rising"])
  why = []
  if not acc:
    why.append("no validation points")
  elif not out["left_chance_plateau"]:
    why.append(f"final {acc[-1] * 100:.1f} % <= chance + margin {(chance + margin) * 100:.1f} %")
  if acc and out["stopped_rising"] is None:
    why.append(f"{len(acc)} points, the rule needs {2 * window}")
  elif out["stopped_rising"] is False:
    why.append(f"still rising: the last {window} points average {out['rise'] * 100:+.1f} points over the {window} "
               f"before")
  out["reason"] = "; ".join(why)
  return out


def val_curve(history: Sequence[Mapping[str, Any]]) -> list[list[float | int]]:
  """[[step, val accuracy], ...] of one run's `read_history`."""
  return [[int(h["step"]), float(h[VAL_ACC])] for h in history if VAL_ACC in h]


def validation(histories: Mapping[str, list[dict[str, Any]]], job: Mapping[str, Any], method: str) -> dict[str, Any]:
  """{"rule": text, "runs": {"seed{s}/{run}": curve + `plateau` + cost}} for every run in `histories`."""
  j = job_settings(job)
  kw = dict(chance=CHANCE, margin=j["chance_margin"], window=j["rise_window"], tolerance=j["rise_tolerance"])
  runs = {}
  for key, hist in histories.items():
    run = key.split("/")[1]
    pts = [h for h in hist if VAL_ACC in h]
    curve = val_curve(hist)
    runs[key] = {"run": run, "method": "none" if run == "unpruned" else (method if run == "stts" else run),
                 "curve": curve, **plateau(curve, **kw),
                 "examples": int(pts[-1]["eval/val_scored"]) if pts and "eval/val_scored" in pts[-1] else None,
                 "seconds_per_eval": float(np.median([h["eval/val_seconds"] for h in pts]))
                 if pts and all("eval/val_seconds" in h for h in pts) else None,
                 # new executables after the first evaluation of the run: 0 when it compiled once
                 "recompilations": int(sum(h.get("eval/val_compilations", 0) for h in pts[1:]))}
  rule = (f"left the chance plateau: last val accuracy > chance {CHANCE * 100:g} % + {kw['margin'] * 100:g} points; "
          f"stopped rising: mean of the last {kw['window']} val points <= mean of the {kw['window']} before "
          f"+ {kw['tolerance'] * 100:g} points (needs {2 * kw['window']} points); converged: both")
  return {"rule": rule, "val_every": j["val_every"], "val_examples": j["val_examples"], "runs": runs}


def converged_check(val: Mapping[str, Any]) -> dict[str, Any]:
  """job.require_converged: every run left the chance plateau and stopped rising (`plateau`)."""
  runs = val["runs"]
  bad = {k: r["reason"] for k, r in runs.items() if not r["converged"]}
  return {"name": "every run left the chance plateau and stopped rising on the validation split",
          "value": len(runs) - len(bad), "bound": len(runs), "unit": "runs", "passed": bool(runs) and not bad,
          "detail": ("; ".join(f"{k}: {v}" for k, v in bad.items()) if bad else val["rule"])
          if runs else "missing: no validation curves"}


def validation_lines(report: Mapping[str, Any]) -> list[str]:
  """One line per run: curve (step:acc %), best, final, rise, the two verdicts."""
  val = report.get("validation") or {}
  if not val.get("runs"):
    return []
  yn = {True: "yes", False: "no", None: "undecided"}
  counts = sorted({r["examples"] for r in val["runs"].values() if r["examples"]})
  out = [f"Validation accuracy % ({' / '.join(map(str, counts)) or '?'} val questions, every {val['val_every']} "
         f"steps and the last; rule: {val['rule']}):"]
  for key, r in val["runs"].items():
    curve = " ".join(f"{s}:{a * 100:.1f}" for s, a in r["curve"]) or "-"
    if r["points"]:
      rise = "" if r["rise"] is None else f", rise {r['rise'] * 100:+.1f} points"
      out.append(f"{key} ({LABELS.get(r['method'], r['method'])}): best {r['best'] * 100:.1f} @{r['best_step']}, "
                 f"final {r['final'] * 100:.1f} @{r['final_step']}{rise}; left chance plateau "
                 f"{yn[r['left_chance_plateau']]}, stopped rising {yn[r['stopped_rising']]}; curve {curve}")
    else:
      out.append(f"{key}: no validation points (trained with val_every 0?)")
  return out


__all__ = ["CHANCE", "VAL_ACC", "converged_check", "plateau", "val_curve", "val_eval_fn", "val_method", "validation",
           "validation_lines"]

"""The main job's report: one table, the checks of issue 10 (with issue 19's intervals), report.json,
table.md and plots.

`build_report(...)` turns the stage outputs (training summaries, eval results per seed and model,
timings) into a JSON-able dict; `write_all` writes report.json, table.md and plots/; `console_text`
is what the job prints at the end; `failed_checks` is what decides the exit status.

Table rows (accuracy at the trained ratio r; mean +- sample std over seeds, and per seed):
  unpruned   unpruned-trained weights, all tokens
  STTS       STTS-trained weights, STTS keep mask at r
  random     STTS-trained weights, random keep mask at r     (same weights: only the selector differs)
  heuristic  STTS-trained weights, 1 - cosine keep mask at r
  random     unpruned-trained weights, random at r           (training-free pruning of a normal model)
  heuristic  unpruned-trained weights, heuristic at r
  random     trained with random pruning at r, on its own weights      (only with job.trained_baselines)
  heuristic  trained with heuristic pruning at r, on its own weights   (only with job.trained_baselines)
Every row other than STTS carries `vs_stts`: the paired bootstrap of STTS - row over the test
questions, pooled over seeds and per seed (`stats.py`). The checks hold its lower bound to the job's
bounds; against random (and heuristic, if checked) they use the trained baselines when present, else
every training-free row of that method (the smallest lower bound decides).
Times are medians of interleaved rounds in one process (`speed.py`): the train step of the two
trained models, and vision + prefill per test batch of each inference variant.

Validation curves and the plateau rule: `validation.py`.
"""

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from stts_jax import viz
from stts_jax.experiments import stats
from stts_jax.experiments.config import job_settings as _job_settings
from stts_jax.experiments.validation import (CHANCE, LABELS, converged_check, val_curve, validation,
                                              validation_lines)

ACC_KEY = "multiple_choice/likelihood_accuracy"
KEPT_KEY = "multiple_choice/kept_tokens"
# Which weights a row runs on, by training run: the first two are the job's trained models (a
# pruning method on them is training-free); the others are models trained with that method.
WEIGHTS = {"unpruned": "unpruned-trained", "stts": "STTS-trained", "random": "trained with random pruning",
           "heuristic": "trained with heuristic pruning"}
BASELINE_RUNS = ("random", "heuristic")


def _cell(results: Mapping[str, Any], method: str, ratio: float) -> Optional[dict[str, Any]]:
  for c in results["cells"]:
    if c["method"] == method and (method == "none" or math.isclose(c["ratio"], ratio)) and not c.get("note"):
      return c
  return None


def _metric(cell: Optional[Mapping[str, Any]], suffix: str) -> float:
  if cell is None:
    return float("nan")
  metrics = cell["metrics"]
  if suffix in metrics:
    return float(metrics[suffix])
  tail = suffix.split("/")[-1]
  for k, v in metrics.items():
    if k.endswith(tail):
      return float(v)
  return float("nan")


def _stats(values: Sequence[float]) -> dict[str, Any]:
  v = np.asarray([x for x in values if x is not None and not math.isnan(x)], float)
  if v.size == 0:
    return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "values": []}
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "min": float(v.min()),
          "max": float(v.max()), "n": int(v.size), "values": [float(x) for x in values]}


def accuracy_rows(evals: Mapping[str, Any], seeds: Sequence[int], method: str, ratio: float) -> list[dict[str, Any]]:
  """The table's rows (module docstring) with per-seed accuracies and kept tokens; rows[0] is
  unpruned, rows[1] is STTS. Each row names its eval cell (`cell_method`, `run`: whose weights)."""
  spec = [("none", "unpruned", "none"), (method, "stts", method), ("random", "stts", "random"),
          ("heuristic", "stts", "heuristic"), ("random", "unpruned", "random"), ("heuristic", "unpruned", "heuristic")]
  spec += [(b, b, b) for b in BASELINE_RUNS if all(f"seed{s}/{b}" in evals for s in seeds)]
  rows = []
  for cell_method, weights, timing in spec:
    cells = [_cell(evals[f"seed{s}/{weights}"], cell_method, ratio) for s in seeds]
    rows.append({"id": f"{cell_method}@{weights}", "method": LABELS.get(cell_method, cell_method),
                 "cell_method": cell_method, "run": weights, "weights": WEIGHTS[weights],
                 "trained_baseline": weights in BASELINE_RUNS,
                 "ratio": 0.0 if cell_method == "none" else ratio, "timing_variant": "unpruned" if timing == "none" else timing,
                 "accuracy": _stats([_metric(c, ACC_KEY) for c in cells]),
                 "kept_tokens": _stats([_metric(c, KEPT_KEY) for c in cells])["mean"],
                 "train_variant": {("none", "unpruned"): "unpruned", (method, "stts"): "stts"}.get((cell_method, weights))})
  return rows


def compare_to_stts(rows: list[dict[str, Any]], evals: Mapping[str, Any], seeds: Sequence[int],
                    job: Mapping[str, Any]) -> None:
  """Sets row["vs_stts"] on every row but STTS (rows[1]): the paired bootstrap of STTS - row
  (`stats.paired_bootstrap`), or None when a seed's eval lacks per-question records for either row."""
  j = _job_settings(job)
  ratio = rows[1]["ratio"]

  def per_seed(row):
    out = [stats.correctness(_cell(evals[f"seed{s}/{row['run']}"], row["cell_method"], ratio), ACC_KEY)
           for s in seeds]
    return None if any(x is None for x in out) else out
  stts_q = per_seed(rows[1])
  for row in rows[:1] + rows[2:]:
    other = per_seed(row)
    row["vs_stts"] = None if stts_q is None or other is None else stats.paired_bootstrap(
        stts_q, other, seeds, resamples=j["bootstrap_resamples"], seed=j["bootstrap_seed"],
        level=j["confidence_level"])


def _speeds(rows: list[dict[str, Any]], speed: Mapping[str, Any]) -> None:
  train = speed["train_step"]["median_s"]
  prefill = speed["prefill"]["median_s"]
  for r in rows:
    r["train_step_s"] = train.get(r["train_variant"]) if r["train_variant"] else None
    r["prefill_s"] = prefill.get(r["timing_variant"])
    r["train_speedup"] = train["unpruned"] / r["train_step_s"] if r["train_step_s"] else None
    r["prefill_speedup"] = prefill["unpruned"] / r["prefill_s"] if r["prefill_s"] else None


def _pts(x: Optional[float]) -> str:
  return "-" if x is None else f"{x * 100:+.1f}"


def _bound_check(name: str, stts_label: str, rows: Sequence[Mapping[str, Any]], bound: float,
                 level: float) -> dict[str, Any]:
  """One accuracy check: the smallest lower bound of STTS - row over `rows` against `bound` (fractions;
  reported in points). A missing interval (no rows, or no per-question records) fails."""
  comps = [(r, (r.get("vs_stts") or {}).get("pooled")) for r in rows]
  missing = [f"{r['method']} ({r['weights']})" for r, c in comps if c is None]
  if not rows or missing:
    return {"name": name, "value": None, "bound": bound * 100, "unit": "points", "passed": False,
            "detail": "missing: " + (", ".join(missing) if missing else "no such row") +
                      " has no per-question results to bootstrap"}
  row, worst = min(comps, key=lambda rc: rc[1]["lo"])
  per_seed = " / ".join(_pts(p["mean"]) for p in row["vs_stts"]["per_seed"])
  detail = (f"{stts_label} - {row['method']} ({row['weights']}): mean {_pts(worst['mean'])}, {level * 100:g}% CI "
            f"[{_pts(worst['lo'])}, {_pts(worst['hi'])}] points over {worst['n_questions']} questions"
            + (f"; per seed {per_seed}" if len(row["vs_stts"]["per_seed"]) > 1 else ""))
  # 1e-12: a bound met exactly (e.g. both rows identical, bound 0) must pass despite float rounding.
  return {"name": name, "value": worst["lo"] * 100, "bound": bound * 100, "unit": "points",
          "passed": bool(worst["lo"] >= bound - 1e-12), "detail": detail, "against": row["id"]}


def checks(rows: list[dict[str, Any]], job: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Issue 10's claims at issue 19's standard, each with its value, bound and verdict: the accuracy
  checks hold the lower bound of the paired bootstrap interval (`compare_to_stts`) to the bound."""
  j = _job_settings(job)
  unpruned, stts = rows[0], rows[1]
  lvl = f"{j['confidence_level'] * 100:g}%"
  trained = any(r["trained_baseline"] for r in rows)

  def baselines(method):
    # Trained baselines when present (same training, own weights); else every training-free row.
    return [r for r in rows[2:] if r["cell_method"] == method and r["trained_baseline"] == trained]
  which = "trained with it" if trained else "training-free, every row"
  s = stts["method"]
  out = []
  if j["max_accuracy_gap"] is not None:
    out.append(_bound_check(f"{s} - unpruned >= {-j['max_accuracy_gap'] * 100:+g} points at the {lvl} lower bound",
                            s, [unpruned], -j["max_accuracy_gap"], j["confidence_level"]))
  if j["min_gain_over_random"] is not None:
    out.append(_bound_check(f"{s} - random pruning ({which}) >= {j['min_gain_over_random'] * 100:+g} points at the "
                            f"{lvl} lower bound", s, baselines("random"), j["min_gain_over_random"],
                            j["confidence_level"]))
  if j["min_gain_over_heuristic"] is not None:
    out.append(_bound_check(f"{s} - heuristic pruning ({which}) >= {j['min_gain_over_heuristic'] * 100:+g} points "
                            f"at the {lvl} lower bound", s, baselines("heuristic"), j["min_gain_over_heuristic"],
                            j["confidence_level"]))
  speedup = stts.get("train_speedup")
  out.append({"name": f"{s} train step >= {j['min_train_speedup']:g}x faster than unpruned",
              "value": speedup, "bound": j["min_train_speedup"], "unit": "x",
              "passed": bool(speedup is not None and speedup >= j["min_train_speedup"]),
              "detail": "median of interleaved rounds, same process" if speedup else "missing: no train-step timing"})
  return out


def failed_checks(report: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The checks that did not pass (a missing value counts as failed)."""
  return [c for c in report["checks"] if not c["passed"]]


def _check_line(c: Mapping[str, Any]) -> str:
  fmt = {"points": lambda x: f"{x:+.1f} points", "x": lambda x: f"{x:.2f}x", "runs": lambda x: f"{x:g} runs"}
  value = "missing" if c["value"] is None else fmt[c["unit"]](c["value"])
  bound = {"points": f"{c['bound']:+g} points", "x": f"{c['bound']:g}x", "runs": f"{c['bound']:g} runs"}[c["unit"]]
  return f"[{'PASS' if c['passed'] else 'FAIL'}] {c['name']}: {value} (bound {bound}; {c['detail']})"


def build_report(*, job_info: Mapping[str, Any], env: Mapping[str, Any], dataset: Mapping[str, Any],
                 runs: Mapping[str, Any], evals: Mapping[str, Any], speed: Mapping[str, Any],
                 wall: Mapping[str, float], histories: Optional[Mapping[str, list[dict[str, Any]]]] = None,
                 provenance: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """The JSON-able report (see the module docstring). histories: each run's `read_history` (its
  validation curve); provenance: `stts_jax.provenance.record()` (command, commit, machine, date)."""
  seeds, method, ratio = job_info["seeds"], job_info["method"], job_info["ratio"]
  rows = accuracy_rows(evals, seeds, method, ratio)
  _speeds(rows, speed)
  compare_to_stts(rows, evals, seeds, job_info["job"])
  sweep = {}
  for weights in ("stts", "unpruned"):      # the trained baselines are evaluated at r only
    res = [evals[f"seed{s}/{weights}"] for s in seeds]
    cells = {(c["method"], c["ratio"]) for c in res[0]["cells"] if not c.get("note")}
    for m, r in sorted(cells):
      sweep.setdefault(weights, []).append({"method": m, "ratio": r, "accuracy": _stats(
          [_metric(_cell(x, m, r), ACC_KEY) for x in res])})
  val = validation(histories or {}, job_info["job"], method)
  out_checks = checks(rows, job_info["job"])
  if _job_settings(job_info["job"])["require_converged"]:
    out_checks.append(converged_check(val))
  return {
      **dict(provenance or {}),
      "job": dict(job_info),
      "environment": dict(env),
      "dataset": dict(dataset),
      "runs": dict(runs),
      "table": rows,
      "checks": out_checks,
      "validation": val,
      "accuracy_sweep": sweep,
      "speed": {k: v for k, v in speed.items() if k != "key"},
      "eval_results": {k: os.path.join(os.path.dirname(v["checkpoint"]), f"eval_{k.split('/')[1]}", "results.json")
                       for k, v in evals.items()},
      "num_test_examples": next(iter(evals.values()))["num_examples"],
      "wall_seconds": {k: round(v, 1) for k, v in wall.items()},
  }


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------
def _fmt_acc(a: Mapping[str, Any]) -> str:
  if a["mean"] is None:
    return "-"
  text = f"{a['mean'] * 100:.1f}"
  return text + (f" ± {a['std'] * 100:.1f}" if a["n"] > 1 else "")


def _fmt(x: Optional[float], spec: str, suffix: str = "") -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def _fmt_vs(r: Mapping[str, Any]) -> str:
  pooled = (r.get("vs_stts") or {}).get("pooled")
  if pooled is None:
    return "-"
  return f"{_pts(pooled['mean'])} [{_pts(pooled['lo'])}, {_pts(pooled['hi'])}]"


def split_of(report: Mapping[str, Any]) -> str:
  """The split the table was evaluated on ("test" unless a tuning run set eval.split)."""
  return ((report["job"].get("config") or {}).get("eval") or {}).get("split", "test")


def table_lines(report: Mapping[str, Any]) -> list[str]:
  """The table as aligned markdown."""
  n = len(report["job"]["seeds"])
  speed = report["speed"]
  level = _job_settings(report["job"]["job"])["confidence_level"]
  stts = report["table"][1]["method"]
  head = ["method", "weights", "kept tokens", f"{split_of(report)} acc % ({'mean ± sd, ' if n > 1 else ''}{n} seed{'s' * (n > 1)})"]
  head += ["seeds " + " / ".join(str(s) for s in report["job"]["seeds"])] if n > 1 else []
  head += [f"{stts} - row, points ({level * 100:g}% CI)",
           f"train step ms (B={speed['train_step'].get('batch_size', '?')})",
           f"prefill ms (B={speed['prefill'].get('batch_size', '?')})", "speedup train / prefill"]
  body = []
  for r in report["table"]:
    ts = r["train_step_s"] * 1e3 if r["train_step_s"] else None
    ps = r["prefill_s"] * 1e3 if r["prefill_s"] else None
    row = [f"{r['method']}" + (f" @{r['ratio']:g}" if r["ratio"] else ""), r["weights"],
           _fmt(r["kept_tokens"], ".1f"), _fmt_acc(r["accuracy"])]
    if n > 1:
      row.append(" / ".join(_fmt(None if v is None or math.isnan(v) else v * 100, ".1f")
                            for v in r["accuracy"]["values"]) or "-")
    row += [_fmt_vs(r), _fmt(ts, ".0f"), _fmt(ps, ".0f"),
            f"{_fmt(r['train_speedup'], '.2f', 'x')} / {_fmt(r['prefill_speedup'], '.2f', 'x')}"]
    body.append(row)
  widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
  line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
  return [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body]


def table_notes(report: Mapping[str, Any]) -> list[str]:
  """What the table's columns mean: whose weights, the soft bias, the intervals."""
  j = _job_settings(report["job"]["job"])
  stts = report["table"][1]["method"]
  trained = any(r["trained_baseline"] for r in report["table"])
  notes = ["weights: a method on `unpruned-trained` / `STTS-trained` weights selects tokens without training "
           "for it (same weights as the trained row, only the selector differs)"
           + ("; `trained with random / heuristic pruning`: a model trained with that method at the same ratio "
              "and steps (otherwise the same training), evaluated with it on its own weights" if trained else "")
           + ".",
           f"Only {stts} has a soft bias (log s' on the keys of the block after the scorer); random and heuristic "
           "run that block without one.",
           f"{stts} - row: paired bootstrap over the {report['num_test_examples']} {split_of(report)} questions (same "
           f"question, "
           f"same seed), pooled over {len(report['job']['seeds'])} seed(s), {j['bootstrap_resamples']} resamples of "
           f"questions (numpy seed {j['bootstrap_seed']}): mean difference [{j['confidence_level'] * 100:g}% "
           "percentile interval], in points. It covers the draw of questions, not training variance across "
           "seeds (see the per-seed values)."]
  return notes


def comparison_lines(report: Mapping[str, Any]) -> list[str]:
  """One line per comparison with STTS: pooled interval and per-seed values."""
  stts = report["table"][1]["method"]
  out = []
  for r in report["table"][:1] + report["table"][2:]:
    vs = r.get("vs_stts")
    label = f"{stts} - {r['method']}" + (f" @{r['ratio']:g}" if r["ratio"] else "") + f" ({r['weights']})"
    if not vs or vs["pooled"] is None:
      out.append(f"{label}: no per-question results")
      continue
    p = vs["pooled"]
    seeds = ", ".join(f"seed {x['seed']} {_pts(x['mean'])} [{_pts(x['lo'])}, {_pts(x['hi'])}]" for x in vs["per_seed"])
    out.append(f"{label}: {_pts(p['mean'])} [{_pts(p['lo'])}, {_pts(p['hi'])}] points ({p['n_pairs']} paired "
               f"answers)" + (f"; per seed: {seeds}" if len(vs["per_seed"]) > 1 else ""))
  return out


def console_text(report: Mapping[str, Any], files: Mapping[str, str]) -> str:
  j = report["job"]
  out = ["", f"Results: {report['num_test_examples']} {split_of(report)} examples, 4-way multiple choice (chance 25 %), "
             f"{j['steps']} training steps per model, train batch {j['train_batch']}"
             + (f", every model from a vision tower pretrained for {j['vision_tower']['steps']} steps (stage 0)"
                if j.get("vision_tower") else "") + ".", ""]
  out += table_lines(report)
  out += [""] + [f"  {n}" for n in table_notes(report)]
  level = _job_settings(j["job"])["confidence_level"]
  out += ["", f"Paired bootstrap over {split_of(report)} questions ({level * 100:g}% percentile intervals):"]
  out += [f"  {line}" for line in comparison_lines(report)]
  val = validation_lines(report)
  out += ([""] + val[:1] + [f"  {line}" for line in val[1:]]) if val else []
  out += ["", "Checks:"]
  out += [f"  {_check_line(c)}" for c in report["checks"]]
  pre = report["speed"]["prefill"]
  packed = pre.get("packed_rate", {}).get(j["method"])
  if packed is not None:
    out.append(f"  ({j['method']}: packed ViT rows used in {packed:.0%} of timed batches; the rest took the exact "
               f"dense fallback)")
  w = report["wall_seconds"]
  out += ["", "Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in w.items()), "", "Files:"]
  out += [f"  {k:<18} {v}" for k, v in files.items()]
  return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (np.integer, np.floating, np.bool_)):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def loss_curves_figure(histories: Mapping[str, list[dict[str, Any]]], method: str):
  curves: dict[str, list] = {}
  for key, hist in histories.items():
    pts = [(h["step"], h["ce"]) for h in hist if "ce" in h]
    curves.setdefault(_run_label(key.split("/")[1], method), []).append(([p[0] for p in pts], [p[1] for p in pts]))
  return viz.loss_curves(curves, title="training loss on the default dataset")


def accuracy_figure(report: Mapping[str, Any]):
  series = []
  sweep = report["accuracy_sweep"]
  for weights, style in (("stts", "-"), ("unpruned", "--")):
    cells = sweep.get(weights, [])
    base = next((c for c in cells if c["method"] == "none"), None)
    methods = dict.fromkeys(c["method"] for c in cells if c["method"] != "none")
    for m in methods:
      pts = ([base] if base else []) + sorted((c for c in cells if c["method"] == m), key=lambda c: c["ratio"])
      pts = [p for p in pts if p["accuracy"]["n"]]
      if pts:
        series.append(viz.Series(f"{LABELS.get(m, m)} ({WEIGHTS[weights]})", [p["ratio"] for p in pts],
                                 [p["accuracy"]["values"] for p in pts], linestyle=style))
  return viz.accuracy_vs_ratio(series, chance=0.25,
                               title=f"{split_of(report)} accuracy vs pruned fraction (ratio 0: unpruned)")


def speed_figure(report: Mapping[str, Any]):
  sp = report["speed"]
  b1, b2 = sp["train_step"].get("batch_size", "?"), sp["prefill"].get("batch_size", "?")
  return viz.speed_bars({f"train step, batch {b1}": sp["train_step"]["median_s"],
                         f"vision + prefill, batch {b2}": sp["prefill"]["median_s"]}, baseline="unpruned",
                        title="median of interleaved rounds, same process")


def _run_label(run: str, method: str) -> str:
  return {"unpruned": "unpruned", "stts": LABELS.get(method, method)}.get(run, f"{LABELS.get(run, run)} (trained)")


def val_curves_figure(histories: Mapping[str, list[dict[str, Any]]], method: str):
  """Validation accuracy (left) and training loss (right) against the step, one line per run and
  seed (seeds differ in line style), with the chance level."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(10, 3.8))
  ax_acc, ax_ce = fig.subplots(1, 2)
  styles = ("-", "--", ":", "-.")
  for key, hist in sorted(histories.items()):
    seed, run = key.split("/")
    label, ls = f"{_run_label(run, method)} {seed}", styles[int(seed.removeprefix("seed") or 0) % len(styles)]
    curve = val_curve(hist)
    if curve:
      ax_acc.plot([s for s, _ in curve], [a * 100 for _, a in curve], marker="o", ms=3, ls=ls,
                  color=viz.color(label), label=label)
    ce = [(h["step"], h["ce"]) for h in hist if "ce" in h]
    if ce:
      ax_ce.plot([s for s, _ in ce], [c for _, c in ce], ls=ls, lw=1, color=viz.color(label), label=label)
  ax_acc.axhline(CHANCE * 100, color="grey", ls=":", lw=1, label="chance")
  ax_acc.set(xlabel="step", ylabel="validation accuracy (%)", title="validation accuracy (own method, trained ratio)")
  ax_ce.set(xlabel="step", ylabel="training loss (answer CE)", yscale="log", title="training loss")
  for ax in (ax_acc, ax_ce):
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def _curves(history: list[dict[str, Any]]) -> dict[str, list[Any]]:
  out = {"val_accuracy": val_curve(history), "train_ce": [[int(x["step"]), x["ce"]] for x in history if "ce" in x]}
  aux = [[int(x["step"]), x["aux_loss"]] for x in history if "ce" in x and x.get("aux_loss")]
  if aux:   # 0 throughout for runs without a learned scorer: left out
    out["train_aux_loss"] = aux
  return out


def write_all(report: dict[str, Any], histories: Mapping[str, list[dict[str, Any]]],
              grid: Sequence[Mapping[str, Any]], workdir: str) -> dict[str, str]:
  """report.json, table.md, val_curves.json (per run: val accuracy, training CE and, for runs with a
  learned scorer, the aux loss by step) and plots/*.png in `workdir`; returns {name: path} of what was
  written."""
  plots = os.path.join(workdir, "plots")
  method = report["job"]["method"]
  curves_path = os.path.join(workdir, "val_curves.json")
  os.makedirs(workdir, exist_ok=True)
  with open(curves_path, "w") as f:
    json.dump(_jsonable({k: _curves(h) for k, h in histories.items()}), f, indent=1)
  files = {"val curves": viz.save(val_curves_figure(histories, method), os.path.join(plots, "val_curves.png")),
           "loss curves": viz.save(loss_curves_figure(histories, method), os.path.join(plots, "loss_curves.png")),
           "accuracy vs ratio": viz.save(accuracy_figure(report), os.path.join(plots, "accuracy_vs_ratio.png")),
           "speed": viz.save(speed_figure(report), os.path.join(plots, "speed.png"))}
  grid_meta = []
  for i, ex in enumerate(grid):
    order = [m for m in (method, "heuristic", "random") if m in ex["keep"]]
    rows = [viz.GridRow(LABELS.get(m, m), ex["keep"][m], ex["scores"] if m == method else None) for m in order]
    fig = viz.frame_grid(ex["frames"], rows, grid=int(round(math.sqrt(ex["keep"][order[0]].shape[-1]))),
                         event=ex["event"], timestamps=ex["timestamps"],
                         title=f"{ex['example_id']}: {ex['question']}  answer: {ex['answer']}   "
                               f"(yellow: the event window; dimmed + crossed: dropped)")
    files[f"keep masks {i}"] = viz.save(fig, os.path.join(plots, f"keep_masks_{i}.png"))
    grid_meta.append({k: ex[k] for k in ("example_id", "question", "answer", "clip_row", "event")}
                     | {"kept_event": {m: bool(np.all([ex["keep"][m][t, ex["event"][1]] for t in ex["event"][0]]))
                                       for m in order}})
  report["keep_mask_examples"] = grid_meta
  table_path = os.path.join(workdir, "table.md")
  val = validation_lines(report)
  with open(table_path, "w") as f:
    f.write("\n".join(table_lines(report)) + "\n\n" + "\n".join(f"- {n}" for n in table_notes(report))
            + "\n\nPaired bootstrap:\n\n" + "\n".join(f"- {x}" for x in comparison_lines(report))
            + (f"\n\n{val[0]}\n\n" + "\n".join(f"- {x}" for x in val[1:]) if val else "")
            + "\n\nChecks:\n\n" + "\n".join(f"- {_check_line(c)}" for c in report["checks"]) + "\n")
  files = {"table": table_path, "val curves data": curves_path, **files}
  report["files"] = dict(files)
  json_path = os.path.join(workdir, "report.json")
  files = {"report": json_path, **files}
  report["files"]["report"] = json_path
  with open(json_path, "w") as f:
    json.dump(_jsonable(report), f, indent=1)
  return files


__all__ = ["ACC_KEY", "BASELINE_RUNS", "CHANCE", "VAL_ACC", "accuracy_rows", "build_report", "checks",
           "comparison_lines", "compare_to_stts", "console_text", "failed_checks",
           "table_lines", "table_notes", "val_curves_figure",
           "write_all"]

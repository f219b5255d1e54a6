"""The main job's report: one table, the checks of issue 10, report.json, table.md and plots.

`build_report(...)` turns the stage outputs (training summaries, eval results per seed and model,
timings) into a JSON-able dict; `write_all` writes report.json, table.md and plots/; `console_text`
is what the job prints at the end.

Table rows (accuracy at the trained ratio r; mean +- sample std over seeds):
  unpruned   unpruned-trained weights, all tokens
  STTS       STTS-trained weights, STTS keep mask at r
  random     STTS-trained weights, random keep mask at r     (same weights: only the selector differs)
  heuristic  STTS-trained weights, 1 - cosine keep mask at r
  random     unpruned-trained weights, random at r           (training-free pruning of a normal model)
  heuristic  unpruned-trained weights, heuristic at r
Times are medians of interleaved rounds in one process (`speed.py`): the train step of the two
trained models, and vision + prefill per test batch of each inference variant.
"""

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from stts_jax import viz

ACC_KEY = "multiple_choice/likelihood_accuracy"
KEPT_KEY = "multiple_choice/kept_tokens"
LABELS = {"none": "unpruned", "stts": "STTS", "random": "random", "heuristic": "heuristic"}
WEIGHTS = {"unpruned": "unpruned-trained", "stts": "STTS-trained"}


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
  """The table's rows (module docstring) with per-seed accuracies and kept tokens."""
  spec = [("none", "unpruned", "none"), (method, "stts", method), ("random", "stts", "random"),
          ("heuristic", "stts", "heuristic"), ("random", "unpruned", "random"), ("heuristic", "unpruned", "heuristic")]
  rows = []
  for cell_method, weights, timing in spec:
    cells = [_cell(evals[f"seed{s}/{weights}"], cell_method, ratio) for s in seeds]
    rows.append({"method": LABELS.get(cell_method, cell_method), "weights": WEIGHTS[weights],
                 "ratio": 0.0 if cell_method == "none" else ratio, "timing_variant": "unpruned" if timing == "none" else timing,
                 "accuracy": _stats([_metric(c, ACC_KEY) for c in cells]),
                 "kept_tokens": _stats([_metric(c, KEPT_KEY) for c in cells])["mean"],
                 "train_variant": {("none", "unpruned"): "unpruned", (method, "stts"): "stts"}.get((cell_method, weights))})
  return rows


def _speeds(rows: list[dict[str, Any]], speed: Mapping[str, Any]) -> None:
  train = speed["train_step"]["median_s"]
  prefill = speed["prefill"]["median_s"]
  for r in rows:
    r["train_step_s"] = train.get(r["train_variant"]) if r["train_variant"] else None
    r["prefill_s"] = prefill.get(r["timing_variant"])
    r["train_speedup"] = train["unpruned"] / r["train_step_s"] if r["train_step_s"] else None
    r["prefill_speedup"] = prefill["unpruned"] / r["prefill_s"] if r["prefill_s"] else None


def checks(rows: list[dict[str, Any]], job: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Issue 10's claims, each with its value, threshold and verdict."""
  unpruned, stts = rows[0], rows[1]
  acc = lambda r: r["accuracy"]["mean"]  # noqa: E731
  out = []
  if acc(unpruned) is not None and acc(stts) is not None:
    gap = acc(unpruned) - acc(stts)
    out.append({"name": f"{stts['method']} within {job['max_accuracy_gap'] * 100:g} points of unpruned (mean)",
                "value": f"{-gap * 100:+.1f} points", "passed": bool(gap <= job["max_accuracy_gap"] + 1e-12)})
    randoms = [acc(r) for r in rows if r["method"] == "random" and acc(r) is not None]
    if randoms:
      gain = acc(stts) - max(randoms)
      out.append({"name": f"{stts['method']} above random pruning (the better random row) by >= "
                          f"{job['min_gain_over_random'] * 100:g} points",
                  "value": f"{gain * 100:+.1f} points", "passed": bool(gain >= job["min_gain_over_random"])})
  if stts.get("train_speedup"):
    out.append({"name": f"{stts['method']} train step >= {job['min_train_speedup']:g}x faster than unpruned",
                "value": f"{stts['train_speedup']:.2f}x", "passed": bool(stts["train_speedup"] >= job["min_train_speedup"])})
  return out


def build_report(*, job_info: Mapping[str, Any], env: Mapping[str, Any], dataset: Mapping[str, Any],
                 runs: Mapping[str, Any], evals: Mapping[str, Any], speed: Mapping[str, Any],
                 wall: Mapping[str, float]) -> dict[str, Any]:
  """The JSON-able report (see the module docstring)."""
  seeds, method, ratio = job_info["seeds"], job_info["method"], job_info["ratio"]
  rows = accuracy_rows(evals, seeds, method, ratio)
  _speeds(rows, speed)
  sweep = {}
  for weights in ("stts", "unpruned"):
    res = [evals[f"seed{s}/{weights}"] for s in seeds]
    cells = {(c["method"], c["ratio"]) for c in res[0]["cells"] if not c.get("note")}
    for m, r in sorted(cells):
      sweep.setdefault(weights, []).append({"method": m, "ratio": r, "accuracy": _stats(
          [_metric(_cell(x, m, r), ACC_KEY) for x in res])})
  return {
      "job": dict(job_info),
      "environment": dict(env),
      "dataset": dict(dataset),
      "runs": dict(runs),
      "table": rows,
      "checks": checks(rows, job_info["job"]),
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


def table_lines(report: Mapping[str, Any]) -> list[str]:
  """The table as aligned markdown."""
  n = len(report["job"]["seeds"])
  speed = report["speed"]
  head = ["method", "weights", "kept tokens", f"test acc % ({'mean ± sd, ' if n > 1 else ''}{n} seed{'s' * (n > 1)})",
          f"train step ms (B={speed['train_step'].get('batch_size', '?')})",
          f"prefill ms (B={speed['prefill'].get('batch_size', '?')})", "speedup train / prefill"]
  body = []
  for r in report["table"]:
    ts = r["train_step_s"] * 1e3 if r["train_step_s"] else None
    ps = r["prefill_s"] * 1e3 if r["prefill_s"] else None
    body.append([f"{r['method']}" + (f" @{r['ratio']:g}" if r["ratio"] else ""), r["weights"],
                 _fmt(r["kept_tokens"], ".1f"), _fmt_acc(r["accuracy"]), _fmt(ts, ".0f"), _fmt(ps, ".0f"),
                 f"{_fmt(r['train_speedup'], '.2f', 'x')} / {_fmt(r['prefill_speedup'], '.2f', 'x')}"])
  widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
  line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
  return [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body]


def console_text(report: Mapping[str, Any], files: Mapping[str, str]) -> str:
  j = report["job"]
  out = ["", f"Results: {report['num_test_examples']} test examples, 4-way multiple choice (chance 25 %), "
             f"{j['steps']} training steps per model, train batch {j['train_batch']}"
             + (f", both from a vision tower pretrained for {j['vision_tower']['steps']} steps (stage 0)"
                if j.get("vision_tower") else "") + ".", ""]
  out += table_lines(report)
  out += ["", "Checks:"]
  out += [f"  [{'PASS' if c['passed'] else 'FAIL'}] {c['name']}: {c['value']}" for c in report["checks"]]
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
    run = key.split("/")[1]
    pts = [(h["step"], h["ce"]) for h in hist if "ce" in h]
    label = "unpruned" if run == "unpruned" else LABELS.get(method, method)
    curves.setdefault(label, []).append(([p[0] for p in pts], [p[1] for p in pts]))
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
  return viz.accuracy_vs_ratio(series, chance=0.25, title="test accuracy vs pruned fraction (ratio 0: unpruned)")


def speed_figure(report: Mapping[str, Any]):
  sp = report["speed"]
  b1, b2 = sp["train_step"].get("batch_size", "?"), sp["prefill"].get("batch_size", "?")
  return viz.speed_bars({f"train step, batch {b1}": sp["train_step"]["median_s"],
                         f"vision + prefill, batch {b2}": sp["prefill"]["median_s"]}, baseline="unpruned",
                        title="median of interleaved rounds, same process")


def write_all(report: dict[str, Any], histories: Mapping[str, list[dict[str, Any]]],
              grid: Sequence[Mapping[str, Any]], workdir: str) -> dict[str, str]:
  """report.json, table.md and plots/*.png in `workdir`; returns {name: path} of what was written."""
  plots = os.path.join(workdir, "plots")
  files = {"loss curves": viz.save(loss_curves_figure(histories, report["job"]["method"]),
                                   os.path.join(plots, "loss_curves.png")),
           "accuracy vs ratio": viz.save(accuracy_figure(report), os.path.join(plots, "accuracy_vs_ratio.png")),
           "speed": viz.save(speed_figure(report), os.path.join(plots, "speed.png"))}
  method = report["job"]["method"]
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
  with open(table_path, "w") as f:
    f.write("\n".join(table_lines(report)) + "\n\n" + "\n".join(
        f"- [{'PASS' if c['passed'] else 'FAIL'}] {c['name']}: {c['value']}" for c in report["checks"]) + "\n")
  files = {"table": table_path, **files}
  report["files"] = dict(files)
  json_path = os.path.join(workdir, "report.json")
  files = {"report": json_path, **files}
  report["files"]["report"] = json_path
  with open(json_path, "w") as f:
    json.dump(_jsonable(report), f, indent=1)
  return files


__all__ = ["ACC_KEY", "accuracy_rows", "build_report", "checks", "console_text", "table_lines", "write_all"]

"""Adaptive vs fixed budget sweep (issue 22): accuracy vs mean kept windows, per camera type.

`sweep(model, data_cfg, eval_cfg, method=..., thresholds=..., buckets=...)` evaluates, on the same
examples of `eval_cfg.split`, the fixed ratios `eval_cfg.ratios` and one adaptive point per
threshold or score-mass fraction (`adaptive_budget.AdaptivePredictor`, `rule`), all with `method`'s scores. "Kept tokens" are kept
vision windows (= LLM vision tokens) per video. It returns a JSON-able dict with
  fixed / adaptive   one point each: accuracy, mean kept windows, per camera type (accuracy, kept,
                     for adaptive the bucket histogram), compilations; adaptive points add the
                     share of videos whose bucket kept every window above the threshold,
  matched            per fixed ratio: the adaptive point whose mean kept windows is the closest
                     *not above* the fixed ratio's (None if none is), adaptive - fixed accuracy with
                     the paired bootstrap over questions (`experiments.stats`),
  vs_fixed_05        per adaptive point: % fewer kept windows than fixed 0.5, accuracy difference and
                     its paired interval (`operating_point` picks the val sweep's operating point from it),
and `plot(results, path)` draws both curves (all clips and one panel per camera type).
`pool(runs, seeds)` combines several training seeds' sweeps of the same comparison into one such dict
(seed means; paired bootstrap pooled over seeds, as the main job's statistics).
Camera types come from the manifest's `camera` field (the default dataset's clip metadata).
"""

import gzip
import json
import os
import statistics
from collections.abc import Sequence
from typing import Any, Optional

import jax
import numpy as np

from stts_jax.data.config import DataConfig
from stts_jax.eval import adaptive_budget as ab
from stts_jax.eval import data as data_lib
from stts_jax.eval import evaluators as evaluators_lib
from stts_jax.eval import generate as gen_lib
from stts_jax.eval import predictor as predictor_lib
from stts_jax.eval.config import EvalConfig
from stts_jax.experiments import stats
from stts_jax.models import vlm


def _cameras(data_cfg: DataConfig, split: str) -> dict[str, str]:
  path = os.path.join(data_cfg.path, f"{split}.jsonl")
  out: dict[str, str] = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          ex = json.loads(line)
          out[ex["id"]] = str(ex.get("camera", "unknown"))
  return out


def _point(model: vlm.Molmo2, data: data_lib.EvalData, eval_cfg: EvalConfig, predict_fn, metric: str,
           cameras: dict[str, str]) -> dict[str, Any]:
  name, mode = metric.split("/", 1)
  mode = mode[:-len("_accuracy")]
  kw = {"modes": tuple(eval_cfg.mc_modes)} if name == "multiple_choice" else {}
  before = ab.compile_counts()
  ev = evaluators_lib.from_name(name, predict_fn, data=data, **kw)
  metrics = dict(ev.run(model))
  after = ab.compile_counts()
  correct = {r["example_id"]: bool(r["correct"]) for r in ev.details["records"][mode] if r["status"] == "scored"}
  per = ev.details["per_example"]
  by_cam: dict[str, dict[str, Any]] = {}
  for cam in sorted(set(cameras.get(q, "unknown") for q in correct)):
    ids = [q for q in correct if cameras.get(q, "unknown") == cam]
    row = {"n": len(ids), "accuracy": float(np.mean([correct[q] for q in ids])),
           "kept_windows": float(np.mean([per[q]["vision_tokens"] for q in ids]))}
    if ids and "bucket" in per[ids[0]]:
      bk = [per[q]["bucket"] for q in ids]
      row["buckets"] = {f"{b:g}": int(sum(x == b for x in bk)) for b in sorted(set(bk))}
      row["mean_bucket"] = float(np.mean(bk))
    by_cam[cam] = row
  out = {"accuracy": float(metrics[f"{mode}_accuracy"]), "kept_windows": float(metrics["kept_tokens"]),
         "scored": int(metrics["scored"]), "by_camera": by_cam,
         "compilations": {k: after[k] - before[k] for k in after}, "correct": correct,
         "per_example": per}
  return out


def _comparisons(fixed: Sequence[dict[str, Any]], adaptive: Sequence[dict[str, Any]], outcomes, seeds: Sequence[int], *,
                 resamples: int, per_seed: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """`matched` and `vs_fixed_05` of a sweep (module docstring). outcomes(point): the point's per-question
  outcomes, one {example_id: correct} per seed of `seeds`; per_seed: also each seed's interval."""
  def compare(a, b):
    res = stats.paired_bootstrap(outcomes(a), outcomes(b), seeds, resamples=resamples)
    return res["pooled"], res["per_seed"]

  def time_ratio(x, y):
    return x / y if x and y else None

  matched = []
  for f in fixed:
    below = [a for a in adaptive if a["kept_windows"] <= f["kept_windows"] + 1e-9]
    a = max(below, key=lambda x: x["kept_windows"]) if below else None
    diff, each = compare(a, f) if a else (None, None)
    row = {"fixed_ratio": f["ratio"], "fixed_kept": f["kept_windows"],
           "adaptive_threshold": a["threshold"] if a else None, "adaptive_kept": a["kept_windows"] if a else None,
           "adaptive_minus_fixed": diff,
           "fixed_over_adaptive_time": time_ratio(f.get("ms_per_video"), a.get("ms_per_video")) if a else None}
    if per_seed:
      row["adaptive_minus_fixed_per_seed"] = each
    matched.append(row)
  f05 = next((f for f in fixed if abs(f["ratio"] - 0.5) < 1e-9), None)
  vs05 = []
  if f05 is not None:
    for a in adaptive:
      diff, each = compare(a, f05)
      row = {"threshold": a["threshold"], "kept_windows": a["kept_windows"],
             "fewer_windows_pct": 100.0 * (1.0 - a["kept_windows"] / f05["kept_windows"]),
             "adaptive_minus_fixed05": diff,
             "fixed05_over_adaptive_time": time_ratio(f05.get("ms_per_video"), a.get("ms_per_video"))}
      if per_seed:
        row["adaptive_minus_fixed05_per_seed"] = each
      vs05.append(row)
  return matched, vs05


def sweep(model: vlm.Molmo2, data_cfg: DataConfig, eval_cfg: EvalConfig, *, method: str,
          thresholds: Sequence[float], buckets: Sequence[float] = ab.DEFAULT_BUCKETS,
          metric: str = "multiple_choice/likelihood_accuracy", tokenizer=None, resamples: int = 10000,
          checkpoint: str = "", rule: str = "threshold", group_batches: bool = True,
          reuse_scored: bool = True, mesh: Optional[jax.sharding.Mesh] = None,
          rules: Sequence[tuple[str, Any]] = ()) -> dict[str, Any]:
  """Fixed ratios and adaptive points on the same examples (module docstring). `rule`: "threshold"
  (each value of `thresholds` is a score threshold) or "mass" (each is a kept score-mass fraction).
  `group_batches`: adaptive points group videos by bucket across batches (`AdaptivePredictor`); False:
  every batch runs one pass per bucket it contains. `reuse_scored`: bucket passes start from the score
  pass (`AdaptivePredictor`); False: from the patches. Per-video results are the same; the time is not.
  `mesh`, `rules`: data-parallel over the mesh's devices (one process), as `Predictor`."""
  if eval_cfg.batch_size is not None:
    import dataclasses
    data_cfg = dataclasses.replace(data_cfg, batch_size=eval_cfg.batch_size)
  data = data_lib.EvalData(data_cfg, model.config.tokens, eval_cfg.split, tokenizer=tokenizer,
                           max_examples=eval_cfg.max_examples)
  cameras = _cameras(data_cfg, eval_cfg.split)
  predictor = predictor_lib.Predictor(max_new_tokens=eval_cfg.max_new_tokens, temperature=eval_cfg.temperature,
                                      stop_ids=eval_cfg.stop, seed=eval_cfg.seed, mesh=mesh, rules=rules)
  # Warm-up (untimed): compile every fixed ratio and bucket once on the first batch, so the medians
  # below time execution only (a bucket may be used by few batches).
  batches = data.batches()
  first = next(batches)
  if hasattr(batches, "close"):
    batches.close()
  before = ab.compile_counts()
  frames = int(np.asarray(first["frame_mask"]).shape[1])
  scored, _ = ab.score_pass(gen_lib.model_variant(model, method=method, ratio=0.5), first, mesh=mesh, rules=rules)
  if reuse_scored and group_batches:
    ab.warm_rows(scored)
  for r in sorted(set(eval_cfg.ratios) | set(ab.valid_buckets(frames, model.config.windows_per_frame, buckets))):
    variant = gen_lib.model_variant(model, method=method if r > 0 else "none", ratio=r, budget="fixed")
    predictor(variant, first, generate=False)
    if r > 0 and r in buckets and reuse_scored:   # a bucket pass starts from the score pass
      predictor(variant, first, generate=False, scored=scored)
  after = ab.compile_counts()
  warmup_compilations = {k: after[k] - before[k] for k in after}
  fixed = []
  for r in sorted(set(eval_cfg.ratios)):
    variant = gen_lib.model_variant(model, method=method if r > 0 else "none", ratio=r, budget="fixed")
    predictor.reset_times()
    pt = _point(variant, data, eval_cfg, predictor, metric, cameras)
    total = sum(sum(v) for v in predictor.times.values())
    fixed.append({"ratio": r, **pt, "ms_per_video": 1e3 * total / max(pt["scored"], 1),
                  "seconds_per_batch": {st: statistics.median(v) for st, v in predictor.times.items() if v}})
  adaptive = []
  base = gen_lib.model_variant(model, method=method, ratio=0.5, budget="adaptive")   # ratio: per bucket
  for thr in thresholds:
    ad = ab.AdaptivePredictor(predictor, ab.rule_for(method, thr, buckets, rule), group_batches=group_batches,
                              reuse_scored=reuse_scored)
    pt = _point(base, data, eval_cfg, ad, metric, cameras)
    pt["threshold"] = float(thr)
    # every timed pass (score passes + bucket passes) per video: what the adaptive budget costs or saves
    pt["ms_per_video"] = 1e3 * ad.total_seconds() / max(pt["scored"], 1)
    pt["bucket_passes"] = {f"{r:g}": len(ts.get("vision", [])) for r, ts in sorted(ad.bucket_times.items())}
    pt["seconds_per_bucket_pass"] = {f"{r:g}": {st: statistics.median(v) for st, v in ts.items()}
                                     for r, ts in sorted(ad.bucket_times.items())}
    adaptive.append(pt)
  matched, vs05 = _comparisons(fixed, adaptive, lambda p: [p["correct"]], [0], resamples=resamples)
  return {"split": eval_cfg.split, "method": method, "rule": rule, "metric": metric, "buckets": list(buckets),
          "batch_size": data_cfg.batch_size, "group_batches": group_batches, "reuse_scored": reuse_scored,
          "mesh": dict(mesh.shape) if mesh is not None else None,
          "warmup_compilations": warmup_compilations,
          "thresholds": list(thresholds), "num_examples": len(data), "checkpoint": checkpoint,
          "fixed": fixed, "adaptive": adaptive, "matched": matched, "vs_fixed_05": vs05}


def plot(results: dict[str, Any], path: str) -> str:
  """Accuracy vs mean kept windows: fixed ratios and adaptive thresholds, all clips + per camera."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cams = sorted({c for p in results["fixed"] + results["adaptive"] for c in p["by_camera"]})
  panels = [("all clips", None)] + [(c, c) for c in cams]
  n = len(panels)
  cols = min(n, 4)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
  for ax, (title, cam) in zip(axes.ravel(), panels):
    for pts, label, style in ((results["fixed"], "fixed ratio", "o-"), (results["adaptive"], "adaptive", "s--")):
      if cam is None:
        xs = [p["kept_windows"] for p in pts]
        ys = [100 * p["accuracy"] for p in pts]
      else:
        xs = [p["by_camera"][cam]["kept_windows"] for p in pts if cam in p["by_camera"]]
        ys = [100 * p["by_camera"][cam]["accuracy"] for p in pts if cam in p["by_camera"]]
      order = np.argsort(xs)
      ax.plot(np.asarray(xs)[order], np.asarray(ys)[order], style, label=label)
    ax.set_title(title)
    ax.set_xlabel("mean kept windows per video")
    ax.set_ylabel("accuracy %")
    ax.grid(alpha=0.3)
  for ax in axes.ravel()[n:]:
    ax.axis("off")
  axes[0, 0].legend()
  seeds = f", seeds {','.join(map(str, results['seeds']))} (means)" if "seeds" in results else ""
  fig.suptitle(f"{results['method']} on {results['split']}: fixed vs adaptive budget "
               f"({results.get('rule', 'threshold')} rule{seeds})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _param(results: dict[str, Any]) -> str:
  """How an adaptive point is named: its score threshold, or its kept score-mass fraction."""
  return "mass" if results.get("rule") == "mass" else "thr"


def _num(x: Optional[float], fmt: str = ".1f", unit: str = "") -> str:
  return "-" if x is None else f"{x:{fmt}}{unit}"


def operating_point(results: dict[str, Any], min_fewer_pct: float = 25.0) -> Optional[dict[str, Any]]:
  """The operating point of a (val) sweep (docs/adaptive_budget.md): of the adaptive points keeping at
  least `min_fewer_pct` % fewer windows than fixed 0.5, the one with the highest lower bound of adaptive -
  fixed 0.5; ties (at the 0.1 points the tables print) go to the higher mean, then the smaller threshold.
  Returns its `vs_fixed_05` row, or None when no point keeps that many fewer windows."""
  rows = [v for v in results.get("vs_fixed_05") or []
          if v["fewer_windows_pct"] >= min_fewer_pct and v["adaptive_minus_fixed05"]]
  if not rows:
    return None
  return max(rows, key=lambda v: (round(100 * v["adaptive_minus_fixed05"]["lo"], 1),
                                  round(100 * v["adaptive_minus_fixed05"]["mean"], 1), -v["threshold"]))


def markdown(results: dict[str, Any]) -> str:
  """The tables of a sweep. "ms / video": every timed pass of the point (adaptive: score passes and
  bucket passes) over the scored videos; grouped or not as `group_batches` says."""
  par = _param(results)
  pooled = "seeds" in results

  def iv(x):
    return "-" if not x else f"{100 * x['mean']:+.1f} [{100 * x['lo']:+.1f}, {100 * x['hi']:+.1f}]"

  def per_seed(xs):
    return " | " + ("-" if not xs else " / ".join(_num(None if x["mean"] is None else 100 * x["mean"], "+.1f")
                                                  for x in xs)) if pooled else ""
  seed_col, seed_sep = (" per seed |", "---|") if pooled else ("", "")
  lines = [f"Split `{results['split']}`, method `{results['method']}`, {results['num_examples']} examples, "
           f"buckets {results['buckets']}, rule `{results.get('rule', 'threshold')}`; kept = vision windows per video."
           + (f" Seeds {results['seeds']} pooled: every number is the mean over the seeds, every interval a paired "
              "bootstrap over questions pooled over the seeds; `per seed`: each seed's difference." if pooled else ""), "",
           "| point | accuracy % | kept windows | ms / video | " + " | ".join(
               f"{c} acc / kept / bucket" for c in sorted(results['adaptive'][0]['by_camera'])) + " |"
           if results["adaptive"] else "| point | accuracy % | kept windows | ms / video |"]
  cams = sorted(results["adaptive"][0]["by_camera"]) if results["adaptive"] else []
  lines.append("|" + "---|" * (4 + len(cams)))
  for p in results["fixed"] + results["adaptive"]:
    name = f"fixed {p['ratio']:g}" if "ratio" in p else f"adaptive {par} {p['threshold']:g}"
    cells = []
    for c in cams:
      q = p["by_camera"].get(c)
      cells.append("-" if q is None else f"{100 * q['accuracy']:.1f} / {q['kept_windows']:.1f} / "
                   f"{q.get('mean_bucket', p.get('ratio', float('nan'))):.2f}")
    lines.append(f"| {name} | {100 * p['accuracy']:.1f} | {p['kept_windows']:.1f} | {_num(p.get('ms_per_video'))} | "
                 + " | ".join(cells) + " |")
  lines += ["", "Matched kept windows (adaptive point with the most kept windows not above the fixed ratio's):", "",
            f"| fixed ratio | fixed kept | adaptive {par} | adaptive kept | adaptive - fixed, points [95% paired CI] "
            "| time fixed / adaptive |" + seed_col, "|---|---|---|---|---|---|" + seed_sep]
  for m in results["matched"]:
    lines.append(f"| {m['fixed_ratio']:g} | {m['fixed_kept']:.1f} | {m['adaptive_threshold']} | "
                 f"{'-' if m['adaptive_kept'] is None else format(m['adaptive_kept'], '.1f')} | "
                 f"{iv(m['adaptive_minus_fixed'])} | {_num(m.get('fixed_over_adaptive_time'), '.2f', 'x')}"
                 + per_seed(m.get("adaptive_minus_fixed_per_seed")) + " |")
  if results["vs_fixed_05"]:
    lines += ["", "Against fixed 0.5:", "", f"| adaptive {par} | kept | fewer windows % | adaptive - fixed 0.5 [95% CI] "
              "| time fixed 0.5 / adaptive |" + seed_col, "|---|---|---|---|---|" + seed_sep]
    for v in results["vs_fixed_05"]:
      lines.append(f"| {v['threshold']:g} | {v['kept_windows']:.1f} | {v['fewer_windows_pct']:.1f} | "
                   f"{iv(v['adaptive_minus_fixed05'])} | {_num(v.get('fixed05_over_adaptive_time'), '.2f', 'x')}"
                   + per_seed(v.get("adaptive_minus_fixed05_per_seed")) + " |")
  if results["vs_fixed_05"] and results["split"] == "val":
    # chosen on val only: a test sweep is read at the val sweep's operating point
    op = operating_point(results)
    lines += ["", "Operating point (`adaptive_eval.operating_point`: of the points with >= 25 % fewer windows, the "
              "highest lower bound; ties: the higher mean, then the smaller value): " +
              ("none keeps 25 % fewer windows" if op is None else
               f"{par} {op['threshold']:g}, {op['kept_windows']:.1f} kept, {op['fewer_windows_pct']:.1f} % fewer, "
               f"{iv(op['adaptive_minus_fixed05'])}")]
  rows = []
  for p in results["fixed"]:
    if p.get("seconds_per_batch"):          # pooled seeds carry no pass timings
      rows.append((f"fixed {p['ratio']:g}", p["seconds_per_batch"]))
  for p in results["adaptive"]:
    for r, t in (p.get("seconds_per_bucket_pass") or {}).items():
      rows.append((f"adaptive {par} {p['threshold']:g}, bucket {r}", t))
  if rows:
    grouping = ("videos grouped by bucket across batches" if results.get("group_batches")
                else "one pass per bucket present in each batch")
    lines += ["", f"Seconds per pass of a full batch ({results.get('batch_size')} videos; median; every ratio and bucket "
              f"compiled in an untimed warm-up; adaptive: {grouping}):", "",
              "| pass | vision ms | prefill ms |", "|---|---|---|"]
    for name, t in rows:
      lines.append(f"| {name} | {1e3 * t.get('vision', float('nan')):.1f} | {1e3 * t.get('prefill', float('nan')):.1f} |")
  return "\n".join(lines) + "\n"


# Per-question outcomes of every point (what the paired bootstrap resampled): most of a sweep's bytes,
# so `write` keeps them out of adaptive.json, in a gzipped sidecar that `read` merges back.
PER_EXAMPLE_KEYS = ("correct", "per_example")
EXAMPLES_FILE = "adaptive_examples.json.gz"


def write(results: dict[str, Any], out_dir: str, extra: Optional[dict[str, Any]] = None) -> list[str]:
  """adaptive.json (summary + provenance in `extra`), adaptive_examples.json.gz (per-question outcomes of
  every fixed and adaptive point, in the same order), adaptive.md, adaptive.png in `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  res = dict(results, **(extra or {}))
  sidecar = {part: [{k: p[k] for k in PER_EXAMPLE_KEYS if k in p} for p in res.get(part, [])]
             for part in ("fixed", "adaptive")}
  summary = dict(res, **{part: [{k: v for k, v in p.items() if k not in PER_EXAMPLE_KEYS} for p in res.get(part, [])]
                         for part in ("fixed", "adaptive")})
  json_path, md_path, png_path = (os.path.join(out_dir, n) for n in ("adaptive.json", "adaptive.md", "adaptive.png"))
  paths = [json_path, md_path, png_path]
  if any(sidecar.values()):
    summary["examples_file"] = EXAMPLES_FILE
    paths.append(os.path.join(out_dir, EXAMPLES_FILE))
    with gzip.open(paths[-1], "wt") as f:
      json.dump(sidecar, f)
  with open(json_path, "w") as f:
    json.dump(summary, f, indent=1)
  with open(md_path, "w") as f:
    f.write(markdown(summary))
  plot(summary, png_path)
  return paths


def read(out_dir: str) -> dict[str, Any]:
  """The results `write` wrote to `out_dir`, per-question outcomes merged back into their points."""
  path = os.path.join(out_dir, "adaptive.json")
  with open(path) as f:
    res = json.load(f)
  name = res.pop("examples_file", None)
  if name:
    with gzip.open(os.path.join(out_dir, name), "rt") as f:
      sidecar = json.load(f)
    for part, rows in sidecar.items():
      if len(rows) != len(res[part]):
        raise ValueError(f"{out_dir}/{name}: {len(rows)} {part} points, adaptive.json has {len(res[part])}")
      res[part] = [dict(p, **r) for p, r in zip(res[part], rows)]
  return res


# What must agree between the sweeps `pool` combines: the same comparison, only the training seed differs.
_POOL_KEYS = ("split", "method", "rule", "metric", "buckets", "thresholds", "num_examples")


def _mean_point(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """One point of several seeds' sweeps: accuracy, kept windows, ms per video and per-camera numbers as
  means over the seeds (every seed scores the same questions), bucket histograms summed, `per_seed`."""
  out: dict[str, Any] = {k: points[0][k] for k in ("ratio", "threshold") if k in points[0]}
  for k in ("accuracy", "kept_windows", "ms_per_video"):
    vals = [p.get(k) for p in points]
    out[k] = float(np.mean(vals)) if all(v is not None for v in vals) else None
  out["scored"] = int(sum(p["scored"] for p in points))
  by_cam: dict[str, dict[str, Any]] = {}
  for cam in sorted(set().union(*(p["by_camera"] for p in points))):
    rows = [p["by_camera"][cam] for p in points if cam in p["by_camera"]]
    row = {"n": int(sum(r["n"] for r in rows)),
           "accuracy": float(np.mean([r["accuracy"] for r in rows])),
           "kept_windows": float(np.mean([r["kept_windows"] for r in rows]))}
    if all("mean_bucket" in r for r in rows):
      row["mean_bucket"] = float(np.mean([r["mean_bucket"] for r in rows]))
      hist: dict[str, int] = {}
      for r in rows:
        for b, c in r["buckets"].items():
          hist[b] = hist.get(b, 0) + int(c)
      row["buckets"] = dict(sorted(hist.items(), key=lambda kv: float(kv[0])))
    by_cam[cam] = row
  out["by_camera"] = by_cam
  out["per_seed"] = [{"accuracy": p["accuracy"], "kept_windows": p["kept_windows"]} for p in points]
  out["correct_seeds"] = [p["correct"] for p in points]   # for the comparisons; `pool` drops it
  return out


def pool(runs: Sequence[dict[str, Any]], seeds: Sequence[int], *, resamples: int = 10000) -> dict[str, Any]:
  """Several training seeds' sweeps (`read` results of the same comparison) -> one results dict of the
  `sweep` layout, pooled over seeds: every point's numbers are seed means (`per_seed` keeps each seed's),
  matched points are chosen on the seed-mean kept windows, and every comparison is the paired bootstrap
  over questions pooled over the seeds (`experiments.stats.paired_bootstrap`; each seed's interval in
  `*_per_seed`). Raises ValueError naming the first field on which two sweeps differ."""
  if len(runs) != len(seeds) or not runs:
    raise ValueError(f"pool: {len(runs)} sweeps for {len(seeds)} seeds")
  for k in _POOL_KEYS:
    vals = [r.get(k) for r in runs]
    if any(v != vals[0] for v in vals):
      raise ValueError(f"pool: sweeps differ in {k!r}: {vals}")
  for part, key in (("fixed", "ratio"), ("adaptive", "threshold")):
    vals = [[p[key] for p in r[part]] for r in runs]
    if any(v != vals[0] for v in vals):
      raise ValueError(f"pool: sweeps differ in their {part} points: {vals}")
  for r in runs:
    if not all("correct" in p for p in r["fixed"] + r["adaptive"]):
      raise ValueError("pool: a sweep has no per-question outcomes (read it with adaptive_eval.read)")
  fixed = [_mean_point([r["fixed"][i] for r in runs]) for i in range(len(runs[0]["fixed"]))]
  adaptive = [_mean_point([r["adaptive"][j] for r in runs]) for j in range(len(runs[0]["adaptive"]))]
  # matched on the seed-mean kept windows; each point's outcomes stay with the seeds' sweeps
  matched, vs05 = _comparisons(fixed, adaptive, lambda p: p["correct_seeds"], seeds, resamples=resamples,
                               per_seed=True)
  for p in fixed + adaptive:
    del p["correct_seeds"]
  return {**{k: runs[0][k] for k in _POOL_KEYS}, "seeds": [int(s) for s in seeds],
          "batch_size": runs[0].get("batch_size"), "group_batches": runs[0].get("group_batches"),
          "checkpoints": [r.get("checkpoint") for r in runs], "fixed": fixed, "adaptive": adaptive,
          "matched": matched, "vs_fixed_05": vs05}


__all__ = ["EXAMPLES_FILE", "PER_EXAMPLE_KEYS", "markdown", "operating_point", "plot", "pool", "read", "sweep",
           "write"]

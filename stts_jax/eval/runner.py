"""Compare pruning methods x ratios x frame counts on the same examples; JSON + markdown results.

`evaluate(model, data_cfg, eval_cfg)` runs every cell of `eval_cfg.cells(...)` with the same
parameters (`generate.model_variant`), the same examples and one `Predictor`:
  * accuracy from the configured evaluators (skipped examples listed, never in the denominator;
    more than `data.max_skipped_fraction` skipped stops the evaluation after the cell with
    `pipeline.TooManySkippedError` listing them),
  * kept LLM vision tokens per video and pruned prompt length,
  * median seconds per batch of the vision (ViT + pruning + adapter), prefill and decode stages,
    timed after `warmup` untimed passes over the first batch (so compilation is excluded),
  * compilations per stage in the cell (1 each for a new (method, ratio, frames); 0 when the same
    config was compiled before in this process).
Test-time scaling: every cell with more frames than the smallest frame count is paired with the
unpruned cell at that smallest count (`test_time_scaling` in the results), e.g. 2x frames at
ratio 0.5 against 1x frames unpruned: about the same LLM token budget.
"""

import dataclasses
import json
import logging
import math
import os
import statistics
from typing import Any, Optional

import jax
import numpy as np

from stts_jax import config as config_lib
from stts_jax.data.config import DataConfig
from stts_jax.eval import data as data_lib
from stts_jax.eval import evaluators as evaluators_lib
from stts_jax.eval import generate as gen_lib
from stts_jax.eval import predictor as predictor_lib
from stts_jax.eval.config import EvalConfig
from stts_jax.models import vlm

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CellResult:
  method: str
  ratio: float
  frames: int
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)     # median per batch, per stage
  compilations: dict[str, int] = dataclasses.field(default_factory=dict)
  num_batches: int = 0
  skipped_examples: list[dict[str, str]] = dataclasses.field(default_factory=list)
  records: dict[str, Any] = dataclasses.field(default_factory=dict)
  note: str = ""                                                          # why a cell was not run

  @property
  def key(self) -> str:
    return f"{self.method}@{self.ratio:g}x{self.frames}f"


def _evaluator_kwargs(name: str, eval_cfg: EvalConfig) -> dict[str, Any]:
  return {"modes": tuple(eval_cfg.mc_modes)} if name == "multiple_choice" else {}


def _progress(total: int, desc: str):
  if jax.process_index() != 0:
    return None
  import tqdm
  return tqdm.tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)


def run_cell(model: vlm.Molmo2, data: data_lib.EvalData, eval_cfg: EvalConfig, predictor: predictor_lib.Predictor,
             cell: CellResult, *, mesh=None, progress: bool = True) -> CellResult:
  """Evaluates one (method, ratio, frames) cell in place (see the module docstring)."""
  variant = gen_lib.model_variant(model, method=cell.method, ratio=cell.ratio if cell.method != "none" else 0.0)
  needs_gen = any(n == "open_ended" or "generate" in eval_cfg.mc_modes for n in eval_cfg.evaluators)
  before = predictor_lib.compile_counts()
  batches = data.batches()
  first = next(batches)
  if hasattr(batches, "close"):   # stop its prefetch (and worker processes) now
    batches.close()
  for _ in range(eval_cfg.warmup):
    predictor(variant, first, generate=needs_gen, step=0)
  predictor.reset_times()
  bar = _progress(data.num_batches() * len(eval_cfg.evaluators), f"eval {cell.key}") if progress else None
  for name in eval_cfg.evaluators:
    ev = evaluators_lib.from_name(name, predictor, data=data, mesh=mesh,
                                  progress=bar.update if bar is not None else None,
                                  **_evaluator_kwargs(name, eval_cfg))
    for key, value in ev.run(variant):
      cell.metrics[f"{name}/{key}"] = float(value)
    cell.skipped_examples = ev.details["skipped_examples"]
    cell.records[name] = ev.details["records"]
  if bar is not None:
    bar.close()
  data.check_skipped(f"eval {cell.key}")
  after = predictor_lib.compile_counts()
  cell.compilations = {k: after[k] - before[k] for k in after}
  cell.seconds = {k: statistics.median(v) for k, v in predictor.times.items() if v}
  cell.num_batches = len(predictor.times["vision"])
  return cell


def evaluate(model: vlm.Molmo2, data_cfg: DataConfig, eval_cfg: EvalConfig, *, tokenizer=None, mesh=None,
             rules: tuple = (), progress: bool = True, fresh_scorer: bool = False,
             checkpoint: str = "") -> dict[str, Any]:
  """All cells on one split -> the results dict (also what `write_results` stores)."""
  data_cfg.check_model(model.config)
  if eval_cfg.batch_size is not None:
    data_cfg = dataclasses.replace(data_cfg, batch_size=eval_cfg.batch_size)
  predictor = predictor_lib.Predictor(max_new_tokens=eval_cfg.max_new_tokens, temperature=eval_cfg.temperature,
                                      stop_ids=eval_cfg.stop, seed=eval_cfg.seed, mesh=mesh, rules=rules)
  datasets: dict[int, data_lib.EvalData] = {}
  cells = []
  for method, ratio, frames in eval_cfg.cells(data_cfg.max_frames):
    cell = CellResult(method, ratio, frames)
    cells.append(cell)
    if method == "stts" and (model.scorer is None or fresh_scorer):
      cell.note = ("not run: the model has no scorer" if model.scorer is None
                   else "not run: the checkpoint has no scorer weights (freshly initialised scorer)")
      log.warning("eval %s %s", cell.key, cell.note)
      continue
    if frames not in datasets:
      dcfg = data_lib.with_frames(data_cfg, frames, tokens_per_extra_frame=eval_cfg.tokens_per_extra_frame,
                                  max_fps=eval_cfg.max_fps)
      datasets[frames] = data_lib.EvalData(dcfg, model.config.tokens, eval_cfg.split, tokenizer=tokenizer,
                                           max_examples=eval_cfg.max_examples)
      tokenizer = datasets[frames].tokenizer
    run_cell(model, datasets[frames], eval_cfg, predictor, cell, mesh=mesh, progress=progress)
    log.info("eval %s: %s", cell.key, {k: round(v, 4) for k, v in cell.metrics.items()})
  first_data = next(iter(datasets.values()), None)
  return {
      "split": eval_cfg.split,
      "num_examples": len(first_data) if first_data is not None else 0,
      "checkpoint": checkpoint,
      "devices": jax.device_count(),
      "mesh": dict(mesh.shape) if mesh is not None else None,
      "eval_config": config_lib.to_dict(eval_cfg),
      "cells": [dataclasses.asdict(c) for c in cells],
      "test_time_scaling": scaling_pairs(cells),
      "skipped_examples": next((c.skipped_examples for c in cells if not c.note), []),
  }


def _accuracy_keys(cells: list[dict[str, Any]]) -> list[str]:
  keys: list[str] = []
  for c in cells:
    keys += [k for k in c["metrics"] if k.endswith("_accuracy") and k not in keys]
  return keys


def _stat(cell: dict[str, Any], name: str) -> float:
  for k, v in cell["metrics"].items():
    if k.endswith("/" + name):
      return float(v)
  return float("nan")


def scaling_pairs(cells: list[CellResult]) -> list[dict[str, Any]]:
  """Cells with more frames than the smallest count vs the unpruned cell at that count."""
  run = [c for c in cells if not c.note]
  if not run:
    return []
  base_frames = min(c.frames for c in run)
  base = next((c for c in run if c.frames == base_frames and c.method == "none"), None)
  if base is None:
    return []
  acc = lambda c: next((v for k, v in c.metrics.items() if k.endswith("_accuracy")), float("nan"))  # noqa: E731
  kept = lambda c: next((v for k, v in c.metrics.items() if k.endswith("/kept_tokens")), float("nan"))  # noqa: E731
  return [{"cell": c.key, "frames": c.frames, "method": c.method, "ratio": c.ratio, "accuracy": acc(c),
           "kept_tokens": kept(c), "base_cell": base.key, "base_accuracy": acc(base), "base_kept_tokens": kept(base)}
          for c in run if c.frames > base_frames]


def _fmt(x: Optional[float | int], digits: int = 1, scale: float = 1.0) -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * scale:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
  """The results table (one row per cell) plus skipped examples and test-time scaling."""
  cells = results["cells"]
  acc_keys = _accuracy_keys(cells)
  head = (["method", "ratio", "frames"] + [k.split("/")[-1].replace("_accuracy", " acc %") for k in acc_keys]
          + ["scored", "skipped", "kept tokens", "LLM tokens", "vision ms", "prefill ms", "decode ms", "speedup"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  base_time = {}
  for c in cells:
    if c["method"] == "none" and c["seconds"]:
      base_time[c["frames"]] = c["seconds"].get("vision", 0) + c["seconds"].get("prefill", 0)
  for c in cells:
    row = [c["method"], f"{c['ratio']:g}", str(c["frames"])]
    if c["note"]:
      lines.append("| " + " | ".join(row + [c["note"]] + [""] * (len(head) - 4)) + " |")
      continue
    row += [_fmt(c["metrics"].get(k, float("nan")), 1, 100.0) for k in acc_keys]
    row += [_fmt(_stat(c, "scored"), 0), _fmt(_stat(c, "skipped"), 0), _fmt(_stat(c, "kept_tokens")),
            _fmt(_stat(c, "prompt_tokens"))]
    row += [_fmt(c["seconds"].get(s, float("nan")), 1, 1e3) for s in predictor_lib.STAGES]
    t = c["seconds"].get("vision", 0) + c["seconds"].get("prefill", 0)
    row.append(_fmt(base_time[c["frames"]] / t, 2) + "x" if c["frames"] in base_time and t > 0 else "-")
    lines.append("| " + " | ".join(row) + " |")
  out = [f"Split `{results['split']}`: {results['num_examples']} examples; checkpoint `{results['checkpoint']}`.",
         "Times are medians per batch (compilation excluded); speedup = (vision + prefill) of `none` at the "
         "same frame count / this cell's.", "", *lines]
  skipped = results.get("skipped_examples") or []
  if skipped:
    out += ["", f"Skipped examples ({len(skipped)}, excluded from every accuracy):"]
    out += [f"- `{s['example_id']}`: {s['error']}" for s in skipped]
  if results.get("test_time_scaling"):
    out += ["", "Test-time scaling (vs the unpruned cell with the fewest frames):"]
    for s in results["test_time_scaling"]:
      out.append(f"- {s['cell']}: accuracy {_fmt(s['accuracy'], 1, 100.0)}% with {_fmt(s['kept_tokens'])} vision "
                 f"tokens vs {s['base_cell']}: {_fmt(s['base_accuracy'], 1, 100.0)}% with "
                 f"{_fmt(s['base_kept_tokens'])}")
  return "\n".join(out) + "\n"


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.integer, np.floating, np.bool_)):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_results(results: dict[str, Any], out_dir: str) -> tuple[str, str]:
  """results.json + results.md in `out_dir` (process 0 only); returns their paths."""
  json_path, md_path = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    with open(json_path, "w") as f:
      json.dump(_jsonable(results), f, indent=1)
    with open(md_path, "w") as f:
      f.write(markdown(results))
  return json_path, md_path


__all__ = ["CellResult", "evaluate", "markdown", "run_cell", "scaling_pairs", "write_results"]

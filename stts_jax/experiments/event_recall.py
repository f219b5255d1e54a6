"""Does a model answer when its token selection dropped the event? Recall and accuracy split by it.

On a dataset with a known event (the default dataset and its hard variant: manifest fields
`event_frames`, `event_window`), one row = (checkpoint, selection method, drop ratio): the model's
likelihood answers to the split's multiple-choice questions, and per question whether the kept
windows include the event (any event frame's event window: `data.oracle.event_kept` on the model's
own keep mask [T, W]). Reported per row: event recall, accuracy, accuracy with the event kept and
with it dropped (a bootstrap interval over those questions), each also per question type.

Accuracy far above chance (1 / options) with the event dropped means the answer reached the LLM
without the event's own tokens: from the *pattern* of kept windows (which windows of which frames
survived), which a selector that reacts to the event's change carries whether or not the event's
tokens survive, or from neighbouring windows. A comparison of selectors by accuracy then does not
measure which of them keeps the event.

Each row also reports the selection's window scores: the median over questions of the event
window's score (its highest over the event frames) and of the median score of the other windows
(frames >= 1). For a heuristic row that is the model's own frame-to-frame change, 1 - cos at block
`prune_at`: how much the event, and everything else, changes in the features the selection reads.
"""

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from stts_jax.data import oracle
from stts_jax.data.config import DataConfig
from stts_jax.eval import checkpoints
from stts_jax.eval import data as data_lib
from stts_jax.eval import evaluators as evaluators_lib
from stts_jax.eval import generate as gen_lib
from stts_jax.eval import predictor as predictor_lib
from stts_jax.experiments import stats


INIT = "init"   # a row's checkpoint: the config's model at its random initialisation


@dataclasses.dataclass(frozen=True)
class Row:
  """One evaluated selection: `name` (table label), the run or HF directory, the method it selects
  with ("stts", "heuristic", "random" or "none"), and the drop ratio."""
  name: str
  checkpoint: str
  method: str
  ratio: float = 0.5


def parse_rows(spec: str, ratio: float = 0.5) -> list[Row]:
  """`name=CHECKPOINT:method,...` -> rows (one-line error naming the bad item)."""
  rows = []
  for item in [s for s in spec.split(",") if s.strip()]:
    if "=" not in item or ":" not in item.split("=", 1)[1]:
      raise ValueError(f"--rows item {item!r}: expected name=CHECKPOINT:method")
    name, rest = item.split("=", 1)
    path, method = rest.rsplit(":", 1)
    if method not in ("stts", "heuristic", "random", "none"):
      raise ValueError(f"--rows item {item!r}: method must be stts | heuristic | random | none")
    rows.append(Row(name.strip(), path.strip(), method.strip(), ratio))
  return rows


def read_events(data_cfg: DataConfig, split: str) -> dict[str, dict[str, Any]]:
  """{question id: {"frames", "window", "qtype"}} from `{path}/{split}.jsonl` (one-line error on a
  line without the event fields)."""
  path = os.path.join(data_cfg.path, f"{split}.jsonl")
  out = {}
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      rec = json.loads(line)
      if "event_frames" not in rec or "event_window" not in rec:
        raise ValueError(f"{path}:{n}: no event_frames / event_window (not a default-dataset manifest)")
      out[str(rec["id"])] = {"frames": [int(x) for x in rec["event_frames"]], "window": int(rec["event_window"]),
                             "qtype": str(rec.get("qtype", ""))}
  return out


class _KeepRecorder:
  """A `Predictor` that also keeps each valid row's keep mask [T, W], by the batch's `example_id`."""

  def __init__(self, predictor: predictor_lib.Predictor):
    self.predictor = predictor
    self.keep: dict[int, np.ndarray] = {}
    self.scores: dict[int, np.ndarray] = {}

  def __call__(self, model, batch, *, generate: bool = True, step: int = 0):
    out = self.predictor(model, batch, generate=generate, step=step)
    valid = np.asarray(batch.get("valid", np.ones(len(batch["example_id"]), bool)), bool)
    for i in np.flatnonzero(valid):
      self.keep[int(batch["example_id"][i])] = np.asarray(out["keep_mask"][i])
      self.scores[int(batch["example_id"][i])] = np.asarray(out["scores"][i], np.float64)
    return out


def event_score_contrast(scores: np.ndarray, frames: Sequence[int], window: int) -> tuple[float, float]:
  """(the event window's highest score over its event frames >= 1, median score of the other windows
  of frames >= 1) of one video's scores [T, W]; nan where there is none (an event on frame 0 only)."""
  s = np.asarray(scores, np.float64)
  is_event = np.zeros(s.shape, bool)
  is_event[[t for t in frames if 0 < t < s.shape[0]], window] = True
  later = np.arange(s.shape[0])[:, None] >= 1
  event = s[is_event & later]
  others = s[~is_event & later]
  return (float(event.max()) if event.size else float("nan"),
          float(np.median(others)) if others.size else float("nan"))


def summarize(correct: Mapping[str, bool], kept: Mapping[str, bool], qtypes: Mapping[str, str], *,
              resamples: int = 10000) -> dict[str, Any]:
  """Recall and accuracies over the questions in both maps, overall and per question type."""

  def part(ids: Sequence[str]) -> dict[str, Any]:
    c = np.asarray([correct[q] for q in ids], float)
    k = np.asarray([kept[q] for q in ids], bool)
    ci = stats.bootstrap(c[None, ~k], np.ones((1, int((~k).sum())), bool), resamples=resamples)
    lo, hi = (ci.lo, ci.hi) if ci is not None else (float("nan"), float("nan"))
    return {"n": len(ids), "event_recall": float(k.mean()) if len(ids) else float("nan"),
            "accuracy": float(c.mean()) if len(ids) else float("nan"),
            "n_kept": int(k.sum()), "accuracy_event_kept": float(c[k].mean()) if k.any() else float("nan"),
            "n_dropped": int((~k).sum()),
            "accuracy_event_dropped": float(c[~k].mean()) if (~k).any() else float("nan"),
            "accuracy_event_dropped_ci": [lo, hi]}

  ids = sorted(set(correct) & set(kept))
  out = part(ids)
  out["by_qtype"] = {t: part([q for q in ids if qtypes.get(q) == t]) for t in sorted({qtypes.get(q, "") for q in ids})}
  return out


def evaluate_model(model, method: str, ratio: float, data_cfg: DataConfig, split: str,
                   events: Mapping[str, dict[str, Any]], *, max_examples: Optional[int] = None,
                   resamples: int = 10000) -> dict[str, Any]:
  """Answers every question of `split` with `model` selecting by `method` at `ratio`; summarises."""
  variant = gen_lib.model_variant(model, method=method, ratio=ratio if method != "none" else 0.0, budget="fixed")
  data = data_lib.EvalData(data_cfg, model.config.tokens, split, max_examples=max_examples)
  recorder = _KeepRecorder(predictor_lib.Predictor(max_new_tokens=1))
  ev = evaluators_lib.from_name("multiple_choice", recorder, data=data, modes=("likelihood",))
  metrics = dict(ev.run(variant))
  correct = {r["example_id"]: bool(r["correct"]) for r in ev.details["records"]["likelihood"] if r["status"] == "scored"}
  kept, qtypes, contrast = {}, {}, []
  for ex_row, keep in recorder.keep.items():
    qid = data.info(ex_row).id
    if qid not in events:
      raise KeyError(f"{split}: question {qid!r} has no event in the manifest")
    e = events[qid]
    kept[qid] = oracle.event_kept(keep, e["frames"], e["window"])
    qtypes[qid] = e["qtype"]
    contrast.append(event_score_contrast(recorder.scores[ex_row], e["frames"], e["window"]))
  res = summarize(correct, kept, qtypes, resamples=resamples)
  c = np.asarray(contrast, np.float64).reshape(-1, 2)
  res["score_event_median"] = float(np.nanmedian(c[:, 0])) if np.isfinite(c[:, 0]).any() else float("nan")
  res["score_others_median"] = float(np.nanmedian(c[:, 1])) if np.isfinite(c[:, 1]).any() else float("nan")
  res["likelihood_accuracy"] = float(metrics["likelihood_accuracy"])
  return res


def evaluate_row(row: Row, model_cfg, data_cfg: DataConfig, split: str, events: Mapping[str, dict[str, Any]], *,
                 batch_size: Optional[int] = None, max_examples: Optional[int] = None,
                 resamples: int = 10000) -> dict[str, Any]:
  """One row: load its checkpoint (`INIT`: the config's model at its random initialisation, seed 0,
  for the recall of a selection on untrained features; its answers are untrained), then `evaluate_model`."""
  if row.checkpoint == INIT:
    from flax import nnx
    from stts_jax.models import vlm
    model, info = vlm.Molmo2(model_cfg, rngs=nnx.Rngs(0)), {"fresh_scorer": model_cfg.stts.method == "stts"}
  else:
    model, info = checkpoints.load_model(row.checkpoint, model_cfg)
  if row.method == "stts" and info.get("fresh_scorer"):
    raise ValueError(f"{row.checkpoint}: method 'stts' needs a checkpoint with scorer weights")
  if batch_size:
    data_cfg = dataclasses.replace(data_cfg, batch_size=batch_size)
  res = evaluate_model(model, row.method, row.ratio, data_cfg, split, events, max_examples=max_examples,
                       resamples=resamples)
  res.update(name=row.name, checkpoint=row.checkpoint, method=row.method, ratio=row.ratio,
             checkpoint_step=info.get("step"))
  return res


def markdown(results: dict[str, Any]) -> str:
  pct = lambda x: "-" if x != x else f"{100 * x:.1f}"   # noqa: E731  (nan -> "-")
  lines = [f"Split `{results['split']}`, {results['num_questions']} questions; event kept = some event frame's event "
           "window is among the kept windows. `dropped acc` interval: bootstrap over those questions.", "",
           "| row | method @ratio | event recall % | accuracy % | acc, event kept % (n) | acc, event dropped % (n) [95% CI] | "
           "by type: recall / acc dropped | score: event / others (medians) |",
           "|---|---|---|---|---|---|---|---|"]
  for r in results["rows"]:
    lo, hi = r["accuracy_event_dropped_ci"]
    types = "; ".join(f"{t}: {pct(p['event_recall'])} / {pct(p['accuracy_event_dropped'])}" for t, p in r["by_qtype"].items())
    lines.append(f"| {r['name']} | {r['method']} @{r['ratio']:g} | {pct(r['event_recall'])} | {pct(r['accuracy'])} | "
                 f"{pct(r['accuracy_event_kept'])} ({r['n_kept']}) | {pct(r['accuracy_event_dropped'])} ({r['n_dropped']}) "
                 f"[{pct(lo)}, {pct(hi)}] | {types} | {r.get('score_event_median', float('nan')):.4f} / "
                 f"{r.get('score_others_median', float('nan')):.4f} |")
  return "\n".join(lines) + "\n"


def run(rows: Sequence[Row], model_cfg, data_cfg: DataConfig, split: str, *, batch_size: Optional[int] = None,
        max_examples: Optional[int] = None, resamples: int = 10000, progress=print) -> dict[str, Any]:
  events = read_events(data_cfg, split)
  out = []
  for row in rows:
    res = evaluate_row(row, model_cfg, data_cfg, split, events, batch_size=batch_size, max_examples=max_examples,
                       resamples=resamples)
    progress(f"{row.name}: recall {100 * res['event_recall']:.1f} %, accuracy {100 * res['accuracy']:.1f} %, "
             f"with the event dropped {100 * res['accuracy_event_dropped']:.1f} % of {res['n_dropped']}")
    out.append(res)
  return {"split": split, "data": data_cfg.path, "num_questions": max((r["n"] for r in out), default=0), "rows": out}


__all__ = ["INIT", "Row", "evaluate_model", "event_score_contrast", "markdown", "parse_rows", "read_events", "run",
           "summarize"]

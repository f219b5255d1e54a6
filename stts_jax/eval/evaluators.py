"""QA evaluators, big_vision style: `Evaluator(predict_fn, *, data, mesh, **kw)`; `run(model)` yields
`(name, value)` pairs and leaves per-example records in `evaluator.details`.

predict_fn(model, batch, *, generate: bool, step: int) -> dict of host arrays for the global batch
(`predictor.Predictor` is the real one): `option_logprobs [B, K]`, and with generate `tokens [B, N]`,
`num_tokens [B]`; optionally `num_kept [B]`, `prompt_tokens [B]`, `num_truncated [B]`.

Rows of a batch: `valid` -> scored; `skipped` (corrupt/missing video) -> listed with its reason and
left out of the denominator; neither -> padding, ignored. Bad manifest lines are listed as skipped
too. With several processes, each host's batch fields are gathered, so every host computes the
same global numbers.

Registered: "multiple_choice" (by option-letter likelihood and/or by the generated letter) and
"open_ended" (normalised exact match of the generated text).
"""

import abc
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional

import jax
import numpy as np

from stts_jax.eval import data as data_lib
from stts_jax.eval import metrics

REGISTRY: dict[str, type] = {}
_HOST_KEYS = ("example_id", "valid", "skipped", "error", "answer_index", "option_ids")


def register(name: str):
  def wrap(cls):
    REGISTRY[name] = cls
    cls.name = name
    return cls
  return wrap


def _gather(x: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


class Evaluator(abc.ABC):
  """Shared batch loop; subclasses set `generate` and implement `_new_accuracies` and `_score_row`."""
  name = "base"
  generate = False

  def __init__(self, predict_fn: Callable[..., Mapping[str, np.ndarray]], *, data: data_lib.EvalData,
               mesh: Optional[jax.sharding.Mesh] = None, progress: Optional[Callable[[int], None]] = None):
    self.predict_fn = predict_fn
    self.data = data
    self.mesh = mesh
    self.progress = progress
    self.details: dict[str, Any] = {}
    self.stats: dict[str, float] = {}

  def _passes(self, model) -> Iterator[tuple[dict[str, np.ndarray], Mapping[str, np.ndarray]]]:
    if getattr(self.predict_fn, "group_batches", False):
      # The predictor regroups rows across batches (adaptive budget): passes arrive in its order.
      for batch, preds, consumed in self.predict_fn.grouped_passes(model, self.data.batches(), generate=self.generate):
        yield {k: _gather(batch[k]) for k in _HOST_KEYS if k in batch}, preds
        if self.progress is not None and consumed:
          self.progress(consumed)
      return
    for step, batch in enumerate(self.data.batches()):
      preds = self.predict_fn(model, batch, generate=self.generate, step=step)
      host = {k: _gather(batch[k]) for k in _HOST_KEYS if k in batch}
      yield host, preds
      if self.progress is not None:
        self.progress(1)

  @abc.abstractmethod
  def _new_accuracies(self) -> dict[str, metrics.Accuracy]:
    """The accumulators this evaluator fills, by metric name."""

  def run(self, model) -> Iterator[tuple[str, float]]:
    accs = self._new_accuracies()
    for err in self.data.manifest_errors:
      for acc in accs.values():
        acc.skip(err.split(": ", 1)[0], err)
    kept, prompt, truncated = [], [], 0
    per_example: dict[str, dict[str, float]] = {}   # vision tokens (and adaptive bucket) per example id
    for host, preds in self._passes(model):
      for i in range(host["valid"].shape[0]):
        row = int(host["example_id"][i])
        if bool(host["skipped"][i]):
          info_id = self.data.info(row).id if row >= 0 else f"row-unknown-{i}"
          for acc in accs.values():
            acc.skip(info_id, data_lib.decode_error(host["error"][i]) if "error" in host else "skipped by the pipeline")
          continue
        if not bool(host["valid"][i]):
          continue
        info = self.data.info(row)
        self._score_row(accs, info, host, preds, i)
        if "num_kept" in preds:
          kept.append(int(preds["num_kept"][i]))
          per_example[info.id] = {"vision_tokens": int(preds["num_kept"][i])}
          if "bucket" in preds:
            per_example[info.id]["bucket"] = float(preds["bucket"][i])
        if "prompt_tokens" in preds:
          prompt.append(int(preds["prompt_tokens"][i]))
        truncated += int(preds["num_truncated"][i]) if "num_truncated" in preds else 0
    first = next(iter(accs.values()))
    self.stats = {"scored": first.num_scored, "skipped": first.num_skipped,
                  "kept_tokens": float(np.mean(kept)) if kept else float("nan"),
                  "prompt_tokens": float(np.mean(prompt)) if prompt else float("nan"),
                  "truncated_tokens": truncated}
    self.details = {"records": {k: [dataclasses.asdict(r) for r in a.records] for k, a in accs.items()},
                    "skipped_examples": first.skipped_examples(), "per_example": per_example}
    for key, acc in accs.items():
      yield f"{key}_accuracy", acc.accuracy
      yield f"{key}_correct", acc.num_correct
    yield from self.stats.items()

  @abc.abstractmethod
  def _score_row(self, accs, info, host, preds, i) -> None:
    """Scores valid row `i` of a batch into `accs`."""


@register("multiple_choice")
class MultipleChoice(Evaluator):
  """Accuracy by option-letter likelihood (`likelihood`) and/or by the generated letter (`generate`)."""

  def __init__(self, predict_fn, *, data, mesh=None, modes: tuple[str, ...] = ("likelihood", "generate"),
               progress=None):
    super().__init__(predict_fn, data=data, mesh=mesh, progress=progress)
    bad = [m for m in modes if m not in ("likelihood", "generate")]
    if bad or not modes:
      raise ValueError(f"multiple_choice: modes must be a non-empty subset of (likelihood, generate), got {modes}")
    self.modes = tuple(modes)
    self.generate = "generate" in self.modes

  def _new_accuracies(self):
    return {m: metrics.Accuracy() for m in self.modes}

  def _score_row(self, accs, info, host, preds, i):
    target = int(host["answer_index"][i])
    k = int(np.sum(host["option_ids"][i] >= 0))
    if target < 0 or k == 0:
      for acc in accs.values():
        acc.skip(info.id, "not a multiple-choice example (no options)")
      return
    if "likelihood" in accs:
      scores = np.asarray(preds["option_logprobs"][i][:k], np.float64)
      pred = int(np.argmax(scores))
      accs["likelihood"].add(info.id, pred == target, prediction=pred, target=target)
    if "generate" in accs:
      text = self.data.tokenizer.decode(preds["tokens"][i][:int(preds["num_tokens"][i])])
      pred = metrics.parse_letter(text, k, info.options)
      accs["generate"].add(info.id, pred == target, prediction=pred, target=target, text=text)


@register("open_ended")
class OpenEnded(Evaluator):
  """Normalised exact match of the generated answer with the reference answer."""
  generate = True

  def _new_accuracies(self):
    return {"exact_match": metrics.Accuracy()}

  def _score_row(self, accs, info, host, preds, i):
    text = self.data.tokenizer.decode(preds["tokens"][i][:int(preds["num_tokens"][i])])
    accs["exact_match"].add(info.id, metrics.exact_match(text, info.answer), prediction=text, target=info.answer)


def from_name(name: str, predict_fn, *, data, mesh=None, **kw) -> Evaluator:
  if name not in REGISTRY:
    raise ValueError(f"unknown evaluator {name!r}; registered: {sorted(REGISTRY)}")
  return REGISTRY[name](predict_fn, data=data, mesh=mesh, **kw)


__all__ = ["Evaluator", "MultipleChoice", "OpenEnded", "REGISTRY", "from_name", "register"]

"""Side-by-side timing of trained models, in one process: the train step and the prefill.

Interleaved rounds: every round times each variant once, on the same batch, one after the other,
so a shared machine's load drift hits all variants alike; the figure reported is the median over
rounds. Compilation is excluded: each function is compiled (or fetched from the compilation
cache) and called `warmup` times before the timed rounds, and every call ends with
`jax.block_until_ready`.

  train step  the exact `train.loop` step (`loop.make_step_fn`: forward, backward, optimizer
              update, sharded over the mesh) from the run's final checkpoint, on training batches
              of the run's data iterator (restored to where training stopped); the state is donated
              and carried from call to call, so the timing includes nothing but the step.
  prefill     time to the first generated token per batch: the eval `Predictor`'s vision stage
              (ViT, scoring, pruning, packing, adapter) + LLM prefill, on test batches.
"""

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax
import numpy as np

from stts_jax import config as config_lib
from stts_jax.data import pipeline
from stts_jax.data.config import DataConfig
from stts_jax.eval import predictor as predictor_lib
from stts_jax.train import checkpoint as ckpt_lib
from stts_jax.train import loop
from stts_jax.train import main as train_main
from stts_jax.parallel import sharding
from stts_jax.train.config import TrainConfig


@dataclasses.dataclass
class Timings:
  """Seconds per call of each variant, one entry per timed round."""
  seconds: dict[str, list[float]]
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def median(self, name: str) -> float:
    return statistics.median(self.seconds[name])

  def to_dict(self) -> dict[str, Any]:
    return {"median_s": {k: self.median(k) for k in self.seconds},
            "min_s": {k: min(v) for k, v in self.seconds.items()},
            "seconds": self.seconds, **self.extra}


@dataclasses.dataclass(frozen=True)
class TrainRun:
  """A finished training run to time: its model/train/data configs and workdir."""
  model: config_lib.ModelConfig
  train: TrainConfig
  data: DataConfig
  workdir: str


def _interleave(calls: Mapping[str, Callable[[int], Any]], *, warmup: int, repeats: int,
                progress: Optional[Callable[[int], None]]) -> dict[str, list[float]]:
  seconds: dict[str, list[float]] = {k: [] for k in calls}
  for i in range(warmup + repeats):
    for name, call in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call(i))
      if i >= warmup:
        seconds[name].append(time.perf_counter() - t0)
      if progress is not None:
        progress(1)
  return seconds


class _StatefulStep:
  """A compiled, donated train step with its state carried from call to call."""

  def __init__(self, run: TrainRun, mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]], num_batches: int):
    model_fn = train_main.model_builder(run.model, run.train.seed)
    graphdef, abs_state, shardings = loop.abstract_state(model_fn, run.train, mesh, rules)
    data_iter = pipeline.train_iterator(run.data, run.model.tokens, process_index=jax.process_index(),
                                        process_count=jax.process_count())
    ck = ckpt_lib.Checkpointer(os.path.join(os.path.abspath(run.workdir), "checkpoints"), async_save=False)
    try:
      step = ck.latest_step()
      if step is None:
        raise FileNotFoundError(f"{run.workdir}: no checkpoint to time (train it first)")
      self.state, _ = ck.restore(step, abs_state, data_iter)
    finally:
      ck.close()
    host = [loop.device_fields(next(data_iter)) for _ in range(num_batches)]
    self.batches = [sharding.shard_batch(b, mesh, rules) for b in host]
    batch_shardings = {k: v.sharding for k, v in self.batches[0].items()}
    step_fn = loop.make_step_fn(graphdef, shardings, batch_shardings, mesh, rules, run.train)
    with jax.set_mesh(mesh):
      t0 = time.perf_counter()
      self.compiled = step_fn.lower(self.state, self.batches[0]).compile()
      self.compile_seconds = time.perf_counter() - t0

  def __call__(self, i: int):
    self.state, metrics = self.compiled(self.state, self.batches[i % len(self.batches)])
    return self.state, metrics


def time_train_steps(runs: Mapping[str, TrainRun], mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]], *,
                     num_batches: int, warmup: int, repeats: int,
                     progress: Optional[Callable[[int], None]] = None) -> Timings:
  """Median seconds per train step of each run (module docstring), timed in interleaved rounds."""
  steps = {name: _StatefulStep(run, mesh, rules, num_batches) for name, run in runs.items()}
  with jax.set_mesh(mesh):
    seconds = _interleave(steps, warmup=warmup, repeats=repeats, progress=progress)
  extra = {"compile_s": {k: s.compile_seconds for k, s in steps.items()}, "batch_size": runs[next(iter(runs))].data.batch_size,
           "num_batches": num_batches, "warmup": warmup, "repeats": repeats}
  del steps
  return Timings(seconds, extra)


def time_prefill(models: Mapping[str, Any], batches: Sequence[Mapping[str, np.ndarray]], *,
                 mesh: Optional[jax.sharding.Mesh], rules: Sequence[tuple[str, Any]], warmup: int, repeats: int,
                 progress: Optional[Callable[[int], None]] = None) -> Timings:
  """Median seconds of vision + prefill per batch for each model variant (`Predictor` stages)."""
  predictors = {k: predictor_lib.Predictor(mesh=mesh, rules=rules) for k in models}
  packed: dict[str, list[bool]] = {k: [] for k in models}

  def call(name):
    def run(i):
      out = predictors[name](models[name], batches[i % len(batches)], generate=False, step=i % len(batches))
      packed[name].append(bool(out["packed"]))
      return out["option_logprobs"]
    return run

  seconds = _interleave({k: call(k) for k in models}, warmup=warmup, repeats=repeats, progress=progress)
  del seconds
  out: dict[str, list[float]] = {}
  stages: dict[str, dict[str, float]] = {}
  for name, p in predictors.items():
    vis, pre = p.times["vision"][warmup:], p.times["prefill"][warmup:]
    out[name] = [a + b for a, b in zip(vis, pre)]
    stages[name] = {"vision_s": statistics.median(vis), "prefill_s": statistics.median(pre)}
  return Timings(out, {"stages": stages, "packed_rate": {k: float(np.mean(v)) for k, v in packed.items()},
                       "batch_size": int(np.asarray(batches[0]["input_ids"]).shape[0]),
                       "warmup": warmup, "repeats": repeats})


__all__ = ["Timings", "TrainRun", "time_prefill", "time_train_steps"]

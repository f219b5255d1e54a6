"""Shared pieces of the multi-process tests: data, the toy-model run, batch bookkeeping.

The child processes (`toy_child.py`) and the in-process references both train through
`stts_jax.train.loop.run`, so a 2-process run and a 1-process run differ only in how the global
batch is assembled: each child feeds its own Grain shard (`process_index::process_count`), and
`GlobalBatches` concatenates the per-process iterators in process order, which is the global
batch `sharding.shard_batch` builds from the processes' rows.
"""

import json
import os

import numpy as np

from stts_jax.data import default_dataset, pipeline
from stts_jax.data.config import DataConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = default_dataset.Spec(num_clips=(16, 4, 4))   # 25 train examples: 12 per process of 2
GLOBAL_BATCH = 8


def build_dataset(out_dir: str) -> str:
  default_dataset.build(out_dir, SPEC, workers=1, with_tfds=False)
  return out_dir


def data_config(path: str, **kw) -> DataConfig:
  base = dict(batch_size=GLOBAL_BATCH, num_threads=1, prefetch_buffer=1)
  base.update(kw)
  return default_dataset.data_config(path, **base)


def data_iterator(path: str, process_index: int, process_count: int) -> pipeline.DataIterator:
  return pipeline.train_iterator(data_config(path), default_dataset.tiny_token_ids(),
                                 process_index=process_index, process_count=process_count)


class GlobalBatches:
  """The global batches of an N-process run, built in one process from N per-process iterators."""

  def __init__(self, iterators):
    self.iterators = list(iterators)

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self.iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return {"per_process": [it.get_state() for it in self.iterators]}

  def set_state(self, state):
    for it, s in zip(self.iterators, state["per_process"]):
      it.set_state(s)


class RaiseAt:
  """Wraps a data iterator; raises a RuntimeError when asked for batch number `at`."""

  def __init__(self, inner, at: int):
    self.inner, self.at, self.count = inner, at, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.count += 1
    if self.count == self.at:
      raise RuntimeError(f"injected failure while reading batch {self.at}")
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def toy_train(data_iter, workdir: str, *, steps: int, checkpoint_every: int = 0, on_step=None, mesh=None):
  """The toy video LM (tests/train/toy_model.py) on a (data 2, fsdp 2, tensor 2) mesh over all
  devices: parameters are sharded across the processes, not only the batch."""
  from stts_jax.parallel import sharding
  from stts_jax.train import loop
  from tests.train import helpers, toy_model
  cfg = helpers.train_cfg(num_steps=steps, checkpoint_every=checkpoint_every, log_example_ids=True,
                          tensorboard=True, progress_bar=True, optim={"eps": 1e-4})
  return loop.run(helpers.toy_model_fn(), data_iter, cfg, mesh or helpers.mesh_8(), sharding.make_rules(),
                  workdir, forward=toy_model.toy_forward, on_step=on_step)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def example_ids(workdir: str, process_count: int) -> list[list[list[int]]]:
  """[process][step - 1] -> that process's example ids at that step (from the run's own log)."""
  out = []
  for i in range(process_count):
    rows = read_jsonl(os.path.join(workdir, "example_ids", f"process_{i}-of-{process_count}.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    out.append([r["example_id"] for r in rows])
  return out

"""Shared builders for the training tests (toy model or Molmo2, synthetic batches)."""

import os
import signal

import jax
import numpy as np
from flax import nnx

from stts_jax.testing import synthetic_batches, tiny
from stts_jax.train import config as train_config
from stts_jax.parallel import mesh as mesh_lib
from stts_jax.parallel import sharding

from tests.train import toy_model

MODEL_CFG = tiny.tiny_model_config()


def toy_model_fn(seed: int = 0):
  return lambda: toy_model.ToyVideoLM(MODEL_CFG, rngs=nnx.Rngs(seed))


def train_cfg(**kw) -> train_config.TrainConfig:
  optim = kw.pop("optim", {})
  base = dict(num_steps=4, log_every=1, tensorboard=False, progress_bar=False, async_checkpoint=True,
              optim=train_config.OptimConfig(**{"learning_rate": 1e-2, "warmup_steps": 1, **optim}))
  base.update(kw)
  return train_config.TrainConfig(**base).validate()


def mesh_8():
  return mesh_lib.make_mesh(train_config.MeshConfig(data=2, fsdp=2, tensor=2))


def mesh_1():
  return mesh_lib.make_mesh(train_config.MeshConfig(data=1, fsdp=1, tensor=1),
                            devices=jax.devices()[:1])


def batches(batch_size=4, num_frames=3, seq_len=64, seed=0):
  return synthetic_batches.SyntheticBatches(MODEL_CFG, batch_size=batch_size, num_frames=num_frames,
                                            seq_len=seq_len, seed=seed)


class SigtermAt:
  """Wraps a data iterator; sends this process SIGTERM when handing out batch number `at`."""

  def __init__(self, inner, at: int):
    self.inner, self.at, self.count = inner, at, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.inner)
    self.count += 1
    if self.count == self.at:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def flat_arrays(state) -> dict[str, np.ndarray]:
  return {sharding.path_str(p): np.asarray(jax.device_get(v.get_value()))
          for p, v in nnx.to_flat_state(state) if hasattr(v.get_value(), "shape")}


def build_step(mesh, cfg, model_fn=None, forward=None, batch=None):
  """(graphdef, state, step_fn, device batch shardings) on `mesh` with the default rules."""
  from stts_jax.train import loop
  rules = sharding.make_rules()
  model_fn = model_fn or toy_model_fn()
  forward = forward or toy_model.toy_forward
  graphdef, state, shardings = loop.init_state(model_fn, cfg, mesh, rules)
  batch = batch if batch is not None else next(batches())
  batch_sh = sharding.data_sharding(loop.device_fields(batch), mesh, rules)
  step_fn = loop.make_step_fn(graphdef, shardings, batch_sh, mesh, rules, cfg, forward)
  return graphdef, state, step_fn


def put(batch, mesh):
  from stts_jax.train import loop
  return sharding.shard_batch(loop.device_fields(batch), mesh, sharding.make_rules())

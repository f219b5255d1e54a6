"""Checkpointer: state restored into another mesh's layout, per-process iterator files, config."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stts_jax.models import partitioning
from stts_jax.parallel import sharding
from stts_jax.train import checkpoint
from tests.train import helpers


class _Small(nnx.Module):
  def __init__(self, rngs):
    init = nnx.initializers.normal(1.0)
    self.w = nnx.Param(partitioning.with_names(init, ("embed", "mlp"))(rngs.params(), (8, 16)))
    self.b = nnx.Param(partitioning.with_names(init, ("mlp",))(rngs.params(), (16,)))


def _sharded_state(mesh):
  abstract = nnx.eval_shape(lambda: _Small(nnx.Rngs(0)))
  graphdef, abs_state = nnx.split(abstract)
  shardings = sharding.state_shardings(abs_state, mesh, sharding.make_rules())
  state = jax.jit(lambda: nnx.split(_Small(nnx.Rngs(0)))[1], out_shardings=shardings)()
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shardings)
  return state, target


@pytest.mark.multidevice
def test_restore_onto_other_mesh_with_iterator_and_config(tmp_path, caplog):
  state8, _ = _sharded_state(helpers.mesh_8())
  assert state8["w"].get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  it = helpers.batches(batch_size=2, num_frames=2, seq_len=40)
  for _ in range(5):
    next(it)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
  ckpt.save(5, state8, it, {"model": {"dtype": "float32"}, "name": "x"})
  ckpt.wait()
  assert ckpt.latest_step() == 5

  _, target1 = _sharded_state(helpers.mesh_1())          # elastic: 8 devices -> 1 device
  fresh = helpers.batches(batch_size=2, num_frames=2, seq_len=40)
  restored, config = ckpt.restore(5, target1, fresh)
  assert fresh.index == 5 and config == {"model": {"dtype": "float32"}, "name": "x"}
  w = restored["w"].get_value()
  assert len(w.sharding.device_set) == 1
  np.testing.assert_array_equal(np.asarray(w), np.asarray(state8["w"].get_value()))
  np.testing.assert_array_equal(np.asarray(restored["b"].get_value()), np.asarray(state8["b"].get_value()))

  # A run with another process count finds no iterator file of its own: model restored,
  # iterator left at its start, and a warning says so.
  it_dir = tmp_path / "ckpt" / "5" / "data_iter"
  os.rename(it_dir / "process_0-of-1.json", it_dir / "process_0-of-2.json")
  fresh = helpers.batches(batch_size=2, num_frames=2, seq_len=40)
  with caplog.at_level(logging.WARNING):
    restored, _ = ckpt.restore(5, target1, fresh)
  assert fresh.index == 0
  assert "no data iterator state for process_0-of-1.json" in caplog.text
  np.testing.assert_array_equal(np.asarray(restored["w"].get_value()), np.asarray(state8["w"].get_value()))
  ckpt.close()

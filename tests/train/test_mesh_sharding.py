"""Mesh from config, the rules table, spec derivation and the train/mesh config sections."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from stts_jax import config as config_lib
from stts_jax.train import config as train_config
from stts_jax.parallel import mesh as mesh_lib
from stts_jax.parallel import sharding


def test_mesh_shape_fills_one_axis_and_checks_product():
  mc = train_config.MeshConfig
  assert mesh_lib.mesh_shape(mc(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
  assert mesh_lib.mesh_shape(mc(data=-1, fsdp=1, tensor=1), 8) == (8, 1, 1)
  assert mesh_lib.mesh_shape(mc(data=1, fsdp=4, tensor=2), 8) == (1, 4, 2)
  with pytest.raises(ValueError, match="has 4 devices, but 8"):
    mesh_lib.mesh_shape(mc(data=1, fsdp=2, tensor=2), 8)
  with pytest.raises(ValueError, match="not divisible"):
    mesh_lib.mesh_shape(mc(data=3, fsdp=-1, tensor=1), 8)
  with pytest.raises(ValueError, match="at most one"):
    mc(data=-1, fsdp=-1).validate()


def test_make_mesh_axes_and_types():
  mesh = mesh_lib.make_mesh(train_config.MeshConfig(data=2, fsdp=-1, tensor=2))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_spec_for_rules_and_divisibility():
  mesh = mesh_lib.make_mesh(train_config.MeshConfig(data=2, fsdp=2, tensor=2))
  rules = sharding.make_rules()
  assert sharding.spec_for(("embed", "mlp"), (64, 128), mesh, rules) == P("fsdp", "tensor")
  assert sharding.spec_for(("vocab", "embed"), (640, 64), mesh, rules) == P(("tensor", "fsdp"), None)
  assert sharding.spec_for(("embed", "vocab"), (64, 640), mesh, rules) == P("fsdp", "tensor")
  assert sharding.spec_for(("layers", "vit_embed", "vit_mlp"), (6, 32, 64), mesh, rules) == \
      P(None, "fsdp", "tensor")
  # An axis that does not divide the dim is dropped (here tensor on 6, then fsdp on 3).
  assert sharding.spec_for(("vocab", "embed"), (6, 64), mesh, rules) == P("tensor", None)
  assert sharding.spec_for(("scorer_mlp",), (3,), mesh, rules) == P(None)
  assert sharding.spec_for(("norm",), (64,), mesh, rules) == P(None)
  with pytest.raises(ValueError, match="2 logical names"):
    sharding.spec_for(("embed", "mlp"), (64,), mesh, rules)


def test_rule_overrides_from_config():
  mc = train_config.MeshConfig(rules=(("mlp", "fsdp,tensor"), ("embed", ""), ("act_batch", "data")))
  rules = dict(sharding.make_rules(mc.validate()))
  assert rules["mlp"] == ("fsdp", "tensor") and rules["embed"] is None
  assert rules["act_batch"] == ("data",) and rules["vocab"] == ("tensor", "fsdp")
  with pytest.raises(ValueError, match="unknown mesh axis"):
    train_config.MeshConfig(rules=(("mlp", "model"),)).validate()


def test_data_sharding_and_shard_batch():
  mesh = mesh_lib.make_mesh(train_config.MeshConfig(data=2, fsdp=2, tensor=2))
  rules = sharding.make_rules()
  batch = {"input_ids": np.arange(4 * 6, dtype=np.int32).reshape(4, 6), "frame_mask": np.ones((4, 2), bool)}
  arrays = sharding.shard_batch(batch, mesh, rules)
  assert arrays["input_ids"].sharding.spec == P(("data", "fsdp"), None)
  assert arrays["input_ids"].addressable_shards[0].data.shape == (1, 6)
  np.testing.assert_array_equal(np.asarray(arrays["input_ids"]), batch["input_ids"])
  with pytest.raises(ValueError, match="not divisible by the 4 devices"):
    sharding.data_sharding({"input_ids": (6, 3)}, mesh, rules)


def test_train_sections_build_strictly():
  cfgs = config_lib.build(ml_collections.ConfigDict({"train": {"num_steps": 7, "optim": {"learning_rate": 3e-4, "freeze": ["vit/"]}},
                           "mesh": {"data": 2, "fsdp": -1}}))
  assert cfgs["train"].num_steps == 7 and cfgs["train"].optim.freeze == ("vit/",)
  assert cfgs["train"].decay_steps == 7
  assert cfgs["mesh"].fsdp == -1
  with pytest.raises(ValueError, match="unknown config keys"):
    config_lib.build(ml_collections.ConfigDict({"train": {"num_step": 7}}))
  with pytest.raises(ValueError, match="bad regex"):
    config_lib.build(ml_collections.ConfigDict({"train": {"optim": {"freeze": ["("]}}}))

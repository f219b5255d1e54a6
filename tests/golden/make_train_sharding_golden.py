"""Regenerates tests/golden/train_sharding.json: the PartitionSpec of every model parameter (and
its logical names) under the default rules on a data=2, fsdp=2, tensor=2 mesh, for the tiny STTS
model and the Molmo2-4B STTS config. Abstract only (no weights allocated).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
    .venv/bin/python tests/golden/make_train_sharding_golden.py
Review the diff before committing: a change means parameters moved between devices.
"""

import json
import os

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_sharding.json")


def current_specs() -> dict:
  import jax
  from flax import nnx

  from configs import molmo2_4b_stts, tiny
  from stts_jax import config as config_lib
  from stts_jax.train import config as train_config
  from stts_jax.train import main as train_main
  from stts_jax.parallel import mesh as mesh_lib
  from stts_jax.parallel import sharding

  mesh = mesh_lib.make_mesh(train_config.MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
  rules = sharding.make_rules()
  out = {}
  for name, cfg in (("tiny_stts", tiny.get_config("method=stts")),
                    ("molmo2_4b_stts", molmo2_4b_stts.get_config(None))):
    model_cfg = config_lib.build_model_config(cfg.model)
    abstract = nnx.eval_shape(train_main.model_builder(model_cfg, 0))
    state = nnx.state(abstract, nnx.Param)
    specs = sharding.describe_shardings(state, mesh, rules)
    names = {sharding.path_str(p): list(v.get_metadata().get("out_sharding") or ())
             for p, v in nnx.to_flat_state(state)}
    shapes = {sharding.path_str(p): list(v.get_value().shape) for p, v in nnx.to_flat_state(state)}
    out[name] = {k: {"spec": specs[k], "names": names[k], "shape": shapes[k]} for k in sorted(specs)}
  return out


if __name__ == "__main__":
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  with open(GOLDEN, "w") as f:
    json.dump(current_specs(), f, indent=1, sort_keys=True)
    f.write("\n")
  print(f"wrote {GOLDEN}")

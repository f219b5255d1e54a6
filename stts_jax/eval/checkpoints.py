"""Load a model for evaluation: our Orbax checkpoints (training runs) or an HF Molmo2 directory.

`load_model(path, model_cfg)` accepts
  * an HF checkpoint directory (`config.json` + safetensors): `stts_jax.weights.load_molmo2` with
    `model_cfg.stts`; a scorer the checkpoint lacks is freshly initialised and reported in
    `info["fresh_scorer"]` (an untrained scorer, so "stts" results would mean nothing);
  * an Orbax run: the training workdir, its `checkpoints/` directory, or one step directory
    `checkpoints/<step>`. Only the model part of the saved TrainState is read (partial restore:
    no optimizer state is allocated). The model config saved with the run (its `config` item)
    decides the parameter structure when it has a `model` section.
Parameters are restored straight into their final layout (the mesh's shardings, or device 0).
"""

import dataclasses
import glob
import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from flax import nnx

from stts_jax import config as config_lib
from stts_jax.models import vlm

log = logging.getLogger(__name__)


def is_hf_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json")) and bool(glob.glob(os.path.join(path, "*.safetensors")))


def _orbax_root(path: str) -> tuple[str, Optional[int]]:
  """(CheckpointManager directory, step or None) for a workdir, checkpoints dir or step dir."""
  path = os.path.abspath(path)
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
    return os.path.dirname(path), int(base)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None
  return path, None


def _shardings(abs_state, mesh, rules):
  if mesh is not None:
    from stts_jax.parallel import sharding
    return sharding.state_shardings(abs_state, mesh, rules)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda _: device, abs_state)


def load_orbax(path: str, model_cfg: config_lib.ModelConfig, *, step: Optional[int] = None,
               mesh: Optional[jax.sharding.Mesh] = None, rules: tuple = ()) -> tuple[vlm.Molmo2, dict[str, Any]]:
  root, dir_step = _orbax_root(path)
  step = dir_step if step is None else step
  manager = ocp.CheckpointManager(root, item_names=("state", "data_iter", "config"))
  try:
    if step is None:
      step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{path}: no Orbax checkpoint steps found under {root}")
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"] or {}
    if isinstance(saved, dict) and saved.get("model"):
      model_cfg = config_lib.build_model_config(saved["model"])
    abstract = nnx.eval_shape(lambda: vlm.Molmo2(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    shardings = _shardings(abs_state, mesh, rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shardings)
    item = {"model": nnx.to_pure_dict(target)}
    # Explicit restore args: the target's shardings, not the saved ones (whose device ids need
    # not exist here, e.g. a checkpoint written by another number of processes).
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                     partial_restore=True)))
  finally:
    manager.close()
  state = jax.tree.map(lambda x: x, abs_state)
  nnx.replace_by_pure_dict(state, restored["state"]["model"])
  model = nnx.merge(graphdef, state)
  return model, {"format": "orbax", "directory": root, "step": int(step), "fresh_scorer": []}


def load_model(path: str, model_cfg: config_lib.ModelConfig, *, step: Optional[int] = None,
               mesh: Optional[jax.sharding.Mesh] = None, rules: tuple = ()) -> tuple[vlm.Molmo2, dict[str, Any]]:
  """(model, info) from an HF directory or an Orbax run (module docstring). `info` has `format`,
  `fresh_scorer` (scorer params initialised at load: the scorer is untrained) and, for Orbax, `step`."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  if is_hf_dir(path):
    from stts_jax import weights
    if step is not None:
      raise ValueError("load_model: `step` applies to Orbax runs, not to an HF checkpoint directory")
    model, report = weights.load_molmo2_with_report(path, dtype=model_cfg.dtype, stts=model_cfg.stts)
    if mesh is not None:
      from stts_jax.parallel import sharding
      graphdef, state = nnx.split(model)
      model = nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh, rules)))
    return model, {"format": "hf", "directory": os.path.abspath(path), "fresh_scorer": list(report.fresh)}
  return load_orbax(path, model_cfg, step=step, mesh=mesh, rules=rules)


def with_scorer_config(model_cfg: config_lib.ModelConfig) -> config_lib.ModelConfig:
  """`model_cfg` with method "stts" (so an HF load builds the scorer slot for the "stts" cells)."""
  return dataclasses.replace(model_cfg, stts=dataclasses.replace(model_cfg.stts, method="stts")).validate()


__all__ = ["is_hf_dir", "load_model", "load_orbax", "with_scorer_config"]

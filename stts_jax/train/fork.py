"""Starting a pruning run from another run's checkpoint (`train.init_from`, `train.init_from_step`).

A pruning run with `train.prune_start` = k runs its first k steps unpruned: drop ratio 0, no scorer in
the path, so the scorer's gradients are exactly zero and every other parameter follows the same
trajectory as the unpruned run of the same config (same init, seed, data order). Instead of
recomputing those steps, the run starts from the unpruned run's checkpoint at step k (written there
by `train.keep_checkpoint_steps`, `loop.KEPT_DIR`):

  * every leaf the source holds (parameters, optimizer moments and counts, step counters) and the data
    iterator's position are restored from it;
  * the leaves only this run has (the learned scorer's parameters and their optimizer moments) start
    from this run's own init (after its scorer warm-up, which touches the scorer alone) and get the
    k optimizer updates with zero gradient the full run gives them: Adam's moments stay 0 but AdamW's
    decoupled weight decay still shrinks the scorer's matrices.

The result is the state the full run holds after its k-th step (`tests/train/test_fork.py` checks the
forked run against the full one). `TrainConfig.validate` holds `init_from_step` <= `prune_start`;
the caller vouches that the source run is this run's config with the pruning removed (`main_job`
forks only such pairs).
"""

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from stts_jax.parallel import sharding
from stts_jax.train import checkpoint as ckpt_lib

log = logging.getLogger(__name__)


def _flat(tree: Any) -> dict[str, Any]:
  """{'a/b/0/c': leaf} (`sharding.path_str`: the same names for an NNX pure dict and Orbax's restored one)."""
  return {sharding.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _is_array(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def zero_gradient_updates(graphdef: Any, state: nnx.State, shardings: Any, num_updates: int,
                          mesh: jax.sharding.Mesh) -> nnx.State:
  """`state` after `num_updates` optimizer updates with all-zero gradients (one compiled loop)."""

  def run(state):
    def body(_, s):
      ts = nnx.merge(graphdef, s)
      params = nnx.state(ts.model, ts.optimizer.wrt)
      ts.optimizer.update(ts.model, jax.tree.map(jnp.zeros_like, params))
      return nnx.state(ts)
    return jax.lax.fori_loop(0, num_updates, body, state)

  with jax.set_mesh(mesh):
    return jax.jit(run, in_shardings=(shardings,), out_shardings=shardings, donate_argnums=0)(state)


def start_from(graphdef: Any, state: nnx.State, shardings: Any, data_iter: Any, cfg: Any,
               mesh: jax.sharding.Mesh) -> tuple[nnx.State, dict[str, Any]]:
  """The freshly initialised `state` of this run moved to step `cfg.init_from_step` from the checkpoint
  in `cfg.init_from` (an Orbax checkpoint directory written by `ckpt_lib.Checkpointer`); `data_iter`
  is set to the source's position. Returns (state in `shardings`, summary)."""
  source = ckpt_lib.Checkpointer(cfg.init_from, async_save=False)
  try:
    if cfg.init_from_step not in source.all_steps():
      raise FileNotFoundError(f"train.init_from={cfg.init_from}: no checkpoint of step {cfg.init_from_step} "
                              f"(it has steps {source.all_steps()})")
    restored = source.manager.restore(cfg.init_from_step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), data_iter=ckpt_lib.DataIterRestore(data_iter)))
  finally:
    source.close()
  theirs = {k: v for k, v in _flat(restored["state"]).items() if _is_array(v)}
  ours = {k: v for k, v in _flat(nnx.to_pure_dict(state)).items() if _is_array(v)}
  extra = sorted(set(theirs) - set(ours))
  if extra:
    raise ValueError(f"train.init_from={cfg.init_from}: the source run has state this run lacks "
                     f"({len(extra)} leaves, e.g. {extra[0]}); it is not this run without pruning")
  wrong = [k for k in theirs if tuple(theirs[k].shape) != tuple(ours[k].shape) or
           np.dtype(theirs[k].dtype) != np.dtype(ours[k].dtype)]
  if wrong:
    k = wrong[0]
    raise ValueError(f"train.init_from={cfg.init_from}: {len(wrong)} leaves differ in shape or dtype, e.g. {k}: "
                     f"{theirs[k].shape} {theirs[k].dtype} vs this run's {ours[k].shape} {ours[k].dtype}")
  own = sorted(set(ours) - set(theirs))
  # A replicated scalar: any local shard holds it (also when the array spans several processes).
  step = theirs["optimizer/step"]
  updates = int(np.asarray(step.addressable_data(0) if isinstance(step, jax.Array) else step))
  if own:
    state = zero_gradient_updates(graphdef, state, shardings, updates, mesh)
  # The source's arrays keep the layout they were saved with; device_put moves them (and this run's
  # own leaves) into this run's shardings without gathering anything onto one host.
  pure = jax.tree_util.tree_map_with_path(
      lambda path, leaf: theirs.get(sharding.path_str(path), leaf), nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  state = jax.device_put(state, shardings)
  summary = {"init_from": cfg.init_from, "init_from_step": cfg.init_from_step, "restored_leaves": len(theirs),
             "own_leaves": len(own), "zero_gradient_updates": updates if own else 0}
  log.info("started from %s step %d: %d leaves restored, %d own leaves after %d zero-gradient updates",
           cfg.init_from, cfg.init_from_step, len(theirs), len(own), summary["zero_gradient_updates"])
  return state, summary


"""THE logical-axis rules table and the shardings derived from it.

Models name logical axes only (see `stts_jax/models/partitioning.py` for the names); this file
maps them onto the mesh axes ('data', 'fsdp', 'tensor') of `stts_jax/parallel/mesh.py`:

  weights                                 activations
  vocab       tensor, fsdp                act_batch      data, fsdp
  embed       fsdp                        act_heads      tensor
  q_heads     tensor                      act_kv_heads   tensor
  kv_heads    tensor                      act_mlp        tensor
  mlp         tensor                      act_vocab      tensor
  vit_embed   fsdp                        act_loss_batch data
  vit_heads   tensor                      act_loss_vocab tensor, fsdp
  vit_mlp     tensor                      act_frames, act_seq, act_patches,
  adapter_in  fsdp                        act_embed, act_vit_embed   replicated
  scorer_in   fsdp
  scorer_mlp  tensor
  norm, patch_in, vit_pos, layers         replicated

Within one array a mesh axis is used at most once, first come first served along the array's
dims: the embedding table `[vocab, embed]` is split over tensor*fsdp on its rows only (splitting
both of its dims made XLA rematerialise the lookup's gradient, stack_notes.md), while lm_head
`[embed, vocab]` gets embed->fsdp, vocab->tensor. A mesh axis whose size does not divide the
dimension is dropped for that array (e.g. the 4-entry scorer output or odd tiny-model widths),
so every config shards legally; `describe_shardings` shows what each param got.
The loss logits [B, K, V] (train/loss.py) use act_loss_batch x act_loss_vocab: the vocab takes the
FSDP axis that the batch holds everywhere else, so each device computes a vocab slice of the logits
from the (tiny) gathered hidden states of the whole micro-batch.
`MeshConfig.rules` overrides entries by logical name.
"""

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from stts_jax.models import partitioning
from stts_jax.parallel.config import MeshConfig

MeshAxes = Optional[tuple[str, ...]]

RULES: tuple[tuple[str, MeshAxes], ...] = (
    # weights
    ("vocab", ("tensor", "fsdp")),
    ("embed", ("fsdp",)),
    ("q_heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vit_embed", ("fsdp",)),
    ("vit_heads", ("tensor",)),
    ("vit_mlp", ("tensor",)),
    ("adapter_in", ("fsdp",)),
    ("scorer_in", ("fsdp",)),
    ("scorer_mlp", ("tensor",)),
    ("norm", None),
    ("patch_in", None),
    ("vit_pos", None),
    ("layers", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_heads", ("tensor",)),
    ("act_kv_heads", ("tensor",)),
    ("act_mlp", ("tensor",)),
    ("act_vocab", ("tensor",)),
    ("act_loss_batch", ("data",)),
    ("act_loss_vocab", ("tensor", "fsdp")),
    ("act_frames", None),
    ("act_seq", None),
    ("act_patches", None),
    ("act_embed", None),
    ("act_vit_embed", None),
)


def make_rules(cfg: Optional[MeshConfig] = None) -> tuple[tuple[str, MeshAxes], ...]:
  """The default table with `cfg.rules` overrides applied (by logical name)."""
  overrides: dict[str, MeshAxes] = {}
  for logical, axes in (cfg.rules if cfg is not None else ()):
    names = tuple(a.strip() for a in axes.split(",") if a.strip())
    overrides[logical] = names or None
  known = {name for name, _ in RULES}
  out = [(name, overrides.get(name, axes)) for name, axes in RULES]
  out += [(name, axes) for name, axes in overrides.items() if name not in known]
  return tuple(out)


def spec_for(names: Sequence[Optional[str]], shape: Sequence[int], mesh: jax.sharding.Mesh,
             rules: Sequence[tuple[str, Any]]) -> PartitionSpec:
  """PartitionSpec for an array with logical `names`; drops mesh axes that don't divide a dim."""
  if len(names) != len(shape):
    raise ValueError(f"sharding: {len(names)} logical names {tuple(names)} for shape {tuple(shape)}")
  spec = partitioning.logical_to_spec(names, rules)
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    kept: list[str] = []
    for a in axes:
      if dim % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
        kept.append(a)
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*out)


def _logical_names(var: nnx.Variable) -> Optional[tuple]:
  names = var.get_metadata().get("out_sharding")
  return tuple(names) if names else None


def state_shardings(state: Any, mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedSharding for every Variable of an NNX state (model, optimizer, counters).

  Variables with logical names (`out_sharding` metadata, also copied onto optimizer moments by
  `nnx.Optimizer`) follow the rules; everything else (step counts, scalars) is replicated.
  """
  def one(x):
    if isinstance(x, nnx.Variable):
      value = x.get_value()
      if not hasattr(value, "shape"):   # e.g. optax.MaskedNode (no arrays inside)
        return x
      names = _logical_names(x)
      shape = tuple(value.shape)
      spec = spec_for(names, shape, mesh, rules) if names else PartitionSpec()
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def describe_shardings(state: Any, mesh: jax.sharding.Mesh,
                       rules: Sequence[tuple[str, Any]]) -> dict[str, str]:
  """'/'-joined path -> str(PartitionSpec) for every array of `state` (for goldens and logs)."""
  out = {}
  for path, var in nnx.to_flat_state(state_shardings(state, mesh, rules)):
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    if isinstance(value, NamedSharding):
      out[path_str(path)] = str(tuple(value.spec))
  return out


def batch_spec(ndim: int, mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]],
               batch_size: Optional[int] = None) -> PartitionSpec:
  """Leading (batch) axis by the `act_batch` rule, the rest replicated."""
  names = ("act_batch",) + (None,) * (ndim - 1)
  if batch_size is None:
    return partitioning.logical_to_spec(names, rules)
  return spec_for(names, (batch_size,) + (1,) * (ndim - 1), mesh, rules)


def data_sharding(batch: Mapping[str, Any], mesh: jax.sharding.Mesh,
                  rules: Sequence[tuple[str, Any]]) -> dict[str, NamedSharding]:
  """NamedSharding per batch field. Values: arrays, ShapeDtypeStructs or shape tuples, all with
  the *global* shape; the leading axis is the batch and must divide over its mesh axes."""
  out = {}
  for key, x in batch.items():
    shape = tuple(x.shape) if hasattr(x, "shape") else tuple(x)
    if not shape:
      raise ValueError(f"batch field {key!r} is a scalar; every field needs a leading batch axis")
    spec = batch_spec(len(shape), mesh, rules)
    mesh_batch = math.prod(mesh.shape[a] for a in _axes(spec[0]))
    if shape[0] % mesh_batch:
      raise ValueError(f"batch field {key!r}: global batch {shape[0]} not divisible by the "
                       f"{mesh_batch} devices of its batch axes {spec[0]}")
    out[key] = NamedSharding(mesh, spec)
  return out


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                rules: Sequence[tuple[str, Any]]) -> dict[str, jax.Array]:
  """Host batch -> global jax.Arrays. Each process passes only its own rows (its Grain shard);
  the global batch is their concatenation in process order (`make_array_from_process_local_data`)."""
  nproc = jax.process_count()
  global_shapes = {k: (np.shape(v)[0] * nproc,) + np.shape(v)[1:] for k, v in local_batch.items()}
  shardings = data_sharding(global_shapes, mesh, rules)
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v), global_shapes[k])
          for k, v in local_batch.items()}


def path_str(path: Sequence[Any]) -> str:
  """NNX/pytree path -> 'a/b/0/c'."""
  parts = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        p = getattr(p, attr)
        break
    parts.append(str(p))
  return "/".join(parts)


def matches(patterns: Sequence[str], path: str) -> bool:
  return any(re.search(p, path) for p in patterns)

"""Logical axis names for parameters and activations.

Models name only *logical* axes; `stts_jax/parallel/sharding.py` owns the one table that maps
them to mesh axes ('data', 'fsdp', 'tensor'). Parameters carry their names as NNX variable
metadata (`nnx.with_partitioning`); activations are constrained at block boundaries through
`constrain`, which is a no-op unless a rules context is active (so unit tests run unsharded).

Parameter axis names (weights):
  vocab        embedding rows / lm_head outputs          embed      LLM width E
  q_heads      N*H (query heads x head dim, flattened)    kv_heads   K*H
  mlp          LLM / projector MLP hidden F               norm       norm scales (replicated)
  vit_embed    ViT width D                               vit_heads  ViT heads x head dim
  vit_mlp      ViT MLP hidden                            patch_in   flattened patch pixels (588)
  vit_pos      positional-embedding rows (P)             adapter_in concatenated taps C
  scorer_in    scorer MLP input 2D                       scorer_mlp scorer MLP hidden
  layers       stacked-layer axis added by nnx.vmap/scan
Activation axis names: act_batch, act_frames, act_seq, act_patches, act_embed, act_vit_embed,
  act_heads, act_kv_heads, act_mlp, act_vocab, and for the loss logits act_loss_batch, act_loss_vocab.
"""

import contextlib
import contextvars
from collections.abc import Sequence
from typing import Any, Optional

import jax
from flax import nnx

# (mesh, rules) while a sharded computation is being traced; None otherwise.
_ACTIVE: contextvars.ContextVar[Optional[tuple[Any, tuple]]] = contextvars.ContextVar(
    "stts_jax_partitioning", default=None)


def with_names(init, names: Sequence[Optional[str]]):
  """Wraps a parameter initializer so the variable records its logical axis names.

  `eager_sharding=False`: the names are *logical*; flax's default eager sharding would try to
  place the value on a mesh at creation (and fail without one, e.g. in unit tests). Placement
  comes from the rules table instead (sharded init under jit with out_shardings).
  """
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


@contextlib.contextmanager
def activation_rules(mesh, rules: Sequence[tuple[str, Any]]):
  """Makes `constrain` map logical names through `rules` onto `mesh` inside the block."""
  token = _ACTIVE.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def logical_to_spec(names: Sequence[Optional[str]], rules: Sequence[tuple[str, Any]]):
  """Maps logical names to a PartitionSpec; a mesh axis is used at most once per array."""
  table: dict[str, Any] = {}
  for logical, mesh_axes in rules:
    table.setdefault(logical, mesh_axes)
  used: set[str] = set()
  spec = []
  for name in names:
    mesh_axes = table.get(name) if name is not None else None
    if mesh_axes is None:
      spec.append(None)
      continue
    axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return jax.sharding.PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
  """Sharding constraint on an activation by logical names; identity without active rules."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  if len(names) != x.ndim:
    raise ValueError(f"constrain: {len(names)} names for an array of rank {x.ndim}")
  spec = logical_to_spec(names, rules)
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

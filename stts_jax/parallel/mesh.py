"""The device mesh ('data', 'fsdp', 'tensor') from a MeshConfig.

Axis types are `Auto` (classic GSPMD): parameters and batches get their layout from the
`NamedSharding`s of `jax.jit` in/out shardings and activations from `with_sharding_constraint`
at block boundaries (`stts_jax.models.partitioning.constrain`); XLA propagates the rest. Explicit
axes would make every op's output sharding part of its type, which the models do not annotate.
"""

import math
from collections.abc import Sequence
from typing import Optional

import jax
from jax.sharding import AxisType

from stts_jax.parallel.config import MeshConfig

AXES = ("data", "fsdp", "tensor")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """Fills the one -1 entry with the remaining devices; the product must equal `num_devices`."""
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices not divisible by the fixed axes "
                       f"{dict(zip(AXES, sizes))} (product {known})")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh: {dict(zip(AXES, sizes))} has {math.prod(sizes)} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """Mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)

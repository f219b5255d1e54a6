"""The `mesh` section of the top-level config (MeshConfig), registered on import.

Example (configs/*.py):
  config.mesh = dict(data=1, fsdp=-1, tensor=1)
"""

import dataclasses

from stts_jax import config as config_lib


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh ('data', 'fsdp', 'tensor'). One size may be -1 (= the remaining devices).

  rules: overrides of the logical-axis rules table (`stts_jax/parallel/sharding.py: RULES`), as
    (logical name, mesh axes) pairs; mesh axes are comma-separated ("data,fsdp") or "" (replicated).
    An override replaces the default entry of that logical name.
  """
  data: int = 1
  fsdp: int = -1
  tensor: int = 1
  rules: tuple[tuple[str, str], ...] = ()

  def validate(self):
    sizes = (self.data, self.fsdp, self.tensor)
    if sum(s == -1 for s in sizes) > 1:
      raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"mesh: sizes must be positive or -1, got {sizes}")
    for logical, axes in self.rules:
      for a in filter(None, axes.split(",")):
        if a.strip() not in ("data", "fsdp", "tensor"):
          raise ValueError(f"mesh.rules: {logical!r} -> unknown mesh axis {a!r}")
    return self



def build_mesh_config(cfg) -> MeshConfig:
  return config_lib.from_dict(MeshConfig, cfg, "mesh").validate()


config_lib.register_section("mesh", build_mesh_config)

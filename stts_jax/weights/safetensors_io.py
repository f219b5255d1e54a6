"""Reading and writing safetensors checkpoints (single file or sharded with an index), lazily.

`open_checkpoint(dir)` returns `{tensor name: zero-argument loader}` so a large checkpoint is read
one tensor at a time (numpy arrays; bfloat16 through ml_dtypes).
"""

import json
import os
from collections.abc import Callable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

Loader = Callable[[], np.ndarray]


def _file_loaders(path: str) -> dict[str, Loader]:
  with safe_open(path, framework="np") as f:
    names = list(f.keys())

  def loader(name):
    def load():
      with safe_open(path, framework="np") as f:
        return f.get_tensor(name)
    return load

  return {name: loader(name) for name in names}


def open_checkpoint(checkpoint_dir: str) -> dict[str, Loader]:
  """Tensor loaders of `model.safetensors`, or of every shard listed in `model.safetensors.index.json`."""
  index_path = os.path.join(checkpoint_dir, INDEX_FILE)
  single_path = os.path.join(checkpoint_dir, SINGLE_FILE)
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
    loaders: dict[str, Loader] = {}
    for shard in sorted(set(weight_map.values())):
      shard_loaders = _file_loaders(os.path.join(checkpoint_dir, shard))
      missing = sorted(n for n, s in weight_map.items() if s == shard and n not in shard_loaders)
      if missing:
        raise ValueError(f"{shard}: tensors listed in {INDEX_FILE} are missing: {missing[:10]}")
      loaders.update(shard_loaders)
    return loaders
  if os.path.exists(single_path):
    return _file_loaders(single_path)
  raise FileNotFoundError(f"{checkpoint_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def write_checkpoint(checkpoint_dir: str, tensors: dict[str, np.ndarray]) -> str:
  """Writes `model.safetensors` (torch-readable metadata); returns its path."""
  os.makedirs(checkpoint_dir, exist_ok=True)
  path = os.path.join(checkpoint_dir, SINGLE_FILE)
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata={"format": "pt"})
  return path

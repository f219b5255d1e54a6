"""Provenance of result files: which command, commit and machine produced them.

  record(command=None) -> {"command", "commit": {"commit", "dirty"}, "machine": {...}, "date"}
  copy_with_provenance(files, out_dir, prov, **extra) -> {name: path written}

The commit and machine come from `stts_jax.train.aot.git_commit` / `aot.machine`, the helpers the
benchmark (`bench/main.py`) and the AOT reports already record; `dirty` means tracked files had
uncommitted changes. `copy_with_provenance` is how a job puts its result files into a directory
meant to be committed (docs/results/...), next to a provenance.json that says where they came from.
"""

import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Mapping
from typing import Any, Optional

from stts_jax.train import aot


def record(command: Optional[str] = None) -> dict[str, Any]:
  """command (default: this process's command line, `python` plus sys.argv, shell-quoted), git
  commit and dirty flag, machine (host, platform, CPU count, python, jax, backend, XLA_FLAGS) and the
  UTC date."""
  if command is None:
    command = shlex.join([os.path.basename(sys.executable)] + sys.argv)
  return {"command": command, "commit": aot.git_commit(), "machine": aot.machine(),
          "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def copy_with_provenance(files: Mapping[str, str], out_dir: str, prov: Mapping[str, Any],
                         **extra: Any) -> dict[str, str]:
  """Copies `files` ({relative name in out_dir: source path}) into `out_dir` and writes
  out_dir/provenance.json: `prov` plus `extra` plus the list of copied names. Returns {name: path}."""
  out = {}
  for name, src in files.items():
    dst = os.path.join(out_dir, name)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    out[name] = shutil.copy2(src, dst)
  path = os.path.join(out_dir, "provenance.json")
  with open(path, "w") as f:
    json.dump({**prov, **extra, "files": sorted(out)}, f, indent=1)
  return {"provenance.json": path, **out}


__all__ = ["copy_with_provenance", "record"]

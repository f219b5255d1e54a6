"""Transparent huge pages for the host allocator, so XLA:CPU's per-call buffers stop page-faulting.

XLA:CPU allocates an executable's temp buffer (a train step's activations: 1.6 GiB for
configs/bench_cpu.py at 32 frames) afresh on every call. glibc serves allocations that large with a
fresh mmap, so every call faults the whole buffer in again, 4 KiB at a time: 418k page faults per
step, a quarter of its CPU time spent in the kernel, and more for pruned steps (their step is
shorter, the faults are not), which skews every speedup measured on CPU. With the glibc tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc advises its mmaps for transparent huge pages
(2 MiB): ~1k faults per step (measured by scripts/benchmark.py, docs/benchmark.md).

The kernel still hands out (and zeroes) fresh huge pages on every call, and when it has to compact
memory to find them a step takes up to 2x longer: fine for training (the mean improves), bad for a
benchmark that compares single calls. `steady=True` (scripts/benchmark.py) therefore also keeps
freed memory in the process: one malloc arena (`arena_max=1`) whose heap serves the large buffers
(`mmap_threshold`) and is never trimmed (`trim_threshold`), so after the first calls a step
page-faults nothing (0 faults, step times within ~2%), at ~25% more CPU time from the shared arena
for every cell alike.

Tunables are read once at process start, so `reexec_with_hugepages()` (first thing in the scripts,
before JAX is imported) restarts the same command line with them set; the process keeps its pid.
Nothing happens off glibc/Linux, when the kernel has THP off ("never"), when the tunable is already
set, or with STTS_JAX_HUGEPAGES=0.

  hugepage_env(environ, libc_version, thp_mode, steady) -> environment to restart with, or None (pure)
  reexec_with_hugepages(steady)                         -> restarts the process when that is not None
"""

import os
import re
import sys
from collections.abc import Mapping
from typing import Optional

TUNABLE = "glibc.malloc.hugetlb"
# Keep large freed buffers in one never-trimmed heap (values: 16 GiB, 1 TiB; glibc accepts them).
STEADY_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_threshold=17179869184",
                   "glibc.malloc.trim_threshold=1099511627776")
OPT_OUT = "STTS_JAX_HUGEPAGES"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def libc_version() -> Optional[tuple[int, int]]:
  """(major, minor) of glibc, or None on another C library or platform."""
  try:
    text = os.confstr("CS_GNU_LIBC_VERSION")   # "glibc 2.36"
  except (AttributeError, ValueError, OSError):
    return None
  m = re.fullmatch(r"glibc (\d+)\.(\d+).*", text or "")
  return (int(m.group(1)), int(m.group(2))) if m else None


def thp_mode(path: str = _THP_MODE) -> Optional[str]:
  """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None if unknown."""
  try:
    with open(path) as f:
      m = re.search(r"\[(\w+)\]", f.read())
  except OSError:
    return None
  return m.group(1) if m else None


def hugepage_env(environ: Mapping[str, str], libc: Optional[tuple[int, int]],
                 thp: Optional[str], steady: bool = False) -> Optional[dict[str, str]]:
  """The environment to restart with (`environ` plus glibc.malloc.hugetlb=1, and with `steady` the
  `STEADY_TUNABLES`, appended to GLIBC_TUNABLES), or None when a restart would not help or is not
  wanted."""
  if environ.get(OPT_OUT, "1") == "0" or libc is None or libc < (2, 35) or thp in (None, "never"):
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE + "=" in tunables:   # set (by us before the restart, or by the user): leave it
    return None
  added = [f"{TUNABLE}=1", *(STEADY_TUNABLES if steady else ())]
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(([tunables] if tunables else []) + added)
  return env


def _interactive() -> bool:
  """Inside IPython/Jupyter (e.g. `%run scripts/train.py`) or an interactive interpreter, where a
  restart would replace the kernel or the session rather than the script."""
  return "IPython" in sys.modules or hasattr(sys, "ps1") or bool(sys.flags.interactive)


def reexec_with_hugepages(steady: bool = False) -> None:
  """Restarts this process's command line with `hugepage_env`, if that is not None (no return).
  Not on other platforms, nor in an interactive session (`_interactive`)."""
  if not sys.platform.startswith("linux") or _interactive():
    return
  env = hugepage_env(os.environ, libc_version(), thp_mode(), steady)
  if env is None:
    return
  # orig_argv keeps the interpreter's own options and `-m module`, which sys.argv drops.
  argv = [sys.executable, *sys.orig_argv[1:]]
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, env)


__all__ = ["hugepage_env", "libc_version", "reexec_with_hugepages", "thp_mode", "TUNABLE", "OPT_OUT"]

"""stts_jax.hostmem: the restart under glibc.malloc.hugetlb=1 and what it buys (page faults)."""

import os
import subprocess
import sys

import pytest

from stts_jax import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPPORTED = sys.platform.startswith("linux") and (hostmem.libc_version() or (0, 0)) >= (2, 35) \
    and hostmem.thp_mode() not in (None, "never")


def test_hugepage_env_appends_the_tunable_once():
  env = hostmem.hugepage_env({"PATH": "/bin"}, (2, 36), "madvise")
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  env = hostmem.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 35), "always")
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  # already set (after the restart, or by the user, to any value): no second restart
  assert hostmem.hugepage_env(env, (2, 36), "madvise") is None
  assert hostmem.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise") is None


def test_steady_env_also_keeps_freed_memory_in_one_heap():
  env = hostmem.hugepage_env({}, (2, 36), "madvise", steady=True)
  assert env["GLIBC_TUNABLES"].split(":") == ["glibc.malloc.hugetlb=1", *hostmem.STEADY_TUNABLES]
  assert "glibc.malloc.arena_max=1" in hostmem.STEADY_TUNABLES


@pytest.mark.parametrize("environ,libc,thp", [
    ({}, (2, 34), "madvise"),              # the tunable came with glibc 2.35
    ({}, None, "madvise"),                 # musl, macOS
    ({}, (2, 36), "never"),                # THP off in the kernel
    ({}, (2, 36), None),                   # no THP interface
    ({"STTS_JAX_HUGEPAGES": "0"}, (2, 36), "madvise"),   # opted out
])
def test_hugepage_env_none_when_it_cannot_help_or_is_unwanted(environ, libc, thp):
  assert hostmem.hugepage_env(environ, libc, thp) is None


def test_no_restart_in_an_interactive_session(monkeypatch):
  """Under IPython (`%run scripts/train.py` in a notebook) a restart would replace the kernel."""
  monkeypatch.setitem(sys.modules, "IPython", object())
  monkeypatch.setattr(hostmem.os, "execve", lambda *a: pytest.fail("restarted an interactive session"))
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv("STTS_JAX_HUGEPAGES", raising=False)
  hostmem.reexec_with_hugepages()


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert hostmem.thp_mode(str(path)) == "madvise"
  assert hostmem.thp_mode(str(tmp_path / "missing")) is None


_CHILD = """
import os, resource, sys
sys.path.insert(0, {root!r})
print("start", os.getpid(), flush=True)
from stts_jax import hostmem
hostmem.reexec_with_hugepages()
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):   # as XLA:CPU's temp buffers (numpy madvises its own large arrays)
  p = libc.malloc(256 << 20)   # mmap'd by malloc, then touched whole
  libc.memset(p, 1, 256 << 20)
  libc.free(p)
print("tunables", os.environ.get("GLIBC_TUNABLES"), "faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run_child(**env):
  proc = subprocess.run([sys.executable, "-c", _CHILD.format(root=ROOT)], capture_output=True, text=True,
                        env={k: v for k, v in dict(os.environ, **env).items() if v is not None}, check=True)
  lines = proc.stdout.split("\n")
  starts = [line.split()[1] for line in lines if line.startswith("start")]
  tunables, faults = next(line.split()[1::2] for line in lines if line.startswith("tunables"))
  return starts, tunables, int(faults)


@pytest.mark.skipif(not SUPPORTED, reason="needs Linux with glibc >= 2.35 and transparent huge pages")
def test_restart_sets_the_tunable_keeps_the_pid_and_cuts_page_faults():
  starts, tunables, faults = _run_child(GLIBC_TUNABLES=None, STTS_JAX_HUGEPAGES=None)
  assert tunables == "glibc.malloc.hugetlb=1"
  assert len(starts) == 2 and starts[0] == starts[1]      # ran twice, in the same process (exec)
  starts_off, tunables_off, faults_off = _run_child(GLIBC_TUNABLES=None, STTS_JAX_HUGEPAGES="0")
  assert tunables_off == "None" and len(starts_off) == 1
  if hostmem.thp_mode() == "madvise":   # with "always" the kernel uses huge pages either way
    # 1 GiB touched: 262144 faults of 4 KiB pages without, ~512 of 2 MiB pages with
    assert faults_off > 200_000 and faults < faults_off / 20, (faults, faults_off)

"""The local launcher's supervision (plain Python children, no JAX: fast) and the argument
checks / step watchdog of `stts_jax.train.distributed`."""

import os
import subprocess
import sys
import textwrap

import pytest

from stts_jax.train import distributed, launch
from tests.multihost import common


class _Lines:
  def __init__(self):
    self.lines: list[str] = []

  def write(self, text: str) -> None:
    self.lines.extend(text.splitlines())

  def flush(self) -> None:
    pass


def _script(tmp_path, body: str) -> str:
  """A child that parses the launcher's flags and runs `body` with `pid` = its process id."""
  path = tmp_path / "child.py"
  path.write_text(textwrap.dedent("""
      import signal, sys, time
      args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
      pid = int(args["process_id"])
      assert int(args["num_processes"]) == 3 and args["coordinator"].startswith("127.0.0.1:")
  """) + textwrap.dedent(body))
  return str(path)


def test_process_env_sets_device_count_and_keeps_other_flags():
  env = launch.process_env({"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8", "A": "b"}, 4)
  assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=4"]
  assert env["JAX_PLATFORMS"] == "cpu" and env["PYTHONUNBUFFERED"] == "1" and env["A"] == "b"


def test_all_succeed_and_output_is_prefixed(tmp_path):
  out = _Lines()
  result = launch.launch([_script(tmp_path, "print(f'hello from {pid}'); print('bar\\rdone')")], num_processes=3,
                         devices_per_process=2, out=out)
  assert result.ok and result.returncodes == [0, 0, 0] and result.culprit is None
  for i in range(3):
    assert f"[p{i}] hello from {i}" in out.lines
  assert "[p0] bar" in out.lines and "[p0] done" in out.lines       # '\r' (progress bars) ends a line
  assert out.lines[-1].startswith("[launch] all processes succeeded")


def test_failure_stops_the_others_and_names_the_failing_process(tmp_path):
  """Process 1 fails; process 0 ends by itself with EXIT_PEER_FAILED; process 2 ignores SIGTERM
  and is killed `kill_after_s` after it."""
  body = """
      if pid == 0:
        time.sleep(0.3); sys.exit(3)        # "stopped because a peer failed"
      if pid == 1:
        time.sleep(0.1); sys.exit(7)
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
      time.sleep(60)
  """
  out = _Lines()
  result = launch.launch([_script(tmp_path, body)], num_processes=3, grace_s=1.0, kill_after_s=0.5, out=out)
  assert not result.ok and result.reason == "failure" and result.culprit == 1
  assert result.returncodes == [3, 7, -9] and result.stopped_by_launcher == [2]
  assert result.exit_times[2] - result.exit_times[1] < 1.0 + 0.5 + 1.0     # grace + kill_after + polling
  text = "\n".join(out.lines)
  assert "[launch] process 2 still running: SIGTERM" in text and "SIGKILL" in text
  assert "FAILED: process 1 (exit 7)" in text


def test_timeout_stops_everything(tmp_path):
  out = _Lines()
  result = launch.launch([_script(tmp_path, "time.sleep(60)")], num_processes=3, timeout_s=0.5, kill_after_s=0.5,
                         out=out)
  assert result.reason == "timeout" and result.culprit is None and result.stopped_by_launcher == [0, 1, 2]
  assert result.returncodes == [-15, -15, -15]
  assert "FAILED: timeout" in out.lines[-1]


def test_initialize_argument_checks():
  assert distributed.initialize() is False                      # single process: nothing to do
  assert distributed.initialize(num_processes=1, process_id=0) is False
  with pytest.raises(ValueError, match="without a coordinator"):
    distributed.initialize(num_processes=2, process_id=1)
  with pytest.raises(ValueError, match="all needed"):
    distributed.initialize("127.0.0.1:1234", num_processes=2)
  with pytest.raises(ValueError, match="outside"):
    distributed.initialize("127.0.0.1:1234", num_processes=2, process_id=2)
  with pytest.raises(ValueError, match="step_timeout_s"):
    distributed.Supervisor(step_timeout_s=0.0)


def test_step_watchdog_exits_a_stalled_process():
  code = textwrap.dedent("""
      import sys, time
      sys.path.insert(0, {root!r})
      from stts_jax.train import distributed
      with distributed.Supervisor(step_timeout_s=1.0, poll_s=0.2) as sup:
        sup.tick(1)
        time.sleep(30)
  """).format(root=common.ROOT)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == distributed.EXIT_STALLED, proc.stderr[-2000:]
  assert "process 0 stalled: no training step finished in" in proc.stderr
  assert "after step 1" in proc.stderr

"""Start N local processes of a multi-process script and supervise them (testing multi-host runs
on one machine). Standard library only: it never imports JAX.

Process i runs `python SCRIPT ARGS --coordinator=127.0.0.1:PORT --num_processes=N --process_id=i`
with `XLA_FLAGS=--xla_force_host_platform_device_count=D` (D devices per process; other XLA
flags are kept), `JAX_PLATFORMS=cpu` and unbuffered output, in its own process group. Every
output line (stdout and stderr, progress-bar `\\r` updates included) is echoed as `[p{i}] line`.

When a process exits non-zero, the others get `grace_s` to stop by themselves (the JAX
heartbeat, or `distributed.Supervisor`'s failure report, ends them); whatever still runs then
gets SIGTERM and, `kill_after_s` later, SIGKILL (whole process groups). So every process is gone
at most `grace_s + kill_after_s` after the first failure. The culprit named in the report is the
first process that exited non-zero other than with `EXIT_PEER_FAILED` (stopped because a peer
failed), or else the first one that exited non-zero.
"""

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

EXIT_PEER_FAILED = 3   # == stts_jax.train.distributed.EXIT_PEER_FAILED (not imported: no JAX here)


@dataclasses.dataclass
class LaunchResult:
  returncodes: list[int]                 # per process; negative = killed by that signal
  culprit: Optional[int]                 # the process that failed first (None: none did)
  reason: str                            # "" (success), "failure", "timeout" or "interrupted"
  exit_times: list[float]                # seconds since launch at which each process exited
  stopped_by_launcher: list[int]         # processes that needed SIGTERM/SIGKILL from here

  @property
  def ok(self) -> bool:
    return not self.reason

  def describe(self) -> str:
    parts = [f"p{i}: {describe_code(c)} at {t:.1f}s" for i, (c, t) in enumerate(zip(self.returncodes,
                                                                                   self.exit_times))]
    if self.ok:
      head = "all processes succeeded"
    elif self.culprit is not None:
      head = f"FAILED: process {self.culprit} ({describe_code(self.returncodes[self.culprit])})"
    else:
      head = f"FAILED: {self.reason}"
    tail = f"; stopped by the launcher: {self.stopped_by_launcher}" if self.stopped_by_launcher else ""
    return f"{head} [{', '.join(parts)}]{tail}"


def describe_code(code: int) -> str:
  if code < 0:
    try:
      return f"killed by {signal.Signals(-code).name}"
    except ValueError:
      return f"killed by signal {-code}"
  if code == EXIT_PEER_FAILED:
    return f"exit {code} (stopped: a peer failed)"
  return f"exit {code}"


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: Mapping[str, str], devices_per_process: int,
                extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
  """`base` with the per-process device count forced (other XLA flags kept) and CPU JAX."""
  env = dict(base)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  env.update(extra or {})
  return env


def _pump(stream: Iterable[str], prefix: str, out: Any, lock: Any) -> None:
  for line in stream:   # text mode with universal newlines: '\r' also ends a line
    with lock:
      out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
      out.flush()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(proc.pid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def launch(command: Sequence[str], *, num_processes: int, devices_per_process: int = 4,
           port: Optional[int] = None, grace_s: float = 30.0, kill_after_s: float = 5.0,
           timeout_s: Optional[float] = None, env: Optional[Mapping[str, str]] = None,
           out: Optional[Any] = None, python: str = sys.executable) -> LaunchResult:
  """Runs `python *command` as `num_processes` cooperating processes; returns when all exited.

  command: script path and its arguments (the multi-process flags are appended).
  timeout_s: stop everything (SIGTERM, then SIGKILL) after this long; the run counts as failed.
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"launch: num_processes={num_processes} and devices_per_process="
                     f"{devices_per_process} must be >= 1")
  if not command:
    raise ValueError("launch: no command (script path and arguments) given")
  out = out or sys.stdout
  port = port or free_port()
  lock = threading.Lock()
  say = lambda msg: _pump([f"{msg}\n"], "[launch] ", out, lock)
  penv = process_env(env if env is not None else os.environ, devices_per_process)
  procs, pumps = [], []
  t0 = time.monotonic()
  for i in range(num_processes):
    argv = [python, *command, f"--coordinator=127.0.0.1:{port}", f"--num_processes={num_processes}",
            f"--process_id={i}"]
    proc = subprocess.Popen(argv, env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    procs.append(proc)
    say(f"process {i}: pid {proc.pid}")
    pump = threading.Thread(target=_pump, args=(proc.stdout, f"[p{i}] ", out, lock), daemon=True)
    pump.start()
    pumps.append(pump)

  codes: list[Optional[int]] = [None] * num_processes
  times = [0.0] * num_processes
  order: list[int] = []
  stopped: list[int] = []
  reason = ""
  stop_at: Optional[float] = None      # when to SIGTERM whatever still runs
  failed_at: Optional[float] = None
  term_sent = kill_sent = False
  received: list[int] = []

  def on_signal(signum, frame):
    del frame
    received.append(signum)
  previous = {}
  if threading.current_thread() is threading.main_thread():
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    while any(c is None for c in codes):
      now = time.monotonic()
      for i, proc in enumerate(procs):
        if codes[i] is None and proc.poll() is not None:
          codes[i], times[i] = proc.returncode, now - t0
          order.append(i)
          if proc.returncode != 0:
            after = "" if failed_at is None else f", {now - failed_at:.1f}s after the first failure"
            say(f"process {i} {describe_code(proc.returncode)}{after}")
            failed_at = now if failed_at is None else failed_at
            if stop_at is None:
              reason, stop_at = "failure", now + grace_s
      if stop_at is None and received:
        say(f"received {signal.Signals(received[0]).name}: stopping all processes")
        reason, stop_at = "interrupted", now
      if stop_at is None and timeout_s is not None and now - t0 > timeout_s:
        say(f"timeout after {timeout_s:.0f}s: stopping all processes")
        reason, stop_at = "timeout", now
      alive = [i for i in range(num_processes) if codes[i] is None]
      if stop_at is not None and now >= stop_at and alive:
        if not term_sent:
          for i in alive:
            say(f"process {i} still running: SIGTERM")
            _signal_group(procs[i], signal.SIGTERM)
          stopped, term_sent = alive, True
        elif not kill_sent and now >= stop_at + kill_after_s:
          for i in alive:
            say(f"process {i} still running {kill_after_s:.0f}s after SIGTERM: SIGKILL")
            _signal_group(procs[i], signal.SIGKILL)
          kill_sent = True
      time.sleep(0.05)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for proc in procs:
      if proc.poll() is None:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
  for pump in pumps:
    pump.join(timeout=5)
  final = [int(c) for c in codes]
  bad = [i for i in order if final[i] != 0 and i not in stopped]
  culprit = next((i for i in bad if final[i] != EXIT_PEER_FAILED), bad[0] if bad else None)
  result = LaunchResult(returncodes=final, culprit=culprit, reason=reason, exit_times=times,
                        stopped_by_launcher=stopped)
  say(result.describe())
  return result


__all__ = ["launch", "LaunchResult", "process_env", "free_port", "describe_code", "EXIT_PEER_FAILED"]

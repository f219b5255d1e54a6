"""Multi-process start-up and fail-fast supervision (one JAX process per host).

  initialize(coordinator, num_processes, process_id, *, from_env, heartbeat_timeout_s, ...)
      `jax.distributed.initialize` from explicit values (flags) or, with `from_env`, from the
      cluster environment JAX detects itself (TPU pods, SLURM, Open MPI, Kubernetes, and
      JAX_COORDINATOR_ADDRESS). CPU collectives across processes use gloo.
  configure_logging(level)   INFO logging on process 0; WARNING and above on the others.
  barrier(name, timeout_s)   all processes meet (coordination service; no gloo collective).
  Supervisor                 context manager around the work of a multi-process run (below).

How a failure on one process stops all of them, and what bounds the time:

  * An exception on process i (inside `Supervisor`): process i logs it, publishes
    "process i failed: <error>" in the coordination service's key-value store, waits up to
    `ack_timeout_s` (5 s) for the others to acknowledge, and exits with EXIT_FAILED (1) without
    the shutdown barrier that a normal interpreter exit would run (that barrier waits up to
    300 s for peers that are blocked in a collective). Every other process has a watcher thread
    blocked on that key; it logs "process j: stopping, process i failed: ...", acknowledges and
    exits with EXIT_PEER_FAILED (3). Process 0 hosts the coordination service, and a client
    that loses the service aborts its process (SIGABRT): so process 0, when it is not the one
    that failed, first waits for the other acknowledgements (those the failing process waits
    for) and then `exit_grace_s` (2 s) so the failing process leaves with its own exit code.
    Bound: the key-value round trip plus that grace, a few seconds.
  * A process dies without a word (SIGKILL, OOM kill, machine loss): the coordination service
    (hosted by process 0) stops receiving its heartbeats and, after `heartbeat_timeout_s`,
    tells every live process, whose JAX client aborts it ("Terminating process because the JAX
    distributed service detected fatal errors ... tasks are unhealthy (stopped sending
    heartbeats): <ids>"). If process 0 itself dies, the others lose the service's connection
    and abort at once. Bound: `heartbeat_timeout_s` plus the error poll (about a second).
  * A process that is alive but stuck (a hang in data loading, a collective the others never
    join): with `step_timeout_s`, a watchdog thread exits with EXIT_STALLED (4) if no training
    step finished (`tick`) within that time, first publishing "process i stalled" so the
    others stop too. Bound: `step_timeout_s` (which must cover the first step's compilation).
"""

import logging
import os
import sys
import threading
import time
import traceback
from typing import Any, Optional

import jax

log = logging.getLogger(__name__)

EXIT_FAILED = 1          # this process raised
EXIT_PEER_FAILED = 3     # another process failed or stalled; this one stopped on its report
EXIT_STALLED = 4         # the step watchdog fired on this process
FAIL_KEY = "stts_jax/failure"
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Gloo context initialization failed")
ACK_PREFIX = "stts_jax/failure_ack/"


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, from_env: bool = False,
               heartbeat_timeout_s: int = 100, init_timeout_s: int = 300,
               cpu_collectives: str = "gloo") -> bool:
  """Connects this process to the others (before any other JAX call). Returns False (and does
  nothing) for a single-process run: no coordinator given and `from_env` False.

  Explicit values win; with `from_env` the missing ones come from the cluster environment.
  `heartbeat_timeout_s` bounds how long a silently dead peer goes unnoticed (module doc)."""
  explicit = (coordinator, num_processes, process_id)
  if coordinator is None and not from_env:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise ValueError(f"distributed: num_processes={num_processes}, process_id={process_id} given "
                       "without a coordinator address (host:port); pass --coordinator or use the "
                       "cluster environment (--distributed)")
    return False
  if not from_env and None in explicit:
    raise ValueError(f"distributed: coordinator, num_processes and process_id are all needed, got "
                     f"{dict(zip(('coordinator', 'num_processes', 'process_id'), explicit))}")
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"distributed: process_id {process_id} is outside [0, {num_processes})")
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=init_timeout_s,
                             heartbeat_timeout_seconds=heartbeat_timeout_s)
  return True


def configure_logging(level: int = logging.INFO, process_index: Optional[int] = None) -> None:
  """Root logging at `level` on process 0 and WARNING on the others (errors still show).
  `process_index` defaults to `jax.process_index()` (pass the flag's value before `initialize`)."""
  pid = jax.process_index() if process_index is None else process_index
  logging.basicConfig(level=level if pid == 0 else max(level, logging.WARNING),
                      format=f"%(asctime)s [p{pid}] %(name)s %(levelname)s %(message)s", force=True)


def barrier(name: str, *, timeout_s: float = 3600.0) -> None:
  """Blocks until every process reached barrier `name` (coordination service, no collectives,
  so no 30 s gloo rendezvous limit). No-op with one process. Raises after `timeout_s`."""
  if jax.process_count() == 1:
    return
  _client().wait_at_barrier(name, int(1000 * timeout_s))


def _client() -> Any:
  """The coordination-service client of `jax.distributed` (None in a single-process run)."""
  from jax._src import distributed as jax_distributed
  return jax_distributed.global_state.client


def _say(message: str) -> None:
  """Log at ERROR and make sure it reaches the stream before a hard exit."""
  log.error(message)
  for handler in logging.getLogger().handlers:
    handler.flush()
  sys.stderr.flush()
  sys.stdout.flush()


class Supervisor:
  """Fail-fast supervision of one process of a multi-process run (see the module doc).

  with Supervisor(step_timeout_s=600) as sup:
    train(..., on_step=sup.tick)

  An exception inside the block is reported to every process and ends this one (os._exit, no
  return); a failure reported by another process ends this one from the watcher thread. With a
  single process the block runs unsupervised (exceptions propagate as usual) except for the
  step watchdog, which works alone too.
  """

  def __init__(self, *, step_timeout_s: Optional[float] = None, ack_timeout_s: float = 5.0,
               poll_s: float = 1.0, exit_grace_s: float = 2.0):
    if step_timeout_s is not None and step_timeout_s <= 0:
      raise ValueError(f"Supervisor: step_timeout_s must be positive or None, got {step_timeout_s}")
    self.step_timeout_s = step_timeout_s
    self.ack_timeout_s = ack_timeout_s
    self.poll_s = poll_s
    self.exit_grace_s = exit_grace_s
    self.process_index = jax.process_index()
    self.process_count = jax.process_count()
    self._client = _client() if self.process_count > 1 else None
    self._stop = threading.Event()
    self._exiting = threading.Lock()
    self._last_tick = time.monotonic()
    self._last_step: Optional[int] = None
    self._threads: list[threading.Thread] = []

  def tick(self, step: int) -> None:
    """A training step finished (resets the step watchdog)."""
    self._last_tick = time.monotonic()
    self._last_step = step

  def __enter__(self) -> "Supervisor":
    self._last_tick = time.monotonic()
    self._threads = []
    if self._client is not None:
      self._threads.append(threading.Thread(target=self._watch_peers, name="stts-peer-watcher", daemon=True))
    if self.step_timeout_s is not None:
      self._threads.append(threading.Thread(target=self._watch_steps, name="stts-step-watchdog", daemon=True))
    for thread in self._threads:
      thread.start()
    return self

  def __exit__(self, exc_type, exc, tb) -> bool:
    self._stop.set()
    clean = exc_type is None or (issubclass(exc_type, SystemExit) and exc.code in (None, 0))
    if clean or self._client is None:
      # Join the watchers (each wakes within `poll_s`): a daemon thread still blocked in the
      # C++ key-value call when the interpreter finalises aborts the process.
      for thread in self._threads:
        thread.join()
      return False
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    self._fail(f"process {self.process_index} failed: {exc_type.__name__}: {exc}", text, EXIT_FAILED)
    return False   # not reached: _fail exits

  # -- internals -------------------------------------------------------------------------------
  def _publish(self, message: str) -> None:
    if self._client is None:
      return
    try:
      self._client.key_value_set(FAIL_KEY, f"{self.process_index}:{message}")
    except Exception as e:   # another process reported first, or the service is gone
      log.debug("could not publish the failure: %s", e)

  def _missing_acks(self, skip: tuple[int, ...] = ()) -> list[int]:
    """Processes (other than this one and `skip`) that did not acknowledge the failure report
    within `ack_timeout_s`."""
    deadline = time.monotonic() + self.ack_timeout_s
    missing = []
    for j in range(self.process_count):
      if j == self.process_index or j in skip:
        continue
      try:
        self._client.blocking_key_value_get(f"{ACK_PREFIX}{j}", max(1, int(1000 * (deadline - time.monotonic()))))
      except Exception:   # no acknowledgement in time
        missing.append(j)
    return missing

  def _fail(self, message: str, details: str, code: int) -> None:
    """Report `message` to all processes, then end this one with `code`."""
    if not self._exiting.acquire(blocking=False):
      return
    if any(k in details for k in _LOST_PEER):
      message += " (a collective lost its connection: another process probably died first)"
    head = details.rstrip() + "\n" if details else ""
    _say(f"{head}{message}; stopping all {self.process_count} processes")
    self._publish(message)
    if self._client is not None:
      missing = self._missing_acks()
      if missing:
        _say(f"process {self.process_index}: no acknowledgement from process(es) {missing} within "
             f"{self.ack_timeout_s:.0f} s: dead or hung")
      if self.process_index == 0:
        # The service lives in this process: a peer that acknowledged is on its way out, and its JAX
        # client aborts (SIGABRT) if the service disappears before its own exit completes.
        time.sleep(self.exit_grace_s)
    os._exit(code)

  def _watch_peers(self) -> None:
    while not self._stop.is_set():
      try:
        message = self._client.blocking_key_value_get(FAIL_KEY, int(1000 * self.poll_s))
      except Exception as e:
        if "DEADLINE_EXCEEDED" in str(e):
          continue
        return   # the service is gone: the JAX client aborts this process itself
      if self._stop.is_set() or not self._exiting.acquire(blocking=False):
        return
      culprit, _, message = message.partition(":")
      _say(f"process {self.process_index}: stopping, {message}")
      try:
        self._client.key_value_set(f"{ACK_PREFIX}{self.process_index}", "1")
      except Exception:
        pass
      if self.process_index == 0:
        # The service lives in this process: leaving before the failing process has seen all
        # acknowledgements would abort it (SIGABRT) instead of letting it exit with its code.
        self._missing_acks(skip=(int(culprit),))
        time.sleep(self.exit_grace_s)
      os._exit(EXIT_PEER_FAILED)

  def _watch_steps(self) -> None:
    while not self._stop.wait(min(self.poll_s, self.step_timeout_s)):
      idle = time.monotonic() - self._last_tick
      if idle > self.step_timeout_s:
        after = "the start" if self._last_step is None else f"step {self._last_step}"
        self._fail(f"process {self.process_index} stalled: no training step finished in "
                   f"{idle:.0f} s (step timeout {self.step_timeout_s:.0f} s) after {after}", "",
                   EXIT_STALLED)
        return


__all__ = ["initialize", "configure_logging", "barrier", "Supervisor", "EXIT_FAILED", "EXIT_PEER_FAILED",
           "EXIT_STALLED"]

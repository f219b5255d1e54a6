"""Two JAX processes x 4 virtual CPU devices (gloo) = one 8-device mesh, on this machine.

Fast (toy model, `toy_child.py` through `stts_jax.train.launch`):
  * the 2-process loss curve equals the 1-process x 8-device run on the same global batches;
  * the processes read disjoint Grain shards: no example id twice in an epoch, none shared;
  * metrics / TensorBoard / progress bar come from process 0 only;
  * an exception on process 1 stops process 0 too, naming process 1, within seconds.
Slow (`scripts/launch_local.py` -> `scripts/train.py`, tiny Molmo2 on the default dataset):
  * the same equality and shard checks for the real script; elastic restore on 1 process;
  * SIGKILL of process 1 mid-run: process 0 exits within the heartbeat bound; restarting both
    resumes from the last checkpoint and ends with the uninterrupted run's params (bitwise).
"""

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from tests.multihost import common

pytestmark = pytest.mark.multidevice
CHILD = os.path.join(common.ROOT, "tests", "multihost", "toy_child.py")
PER_PROCESS_SHARD = 12          # 25 train examples -> 24 used -> 12 per process
PER_PROCESS_BATCH = common.GLOBAL_BATCH // 2
STEPS_PER_EPOCH = PER_PROCESS_SHARD // PER_PROCESS_BATCH


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return common.build_dataset(str(tmp_path_factory.mktemp("default_dataset")))


class _Lines:
  """A text sink for `launch.launch` that keeps the lines."""

  def __init__(self):
    self.lines: list[str] = []

  def write(self, text: str) -> None:
    self.lines.extend(text.splitlines())

  def flush(self) -> None:
    pass

  @property
  def text(self) -> str:
    return "\n".join(self.lines)


def _launch_toy(workdir, data, *extra):
  from stts_jax.train import launch
  out = _Lines()
  result = launch.launch([CHILD, "--workdir", str(workdir), "--data", data, *extra], num_processes=2,
                         devices_per_process=4, timeout_s=600.0, out=out)
  return result, out


def _assert_disjoint_shards(ids_by_process, num_steps):
  """Per process: each epoch (3 steps of 4 rows) reads its 12-example shard once; the two
  processes never share an example."""
  seen = []
  for ids in ids_by_process:
    assert len(ids) == num_steps
    flat = [i for step in ids for i in step]
    for start in range(0, len(flat), PER_PROCESS_SHARD):
      epoch = flat[start:start + PER_PROCESS_SHARD]
      assert len(set(epoch)) == len(epoch), f"an example repeats within an epoch: {epoch}"
    seen.append(set(flat))
  assert seen[0].isdisjoint(seen[1]), seen[0] & seen[1]
  if num_steps >= STEPS_PER_EPOCH:
    assert len(seen[0]) == len(seen[1]) == PER_PROCESS_SHARD
    assert seen[0] | seen[1] == set(range(2 * PER_PROCESS_SHARD))


def test_two_processes_equal_one_process_and_read_disjoint_shards(tmp_path, dataset):
  steps = 4
  result, out = _launch_toy(tmp_path / "two", dataset, "--steps", str(steps))
  assert result.ok, out.text[-4000:]
  two = common.read_jsonl(str(tmp_path / "two" / "metrics.jsonl"))
  assert [r["step"] for r in two] == list(range(1, steps + 1))       # one writer: no duplicates

  # Reference: one process, 8 devices, the same global batches (both shards, process order).
  ref_iter = common.GlobalBatches(common.data_iterator(dataset, i, 2) for i in range(2))
  ref = common.toy_train(ref_iter, str(tmp_path / "one"), steps=steps)
  one = [h for h in ref.history if "loss" in h]
  for key in ("loss", "ce", "aux_loss", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in two], [h[key] for h in one], rtol=1e-5, atol=1e-5, err_msg=key)

  ids = common.example_ids(str(tmp_path / "two"), 2)
  _assert_disjoint_shards(ids, steps)
  ref_ids = common.example_ids(str(tmp_path / "one"), 1)[0]
  assert ref_ids == [a + b for a, b in zip(*ids)]                   # the same global batches

  # Process 0 alone writes metrics, TensorBoard and the progress bar; process 1 logs no INFO.
  assert len([f for f in os.listdir(tmp_path / "two" / "tb") if f.startswith("events.")]) == 1
  p1 = [line for line in out.lines if line.startswith("[p1]")]
  assert any(line.startswith("[p0] train:") for line in out.lines)
  assert not any("train:" in line or " INFO " in line for line in p1), p1
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints" / str(steps) / "data_iter")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.parametrize("culprit", [1, 0])
def test_exception_on_one_process_stops_all_naming_it(tmp_path, dataset, culprit):
  """One process raises on its first batch while the other compiles and waits for it: the other
  is stopped by the failure report (exit 3), not by a timeout or the launcher. Either way the
  culprit exits with its own code (1): process 0 hosts the coordination service and outlives a
  failing process 1, whose JAX client would otherwise abort (SIGABRT, -6) when the service goes."""
  other = 1 - culprit
  result, out = _launch_toy(tmp_path / "w", dataset, "--raise_on", str(culprit))
  assert not result.ok and result.culprit == culprit, out.text[-4000:]
  codes = [0, 0]
  codes[culprit], codes[other] = 1, 3
  assert result.returncodes == codes and result.stopped_by_launcher == [], out.text[-4000:]
  assert abs(result.exit_times[0] - result.exit_times[1]) < 10.0
  assert f"process {culprit} failed: RuntimeError: injected failure while reading batch 1" in out.text
  assert re.search(rf"\[p{other}\] .*process {other}: stopping, process {culprit} failed: RuntimeError", out.text)
  assert f"FAILED: process {culprit} (exit 1)" in out.text


# ------------------------------------------------------------------------------------------
# slow: the real script and model
# ------------------------------------------------------------------------------------------
_CONFIG = """
from configs import train_tiny


def get_config(arg=None):
  cfg = train_tiny.get_config("data={data},method=none,steps={steps},batch={batch}")
  cfg.train.update(log_every=1, checkpoint_every=2, max_to_keep=3, tensorboard=False, log_example_ids=True)
  cfg.train.optim.decay_steps = {steps}
  cfg.data.update(num_threads=1, prefetch_buffer=1)
  return cfg
"""
STEPS = 6
HEARTBEAT_S = 10


class _Script:
  """`scripts/launch_local.py -n 2 -d 4 -- scripts/train.py ...` as a child, output collected."""

  def __init__(self, config_path, workdir, cache_dir):
    cmd = [sys.executable, os.path.join(common.ROOT, "scripts", "launch_local.py"), "-n", "2", "-d", "4",
           "--timeout", "1500", "--", os.path.join(common.ROOT, "scripts", "train.py"), "--config", config_path,
           "--workdir", workdir, "--heartbeat_timeout", str(HEARTBEAT_S), "--step_timeout", "1200"]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir)
    self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                 cwd=common.ROOT)
    self.lines: list[str] = []
    self.pids: dict[int, int] = {}
    self.exit_times: dict[int, float] = {}
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line.rstrip("\n"))
      m = re.match(r"\[launch\] process (\d+): pid (\d+)", line)
      if m:
        self.pids[int(m.group(1))] = int(m.group(2))
      m = re.match(r"\[launch\] process (\d+) (exit|killed)", line)
      if m:
        self.exit_times[int(m.group(1))] = time.monotonic()

  def wait(self, timeout=1800):
    rc = self.proc.wait(timeout=timeout)
    self._reader.join(timeout=10)
    return rc

  @property
  def text(self):
    return "\n".join(self.lines)


def _load_config(path):
  import importlib.util
  sys.path.insert(0, common.ROOT)
  spec = importlib.util.spec_from_file_location("multihost_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _final_params(workdir, step):
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path).item_metadata.tree
  tree = ckptr.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta))
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def script_run(tmp_path_factory, dataset):
  """The uninterrupted 2-process run of scripts/train.py (6 steps, checkpoints at 2, 4, 6)."""
  root = tmp_path_factory.mktemp("script")
  config_path = str(root / "config_mp.py")
  with open(config_path, "w") as f:
    f.write(_CONFIG.format(data=dataset, steps=STEPS, batch=common.GLOBAL_BATCH))
  cache = str(root / "xla_cache")
  run = _Script(config_path, str(root / "full"), cache)
  assert run.wait() == 0, run.text[-5000:]
  return {"root": root, "config": config_path, "cache": cache, "workdir": str(root / "full"), "lines": run.lines}


@pytest.fixture
def persistent_cache(script_run):
  """In-process runs share one persistent XLA cache (the elastic run reuses the reference's step)."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  previous = {n: getattr(jax.config, n) for n in names}
  jax.config.update("jax_compilation_cache_dir", str(script_run["root"] / "xla_cache_in_process"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  from jax._src import compilation_cache
  compilation_cache.reset_cache()
  yield
  for n, v in previous.items():
    jax.config.update(n, v)
  compilation_cache.reset_cache()


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_train_script_two_processes_equal_one_process(script_run, dataset, tmp_path, caplog, persistent_cache):
  from stts_jax import config as config_lib
  from stts_jax.data import pipeline
  from stts_jax.train import main as train_main
  two = common.read_jsonl(os.path.join(script_run["workdir"], "metrics.jsonl"))
  assert [r["step"] for r in two] == list(range(1, STEPS + 1))
  p1 = [line for line in script_run["lines"] if line.startswith("[p1]")]
  assert not any(" INFO " in line or "train:" in line for line in p1), p1     # logs/progress: process 0
  assert any(line.startswith("[p0] train:") for line in script_run["lines"])
  cfg = _load_config(script_run["config"])
  cfg.train.progress_bar = False
  cfgs = config_lib.build(cfg)
  iters = [pipeline.train_iterator(cfgs["data"], cfgs["model"].tokens, process_index=i, process_count=2)
           for i in range(2)]
  ref = train_main.train_and_evaluate(cfg, str(tmp_path / "one"), data_iter=common.GlobalBatches(iters))
  np.testing.assert_allclose([r["loss"] for r in two], [h["loss"] for h in ref.history], rtol=1e-5, atol=1e-5)
  ids = common.example_ids(script_run["workdir"], 2)
  _assert_disjoint_shards(ids, STEPS)
  assert common.example_ids(str(tmp_path / "one"), 1)[0] == [a + b for a, b in zip(*ids)]

  # Elastic restart: the 2-process checkpoint continues on 1 process x 8 devices; the model
  # state is restored and the data iterator (no process_0-of-1 file) restarts, with a warning.
  elastic = str(tmp_path / "elastic")
  shutil.copytree(script_run["workdir"], elastic)
  cfg.train.num_steps = STEPS + 1
  with caplog.at_level(logging.WARNING):
    more = train_main.train_and_evaluate(cfg, elastic)
  assert "has no data iterator state for process_0-of-1.json" in caplog.text
  assert [h["step"] for h in more.history] == [STEPS + 1]


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_kill_one_process_then_resume_matches_uninterrupted(script_run):
  workdir = str(script_run["root"] / "killed")
  run = _Script(script_run["config"], workdir, script_run["cache"])
  committed = os.path.join(workdir, "checkpoints", "2")
  deadline = time.monotonic() + 1500
  while not os.path.isdir(committed):
    assert run.proc.poll() is None and time.monotonic() < deadline, run.text[-5000:]
    time.sleep(0.2)
  killed_at = time.monotonic()
  os.kill(run.pids[1], signal.SIGKILL)
  assert run.wait() == 1
  survivor_s = run.exit_times[0] - killed_at
  print(f"process 0 exited {survivor_s:.1f} s after process 1 was killed")
  # Bound: the gloo error (peer connection closed) + 5 s acknowledgement wait, or the
  # coordination service's heartbeat timeout (10 s here) + its error poll.
  assert survivor_s < HEARTBEAT_S + 5.0, run.text[-5000:]
  assert "FAILED: process 1 (killed by SIGKILL)" in run.text
  assert re.search(r"\[p0\] .*(another process probably died first|tasks are unhealthy)", run.text), \
      run.text[-5000:]
  assert "[launch] process 0 still running" not in run.text            # it stopped by itself

  resumed = _Script(script_run["config"], workdir, script_run["cache"])
  assert resumed.wait() == 0, resumed.text[-5000:]
  assert re.search(r"resumed from step [24]\b", resumed.text)
  full, again = _final_params(script_run["workdir"], STEPS), _final_params(workdir, STEPS)
  assert full.keys() == again.keys() and len(full) > 50
  for k in full:
    np.testing.assert_array_equal(again[k], full[k], err_msg=k)
  losses = lambda wd: {r["step"]: r["loss"] for r in common.read_jsonl(os.path.join(wd, "metrics.jsonl"))}
  assert losses(workdir) == losses(script_run["workdir"])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_evaluate_script_two_processes_equal_one_process(script_run, tmp_path):
  """scripts/evaluate.py on the 2-process checkpoint, as 2 processes and as 1 process x 8 devices:
  the same per-example records (each process scores its own shard of the split)."""
  import json
  evaluate = os.path.join(common.ROOT, "scripts", "evaluate.py")
  args = ["--config", script_run["config"], "--checkpoint", script_run["workdir"], "--methods", "none,random",
          "--ratios", "0.5", "--split", "val"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  one = subprocess.run([sys.executable, evaluate, *args, "--out", str(tmp_path / "one")], env=env, cwd=common.ROOT,
                       capture_output=True, text=True, timeout=900)
  assert one.returncode == 0, one.stderr[-4000:]
  two = subprocess.run([sys.executable, os.path.join(common.ROOT, "scripts", "launch_local.py"), "-n", "2", "-d", "4",
                        "--timeout", "900", "--", evaluate, *args, "--out", str(tmp_path / "two")], cwd=common.ROOT,
                       capture_output=True, text=True, timeout=1000)
  assert two.returncode == 0, two.stdout[-4000:]
  assert "[p0] | none | 0 | 8 |" in two.stdout and "[p1] |" not in two.stdout     # the table: process 0
  a, b = (json.load(open(tmp_path / d / "results.json")) for d in ("one", "two"))
  assert [c["method"] for c in a["cells"]] == [c["method"] for c in b["cells"]] == ["none", "random"]
  for ca, cb in zip(a["cells"], b["cells"]):
    assert ca["metrics"] == cb["metrics"]
    for name, modes in ca["records"].items():
      for mode, records in modes.items():
        assert len(records) == 7
        assert sorted(map(json.dumps, records)) == sorted(map(json.dumps, cb["records"][name][mode])), (name, mode)

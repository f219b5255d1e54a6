"""Preemption (SIGTERM) after step k, resume, run to n == an uninterrupted n-step run; metrics
files, eval hook and the checkpoint layout."""

import json
import os

import numpy as np
import pytest

from stts_jax.parallel import sharding

from stts_jax.train import loop
from tests.train import helpers, toy_model


@pytest.mark.multidevice
def test_sigterm_resume_matches_uninterrupted(tmp_path):
  cfg = helpers.train_cfg(num_steps=4, checkpoint_every=0, max_to_keep=2, eval_every=2, tensorboard=True)
  mesh, rules = helpers.mesh_8(), sharding.make_rules()
  eval_calls = []

  def eval_fn(model, step):
    eval_calls.append(step)
    return {"up_norm": float(np.linalg.norm(np.asarray(model.up[...])))}

  def run(it, wd):
    return loop.run(helpers.toy_model_fn(), it, cfg, mesh, rules, str(wd), forward=toy_model.toy_forward,
                    eval_fn=eval_fn)

  train_only = lambda hist: [h for h in hist if "loss" in h]
  full = run(helpers.batches(), tmp_path / "full")
  assert not full.preempted and len(train_only(full.history)) == 4
  assert eval_calls == [2, 4] and full.compilations == 1

  first = run(helpers.SigtermAt(helpers.batches(), at=3), tmp_path / "split")
  assert first.preempted
  assert [h["step"] for h in train_only(first.history)] == [1.0, 2.0, 3.0]
  second = run(helpers.batches(), tmp_path / "split")      # fresh iterator: position comes from ckpt
  assert not second.preempted
  assert [h["step"] for h in train_only(second.history)] == [4.0]

  losses_full = [h["loss"] for h in train_only(full.history)]
  losses_split = [h["loss"] for h in train_only(first.history + second.history)]
  np.testing.assert_array_equal(losses_split, losses_full)
  a, b = helpers.flat_arrays(full.state), helpers.flat_arrays(second.state)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)

  # The checkpoint holds the data iterator position (one JSON per process) and the config.
  step3 = tmp_path / "split" / "checkpoints" / "3"
  it_state = json.loads((step3 / "data_iter" / "process_0-of-1.json").read_text())
  assert it_state == {"format": "json", "state": {"seed": 0, "index": 3}}
  assert sorted(os.listdir(tmp_path / "split" / "checkpoints")) == ["3", "4"]
  records = [json.loads(l) for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
  assert [r["step"] for r in records if "eval/up_norm" in r] == [2, 4]
  assert {"loss", "ce", "aux_loss", "kept_ratio", "grad_norm", "lr", "skipped_total", "step_time",
          "tokens_per_s"} <= set(records[0])
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "split" / "tb"))


_KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {root!r})
from stts_jax.parallel import sharding
from stts_jax.train import loop
from tests.train import helpers, toy_model

class KillAt(helpers.SigtermAt):
  def __next__(self):
    if self.count + 1 == self.at:
      os.kill(os.getpid(), signal.SIGKILL)      # hard kill: no handler, no final save
    return super().__next__()

cfg = helpers.train_cfg(num_steps=6, checkpoint_every=2, max_to_keep=2)
loop.run(helpers.toy_model_fn(), KillAt(helpers.batches(), at={at}), cfg, helpers.mesh_8(),
         sharding.make_rules(), {workdir!r}, forward=toy_model.toy_forward)
"""


@pytest.mark.slow
@pytest.mark.multidevice
def test_hard_kill_resume_matches_uninterrupted(tmp_path):
  """SIGKILL while fetching batch 5 (steps 1-4 done, checkpoints at 2 and 4): resume from 4."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  workdir = str(tmp_path / "killed")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _KILLED_RUN.format(root=root, at=5, workdir=workdir)],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == -9, proc.stderr[-2000:]
  cfg = helpers.train_cfg(num_steps=6, checkpoint_every=2, max_to_keep=2)
  mesh, rules = helpers.mesh_8(), sharding.make_rules()
  resumed = loop.run(helpers.toy_model_fn(), helpers.batches(), cfg, mesh, rules, workdir,
                     forward=toy_model.toy_forward)
  # The step-4 save is asynchronous and may not have been committed before the kill: the resume
  # starts after the latest *complete* checkpoint (4, or 2), never from a partial one.
  first = int(resumed.history[0]["step"])
  assert first in (3, 5) and [h["step"] for h in resumed.history] == list(range(first, 7))
  full = loop.run(helpers.toy_model_fn(), helpers.batches(), cfg, mesh, rules, str(tmp_path / "full"),
                  forward=toy_model.toy_forward)
  np.testing.assert_array_equal([h["loss"] for h in resumed.history],
                                [h["loss"] for h in full.history[first - 1:]])
  a, b = helpers.flat_arrays(full.state), helpers.flat_arrays(resumed.state)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)

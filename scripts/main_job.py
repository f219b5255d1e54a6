"""The main job: build the offline default dataset, train an unpruned and an STTS demo model, evaluate
STTS against random and heuristic pruning on the test split, time both side by side, report.

  bash scripts/setup_env.sh && .venv/bin/python scripts/main_job.py --workdir runs/main      # ~18 min, 2 cores
  .venv/bin/python scripts/main_job.py --workdir runs/main3 --seeds 0,1,2                    # mean +- sd
  .venv/bin/python scripts/main_job.py --workdir /tmp/smoke --config configs/demo.py:runlocal=true
  .venv/bin/python scripts/main_job.py --workdir runs/main --results_dir docs/results/main_job/demo   # files to commit

Re-running the same command reuses finished work (dataset, trained runs, eval results, timings) and
resumes an interrupted training from its last checkpoint. Prints one table, paired bootstrap
intervals, the checks and the paths written (report.json, table.md, plots/). Exits 1 when a check
fails (`--no-strict` or job.strict=False: report only). `--trained_baselines` also trains a random-
and a heuristic-pruning model to compare with. Every run logs a validation-accuracy curve (job.val_every,
job.val_examples); `--results_dir` copies report.json, table.md, speed.json, val_curves.json and plots/
there with a provenance.json (this command line, git commit, machine, wall time). `--train_only stts`
builds the dataset and trains that run alone (no eval, timing or report; train_only.json holds its
validation curve). See docs/main_job.md.
"""

import functools
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  # Data parallel over the host's cores: one CPU device per core (set before JAX starts).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={os.cpu_count() or 1}").strip()
sys.path.insert(0, ROOT)
from stts_jax import hostmem  # noqa: E402
hostmem.reexec_with_hugepages()   # before JAX starts: glibc reads its tunables at start-up

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "demo.py"), "configs/<file>.py[:arg]",
                                lock_config=False)
flags.DEFINE_string("workdir", "runs/main", "runs, eval results, timings, report.json, table.md, plots/")
flags.DEFINE_string("seeds", None, "comma-separated training seeds (default: the config's job.seeds)")
flags.DEFINE_integer("steps", None, "training steps per model (default: the config's train.num_steps)")
flags.DEFINE_bool("retime", False, "measure the speeds again even if speed.json matches")
flags.DEFINE_bool("trained_baselines", None, "also train random- and heuristic-pruning models (default: the "
                  "config's job.trained_baselines)")
flags.DEFINE_bool("strict", None, "exit 1 when a check fails; --no-strict only reports (default: job.strict)")
flags.DEFINE_string("results_dir", None, "also copy the result files there, with provenance.json (e.g. a directory "
                    "under docs/results/ to commit)")
flags.DEFINE_list("train_only", None, "only build the dataset and train these runs (e.g. stts: the model for "
                  "scripts/evaluate.py's sweeps), write train_only.json; no eval, timing or report")
FLAGS = flags.FLAGS


def main(argv, command=None):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax
  from stts_jax.experiments import main_job
  seeds = [int(s) for s in FLAGS.seeds.split(",") if s.strip()] if FLAGS.seeds else None
  print(f"jax {jax.__version__} on {jax.device_count()} {jax.default_backend()} device(s)", flush=True)
  if FLAGS.train_only:
    main_job.train_only(FLAGS.config, FLAGS.workdir, FLAGS.train_only, seeds=seeds, steps=FLAGS.steps,
                        results_dir=FLAGS.results_dir, command=command)
    return 0
  report = main_job.run(FLAGS.config, FLAGS.workdir, seeds=seeds, steps=FLAGS.steps, retime=FLAGS.retime,
                        trained_baselines=FLAGS.trained_baselines, results_dir=FLAGS.results_dir, command=command)
  return main_job.exit_status(report, FLAGS.strict)     # app.run exits with it


if __name__ == "__main__":
  command = shlex.join([os.path.basename(sys.executable)] + sys.argv)     # as typed, for provenance
  # absl spells a false boolean --nostrict; accept the usual --no-strict too.
  sys.argv = ["--nostrict" if a == "--no-strict" else a for a in sys.argv]
  app.run(functools.partial(main, command=command))

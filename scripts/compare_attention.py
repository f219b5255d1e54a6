"""The main job's trained checkpoints evaluated with each attention implementation against `xla`.

  .venv/bin/python scripts/compare_attention.py --workdir runs/main --out docs/results/attention_checkpoints.json
Needs a finished main job in --workdir (scripts/main_job.py). Checks (stts_jax/experiments/attention_check.py):
teacher-forced logits within 1e-4 of xla, identical predictions (chosen option, generated tokens), and the
STTS train step's loss equal within float tolerance; exits non-zero when a check fails.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "demo.py"), "the main job's config",
                                lock_config=False)
flags.DEFINE_string("workdir", "runs/main", "a finished main-job workdir")
flags.DEFINE_string("out", None, "result JSON path")
flags.DEFINE_integer("seed", 0, "which seed's runs")
flags.DEFINE_list("impls", ["auto", "blockwise"], "implementations compared with xla")
flags.DEFINE_integer("num_batches", 4, "test batches")
flags.DEFINE_integer("train_steps", 3, "train steps compared")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from stts_jax.experiments import attention_check
  result = attention_check.run(FLAGS.config, FLAGS.workdir, seed=FLAGS.seed, impls=tuple(FLAGS.impls),
                               num_batches=FLAGS.num_batches, train_steps=FLAGS.train_steps)
  result["command"] = " ".join(["python"] + sys.argv)
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {FLAGS.out}")
  for c in result["checks"]:
    print(f"[{'PASS' if c['passed'] else 'FAIL'}] {c['name']}: {c['value']}")
  if not result["passed"]:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)

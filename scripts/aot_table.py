"""The before/after AOT memory table of the authors' recipe (Molmo2-4B STTS, issue 17).

  .venv/bin/python scripts/aot_table.py                       # every cell, ~1-3 min of compile each
  .venv/bin/python scripts/aot_table.py --only stts64_after_8dev,stts64_before_8dev --noresume
Each cell is `scripts/train.py --aot --noaot_flops --aot_json` in its own process on 8 or 64 virtual CPU
devices (`stts_jax/train/aot_table.py` lists them); results go to --out (one JSON per cell, with
command, commit and machine) plus table.md. CPU memory_analysis upcasts bf16: an estimate for TPU/GPU.
Set the device count nowhere else: each cell sets its own XLA_FLAGS.
"""

import os
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

flags.DEFINE_string("out", os.path.join(REPO, "docs", "results", "aot"), "result directory")
flags.DEFINE_list("only", [], "run only these cells (names as in stts_jax/train/aot_table.py)")
flags.DEFINE_bool("resume", True, "skip cells whose JSON already exists")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from stts_jax.train import aot_table
  aot_table.run(FLAGS.out, repo=REPO, only=FLAGS.only, resume=FLAGS.resume, log=lambda m: print(m, flush=True))
  with open(os.path.join(FLAGS.out, "table.md")) as f:
    print(f.read())


if __name__ == "__main__":
  app.run(main)

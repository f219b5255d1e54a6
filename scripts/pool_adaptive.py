"""Pool adaptive-budget sweeps of several training seeds into one report (docs/adaptive_budget.md).

  python scripts/pool_adaptive.py --sweeps DIR0,DIR1,DIR2 --seeds 0,1,2 --out DIR

Each DIR is a `scripts/evaluate.py --budget adaptive` output (adaptive.json + adaptive_examples.json.gz)
of the same split, method, rule, buckets, thresholds and fixed ratios on a model trained with that seed.
Writes DIR/adaptive.{json,md,png}: seed means, matched points on the seed-mean kept windows, paired
bootstrap intervals pooled over the seeds (and each seed's), with this command's provenance.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stts_jax import provenance  # noqa: E402
from stts_jax.eval import adaptive_eval  # noqa: E402

flags.DEFINE_list("sweeps", None, "comma-separated sweep directories, one per seed")
flags.DEFINE_list("seeds", None, "the training seed of each sweep, in the same order")
flags.DEFINE_string("out", None, "output directory")
flags.DEFINE_integer("resamples", 10000, "bootstrap resamples")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS.sweeps or not FLAGS.seeds or not FLAGS.out:
    raise app.UsageError("--sweeps, --seeds and --out are required")
  if len(FLAGS.sweeps) != len(FLAGS.seeds):
    raise app.UsageError(f"--sweeps has {len(FLAGS.sweeps)} directories, --seeds {len(FLAGS.seeds)} seeds")
  runs = []
  for d in FLAGS.sweeps:
    if not os.path.exists(os.path.join(d, "adaptive.json")):
      raise app.UsageError(f"{d}: no adaptive.json (not a --budget adaptive output)")
    runs.append(adaptive_eval.read(d))
  results = adaptive_eval.pool(runs, [int(s) for s in FLAGS.seeds], resamples=FLAGS.resamples)
  results["sources"] = list(FLAGS.sweeps)
  paths = adaptive_eval.write(results, FLAGS.out, {"provenance": provenance.record()})
  print(adaptive_eval.markdown(results))
  print("wrote " + ", ".join(paths))


if __name__ == "__main__":
  app.run(main)

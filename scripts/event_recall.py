"""Event recall of token selections and accuracy with the event kept vs dropped (default dataset).

  python scripts/event_recall.py --config configs/demo.py:variant=hard --split val \
      --rows "stts=runs/X/seed0/stts:stts,heuristic=runs/X/seed0/heuristic:heuristic" --out DIR

Each row is name=CHECKPOINT:method (stts | heuristic | random | none) at --ratio; CHECKPOINT `init`: the
config's model at its random initialisation (recall on untrained features). Writes
DIR/event_recall.{json,md} with this command's provenance (stts_jax/experiments/event_recall.py).
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stts_jax import config as config_lib  # noqa: E402
from stts_jax import provenance  # noqa: E402
from stts_jax.experiments import event_recall  # noqa: E402

config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:arg] (model and data sections)", lock_config=True)
flags.DEFINE_string("rows", None, "comma-separated name=CHECKPOINT:method")
flags.DEFINE_float("ratio", 0.5, "drop ratio of every row")
flags.DEFINE_string("split", "val", "data split")
flags.DEFINE_integer("max_examples", None, "only the first N questions")
flags.DEFINE_integer("batch_size", 32, "evaluation batch size")
flags.DEFINE_string("out", None, "output directory")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS.config or not FLAGS.rows or not FLAGS.out:
    raise app.UsageError("--config, --rows and --out are required")
  try:
    rows = event_recall.parse_rows(FLAGS.rows, FLAGS.ratio)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  cfgs = config_lib.build(FLAGS.config)
  results = event_recall.run(rows, cfgs["model"], cfgs["data"], FLAGS.split, batch_size=FLAGS.batch_size,
                             max_examples=FLAGS.max_examples)
  results["provenance"] = provenance.record()
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, "event_recall.json"), "w") as f:
    json.dump(results, f, indent=1, default=str)
  md = event_recall.markdown(results)
  with open(os.path.join(FLAGS.out, "event_recall.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  app.run(main)

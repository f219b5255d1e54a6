"""Builds the offline default dataset (transient framed picture video QA) from packaged media.

  python scripts/build_dataset.py --out data_cache/default            # ~1-2 min on 2 cores
  python scripts/build_dataset.py --variant hard                       # into data_cache/default_hard
  python scripts/build_dataset.py --out /tmp/small --clips 200,40,40 --workers 1

--variant hard: distractors that change more than the event, so the frame-difference heuristic
keeps the event window about as often as random (see `default_dataset`).
--variant recolour: the event is a framed face that is there all clip turning yellow, a small
change among bigger ones, so a change detector ranks it low in pixels and in ViT features.

Idempotent: an existing complete build with the same spec is reused (use --force to rebuild).
Prints the split sizes, oracle keep rates of the event window under 50 % heuristic / random
pruning, bytes on disk and build time (all also in <out>/meta.json).
"""

import json

from absl import app, flags, logging

from stts_jax.data import default_dataset

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output directory (default: data_cache/default, or data_cache/default_<variant> "
                    "for another --variant).")
flags.DEFINE_enum("variant", "default", default_dataset.VARIANTS, "Dataset variant (Spec.variant).")
flags.DEFINE_string("clips", None, "Clips per split as train,val,test (default: the Spec default).")
flags.DEFINE_integer("workers", 2, "Render/encode processes.")
flags.DEFINE_integer("seed", 0, "Dataset seed.")
flags.DEFINE_bool("tfds", True, "Also write the TFDS ArrayRecord copy under <out>/tfds.")
flags.DEFINE_bool("distractors", True, "False: calm camera, no movers/decoys/flicker (easy curriculum stage).")
flags.DEFINE_float("background_contrast", None, "Footage contrast in [0, 1] (default: the Spec default).")
flags.DEFINE_bool("force", False, "Rebuild even if a complete build with the same spec exists.")


def main(argv):
  del argv
  kw = {"seed": FLAGS.seed, "distractors": FLAGS.distractors, "variant": FLAGS.variant}
  if FLAGS.background_contrast is not None:
    kw["background_contrast"] = FLAGS.background_contrast
  if FLAGS.clips:
    kw["num_clips"] = tuple(int(x) for x in FLAGS.clips.split(","))
    if len(kw["num_clips"]) != 3:
      raise app.UsageError("--clips needs three comma-separated counts: train,val,test")
  spec = default_dataset.Spec(**kw)
  out = FLAGS.out or ("data_cache/default" if FLAGS.variant == "default" else f"data_cache/default_{FLAGS.variant}")
  logging.info("building the default dataset into %s with %s", out, spec)
  meta = default_dataset.build(out, spec, workers=FLAGS.workers, with_tfds=FLAGS.tfds, force=FLAGS.force)
  print(json.dumps({k: meta[k] for k in ("variant", "counts", "oracle_keep_rate_50pct", "bytes", "seconds")},
                   indent=1))


if __name__ == "__main__":
  app.run(main)

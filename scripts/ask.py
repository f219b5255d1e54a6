"""Ask a question about a local video with a Molmo2 / STTS checkpoint.

  python scripts/ask.py --checkpoint DIR --video PATH --question "..." [--question "..."]
      [--option A-text --option B-text] [--method none|stts|heuristic|random] [--ratio 0.5]
      [--max_frames N] [--max_fps F] [--max_new_tokens N] [--temperature T] [--top_p P] [--seed S]
      [--dtype float32|bfloat16] [--json] [--verbose]

DIR: an HF Molmo2 directory (config.json, safetensors, tokenizer.json, processor config) or an Orbax
run of ours (its workdir). Prints each answer and a line of what happened; with `--json`, stdout's
last lines are one JSON object per question. Bad input: a one-line error, exit code 2
(`--verbose`: the traceback).
"""

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("checkpoint", None, "HF Molmo2 directory or Orbax run")
flags.DEFINE_string("video", None, "video file (any container FFmpeg reads)")
flags.DEFINE_multi_string("question", None, "question (repeat for several; the video is decoded once)")
flags.DEFINE_multi_string("option", [], "multiple-choice option (repeat; applies to every question)")
flags.DEFINE_enum("method", None, ["none", "stts", "heuristic", "random"],
                  "pruning method (default: the checkpoint's; 'none' for HF checkpoints without STTS settings)")
flags.DEFINE_float("ratio", None, "fraction of the video's windows to drop, in [0, 1) (default: the checkpoint's)")
flags.DEFINE_integer("max_frames", None, "frames to sample at most (default: the checkpoint's processor)")
flags.DEFINE_float("max_fps", None, "sampling-rate cap (default: the checkpoint's processor; 0: no cap)")
flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate at most (the stop token included)")
flags.DEFINE_float("temperature", 0.0, "0: greedy")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (with --temperature > 0)")
flags.DEFINE_integer("seed", 0, "sampling and random-pruning seed")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                  "parameter and compute dtype (default: float32 for HF checkpoints, the run's for Orbax runs)")
flags.DEFINE_integer("prune_at", None, "ViT block after which windows are scored (default: the checkpoint's)")
flags.DEFINE_string("attention", None, "attention implementation (auto | xla | blockwise | pallas_gpu | splash)")
flags.DEFINE_integer("step", None, "Orbax run: checkpoint step (default: the latest)")
flags.DEFINE_bool("json", False, "print one JSON object per question as the last lines of stdout")
flags.DEFINE_string("out", None, "also write the answers with the command, commit and machine to this JSON file")
flags.DEFINE_bool("verbose", False, "show tracebacks and INFO logs")
FLAGS = flags.FLAGS


def summary_line(answer) -> str:
  t = answer.timings_s
  kept, total = answer.vision_tokens["kept"], answer.vision_tokens["total"]
  method = "unpruned" if answer.method == "none" else f"{answer.method} {answer.ratio:g}"
  parts = [f"{answer.num_frames} frames (bucket {answer.frame_bucket})",
           f"vision tokens {kept}/{total} kept ({method})",
           f"video decode {t['video_decode']:.2f} s, vision {t['vision']:.3f} s, prefill {t['prefill']:.3f} s",
           f"{len(answer.token_ids)} tokens at {t['decode_tokens_per_s']:.1f} tok/s"]
  if t.get("compile"):
    parts.append(f"compile {t['compile']:.1f} s")
  return " | ".join(parts)


def run() -> list[dict]:
  from stts_jax import inference
  if not FLAGS.checkpoint or not FLAGS.video or not FLAGS.question:
    raise inference.AskError("--checkpoint, --video and --question are required")
  pipe = inference.Pipeline.from_checkpoint(
      FLAGS.checkpoint, method=FLAGS.method, ratio=FLAGS.ratio, dtype=FLAGS.dtype, max_frames=FLAGS.max_frames,
      max_fps=FLAGS.max_fps, attention=FLAGS.attention, step=FLAGS.step, prune_at=FLAGS.prune_at)
  video = pipe.load_video(FLAGS.video)
  out = []
  for question in FLAGS.question:
    answer = pipe.ask(video, question, options=FLAGS.option or None, max_new_tokens=FLAGS.max_new_tokens,
                      temperature=FLAGS.temperature, top_p=FLAGS.top_p, seed=FLAGS.seed)
    if not FLAGS.json:
      print(f"Q: {question}\nA: {answer.text}\n   [{summary_line(answer)}]", flush=True)
    out.append(answer.to_json())
  if FLAGS.out:
    from stts_jax.train import aot
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump({"command": " ".join(sys.argv), "commit": aot.git_commit(), "machine": aot.machine(),
                 "checkpoint": FLAGS.checkpoint, "source": pipe.source, "video": FLAGS.video,
                 "sampled": {"num_frames": video.num_frames, "indices": video.indices.tolist(),
                             "fps": video.info.fps, "total_frames": video.info.total_frames},
                 "settings": pipe.settings.to_json(), "answers": out}, f, indent=1)
  if FLAGS.json:
    for rec in out:
      print(json.dumps(rec), flush=True)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO if FLAGS.verbose else logging.WARNING)
  from stts_jax.data import video as video_lib
  from stts_jax import inference
  try:
    run()
  except (inference.AskError, video_lib.VideoError, FileNotFoundError) as e:
    if FLAGS.verbose:
      raise
    print(f"ask.py: error: {e}".splitlines()[0], file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)

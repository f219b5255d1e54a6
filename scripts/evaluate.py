"""Evaluate a checkpoint: pruning methods x ratios (x frame counts) on the same examples.

  python scripts/evaluate.py --config configs/train_tiny.py --checkpoint /tmp/tiny \
      --methods none,random,heuristic,stts --ratios 0,0.3,0.5,0.7
  python scripts/evaluate.py --config configs/train_tiny.py --checkpoint /tmp/tiny --frames 8,16 --ratios 0.5
  (an HF Molmo2 directory works as --checkpoint too; results go to <workdir>/eval/results.{json,md})
  Multi-process: as scripts/train.py (--coordinator/--num_processes/--process_id or --distributed),
  e.g. python scripts/launch_local.py -n 2 -- scripts/evaluate.py --config ... --checkpoint ...
Adaptive budget (issue 22, docs/adaptive_budget.md): fixed ratios vs one adaptive point per threshold,
  python scripts/evaluate.py --config configs/demo.py --checkpoint RUN --split val --budget adaptive \
      --adaptive_method stts --thresholds 0.2,0.4,0.6 --ratios 0.3,0.5,0.7 --out DIR
  writes DIR/adaptive.{json,md,png} (accuracy vs mean kept windows, per camera type, paired bootstrap).
The config's `eval` section (stts_jax/eval/config.py) sets the defaults; these flags override it.
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

# configs/*.py import `configs.common`: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stts_jax import hostmem  # noqa: E402
hostmem.reexec_with_hugepages()   # before JAX starts: glibc reads its tunables at start-up

config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:arg]", lock_config=True)
flags.DEFINE_string("checkpoint", None, "Orbax run (workdir, checkpoints/ or a step dir) or HF Molmo2 dir")
flags.DEFINE_string("methods", None, "comma-separated: none,random,heuristic,stts")
flags.DEFINE_string("ratios", None, "comma-separated pruning ratios, e.g. 0,0.3,0.5,0.7")
flags.DEFINE_string("frames", None, "comma-separated frame counts (test-time scaling), e.g. 8,16")
flags.DEFINE_string("split", None, "data split (default: eval.split)")
flags.DEFINE_integer("max_examples", None, "evaluate only the first N examples")
flags.DEFINE_integer("step", None, "Orbax step (default: latest)")
flags.DEFINE_string("out", None, "output directory for results.json / results.md")
flags.DEFINE_enum("budget", "fixed", ["fixed", "adaptive"], "fixed: the usual cells; adaptive: threshold sweep")
flags.DEFINE_string("thresholds", None, "--budget adaptive: comma-separated score thresholds")
flags.DEFINE_string("buckets", None, "--budget adaptive: drop-ratio buckets (default 0.3,0.5,0.7,0.85)")
flags.DEFINE_string("adaptive_method", "stts", "--budget adaptive: stts | heuristic (whose scores)")
flags.DEFINE_enum("adaptive_rule", "threshold", ["threshold", "mass"],
                  "--budget adaptive: threshold (--thresholds are score thresholds) | mass (--thresholds are "
                  "kept score-mass fractions in (0, 1])")
flags.DEFINE_bool("group_batches", True, "--budget adaptive: group videos by bucket across batches (each bucket "
                  "pass full of its videos); --nogroup_batches: one pass per bucket present in each batch")
flags.DEFINE_bool("reuse_scored", True, "--budget adaptive: bucket passes start from the score pass's ViT output "
                  "(up to the soft block); --noreuse_scored: from the patches (same results, more work)")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() from the cluster env")
flags.DEFINE_string("coordinator", None, "multi-process: coordinator host:port")
flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
flags.DEFINE_integer("process_id", None, "multi-process: this process's id")
flags.DEFINE_integer("heartbeat_timeout", 100, "multi-process: seconds until a silent peer counts as dead")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from stts_jax.train import distributed
  distributed.configure_logging(logging.INFO, process_index=FLAGS.process_id or 0)
  distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id,
                         from_env=FLAGS.distributed, heartbeat_timeout_s=FLAGS.heartbeat_timeout)
  distributed.configure_logging(logging.INFO)
  import jax
  from stts_jax.eval import main as eval_main
  logging.info("jax %s, backend %s, %d processes, devices: %s", jax.__version__, jax.default_backend(),
               jax.process_count(), jax.devices())
  if FLAGS.budget == "adaptive":
    import json
    from stts_jax import provenance
    if not FLAGS.thresholds:
      raise app.UsageError("--budget adaptive needs --thresholds")
    extra = {"provenance": provenance.record()}
    _, paths = eval_main.adaptive_from_config(
        FLAGS.config, FLAGS.checkpoint, method=FLAGS.adaptive_method,
        thresholds=eval_main.parse_list(FLAGS.thresholds, float), buckets=eval_main.parse_list(FLAGS.buckets, float),
        ratios=eval_main.parse_list(FLAGS.ratios, float), split=FLAGS.split, max_examples=FLAGS.max_examples,
        step=FLAGS.step, out_dir=FLAGS.out, extra=json.loads(json.dumps(extra, default=str)),
        rule=FLAGS.adaptive_rule, group_batches=FLAGS.group_batches, reuse_scored=FLAGS.reuse_scored)
    print(open(paths[1]).read(), flush=True)
    print("results: " + "\n         ".join(paths), flush=True)
    return
  with distributed.Supervisor():
    results, json_path, md_path = eval_main.evaluate_from_config(
        FLAGS.config, FLAGS.checkpoint, methods=eval_main.parse_list(FLAGS.methods, str),
        ratios=eval_main.parse_list(FLAGS.ratios, float), frames=eval_main.parse_list(FLAGS.frames, int),
        split=FLAGS.split, max_examples=FLAGS.max_examples, step=FLAGS.step, out_dir=FLAGS.out)
  if jax.process_index() == 0:
    from stts_jax.eval import runner
    print(runner.markdown(results), flush=True)
    print(f"results: {json_path}\n         {md_path}", flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "checkpoint"])
  app.run(main)

"""Train (or AOT-size) an STTS Molmo2 model.

  python scripts/train.py --config configs/train_tiny.py --workdir /tmp/tiny
  python scripts/train.py --config configs/train_tiny.py:steps=50 --config.train.log_every=5 --workdir ...
  python scripts/train.py --config configs/molmo2_4b_stts.py --aot        # 8 virtual CPU devices:
      XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python scripts/train.py ...
      add --aot_json report.json for the machine-readable report, --noaot_flops to skip the FLOP count
  Multi-process: --coordinator host:port --num_processes N --process_id i (or the cluster's env
  vars with --distributed); locally: python scripts/launch_local.py -n 2 -- scripts/train.py ...
  A failure on any process stops all of them (stts_jax/train/distributed.py).
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
flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl and TensorBoard logs")
flags.DEFINE_bool("aot", False, "lower+compile the step from abstract shapes, print FLOPs and memory")
flags.DEFINE_string("aot_json", None, "with --aot: also write the report as JSON to this path")
flags.DEFINE_bool("aot_flops", True, "with --aot: count FLOPs on an unrolled lowering (slower)")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() from the cluster env")
flags.DEFINE_string("coordinator", None, "multi-process: coordinator host:port")
flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
flags.DEFINE_integer("process_id", None, "multi-process: this process's id")
flags.DEFINE_integer("heartbeat_timeout", 100, "multi-process: seconds until a silent peer counts as dead")
flags.DEFINE_float("step_timeout", 0, "exit (all processes) if no step finishes in this many seconds "
                   "(0: off; must cover compilation)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from stts_jax.train import distributed
  distributed.configure_logging(logging.INFO, process_index=FLAGS.process_id or 0)
  distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id,
                         from_env=FLAGS.distributed, heartbeat_timeout_s=FLAGS.heartbeat_timeout)
  distributed.configure_logging(logging.INFO)
  import jax
  from stts_jax.train import main as train_main
  logging.info("jax %s, backend %s, %d processes, devices: %s", jax.__version__, jax.default_backend(),
               jax.process_count(), jax.devices())
  if FLAGS.aot:
    report = train_main.aot_from_config(FLAGS.config, count_flops=FLAGS.aot_flops)
    print(report.summary(), flush=True)
    if FLAGS.aot_json:
      train_main.write_aot_json(report, FLAGS.aot_json, FLAGS.config, [sys.executable] + sys.argv)
    return
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required for training")
  with distributed.Supervisor(step_timeout_s=FLAGS.step_timeout or None) as supervisor:
    result = train_main.train_and_evaluate(FLAGS.config, FLAGS.workdir, on_step=supervisor.tick)
  if result.history:
    logging.info("final metrics: %s", result.history[-1])


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)

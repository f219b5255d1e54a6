"""Child process of tests/multihost, started by `stts_jax.train.launch` (which appends
--coordinator/--num_processes/--process_id): trains the toy model on this process's Grain shard
under `distributed.Supervisor`, like scripts/train.py does with the real model."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data", required=True)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--checkpoint_every", type=int, default=0)
  parser.add_argument("--raise_on", type=int, default=-1, help="this process raises ...")
  parser.add_argument("--raise_at", type=int, default=1, help="... when reading this batch (1-based)")
  parser.add_argument("--heartbeat_timeout", type=int, default=10)
  parser.add_argument("--coordinator")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  args = parser.parse_args()
  from stts_jax.train import distributed
  distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                         heartbeat_timeout_s=args.heartbeat_timeout)
  distributed.configure_logging()
  import jax
  from tests.multihost import common
  with distributed.Supervisor(step_timeout_s=600.0) as supervisor:
    it = common.data_iterator(args.data, jax.process_index(), jax.process_count())
    if jax.process_index() == args.raise_on:
      it = common.RaiseAt(it, at=args.raise_at)
    common.toy_train(it, args.workdir, steps=args.steps, checkpoint_every=args.checkpoint_every,
                     on_step=supervisor.tick)


if __name__ == "__main__":
  main()

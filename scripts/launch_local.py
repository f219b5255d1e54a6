"""Run a multi-process script as N local JAX processes (D virtual CPU devices each).

  python scripts/launch_local.py -n 2 -d 4 -- scripts/train.py --config configs/train_tiny.py \
      --workdir /tmp/tiny2 --heartbeat_timeout 10
  python scripts/launch_local.py -n 2 -- scripts/evaluate.py --config ... --checkpoint /tmp/tiny2
Each process gets `--coordinator=127.0.0.1:PORT --num_processes=N --process_id=i` appended and
`XLA_FLAGS=--xla_force_host_platform_device_count=D`; output lines are prefixed `[p{i}]`.
If a process fails, the others get --grace seconds to stop by themselves, then SIGTERM and, 5 s
later, SIGKILL. Exit code 0 if all succeeded, else 1 (the failing process is named on stderr).
See stts_jax/train/launch.py.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("-n", "--num_processes", type=int, default=2)
  parser.add_argument("-d", "--devices_per_process", type=int, default=4)
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  parser.add_argument("--grace", type=float, default=30.0, help="seconds the others get to stop alone")
  parser.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- script.py [args]")
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  from stts_jax.train import launch
  result = launch.launch(command, num_processes=args.num_processes,
                         devices_per_process=args.devices_per_process, port=args.port,
                         grace_s=args.grace, timeout_s=args.timeout)
  if not result.ok:
    print(f"launch_local: {result.describe()}", file=sys.stderr, flush=True)
  return 0 if result.ok else 1


if __name__ == "__main__":
  sys.exit(main())

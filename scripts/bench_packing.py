"""Benchmark row of issue 20: training examples/s with example packing vs padding to frame buckets.

  .venv/bin/python scripts/build_dataset.py --variant varlen --clips 1200,100,100 --notfds   # once
  .venv/bin/python scripts/bench_packing.py --data data_cache/default_varlen --out docs/results/example_packing
The demo model (configs/demo.py) unpruned and at STTS 0.5 on the varlen dataset (4-32 frames per clip);
`stts_jax/bench/example_packing.py` says what is timed. Writes <out>/bench.json (command, commit,
machine inside) and <out>/bench.md; ~15-25 min on 2 CPU cores (10 train-step compiles).
  .venv/bin/python scripts/bench_packing.py --out docs/results/example_packing --table   # re-render bench.md
"""

import json
import os
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from stts_jax import hostmem  # noqa: E402
hostmem.reexec_with_hugepages(steady=True)   # before JAX starts: glibc reads its tunables at start-up

flags.DEFINE_string("data", "data_cache/default_varlen", "varlen default-dataset directory")
flags.DEFINE_string("out", "docs/results/example_packing", "result directory")
flags.DEFINE_integer("examples", 480, "examples of the shuffled train split both layouts run")
flags.DEFINE_float("ratio", 0.5, "STTS ratio")
flags.DEFINE_integer("pack_seq_len", 704, "pruned tokens per packed row")
flags.DEFINE_integer("pack_frames", 40, "frames per packed row")
flags.DEFINE_integer("rows", 8, "packed rows per step")
flags.DEFINE_integer("batch", 8, "padding: examples per step")
flags.DEFINE_integer("lookahead", 16, "packing: examples that may wait for a later step")
flags.DEFINE_bool("table", False, "only re-render <out>/bench.md from <out>/bench.json")
FLAGS = flags.FLAGS


def render(result):
  """bench.md: the table from the result dict plus where it came from."""
  from stts_jax.bench import example_packing
  md = example_packing.markdown(result)
  prov = result["provenance"]
  return md + (f"\nCommand: `{prov['command']}`; commit {prov['commit']['commit'][:12]}"
               f"{' (dirty)' if prov['commit']['dirty'] else ''}; machine {prov['machine']['host']} "
               f"({prov['machine']['cpu_count']} CPUs, jax {prov['machine']['jax']}); {prov['date']}.\n")


def main(argv):
  del argv
  if FLAGS.table:
    with open(os.path.join(FLAGS.out, "bench.json")) as f:
      result = json.load(f)
  else:
    from configs import demo
    from stts_jax import provenance
    from stts_jax.bench import example_packing
    from stts_jax.data import default_dataset
    data_cfg = default_dataset.data_config(FLAGS.data, max_frames=32, seq_len=768, on_error="raise", num_threads=1)
    s = example_packing.Settings(num_examples=FLAGS.examples, batch=FLAGS.batch, rows=FLAGS.rows,
                                 pack_seq_len=FLAGS.pack_seq_len, pack_frames=FLAGS.pack_frames,
                                 lookahead=FLAGS.lookahead)
    result = example_packing.run(demo.model_config, data_cfg, s, ratio=FLAGS.ratio,
                                 log=lambda m: print(m, flush=True))
    result["provenance"] = provenance.record()
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "bench.json"), "w") as f:
      json.dump(result, f, indent=1, default=str)
  md = render(result)
  with open(os.path.join(FLAGS.out, "bench.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  app.run(main)

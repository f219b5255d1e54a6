"""Benchmark STTS: measured speedup vs frames and prune ratio, or predicted at real sizes.

  python scripts/benchmark.py --config configs/bench_cpu.py --frames 8,16,32,64 --ratios 0,0.3,0.5,0.7 \
      --out /tmp/stts_bench
  python scripts/benchmark.py --config configs/molmo2_4b_stts.py --abstract --frames 64,128,256 \
      --ratios 0.5 --out /tmp/stts_bench_4b          # shapes only, no weights (~1 min per frame count)
  python scripts/benchmark.py --attention_layer --out docs/results   # one LLM attention layer, blockwise vs xla
  python scripts/benchmark.py --config configs/bench_cpu.py --attention_auto --out /tmp/auto   # auto per cell
  python scripts/benchmark.py --generation --out docs/results/generation_cpu   # TTFT + decode tok/s, tiny/demo
      [--frames 8,32,128 --repeats 20 --max_new_tokens 32 --note "shared machine"]  (unpruned vs STTS 0.5)
  python scripts/benchmark.py --table docs/results/bench_cpu_bef7f23/bench.json   # its bench.md again
Writes CSV + JSON + a markdown table of every cell (bench.md) + PNGs to --out and prints the checks
(speedup / FLOP-ratio efficiency, never slower than unpruned, overhead share, XLA vs analytic FLOPs, one compilation per part); exits 1 if
one fails. Measure on a quiet machine.
"""

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # `configs` package
from stts_jax import hostmem  # noqa: E402
hostmem.reexec_with_hugepages(steady=True)   # before JAX starts: glibc reads its tunables at start-up

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:arg]", lock_config=True)
flags.DEFINE_string("out", None, "output directory")
flags.DEFINE_list("frames", None, "frame counts (default: the config's; abstract: 64,128,256)")
flags.DEFINE_list("ratios", None, "prune ratios (default: the config's; abstract: 0.5)")
flags.DEFINE_bool("abstract", False, "lower the config's model from shapes only and predict speedups")
flags.DEFINE_bool("memory", False, "abstract mode: also compile the full step for memory_analysis()")
flags.DEFINE_bool("attention_layer", False, "time one attention layer (Molmo2 LLM mask), blockwise vs xla")
flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192"], "attention_layer: sequence lengths")
flags.DEFINE_integer("repeats", 5, "attention_layer: timed calls per implementation and part; "
                     "generation: at least this many timed rounds (default there: 20; more until 4 s per cell)")
flags.DEFINE_bool("attention_auto", False, "resolve model.attention=auto at every grid cell of --config (traced)")
flags.DEFINE_bool("generation", False, "time to first token and decode tokens/s of the tiny and demo models, "
                  "unpruned vs STTS 0.5 (stts_jax/bench/generation.py)")
flags.DEFINE_integer("max_new_tokens", 32, "generation: tokens generated per call (no stop tokens)")
flags.DEFINE_list("models", ["tiny", "demo"], "generation: models (tiny, demo)")
flags.DEFINE_string("note", "", "generation: free text stored in the JSON (e.g. that the machine was shared)")
flags.DEFINE_string("table", None, "write the markdown table of every cell of this bench.json to bench.md "
                    "beside it (no timing)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  import jax
  from stts_jax.bench import main as bench_main
  from stts_jax.bench import report
  logging.info("jax %s, backend %s, devices: %s", jax.__version__, jax.default_backend(), jax.devices())
  if FLAGS.attention_layer:
    from stts_jax.bench import attention_layer
    out = attention_layer.run(FLAGS.out, lengths=[int(x) for x in FLAGS.lengths], repeats=FLAGS.repeats)
    print(json.dumps(out["checks"], indent=1), flush=True)
    sys.exit(0 if all(c["ok"] for c in out["checks"].values()) else 1)
  if FLAGS.generation:
    from stts_jax.bench import generation
    out = generation.run(FLAGS.out, models=FLAGS.models,
                         frames=[int(x) for x in FLAGS.frames] if FLAGS.frames else (8, 32, 128),
                         max_new_tokens=FLAGS.max_new_tokens, rounds=FLAGS.repeats if FLAGS["repeats"].present else 20,
                         note=FLAGS.note)
    print(json.dumps(out["checks"], indent=1), flush=True)
    sys.exit(0 if all(c["ok"] is not False for c in out["checks"].values()) else 1)
  if FLAGS.table:
    with open(FLAGS.table) as f:
      rows = json.load(f)["rows"]
    path = report.write_markdown(rows, os.path.join(os.path.dirname(os.path.abspath(FLAGS.table)), "bench.md"))
    print(open(path).read(), flush=True)
    return
  if FLAGS.config is None:
    raise app.UsageError("--config is required (except with --attention_layer, --generation or --table)")
  frames = [int(x) for x in FLAGS.frames] if FLAGS.frames else None
  ratios = [float(x) for x in FLAGS.ratios] if FLAGS.ratios else None
  if FLAGS.attention_auto:
    out = bench_main.attention_auto(FLAGS.config, FLAGS.out, frames=frames, ratios=ratios)
    print(json.dumps(out, indent=1), flush=True)
    return
  if FLAGS.abstract:
    out = bench_main.abstract_benchmark(FLAGS.config, FLAGS.out, frames=frames or (64, 128, 256),
                                        ratios=ratios or (0.5,), memory=FLAGS.memory)
    print(json.dumps(out["rows"], indent=1), flush=True)
    return
  out = bench_main.benchmark(FLAGS.config, FLAGS.out, frames=frames, ratios=ratios)
  print(json.dumps(out["checks"], indent=1), flush=True)
  failed = report.failed(out["checks"])
  if failed:
    print(f"FAILED checks: {', '.join(failed)}", flush=True)
    sys.exit(1)


if __name__ == "__main__":
  flags.register_validator("out", lambda v: v is not None or FLAGS.table is not None,
                           message="--out is required (except with --table)")
  app.run(main)

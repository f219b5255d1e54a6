"""AOT memory of long-video inference: vision stage + LLM prefill (+ decode) of Molmo2-4B on one device.

  JAX_PLATFORMS=cpu .venv/bin/python scripts/aot_prefill.py --frames 384 --methods none,stts --ratio 0.5 \
      --dtypes bfloat16,float32 --out docs/results/aot/prefill_384.json
Each cell builds the recipe config (`configs/molmo2_4b_stts.py`: Molmo2-4B, prune_at 3; packed ViT rows
`--rows`) for (method, dtype, vit_chunk), with parameters in that dtype (`dtype=bfloat16`: bfloat16
parameters and compute, what one would serve on one 80 GiB GPU) and no remat, then lowers and compiles
the eval predictor's stages from abstract shapes only (`stts_jax/eval/aot_prefill.py`; no weights are
allocated). The static prompt length S is `aot_prefill.prompt_seq_len(T)` rounded up to --seq_multiple
(as `inference.Pipeline` buckets it) unless --seq is given.

Writes one JSON (--out: command, commit, machine, settings, per-cell results; --resume keeps cells
already there with the same config) and a markdown table next to it (--md, default: --out with .md),
prints the table, and exits 1 if some cell's peak over its compiled stages (arguments + temporaries +
outputs + what the caller still holds, see the module) exceeds --limit_gib.
--extra adds a cell as key=value pairs (method, dtype, vit_chunk, rows, stages joined by '+'), e.g.
`--extra method=none,vit_chunk=0`. Run it with JAX_PLATFORMS=cpu: CPU memory_analysis upcasts many
bfloat16 buffers to float32, so its numbers are an estimate (an upper bound) for a GPU.
"""

import json
import os
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

flags.DEFINE_integer("frames", 384, "frames T of the video (static bucket)")
flags.DEFINE_list("methods", ["none", "stts"], "pruning methods (none = unpruned)")
flags.DEFINE_float("ratio", 0.5, "pruning ratio of the pruned methods")
flags.DEFINE_list("dtypes", ["bfloat16"], "parameter and compute dtypes, one cell each")
flags.DEFINE_integer("seq", 0, "static prompt length S (0: aot_prefill.prompt_seq_len(frames) rounded up to "
                     "--seq_multiple, as inference.Pipeline buckets it)")
flags.DEFINE_integer("seq_multiple", 256, "with --seq 0: S is a multiple of this (inference.Pipeline: 256)")
flags.DEFINE_integer("text_tokens", 128, "text tokens besides the video in the prompt (for seq=0)")
flags.DEFINE_integer("max_new_tokens", 256, "KV-cache slots for generated tokens")
flags.DEFINE_string("attention", "auto", "model.attention (auto | xla | blockwise | pallas_gpu | splash)")
flags.DEFINE_integer("block", 128, "model.attention_block (blockwise query/key block; 128: CPU stands in "
                     "blockwise for the ViT's fused GPU kernel, whose tiles are 128)")
flags.DEFINE_integer("vit_chunk", 16, "model.vit_chunk (0: all ViT rows at once)")
flags.DEFINE_enum("rows", "typical", ["typical", "bound"], "packed ViT rows of the pruned methods "
                  "(recipe arg `rows`: typical = budget.typical_num_rows, bound = the proven bound)")
flags.DEFINE_list("stages", ["vision", "prefill", "decode"], "stages to compile per cell (aot_prefill.ALL_STAGES); "
                  "the peak is over vision and prefill, decode is reported beside it")
flags.DEFINE_multi_string("extra", [], "an extra cell as key=value pairs over method, dtype, vit_chunk, rows, "
                          "stages (vision+prefill), e.g. method=none,vit_chunk=0; repeatable")
flags.DEFINE_string("out", os.path.join(REPO, "docs", "results", "aot", "prefill_384.json"), "result JSON")
flags.DEFINE_string("md", None, "markdown table (default: --out with .md)")
flags.DEFINE_float("limit_gib", 80.0, "exit 1 if a cell's peak exceeds this")
flags.DEFINE_bool("resume", False, "keep cells already in --out with the same settings")
FLAGS = flags.FLAGS

GIB = 1024 ** 3


CELL_KEYS = ("method", "dtype", "vit_chunk", "rows", "stages")


def model_config(cell: dict, seq: int):
  from configs import molmo2_4b_stts
  from stts_jax import config as config_lib
  arg = (f"method={cell['method']},ratio={FLAGS.ratio},frames={FLAGS.frames},seq={seq},dtype={cell['dtype']},"
         f"remat=none,attention={FLAGS.attention},block={FLAGS.block},vit_chunk={cell['vit_chunk']},"
         f"rows={cell['rows']}")
  cfg = molmo2_4b_stts.get_config(arg)
  cfg.model.param_dtype = cell["dtype"]   # the recipe trains float32 parameters; inference serves them in `dtype`
  return config_lib.build_model_config(cfg.model), arg


def cells() -> list[dict]:
  from stts_jax.eval import aot_prefill
  base = dict(vit_chunk=FLAGS.vit_chunk, rows=FLAGS.rows, stages=tuple(FLAGS.stages))
  out = [dict(base, method=m, dtype=d) for d in FLAGS.dtypes for m in FLAGS.methods]
  for spec in FLAGS.extra:
    cell = dict(base, method=FLAGS.methods[0], dtype=FLAGS.dtypes[0])
    for item in spec.split(","):
      key, _, value = item.partition("=")
      if key not in CELL_KEYS or not value:
        raise app.UsageError(f"--extra {spec!r}: expected key=value pairs over {CELL_KEYS}")
      cell[key] = (int(value) if key == "vit_chunk" else tuple(value.split("+")) if key == "stages" else value)
    out.append(cell)
  return out


def cell_name(cell: dict) -> str:
  pruned = cell["method"] != "none"
  name = (f"{cell['method']}{FLAGS.ratio if pruned else ''}_{cell['dtype']}_chunk{cell['vit_chunk']}"
          + (f"_rows{cell['rows']}" if pruned else ""))
  return name if tuple(cell["stages"]) == tuple(FLAGS.stages) else name + "_" + "+".join(cell["stages"])


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.2f}"
  return "-" if v is None else str(v)


def markdown(doc: dict) -> str:
  from stts_jax.eval import aot_prefill
  rows = [aot_prefill.summary_row(name, cell["result"]) for name, cell in doc["cells"].items()]
  cols = ["cell", "method", "dtype", "frames", "S", "S'", "kept windows", "ViT rows", "vit_chunk", "params GiB",
          "vision args", "vision temps", "vision outs", "vision total", "prefill args", "prefill temps",
          "prefill outs", "prefill total", "args+temps GiB", "peak GiB (with outputs)", "peak stage",
          "decode temps", "decode total", "peak GiB incl. decode", "attention"]
  git = doc["git"]
  lines = [f"# AOT inference memory: {doc['settings']['frames']}-frame Molmo2-4B vision + prefill (+ decode), "
           f"one device",
           "",
           f"Generated by `scripts/aot_prefill.py` from `{os.path.basename(doc['settings']['out'])}` (commit "
           f"{git['commit'][:12]}{' dirty' if git['dirty'] else ''}, {doc['machine']['backend']} "
           f"`memory_analysis`, jax {doc['machine']['jax']}, batch 1, {doc['settings']['max_new_tokens']} new-token "
           f"cache slots). GiB. args/temps/outs: XLA's per-stage bytes (args only the parameters a stage reads: "
           f"jit drops unused ones). A stage's total adds the resident parameters it does not read and what "
           f"earlier stages leave held (prefill: the vision inputs; decode: those, the vision features and the "
           f"prefill's other outputs); args+temps and peak are the larger of the vision and prefill totals "
           f"without and with outputs (nothing is donated); decode is beside them. CPU upcasts many bfloat16 "
           f"buffers to float32 and runs the ViT attention blockwise: an estimate (upper bound) for GPU.",
           "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
  lines += ["", f"Command: `{' '.join(doc['command'])}`", ""]
  limit = doc["settings"]["limit_gib"]
  for name, cell in doc["cells"].items():
    res = cell["result"]
    verdict = "fits" if res["peak_all_gib"] <= limit else "DOES NOT FIT"
    dec = (f"; with decode {res['peak_all_gib']:.2f} GiB ({res['peak_all_stage']})"
           if "decode" in res["stages"] else "")
    lines.append(f"- {name}: peak {res['peak_gib']:.2f} GiB ({res['peak_stage']}){dec}: {verdict} in {limit:g} GiB")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  import jax
  from stts_jax.eval import aot_prefill
  from stts_jax.train import aot
  if len(jax.devices()) != 1:
    print(f"note: {len(jax.devices())} devices visible; compiling for the default one", flush=True)
  prompt = aot_prefill.prompt_seq_len(FLAGS.frames, text_tokens=FLAGS.text_tokens)
  seq = FLAGS.seq or -(-prompt // FLAGS.seq_multiple) * FLAGS.seq_multiple
  rule = ("given" if FLAGS.seq else f"1 + frames * (81 + 2 + {aot_prefill.TIMESTAMP_TOKENS}) + {FLAGS.text_tokens} = "
          f"{prompt}, rounded up to a multiple of {FLAGS.seq_multiple}")
  settings = {"frames": FLAGS.frames, "seq_len": seq, "prompt_tokens": prompt, "seq_len_rule": rule,
              "max_new_tokens": FLAGS.max_new_tokens, "batch": 1, "ratio": FLAGS.ratio,
              "attention": FLAGS.attention, "block": FLAGS.block, "limit_gib": FLAGS.limit_gib,
              "out": os.path.relpath(os.path.abspath(FLAGS.out), REPO)}
  doc = {"settings": settings, "cells": {}}
  if FLAGS.resume and os.path.exists(FLAGS.out):
    with open(FLAGS.out) as f:
      old = json.load(f)
    doc["cells"] = dict(old.get("cells", {}))
  command = [sys.executable] + sys.argv
  for cell in cells():
    name = cell_name(cell)
    stages = tuple(cell["stages"])
    model_cfg, arg = model_config(cell, seq)
    if name in doc["cells"] and doc["cells"][name].get("config_arg") == arg:
      print(f"{name}: kept from {FLAGS.out}", flush=True)
      continue
    print(f"{name}: compiling ({arg}) ...", flush=True)
    t0 = time.perf_counter()
    res = aot_prefill.compile_inference(model_cfg, num_frames=FLAGS.frames, seq_len=seq,
                                        max_new_tokens=FLAGS.max_new_tokens, stages=stages)
    print(f"{name}: peak {res['peak_gib']:.2f} GiB, args+temps {res['args_plus_temps_gib']:.2f} GiB, "
          f"with decode {res['peak_all_gib']:.2f} GiB "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    doc["cells"][name] = {"config": "configs/molmo2_4b_stts.py", "config_arg": arg,
                          "param_dtype": cell["dtype"], "stages": list(stages), "result": res,
                          "git": aot.git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    doc.update(command=command, git=aot.git_commit(), machine=aot.machine())
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump(doc, f, indent=1)
  doc.update(command=command, git=aot.git_commit(), machine=aot.machine())
  with open(FLAGS.out, "w") as f:
    json.dump(doc, f, indent=1)
  table = markdown(doc)
  md = FLAGS.md or os.path.splitext(FLAGS.out)[0] + ".md"
  with open(md, "w") as f:
    f.write(table)
  print(table)
  over = [n for n, c in doc["cells"].items() if c["result"]["peak_all_gib"] > FLAGS.limit_gib]
  if over:
    print(f"over {FLAGS.limit_gib:g} GiB: {', '.join(over)}", flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)

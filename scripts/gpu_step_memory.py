"""Memory and time of a shallow Molmo2-4B STTS train step on one accelerator, before vs after.

"Shallow": the real widths (ViT 1152, LLM 2560, vocab 151936 + 128) and the real recipe shapes (64 frames,
sequence 9686, STTS ratio 0.5, micro-batch 1, bfloat16 compute, float32 parameters and AdamW state, full
remat), but only `--vit_layers` ViT blocks (adapter taps at the last two) and `--llm_layers` decoder
layers, so the step fits one device and compiles in seconds. Variants differ only in the attention
implementation and the loss logits:
  before: attention=xla (materialised [heads, L, L] scores) and full [L, V] logits;
  after:  attention=auto (fused / blockwise) and loss-only logits.
Per variant: XLA's compiled memory_analysis (arguments, temporaries: on GPU/TPU no bf16 upcast), the
device's peak bytes in use after running (memory_stats), and the step time (median of --repeats,
compilation excluded). A variant that does not fit is reported as an error, not skipped.

  python scripts/gpu_step_memory.py --out /tmp/step.json                 # on the GPU machine
  python scripts/gpu_step_memory.py --out /tmp/step.json --smoke         # CPU check of the script itself
Imports only jax, flax, optax, ml_collections and stts_jax's model/train modules (no data stack).
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _commit() -> str:
  if os.environ.get("STTS_JAX_COMMIT"):   # the device machine's copy of the tree has no matching .git
    return os.environ["STTS_JAX_COMMIT"]
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
  except OSError:
    return "unknown"


def model_config(args, attention: str):
  from configs import molmo2_4b
  from stts_jax import config as config_lib
  cfg = molmo2_4b.model_config()
  taps = (args.vit_layers - 1, args.vit_layers - 2)
  vit = dataclasses.replace(cfg.vit, num_layers=args.vit_layers)
  llm = dataclasses.replace(cfg.llm, num_layers=args.llm_layers)
  if args.smoke:   # tiny widths: checks the script on CPU
    vit = dataclasses.replace(vit, hidden_size=64, intermediate_size=128, num_heads=4, head_dim=16)
    llm = dataclasses.replace(llm, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                              head_dim=16, vocab_size=512)
  adapter = dataclasses.replace(cfg.adapter, vit_layers=taps, num_heads=vit.num_heads, head_dim=vit.head_dim,
                                intermediate_size=4 * llm.hidden_size if args.smoke else cfg.adapter.intermediate_size)
  tokens = config_lib.TokenIds.for_vocab(llm.vocab_size, 10, 11, 12) if args.smoke else cfg.tokens
  stts = config_lib.STTSConfig(method="stts", ratio=args.ratio, prune_at=min(taps) - 2,
                               scorer_hidden=128 if args.smoke else 4304,
                               scorer_heads=vit.num_heads)
  return dataclasses.replace(cfg, vit=vit, llm=llm, adapter=adapter, tokens=tokens, stts=stts,
                             dtype="bfloat16", param_dtype="float32", remat="full", scan_layers=True,
                             attention=attention).validate()


def make_batch(mcfg, frames: int, seq_len: int, seed: int = 0):
  """A synthetic but well-formed batch: per frame a timestamp text, frame start, W patch tokens, frame
  end; then a question and an answer of 16 tokens (loss on the answer)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  tok = mcfg.tokens
  w = mcfg.windows_per_frame
  p, i = mcfg.vit.num_patches, mcfg.vit.patch_dim
  ids = []
  for _ in range(frames):
    ids += list(rng.integers(100, 200, 3)) + [tok.frame_start] + [tok.image_patch] * w + [tok.frame_end]
  question = list(rng.integers(100, 200, 24))
  answer = list(rng.integers(100, 200, 16))
  ids = (ids + question + answer)[:seq_len]
  n = len(ids)
  input_ids = np.full((1, seq_len), tok.pad, np.int32)
  input_ids[0, :n] = ids
  token_mask = np.zeros((1, seq_len), bool)
  token_mask[0, :n] = True
  target_ids = np.zeros((1, seq_len), np.int32)
  target_ids[0, :n - 1] = input_ids[0, 1:n]
  loss_mask = np.zeros((1, seq_len), bool)
  loss_mask[0, n - 1 - len(answer):n - 1] = True
  return {"patches": rng.integers(0, 256, (1, frames, p, i), dtype=np.uint8),
          "frame_mask": np.ones((1, frames), bool), "timestamps": np.arange(frames, dtype=np.float32)[None] / 2,
          "input_ids": input_ids, "token_mask": token_mask, "target_ids": target_ids, "loss_mask": loss_mask}


def run_variant(args, name: str, attention: str, loss_overrides: dict):
  import jax
  from flax import nnx
  from stts_jax.models import vlm
  from stts_jax.train import config as train_config
  from stts_jax.parallel import sharding
  from stts_jax.train import loop
  from stts_jax.parallel.config import MeshConfig

  mcfg = model_config(args, attention)
  tcfg = train_config.TrainConfig(num_steps=10, **loss_overrides).validate()
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:1])
  rules = sharding.make_rules(MeshConfig(data=1, fsdp=1, tensor=1))
  batch = make_batch(mcfg, args.frames, args.seq_len)
  row = {"variant": name, "attention": attention, "loss_mode": loss_overrides}
  try:
    t0 = time.perf_counter()
    graphdef, state, shardings = loop.init_state(lambda: vlm.Molmo2(mcfg, rngs=nnx.Rngs(0)), tcfg, mesh, rules)
    batch_sh = sharding.data_sharding({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()},
                                      mesh, rules)
    step_fn = loop.make_step_fn(graphdef, shardings, batch_sh, mesh, rules, tcfg)
    dev_batch = {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items()}
    with jax.set_mesh(mesh):
      compiled = step_fn.lower(state, dev_batch).compile()
    mem = compiled.memory_analysis()
    row.update(compile_s=time.perf_counter() - t0, argument_bytes=int(mem.argument_size_in_bytes),
               temp_bytes=int(mem.temp_size_in_bytes), output_bytes=int(mem.output_size_in_bytes))
    times = []
    with jax.set_mesh(mesh):
      for r in range(args.repeats + 1):
        t = time.perf_counter()
        state, metrics = compiled(state, dev_batch)
        jax.block_until_ready(metrics)
        if r:
          times.append(time.perf_counter() - t)
    stats = jax.devices()[0].memory_stats() or {}
    row.update(step_s_median=statistics.median(times), step_s=times, train_loss=float(metrics["loss"]),
               dense_fallback=float(metrics["dense_fallback"]),
               peak_bytes_in_use=stats.get("peak_bytes_in_use"), bytes_limit=stats.get("bytes_limit"))
  except Exception as e:   # an OOM is a result here: report it
    row.update(error=f"{type(e).__name__}: {str(e)[:400]}", trace=traceback.format_exc()[-2000:])
  finally:
    jax.clear_caches()
  return row


LOSS_FULL = {"loss": "full"}
LOSS_ONLY = {"loss": "answer"}
VARIANTS = {"before": ("xla", LOSS_FULL), "after": ("auto", LOSS_ONLY),
            "after_blockwise": ("blockwise", LOSS_ONLY), "xla_lossonly": ("xla", LOSS_ONLY)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--frames", type=int, default=64)
  ap.add_argument("--seq_len", type=int, default=9686)
  ap.add_argument("--ratio", type=float, default=0.5)
  ap.add_argument("--vit_layers", type=int, default=7)
  ap.add_argument("--llm_layers", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--variants", default="before,after")
  ap.add_argument("--smoke", action="store_true", help="tiny widths and shapes (CPU check of this script)")
  ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # internal: run one variant, print JSON
  args = ap.parse_args()
  if args.smoke:
    args.frames, args.seq_len, args.repeats = 4, 512, 1
  if args.one:
    attention, loss = VARIANTS[args.one]
    print("ROW " + json.dumps(run_variant(args, args.one, attention, loss)), flush=True)
    return
  import jax
  rows = []
  for name in args.variants.split(","):
    # One process per variant: the device's peak-bytes counter is per process.
    proc = subprocess.run([sys.executable] + sys.argv + ["--one", name], capture_output=True, text=True)
    found = [l[4:] for l in proc.stdout.splitlines() if l.startswith("ROW ")]
    row = json.loads(found[-1]) if found else {"variant": name, "error": f"exit {proc.returncode}",
                                                "trace": proc.stderr[-3000:]}
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
  out = {"command": " ".join([sys.executable] + sys.argv), "commit": _commit(), "machine": platform.node(),
         "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
         "jax": jax.__version__, "frames": args.frames, "seq_len": args.seq_len, "ratio": args.ratio,
         "vit_layers": args.vit_layers, "llm_layers": args.llm_layers, "rows": rows}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

"""The authors' STTS recipe on Molmo2-4B (DESIGN.md section 3.12): train everything end to end with
a fresh scorer, prune_at 3, ratio 0.5 (ViT and LLM side), 64 frames, sequence length 9686, global
batch 64, 6250 steps, 8 accelerators.

  AOT sizing on 8 virtual CPU devices (no weights allocated, ~1-2 min):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      .venv/bin/python scripts/train.py --config configs/molmo2_4b_stts.py --aot
  Training (needs the Molmo2-4B weights and a video-QA dataset at `data`):
    python scripts/train.py --config configs/molmo2_4b_stts.py:data=/path/ds --workdir /ckpt/run

arg: `data`, `ratio`, `frames`, `batch` (global), `accum` (microbatches per step), `seq` (seq_len),
`dtype` (bfloat16 | float32 compute), `remat` (none | full | dots), `fsdp` (-1: all devices),
`tensor`, `rows` (typical | bound: packed ViT rows per video; `typical` =
`budget.typical_num_rows(frames, 81, ratio)`, 40 at 64 frames, with the exact dense fallback for a
batch that needs more; `bound` = the proven worst case, ~T at ratio 0.5, which saves no ViT work).
The learning rates are our choice (DESIGN.md does not give the authors').
"""

import ml_collections

from configs import common
from configs import molmo2_4b
from stts_jax.models import budget


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, data="", ratio=0.5, frames=64, batch=64, accum=8, seq=9686,
                         dtype="bfloat16", remat="full", fsdp=-1, tensor=1, rows="typical")
  if arg.rows not in ("typical", "bound"):
    raise ValueError(f"rows must be 'typical' or 'bound', got {arg.rows!r}")
  cfg = molmo2_4b.get_config(f"dtype=float32,remat={arg.remat},scan=true")
  cfg.name = "molmo2_4b_stts"
  cfg.model.dtype = arg.dtype                 # compute dtype; parameters stay float32
  windows = (378 // 14 // 3) ** 2            # 81 pooled windows per frame
  num_rows = budget.typical_num_rows(arg.frames, windows, arg.ratio) if arg.rows == "typical" else None
  cfg.model.stts = dict(cfg.model.stts, method="stts", ratio=arg.ratio, prune_at=3, num_rows=num_rows)
  cfg.data = dict(path=arg.data, format="tfds", image_size=378, patch_size=14, pool=(3, 3),
                  max_frames=arg.frames, max_fps=2.0, seq_len=arg.seq, batch_size=arg.batch,
                  num_workers=8)
  cfg.train = dict(
      num_steps=6250, grad_accum=arg.accum, aux_weight=0.5, log_every=10, checkpoint_every=500,
      max_to_keep=3,
      optim=dict(learning_rate=1e-5, scorer_learning_rate=1e-4, warmup_steps=200, weight_decay=0.0,
                 clip_norm=1.0))
  cfg.mesh = dict(data=1, fsdp=arg.fsdp, tensor=arg.tensor)
  return cfg

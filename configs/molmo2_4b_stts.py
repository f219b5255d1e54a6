"""The authors' STTS recipe on Molmo2-4B (DESIGN.md section 3.12): train everything end to end with
a fresh scorer, prune_at 3, ratio 0.5 (ViT and LLM side), 64 frames, sequence length 9686, global
batch 64, 6250 steps, 8 accelerators.

  AOT sizing on 8 virtual CPU devices (no weights allocated, ~1-2 min):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      .venv/bin/python scripts/train.py --config configs/molmo2_4b_stts.py --aot
  Training (needs the Molmo2-4B weights and a video-QA dataset at `data`):
    python scripts/train.py --config configs/molmo2_4b_stts.py:data=/path/ds --workdir /ckpt/run

arg: `data`, `ratio`, `method` (stts | none: unpruned), `frames`, `batch` (global), `accum` (microbatches
per step), `seq` (seq_len; 0: the recipe's length for `frames`, 9686 at 64 and 11400 at 128),
`dtype` (bfloat16 | float32 compute), `remat` (none | full | dots), `fsdp` (-1: all devices),
`tensor`, `rows` (typical | bound: packed ViT rows per video; `typical` =
`budget.typical_num_rows(frames, 81, ratio)`, 40 at 64 frames, with the exact dense fallback for a
batch that needs more; `bound` = the proven worst case, ~T at ratio 0.5, which saves no ViT work),
`attention` (auto | xla | blockwise | pallas_gpu | splash: models/attention.py), `loss` (answer: LM
head at the answer positions only | full: [B, S, V] logits), `answer` (train.max_answer_tokens), `block` (model.attention_block: blockwise query/key block),
`vit_layers` / `llm_layers` (0: the real depth; smaller values for AOT breakdowns; the adapter taps
keep their offsets from the top), `freeze` (one regex over parameter paths, e.g. `^llm/layers/`),
`accum_dtype` (float32 | bfloat16: the gradient accumulator across microbatches, train.accum_dtype),
`vit_chunk` (model.vit_chunk: ViT rows of each example per rematerialised chunk, 0 = all at once; 16 by
default: at 64 frames per device the ViT backward otherwise sets the step's peak, see docs/real_scale.md).
`pack` (true: example packing, the authors' recipe; false: every example padded to `seq`), `pack_frames`
(frame budget of a packed row: the ViT's frames per row, 128), `pack_videos` (most examples per row, 8).
With packing, `seq` is the length of a packed row in *pruned* tokens (what the LLM runs on; 9686 at 64
frames) and `batch` counts packed rows; data.seq_len stays the longest single example (unpruned).
AOT table of this recipe (before/after memory): `scripts/aot_table.py`, docs/real_scale.md;
with packing: docs/example_packing.md.
The learning rates are our choice (DESIGN.md does not give the authors').
"""

import ml_collections

from configs import common
from configs import molmo2_4b
from stts_jax.models import budget

# The recipe's static LLM sequence length per frame count (the prompt with every frame's tokens).
SEQ_LEN = {64: 9686, 128: 11400}


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, data="", ratio=0.5, method="stts", frames=64, batch=64, accum=8, seq=0,
                         dtype="bfloat16", remat="full", fsdp=-1, tensor=1, rows="typical", attention="auto",
                         loss="answer", answer=256, block=512, vit_layers=0, llm_layers=0,
                         freeze="", accum_dtype="float32", vit_chunk=16, pack=True, pack_frames=128,
                         pack_videos=8)
  if arg.rows not in ("typical", "bound"):
    raise ValueError(f"rows must be 'typical' or 'bound', got {arg.rows!r}")
  if arg.method not in ("stts", "none"):
    raise ValueError(f"method must be 'stts' or 'none', got {arg.method!r}")
  seq = arg.seq or SEQ_LEN.get(arg.frames)
  if not seq:
    raise ValueError(f"no recipe sequence length for {arg.frames} frames (known: {sorted(SEQ_LEN)}); pass seq=")
  cfg = molmo2_4b.get_config(f"dtype=float32,remat={arg.remat},scan=true")
  cfg.name = "molmo2_4b_stts"
  cfg.model.dtype = arg.dtype                 # compute dtype; parameters stay float32
  cfg.model.attention = arg.attention
  cfg.model.attention_block = arg.block
  cfg.model.vit_chunk = arg.vit_chunk or None   # 0: all of an example's ViT rows at once
  if arg.vit_layers:   # taps keep the real offsets from the top (27 -> 24, 18; L -> L-3, L-9)
    if arg.vit_layers < 14:
      raise ValueError(f"vit_layers must be >= 14 (taps L-3, L-9 after prune_at 3), got {arg.vit_layers}")
    cfg.model.vit = dict(cfg.model.vit, num_layers=arg.vit_layers)
    cfg.model.adapter = dict(cfg.model.adapter, vit_layers=(arg.vit_layers - 3, arg.vit_layers - 9))
  if arg.llm_layers:
    cfg.model.llm = dict(cfg.model.llm, num_layers=arg.llm_layers)
  windows = (378 // 14 // 3) ** 2            # 81 pooled windows per frame
  num_rows = budget.typical_num_rows(arg.frames, windows, arg.ratio) if arg.rows == "typical" else None
  cfg.model.stts = dict(cfg.model.stts, method=arg.method, ratio=arg.ratio, prune_at=3,
                        num_rows=num_rows if arg.method != "none" else None)
  cfg.data = dict(path=arg.data, format="tfds", image_size=378, patch_size=14, pool=(3, 3),
                  max_frames=arg.frames, max_fps=2.0, seq_len=seq, batch_size=arg.batch,
                  num_workers=8, pack_examples=bool(arg.pack), pack_seq_len=seq,
                  pack_max_frames=max(arg.pack_frames, arg.frames), pack_max_videos=arg.pack_videos)
  cfg.train = dict(
      num_steps=6250, grad_accum=arg.accum, accum_dtype=arg.accum_dtype, aux_weight=0.5, log_every=10, checkpoint_every=500,
      max_to_keep=3, loss=arg.loss, max_answer_tokens=arg.answer,
      optim=dict(learning_rate=1e-5, scorer_learning_rate=1e-4, warmup_steps=200, weight_decay=0.0,
                 clip_norm=1.0, freeze=(arg.freeze,) if arg.freeze else ()))
  cfg.mesh = dict(data=1, fsdp=arg.fsdp, tensor=arg.tensor)
  return cfg

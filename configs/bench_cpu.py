"""A Molmo2-shaped model small enough to benchmark STTS on 2 CPU cores in minutes.

  .venv/bin/python scripts/benchmark.py --config configs/bench_cpu.py --out /tmp/stts_bench
  .venv/bin/python scripts/benchmark.py --config configs/bench_cpu.py:runlocal=true --out /tmp/bench_smoke
The full grid (frames 8, 16, 32, 64 x ratios 0, 0.3, 0.5, 0.7) takes roughly 10-20 minutes on a quiet
2-core machine, most of it compilation; `runlocal` (frames 4, 8; ratios 0, 0.5; one repeat) about 2.

Why these sizes. What decides STTS's speedup is the split of the work, not the absolute size, so
the proportions of Molmo2-4B are kept (analytic FLOPs, `stts_jax/bench/flops.py`):
  * ViT 20 blocks of width 64 with the scorer after block 2: blocks 0..3 (20%) always see every
    token, 16 see only kept ones (Molmo2: 5 of 25 blocks, prune_at 3);
  * 168 px frames -> 12 x 12 patches, 4 x 4 = 16 windows (LLM tokens) per frame, plus 5 text and
    marker tokens per frame in the prompt, so pruning 50% of the windows removes ~38% of the LLM
    sequence (Molmo2: 81 + 5, ~47%);
  * decoder 8 layers of width 256 (4/2 heads of 64, MLP 768): ViT 53% -> 43% of the forward from
    8 to 64 frames (Molmo2-4B: 44% -> 38%), the rest almost all LLM;
  * the scorer keeps Molmo2's shape (16 pooling heads -> 4 here, MLP hidden 4304/1152 x D), about
    1% of the pruned forward as in Molmo2-4B.
Analytic FLOP ratio unpruned/pruned at ratio 0.5 (typical rows): 1.47x at 8 frames, 1.65x at 64.

arg: `frames` ("8;16;32;64"), `ratios` ("0;0.3;0.5;0.7"), `batch`, `repeats`, `min_seconds` (per part,
see `stts_jax/bench/config.py`), `interleave` (timing rounds across the ratios of a frame count), `warmup`, `rows`
(heldout | typical | fit | bound | min, see `stts_jax/bench/config.py`), `compare_packing` (bool: also time
cells whose rows reach T with packing forced), `xla` (bool: count XLA FLOPs on unrolled copies),
`runlocal` (bool; its one-call, not interleaved timings fail the never-slower check by design).
"""

import ml_collections

from configs import common
from stts_jax import config as config_lib

VOCAB = 1024


def model_config() -> config_lib.ModelConfig:
  vit = config_lib.ViTConfig(hidden_size=64, intermediate_size=256, num_layers=20, num_heads=4, head_dim=16,
                             patch_size=14, image_size=168)
  adapter = config_lib.AdapterConfig(vit_layers=(19, 14), num_heads=4, head_dim=16, intermediate_size=768)
  llm = config_lib.LLMConfig(hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=2, head_dim=64,
                             intermediate_size=768, vocab_size=VOCAB, additional_vocab_size=128,
                             rope_theta=1e6, max_position_embeddings=8192)
  stts = config_lib.STTSConfig(method="stts", ratio=0.5, prune_at=2, scorer_hidden=239, scorer_heads=4)
  tokens = config_lib.TokenIds.for_vocab(VOCAB, chat_start=VOCAB - 3, chat_end=VOCAB - 2, pad=VOCAB - 1)
  return config_lib.ModelConfig(vit=vit, adapter=adapter, llm=llm, stts=stts, tokens=tokens).validate()


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(";") if x]


def _floats(text: str) -> list[float]:
  return [float(x) for x in text.split(";") if x]


def get_config(arg=None) -> ml_collections.ConfigDict:
  # Lists inside `arg` use ';' (',' separates the arguments): frames=8;16;32.
  arg = common.parse_arg(arg, frames="8;16;32;64", ratios="0;0.3;0.5;0.7", batch=1, repeats=3, warmup=1,
                         min_seconds=2.0, interleave=5,
                         rows="heldout", compare_packing=True, xla=True, runlocal=False)
  cfg = ml_collections.ConfigDict()
  cfg.name = "bench_cpu"
  cfg.model = config_lib.to_dict(model_config())
  cfg.train = dict(num_steps=1000, grad_accum=1, aux_weight=0.5, seed=0, tensorboard=False, progress_bar=False,
                   optim=dict(learning_rate=1e-4, scorer_learning_rate=1e-3, warmup_steps=10, clip_norm=1.0))
  cfg.mesh = dict(data=1, fsdp=1, tensor=1)
  frames, ratios, repeats = _ints(arg.frames), _floats(arg.ratios), arg.repeats
  if arg.runlocal:
    frames, ratios, repeats = [4, 8], [0.0, 0.5], 1
  cfg.bench = dict(frames=frames, ratios=ratios, batch_size=arg.batch, repeats=repeats, warmup=arg.warmup,
                   min_seconds=0.0 if arg.runlocal else arg.min_seconds,
                   interleave_rounds=0 if arg.runlocal else arg.interleave,
                   rows=arg.rows, compare_packing=arg.compare_packing, xla_flops=arg.xla)
  return cfg

"""Train the tiny STTS model on the offline default dataset (CPU, minutes).

  .venv/bin/python scripts/build_dataset.py --out data_cache/default      # once, ~1-2 min
  .venv/bin/python scripts/train.py --config configs/train_tiny.py --workdir /tmp/tiny
  (other data dir: --config configs/train_tiny.py:data=/path; overrides: --config.train.num_steps=50)
Measured: ~2.2 s/step (batch 16, 8 frames, 8 virtual devices) on 2 CPU cores shared with other
jobs (load ~15), compile ~60 s; the answer CE drops from ~5.6 to ~1.0 within 100 steps.

arg: `data` (default-dataset directory), `method` (none | random | heuristic | stts), `ratio`,
`steps`, `batch` (global batch), `lr`, `runlocal` (bool: 20 steps, batch 8, for smoke runs).
"""

import ml_collections

from configs import common
from configs import tiny


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, data="data_cache/default", method="stts", ratio=0.5, steps=600, batch=16,
                         lr=1e-3, runlocal=False)
  cfg = tiny.get_config(f"method={arg.method},ratio={arg.ratio}")
  cfg.name = "train_tiny"
  steps, batch = (20, 8) if arg.runlocal else (arg.steps, arg.batch)
  from stts_jax.config import to_dict
  from stts_jax.data import default_dataset
  cfg.data = to_dict(default_dataset.data_config(arg.data, batch_size=batch))
  cfg.train = dict(
      num_steps=steps, grad_accum=1, aux_weight=0.5, seed=0, log_every=10, eval_every=0,
      checkpoint_every=200, max_to_keep=2,
      optim=dict(learning_rate=arg.lr, scorer_learning_rate=arg.lr, warmup_steps=min(50, steps // 10),
                 weight_decay=0.0, clip_norm=1.0))
  cfg.mesh = dict(data=-1, fsdp=1, tensor=1)
  return cfg

"""Tiny Molmo2-shaped model for tests and notebooks (compiles in seconds on CPU).

  .venv/bin/python -c "from configs import tiny; print(tiny.get_config('method=stts'))"
126 px frames / 14 px patches -> 9x9 patches -> 3x3 windows per frame; ViT 6 x 32, LLM 2 x 64,
vocab 512 + 128 (see stts_jax/testing/tiny.py).

arg: `method` (none | random | heuristic | stts), `ratio` (float), `scan` (bool).
"""

import ml_collections

from configs import common
from stts_jax import config as config_lib
from stts_jax.testing import tiny


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, method="none", ratio=0.5, scan=True)
  cfg = ml_collections.ConfigDict()
  cfg.name = "tiny"
  model = config_lib.to_dict(tiny.tiny_model_config(method=arg.method, ratio=arg.ratio))
  model.update(scan_layers=arg.scan)
  cfg.model = model
  return cfg

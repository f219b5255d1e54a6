"""Molmo2-8B host model (no pruning).

  .venv/bin/python -c "from configs import molmo2_8b; print(molmo2_8b.get_config())"
For real weights use `stts_jax.weights.load_molmo2(dir)`: it reads the checkpoint's own config.json,
so the unverified numbers below never matter for a loaded model.

Verified: the text sizes are transformers' Molmo2TextConfig defaults, labelled "Molmo2-8B" there
(hidden 4096, 36 layers, 32 / 8 heads x 128, MLP 12288, vocab 151936 + 128), and the vision tower /
pooling are shared with Molmo2-4B (same SigLIP, taps [24, 18]). The adapter projector output must
equal the text width (4096), which the HF defaults (3584) get wrong.
NOT verified (no 8B config.json was available): rope_theta (5e6, copied from 4B; the HF default
10000 is known to be wrong for 4B), and the projector hidden size (12288, assuming it equals the
text MLP size as in 4B, where both are 9728).

arg: `dtype` (float32 | bfloat16), `remat` (none | full | dots), `scan` (bool).
"""

import dataclasses

import ml_collections

from configs import common
from configs import molmo2_4b
from stts_jax import config as config_lib


def model_config() -> config_lib.ModelConfig:
  base = molmo2_4b.model_config()
  return dataclasses.replace(
      base,
      adapter=dataclasses.replace(base.adapter, intermediate_size=12288),
      llm=dataclasses.replace(base.llm, hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8,
                              head_dim=128, intermediate_size=12288))


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, dtype="float32", remat="none", scan=True)
  cfg = ml_collections.ConfigDict()
  cfg.name = "molmo2_8b"
  model = config_lib.to_dict(model_config())
  model.update(dtype=arg.dtype, param_dtype=arg.dtype, remat=arg.remat, scan_layers=arg.scan)
  cfg.model = model
  return cfg

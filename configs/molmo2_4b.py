"""Molmo2-4B host model (no pruning), the released architecture.

  .venv/bin/python -c "from configs import molmo2_4b; print(molmo2_4b.get_config('dtype=bfloat16'))"
Builds in milliseconds; the model itself has ~4.9B parameters (load real weights with
`stts_jax.weights.load_molmo2(dir)`, which reads the checkpoint's own config.json).

Numbers verified against the Molmo2-4B hub config.json (reference/molmo2_hf.md section 0): ViT 27 x 1152
(16 heads x 72, MLP 4304, 378 px / 14), adapter taps [24, 18] (hub: [-3, -9]), pooling 16 heads x 72,
projector 9728 -> 2560; text 36 x 2560, 32 / 8 heads x 128, MLP 9728, vocab 151936 + 128, qwen3 q/k
norm, no qkv bias, rope_theta 5e6 without scaling, RMS eps 1e-6, max positions 36864.

arg: `dtype` (float32 | bfloat16, compute and parameters), `remat` (none | full | dots), `scan` (bool).
"""

import ml_collections

from configs import common
from stts_jax import config as config_lib


def model_config() -> config_lib.ModelConfig:
  """The released Molmo2-4B (the ModelConfig defaults are exactly this model)."""
  return config_lib.ModelConfig(
      vit=config_lib.ViTConfig(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16,
                               head_dim=72, patch_size=14, image_size=378, layer_norm_eps=1e-6),
      adapter=config_lib.AdapterConfig(vit_layers=(24, 18), num_heads=16, head_dim=72, intermediate_size=9728),
      llm=config_lib.LLMConfig(hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                               intermediate_size=9728, vocab_size=151936, additional_vocab_size=128,
                               rope_theta=5e6, qk_norm_type="qwen3", norm_after=False, rms_norm_eps=1e-6,
                               attention_bias=False, max_position_embeddings=36864),
      tokens=config_lib.TokenIds())


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, dtype="float32", remat="none", scan=True)
  cfg = ml_collections.ConfigDict()
  cfg.name = "molmo2_4b"
  model = config_lib.to_dict(model_config())
  model.update(dtype=arg.dtype, param_dtype=arg.dtype, remat=arg.remat, scan_layers=arg.scan)
  cfg.model = model
  return cfg

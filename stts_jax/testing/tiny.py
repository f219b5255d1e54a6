"""A tiny Molmo2-shaped model config for tests and notebooks (compiles in seconds on CPU).

126 px frames / 14 px patches -> 9x9 patches -> 3x3 = 9 windows per frame.
"""

import dataclasses
import functools

from flax import nnx

from stts_jax import config as config_lib

TINY_VOCAB = 512


def tiny_model_config(**stts_overrides) -> config_lib.ModelConfig:
  vit = config_lib.ViTConfig(hidden_size=32, intermediate_size=64, num_layers=6, num_heads=2,
                             head_dim=16, patch_size=14, image_size=126)
  adapter = config_lib.AdapterConfig(vit_layers=(5, 3), num_heads=2, head_dim=16, intermediate_size=64)
  llm = config_lib.LLMConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                             intermediate_size=128, vocab_size=TINY_VOCAB, additional_vocab_size=128,
                             rope_theta=10000.0, max_position_embeddings=4096)
  stts = config_lib.STTSConfig(method="none", ratio=0.5, prune_at=1, scorer_hidden=64, scorer_heads=2)
  stts = dataclasses.replace(stts, **stts_overrides)
  tokens = config_lib.TokenIds.for_vocab(TINY_VOCAB, chat_start=TINY_VOCAB - 3, chat_end=TINY_VOCAB - 2,
                                         pad=TINY_VOCAB - 1)
  return config_lib.ModelConfig(vit=vit, adapter=adapter, llm=llm, stts=stts, tokens=tokens).validate()


@functools.lru_cache(maxsize=None)
def _shared_stts_model():
  from stts_jax.models.vlm import Molmo2   # lazy: importing the config helpers stays cheap
  return Molmo2(tiny_model_config(method="stts", ratio=0.5), rngs=nnx.Rngs(0))


def tiny_stts_model(**stts):
  """A copy of one shared tiny STTS 0.5 model (seed 0) with other STTS settings (`stts` overrides):
  initialising a Molmo2 costs seconds of CPU, the STTS config is static metadata."""
  model = nnx.clone(_shared_stts_model())
  cfg = model.config
  model.config = dataclasses.replace(cfg, stts=dataclasses.replace(cfg.stts, **stts)).validate()
  return model

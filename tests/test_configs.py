"""configs/{tiny,molmo2_4b,molmo2_8b}.py build, and the real sizes trace without allocating weights."""

import importlib

import jax
import numpy as np
import pytest
from flax import nnx

from stts_jax import config as config_lib
from stts_jax.models import vlm

MODEL_CONFIGS = ("tiny", "molmo2_4b", "molmo2_8b")


def _build(name, arg=None):
  cfg = importlib.import_module(f"configs.{name}").get_config(arg)
  return config_lib.build_model_config(cfg.model)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_config_builds(name):
  model_cfg = _build(name)
  assert model_cfg.stts.method == "none"
  assert config_lib.build_model_config(config_lib.to_dict(model_cfg)) == model_cfg


def test_config_args():
  assert _build("molmo2_4b", "dtype=bfloat16,remat=dots,scan=false").dtype == "bfloat16"
  assert _build("tiny", "method=stts,ratio=0.3").stts.ratio == 0.3
  with pytest.raises(ValueError, match="unknown config arg"):
    _build("molmo2_4b", "dtyp=bfloat16")


def _param_count(model_cfg):
  abstract = nnx.eval_shape(lambda: vlm.Molmo2(model_cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  return sum(int(np.prod(x.shape)) for x in leaves), abstract


def test_molmo2_4b_traces_with_plausible_size():
  model_cfg = _build("molmo2_4b")
  count, abstract = _param_count(model_cfg)
  # ViT 25 x 15.2M + adapter 56.6M + text 36 x 100.9M + embeddings 389M + lm_head 389M ~= 4.85B
  print(f"Molmo2-4B parameters: {count / 1e9:.3f}B")
  assert 4.7e9 < count < 5.0e9
  assert abstract.llm.embed_tokens.embedding.shape == (151936 + 128, 2560)
  assert abstract.llm.lm_head.kernel.shape == (2560, 151936)
  assert abstract.vit.blocks.self_attn.q_proj.kernel.shape == (25, 1152, 1152)   # blocks 0..24 only
  assert abstract.adapter.image_pooling_2d.q_proj.kernel.shape == (2304, 1152)


def test_molmo2_8b_traces():
  count, abstract = _param_count(_build("molmo2_8b"))
  print(f"Molmo2-8B parameters: {count / 1e9:.3f}B")
  assert 8.0e9 < count < 9.5e9
  assert abstract.llm.layers.mlp.gate_proj.kernel.shape == (36, 4096, 12288)
  assert abstract.adapter.image_projector.down_proj.kernel.shape == (12288, 4096)

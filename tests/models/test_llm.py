"""Decoder and RoPE: hand cases, scan == list, KV cache == full recompute, rope tables vs transformers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stts_jax import config as config_lib
from stts_jax.models import llm as llm_lib
from stts_jax.models import rope
from stts_jax.testing.tiny import tiny_model_config

B, S = 2, 12


@pytest.fixture(scope="module")
def cfg():
  base = tiny_model_config().llm   # E=64, 2 layers, 4 / 2 heads x 16, vocab 512 + 128
  return dataclasses.replace(base, num_layers=3, rope_scaling_layers=(1,),
                             rope_scaling=config_lib.RopeScaling(rope_type="linear", factor=2.0))


def _abstract(cfg, **kw):
  return nnx.eval_shape(lambda: llm_lib.Decoder(cfg, rngs=nnx.Rngs(0), **kw))


@pytest.fixture(scope="module")
def model(cfg):
  """Random weights (norm scales around 1) written into an abstract model: no compile for the init."""
  graphdef, params = nnx.split(_abstract(cfg), nnx.Param)
  rng = np.random.default_rng(0)
  flat = [(path, var.replace(jnp.asarray(rng.normal(0, 0.1 + 0.2 * (path[-1] == "scale"), var.get_value().shape)
                                         + (path[-1] == "scale"), jnp.float32)))
          for path, var in nnx.to_flat_state(params)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.fixture(scope="module")
def batch():
  """Row 0: 3 left-padding slots; a vision block at positions 5..8 in both rows."""
  ids = jax.random.randint(jax.random.key(3), (B, S), 0, 500)
  token_mask = jnp.ones((B, S), bool).at[0, :3].set(False)
  vision = jnp.zeros((B, S), bool).at[:, 5:9].set(True)
  positions = jnp.broadcast_to(jnp.arange(S), (B, S))
  return ids, positions, token_mask, vision


def _logits_impl(model, ids, positions, token_mask, vision, cache=None, cache_index=None):
  hidden, cache = model(model.embed(ids), positions, token_mask, vision, cache=cache, cache_index=cache_index)
  return model.logits(hidden), cache


_logits = nnx.jit(_logits_impl)


def test_param_shapes_and_names(model, cfg):
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  l, e, n, k, h = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  expect = {
      ("embed_tokens", "embedding"): ((cfg.vocab_size + 128, e), ("vocab", "embed")),
      ("layers", "self_attn", "q_proj", "kernel"): ((l, e, n * h), ("layers", "embed", "q_heads")),
      ("layers", "self_attn", "k_proj", "kernel"): ((l, e, k * h), ("layers", "embed", "kv_heads")),
      ("layers", "self_attn", "o_proj", "kernel"): ((l, n * h, e), ("layers", "q_heads", "embed")),
      ("layers", "self_attn", "q_norm", "scale"): ((l, h), ("layers", "norm")),
      ("layers", "mlp", "down_proj", "kernel"): ((l, cfg.intermediate_size, e), ("layers", "mlp", "embed")),
      ("lm_head", "kernel"): ((e, cfg.vocab_size), ("embed", "vocab")),
  }
  for path, (shape, names) in expect.items():
    assert flat[path].get_value().shape == shape, path
    assert tuple(flat[path].get_metadata()["out_sharding"]) == names, path
  assert ("layers", "self_attn", "q_proj", "bias") not in flat          # attention_bias False
  olmo = _abstract(dataclasses.replace(cfg, qk_norm_type="olmo", attention_bias=True))
  assert olmo.layers.self_attn.q_norm.scale.get_value().shape == (l, n * h)
  assert olmo.layers.self_attn.k_proj.bias.get_value().shape == (l, k * h)
  assert olmo.layers.self_attn.o_proj.bias is None


def test_prefill_mask_hand_case():
  token_mask = jnp.array([[False, True, True, True, True]])
  vision = jnp.array([[False, False, True, True, False]])
  allowed = np.asarray(llm_lib.prefill_mask(token_mask, vision))[0].astype(int)
  expect = np.array([[0, 0, 0, 0, 0],      # padding key 0 never visible
                     [0, 1, 0, 0, 0],
                     [0, 1, 1, 1, 0],      # vision query 2 sees the later vision key 3
                     [0, 1, 1, 1, 0],
                     [0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(allowed, expect)


def test_rope_hand_cases():
  inv, factor = rope.inv_frequencies(8, 10000.0, None)
  np.testing.assert_allclose(inv, [1.0, 0.1, 0.01, 0.001], rtol=1e-6)
  assert factor == 1.0
  x = jax.random.normal(jax.random.key(0), (1, 3, 2, 8))
  cos, sin = rope.rope_tables(jnp.zeros((1, 3), jnp.int32), inv)
  np.testing.assert_allclose(rope.apply_rope(x, cos, sin), x, atol=1e-7)          # position 0 = identity
  q, k = x[:, :1], x[:, 1:2]

  def score(m, n):
    cq, sq = rope.rope_tables(jnp.full((1, 1), m, jnp.int32), inv)
    ck, sk = rope.rope_tables(jnp.full((1, 1), n, jnp.int32), inv)
    return float(jnp.sum(rope.apply_rope(q, cq, sq) * rope.apply_rope(k, ck, sk)))
  assert score(7, 3) == pytest.approx(score(14, 10), abs=1e-5)                    # relative positions only
  half = np.asarray(rope.apply_rope(x, *rope.rope_tables(jnp.ones((1, 3), jnp.int32), inv)))
  np.testing.assert_allclose(half[..., 0], x[..., 0] * np.cos(1) - x[..., 4] * np.sin(1), atol=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
     "beta_slow": 1.0},
])
def test_inv_frequencies_match_transformers(scaling):
  pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from transformers.models.molmo2.configuration_molmo2 import Molmo2TextConfig
  hf = Molmo2TextConfig(head_dim=64, hidden_size=256, num_attention_heads=4,
                        rope_parameters={**scaling, "rope_theta": 1e6})
  inv_hf, factor_hf = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf)
  ours = config_lib.from_dict(config_lib.RopeScaling, scaling)
  inv, factor = rope.inv_frequencies(64, 1e6, ours)
  np.testing.assert_allclose(inv, inv_hf.numpy(), rtol=1e-6)
  assert factor == pytest.approx(factor_hf, rel=1e-7)


def test_layer_uses_scaled_rope(cfg):
  np.testing.assert_array_equal(rope.layer_uses_scaled_rope(cfg), [False, True, False])
  assert rope.layer_uses_scaled_rope(dataclasses.replace(cfg, rope_scaling_layers=None)).all()
  with pytest.raises(ValueError, match="rope_scaling_layers entry 5"):
    rope.layer_uses_scaled_rope(dataclasses.replace(cfg, rope_scaling_layers=(5,)))


def test_scan_equals_list_and_remat(model, cfg, batch):
  listed = _abstract(cfg, scan_layers=False)
  stacked = nnx.state(model, nnx.Param)
  nnx.update(listed.embed_tokens, nnx.state(model.embed_tokens))
  nnx.update(listed.norm, nnx.state(model.norm))
  nnx.update(listed.lm_head, nnx.state(model.lm_head))
  for i, layer in enumerate(listed.layers):
    nnx.update(layer, jax.tree.map(lambda a: a[i], stacked["layers"]))
  ref, _ = _logits(model, *batch)
  got, _ = _logits(listed, *batch)
  valid = np.asarray(batch[2])
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(ref)[valid], atol=1e-5)
  remat = _abstract(cfg, remat="full")
  nnx.update(remat, nnx.state(model))
  np.testing.assert_allclose(np.asarray(_logits(remat, *batch)[0])[valid], np.asarray(ref)[valid], atol=1e-6)


def test_padding_keys_do_not_leak(model, batch):
  ids, positions, token_mask, vision = batch
  ref, _ = _logits(model, ids, positions, token_mask, vision)
  other_ids = ids.at[0, :3].set(jnp.array([1, 2, 3]))
  got, _ = _logits(model, other_ids, positions, token_mask, vision)
  np.testing.assert_allclose(np.asarray(got)[0, 3:], np.asarray(ref)[0, 3:], atol=1e-6)
  no_block, _ = _logits(model, ids, positions, token_mask, jnp.zeros_like(vision))
  assert np.abs(np.asarray(no_block) - np.asarray(ref))[:, 5:9].max() > 1e-3   # the overlay matters
  np.testing.assert_allclose(np.asarray(no_block)[:, :5][np.asarray(token_mask)[:, :5]],
                             np.asarray(ref)[:, :5][np.asarray(token_mask)[:, :5]], atol=1e-6)


def test_cache_prefill_and_decode_equal_full_recompute(model, batch):
  """Prefill 8 tokens (vision block inside), then decode 4 single tokens; compare with one full pass."""
  ids, positions, token_mask, vision = batch
  full, _ = _logits(model, ids, positions, token_mask, vision)
  cache = model.init_cache(B, 16)
  traces = []

  def fn(m, i, p, t, v, c, idx):
    traces.append(i.shape)
    return _logits_impl(m, i, p, t, v, cache=c, cache_index=idx)
  step = nnx.jit(fn)
  pre, cache = step(model, ids[:, :9], positions[:, :9], token_mask[:, :9], vision[:, :9], cache, jnp.int32(0))
  got = [pre]
  for s in range(9, S):
    out, cache = step(model, ids[:, s:s + 1], positions[:, s:s + 1], token_mask[:, s:s + 1],
                      jnp.zeros((B, 1), bool), cache, jnp.int32(s))
    got.append(out)
  got = np.concatenate([np.asarray(g) for g in got], axis=1)
  valid = np.asarray(token_mask)
  np.testing.assert_allclose(got[valid], np.asarray(full)[valid], atol=1e-5)
  assert traces == [(B, 9), (B, 1)]          # one compile for prefill, one for every decode step
  np.testing.assert_array_equal(np.asarray(cache.valid)[:, :S], valid)
  assert not np.asarray(cache.valid)[:, S:].any()
  np.testing.assert_array_equal(np.asarray(cache.vision)[:, :S], np.asarray(vision))


def test_cache_requires_index(model, batch):
  ids, positions, token_mask, vision = batch
  with pytest.raises(ValueError, match="cache_index"):
    _logits(model, ids, positions, token_mask, vision, cache=model.init_cache(B, 16))

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stts_jax.config import STTSConfig
from stts_jax.models import stts
from stts_jax.models.scorer import WindowScorer


def _scorer(d=32, f=64, heads=2, seed=0):
  return WindowScorer(d, STTSConfig(method="stts", scorer_hidden=f, scorer_heads=heads), rngs=nnx.Rngs(seed))


def test_shapes_range_and_batched_equals_per_video():
  sc = _scorer()
  x = jax.random.normal(jax.random.key(0), (3, 4, 81, 32))
  s = stts.window_scores(sc, x, (9, 9), (3, 3))
  assert s.shape == (3, 4, 9) and s.dtype == jnp.float32
  assert float(s.min()) > 0 and float(s.max()) < 1
  for b in range(3):
    np.testing.assert_allclose(np.asarray(stts.window_scores(sc, x[b], (9, 9), (3, 3))), np.asarray(s[b]),
                               rtol=1e-6, atol=1e-6)
  # frame 0 of video 1 sees zeros, never video 0's last frame
  x2 = x.at[0, -1].set(100.0)
  s2 = stts.window_scores(sc, x2, (9, 9), (3, 3))
  np.testing.assert_array_equal(np.asarray(s2[1]), np.asarray(s[1]))


def test_temporal_context_order_and_pooling_by_hand():
  """fc1 sees [previous window, this window]; pooling uses the window's own 9 patches only."""
  d = 4
  sc = _scorer(d=d, f=8, heads=2)
  x = jax.random.normal(jax.random.key(1), (2, 36, d))
  s = sc(x, (6, 6), (3, 3))
  idx = np.array([[0, 1, 2, 6, 7, 8, 12, 13, 14], [3, 4, 5, 9, 10, 11, 15, 16, 17],
                  [18, 19, 20, 24, 25, 26, 30, 31, 32], [21, 22, 23, 27, 28, 29, 33, 34, 35]])
  win = np.asarray(x)[:, idx]                                    # [T, W, M, D]
  p = {n: (np.asarray(getattr(sc, n).kernel[...]), np.asarray(getattr(sc, n).bias[...]))
       for n in ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "fc3")}
  lin = lambda n, z: z @ p[n][0] + p[n][1]
  q = lin("q_proj", win.mean(2)).reshape(2, 4, 2, 2)
  k = lin("k_proj", win).reshape(2, 4, 9, 2, 2)
  v = lin("v_proj", win).reshape(2, 4, 9, 2, 2)
  a = np.einsum("twnh,twmnh->twnm", q, k) / math.sqrt(2)
  a = np.exp(a - a.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  feat = lin("o_proj", np.einsum("twnm,twmnh->twnh", a, v).reshape(2, 4, 4))
  ctx = np.concatenate([np.concatenate([np.zeros_like(feat[:1]), feat[:1]]), feat], -1)
  silu = lambda z: z / (1 + np.exp(-z))
  logit = lin("fc3", silu(lin("fc2", silu(lin("fc1", ctx)))))[..., 0]
  np.testing.assert_allclose(np.asarray(s), 1 / (1 + np.exp(-logit)), rtol=1e-5, atol=1e-6)


def test_init_follows_authors_and_names_axes():
  d, f = 64, 256
  sc = _scorer(d=d, f=f, heads=4, seed=3)
  for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
    w = np.asarray(getattr(sc, n).kernel[...])
    assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002
  for n, fan_in in (("fc1", 2 * d), ("fc2", f), ("fc3", f)):
    w = np.asarray(getattr(sc, n).kernel[...])
    assert abs(w.std() / math.sqrt(1 / fan_in) - 1) < 0.12
    assert np.abs(w).max() <= 2.0
  for n in ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "fc3"):
    assert (np.asarray(getattr(sc, n).bias[...]) == 0).all()
  names = {path: v.get_metadata().get("out_sharding") for path, v in nnx.to_flat_state(nnx.state(sc))}
  assert names[("q_proj", "kernel")] == ("vit_embed", "vit_heads")
  assert names[("o_proj", "kernel")] == ("vit_heads", "vit_embed")
  assert names[("fc1", "kernel")] == ("scorer_in", "scorer_mlp")
  assert names[("fc2", "kernel")] == ("scorer_mlp", "scorer_mlp")
  assert names[("fc3", "kernel")] == ("scorer_mlp", None)
  assert names[("fc1", "bias")] == ("scorer_mlp",)


def test_pool_init_std_scales_the_pooler_only():
  d = 64
  cfg = STTSConfig(method="stts", scorer_hidden=128, scorer_heads=4, pool_init_std=1 / math.sqrt(d))
  wide, base = WindowScorer(d, cfg, rngs=nnx.Rngs(3)), _scorer(d=d, f=128, heads=4, seed=3)
  for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
    assert abs(np.asarray(getattr(wide, n).kernel[...]).std() - 0.125) < 0.01
  np.testing.assert_array_equal(np.asarray(wide.fc1.kernel[...]), np.asarray(base.fc1.kernel[...]))
  # the pooled feature's scale grows like std^2 * D: the reason narrow ViTs need the larger std
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, d))
  ratio = float(jnp.std(wide.pool(x)) / jnp.std(base.pool(x)))
  assert 20 < ratio < 60
  with pytest.raises(ValueError, match="pool_init_std"):
    STTSConfig(method="stts", pool_init_std=0.0).validate()


def test_truncation_is_absolute_like_torch():
  from stts_jax.models.scorer import torch_trunc_normal
  w = np.asarray(torch_trunc_normal(1.5)(jax.random.key(0), (20000,)))
  assert np.abs(w).max() <= 2.0 and np.abs(w).max() > 1.9      # cut at +-2 absolute, not +-2 std


def test_bad_width_is_an_error():
  with pytest.raises(ValueError, match="scorer_heads"):
    _scorer(d=30, heads=4)
  sc = _scorer()
  with pytest.raises(ValueError, match="width"):
    stts.window_scores(sc, jnp.zeros((2, 81, 16)), (9, 9), (3, 3))

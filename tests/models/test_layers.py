import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stts_jax.models import layers


def _np_attention(q, k, v, scale, bias=None, mask=None):
  """Plain numpy reference: q [B,Sq,N,H], k/v [B,Sk,K,H], kv head of query head n is n // (N/K)."""
  n, kh = q.shape[2], k.shape[2]
  k = np.repeat(k, n // kh, axis=2)
  v = np.repeat(v, n // kh, axis=2)
  logits = np.einsum("bqnh,bsnh->bnqs", q, k) * scale
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  m = logits.max(-1, keepdims=True)
  p = np.exp(logits - m)
  p = p / p.sum(-1, keepdims=True)
  return np.einsum("bnqs,bsnh->bqnh", p, v)


def test_linear_matches_numpy_and_names():
  lin = layers.Linear(3, 4, names=("vit_embed", "vit_mlp"), rngs=nnx.Rngs(0))
  lin.bias[...] = jnp.arange(4.0)
  x = np.arange(6.0, dtype=np.float32).reshape(2, 3)
  np.testing.assert_allclose(lin(jnp.asarray(x)), x @ np.asarray(lin.kernel[...]) + np.arange(4.0), rtol=1e-6)
  assert lin.kernel.get_metadata()["out_sharding"] == ("vit_embed", "vit_mlp")
  assert lin.bias.get_metadata()["out_sharding"] == ("vit_mlp",)
  no_bias = layers.Linear(3, 4, names=(None, "mlp"), use_bias=False, rngs=nnx.Rngs(0))
  assert no_bias.bias is None
  with pytest.raises(ValueError, match="input width 2 != in_features 3"):
    lin(jnp.zeros((1, 2)))


def test_linear_bfloat16_compute_float32_params():
  lin = layers.Linear(8, 8, names=(None, None), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert lin.kernel[...].dtype == jnp.float32
  assert lin(jnp.ones((2, 8))).dtype == jnp.bfloat16


def test_layer_norm_hand_computed():
  ln = layers.LayerNorm(4, eps=1e-6, rngs=nnx.Rngs(0))
  ln.scale[...] = jnp.array([1.0, 2.0, 1.0, 1.0])
  ln.bias[...] = jnp.array([0.0, 0.0, 0.0, 0.5])
  x = jnp.array([[1.0, 2.0, 3.0, 4.0]])               # mean 2.5, var 1.25
  z = (np.array([1.0, 2.0, 3.0, 4.0]) - 2.5) / np.sqrt(1.25 + 1e-6)
  np.testing.assert_allclose(ln(x)[0], z * [1, 2, 1, 1] + [0, 0, 0, 0.5], rtol=1e-6)
  assert ln.scale.get_metadata()["out_sharding"] == ("norm",)
  # float32 statistics even for a bfloat16 input with a large offset
  big = jnp.array([[1024.0, 1032.0, 1040.0, 1048.0]], jnp.bfloat16)   # exact in bfloat16
  ln_bf = layers.LayerNorm(4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(ln_bf(big), np.float32)[0], [-1.34, -0.447, 0.447, 1.34], atol=0.02)


def test_rms_norm_hand_computed():
  rms = layers.RMSNorm(2, eps=0.0, rngs=nnx.Rngs(0))
  rms.scale[...] = jnp.array([1.0, 3.0])
  np.testing.assert_allclose(rms(jnp.array([[3.0, 4.0]]))[0], [3 / np.sqrt(12.5), 12 / np.sqrt(12.5)], rtol=1e-6)


def test_swiglu_formula():
  mlp = layers.SwiGLU(4, 6, 3, in_name="embed", hidden_name="mlp", out_name="embed", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (5, 4))
  g, u, d = (np.asarray(m.kernel[...]) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
  xn = np.asarray(x)
  gate = xn @ g
  want = ((gate / (1 + np.exp(-gate))) * (xn @ u)) @ d
  np.testing.assert_allclose(mlp(x), want, atol=1e-6)


@pytest.mark.parametrize("num_heads,kv_heads", [(2, 2), (4, 2), (4, 1)])
def test_attention_core_matches_numpy(num_heads, kv_heads):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 5, num_heads, 8)).astype(np.float32)
  k = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
  v = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
  bias = rng.normal(size=(2, 1, 1, 7)).astype(np.float32)
  mask = rng.uniform(size=(2, 1, 5, 7)) > 0.3
  mask[..., 0] = True                                    # every query sees at least one key
  got = layers.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=0.3,
                                     bias=jnp.asarray(bias), mask=jnp.asarray(mask))
  np.testing.assert_allclose(got, _np_attention(q, k, v, 0.3, bias, mask), atol=1e-5)
  plain = layers.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=0.3)
  np.testing.assert_allclose(plain, _np_attention(q, k, v, 0.3), atol=1e-5)


def test_attention_core_query_without_keys_is_zero_with_finite_grads():
  q = jnp.ones((1, 2, 1, 4))
  kv = jnp.arange(12.0).reshape(1, 3, 1, 4)
  mask = jnp.array([[[[True, False, True], [False, False, False]]]])
  out = layers.dot_product_attention(q, kv, kv, scale=0.5, mask=mask)
  np.testing.assert_array_equal(out[0, 1], 0.0)
  assert float(jnp.abs(out[0, 0]).max()) > 0
  grads = jax.jit(jax.grad(lambda a, b: layers.dot_product_attention(a, b, b, scale=0.5, mask=mask).sum(),
                           argnums=(0, 1)))(q, kv)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_attention_module_cross_attention_shapes_and_names():
  attn = layers.Attention(6, 2, 4, 5, in_name="adapter_in", heads_name="vit_heads", out_name="vit_embed",
                          rngs=nnx.Rngs(0))
  out = attn(jnp.ones((3, 1, 6)), jnp.ones((3, 9, 6)))
  assert out.shape == (3, 1, 5)
  assert attn.q_proj.kernel.get_metadata()["out_sharding"] == ("adapter_in", "vit_heads")
  assert attn.o_proj.kernel.get_metadata()["out_sharding"] == ("vit_heads", "vit_embed")
  with pytest.raises(ValueError, match="not a multiple"):
    layers.dot_product_attention(jnp.ones((1, 2, 3, 4)), jnp.ones((1, 2, 2, 4)), jnp.ones((1, 2, 2, 4)), scale=1.0)

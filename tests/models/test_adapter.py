import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stts_jax.models import adapter as adapter_lib
from stts_jax.models import windows
from stts_jax.testing.tiny import tiny_model_config

TOL = 1e-5   # max abs diff, fp32

CFG = tiny_model_config()          # ViT D=32, taps (5, 3) -> C=64, 2 heads x 16, F=64, E=64
GRID = CFG.vit.grid                # 9x9 patches per frame
P = CFG.vit.num_patches


@pytest.fixture(scope="module")
def adapter():
  return adapter_lib.Adapter(CFG.adapter, vit_hidden=CFG.vit.hidden_size, text_hidden=CFG.llm.hidden_size,
                             rngs=nnx.Rngs(0))


def _features(n, seed=0):
  c = len(CFG.adapter.vit_layers) * CFG.vit.hidden_size
  return jax.random.normal(jax.random.key(seed), (n, P, c))


def video_pool_idx(num_frames: int) -> np.ndarray:
  """3x3 windows of every frame, global indices: `[T*W, 9]`."""
  per_frame = windows.window_patch_index((GRID, GRID), CFG.adapter.video_pool)
  return np.concatenate([per_frame + t * P for t in range(num_frames)]).astype(np.int32)


def image_pool_idx(num_crops: int) -> np.ndarray:
  """2x2 pooling of a 9x9 grid padded to 10x10 with -1 (0 before, 1 after, as the HF processor)."""
  grid = np.full((GRID + 1, GRID + 1), -1, np.int64)
  grid[:GRID, :GRID] = np.arange(P).reshape(GRID, GRID)
  blocks = grid.reshape(5, 2, 5, 2).transpose(0, 2, 1, 3).reshape(25, 4)
  return np.concatenate([np.where(blocks >= 0, blocks + c * P, -1) for c in range(num_crops)]).astype(np.int32)


def test_param_names(adapter):
  flat = dict(nnx.to_flat_state(nnx.state(adapter, nnx.Param)))
  names = {path: tuple(v.get_metadata()["out_sharding"]) for path, v in flat.items()}
  assert names[("image_pooling_2d", "q_proj", "kernel")] == ("adapter_in", "vit_heads")
  assert names[("image_pooling_2d", "v_proj", "bias")] == ("vit_heads",)
  assert names[("image_pooling_2d", "o_proj", "kernel")] == ("vit_heads", "vit_embed")
  assert names[("image_projector", "gate_proj", "kernel")] == ("vit_embed", "mlp")
  assert names[("image_projector", "down_proj", "kernel")] == ("mlp", "embed")
  assert flat[("image_pooling_2d", "k_proj", "kernel")][...].shape == (64, 32)
  assert flat[("image_projector", "down_proj", "kernel")][...].shape == (64, 64)
  assert ("image_projector", "up_proj", "bias") not in flat


def test_single_valid_slot_is_value_then_output_projection(adapter):
  """Softmax over one key is 1, so the pooled vector is o_proj(v_proj(that patch))."""
  feats = _features(2)
  idx = jnp.array([[5, -1, -1, -1], [-1, -1, P + 7, -1]], jnp.int32)
  got = adapter.pool(feats, idx)
  attn = adapter.image_pooling_2d
  flat = feats.reshape(-1, feats.shape[-1])
  want = attn.o_proj(attn.v_proj(flat[jnp.array([5, P + 7])]))
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_padding_slots_ignored_and_empty_rows_zero(adapter):
  feats = _features(1)
  a = adapter.pool(feats, jnp.array([[3, 4, 12, 13]], jnp.int32))
  # the same window with padding interleaved (and a garbage-free gather for -1) gives the same result
  b = adapter.pool(feats, jnp.array([[3, -1, 4, 12, -1, 13]], jnp.int32))
  np.testing.assert_allclose(a, b, atol=TOL, rtol=0)
  out = adapter(feats, jnp.array([[-1, -1, -1, -1], [0, 1, 9, 10]], jnp.int32))
  np.testing.assert_array_equal(out[0], np.zeros(out.shape[1]))
  assert float(jnp.abs(out[1]).max()) > 0

  def loss(m, f):
    return jnp.sum(m(f, jnp.full((2, 4), -1, jnp.int32)))

  grads = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(adapter, feats)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_concat_taps_order_and_errors():
  taps = {3: jnp.zeros((1, 2, 4)), 5: jnp.ones((1, 2, 4))}
  cat = adapter_lib.concat_taps(taps, (5, 3))
  assert cat.shape == (1, 2, 8)
  np.testing.assert_array_equal(cat[..., :4], 1)
  np.testing.assert_array_equal(cat[..., 4:], 0)
  with pytest.raises(KeyError, match=r"\[4\] missing"):
    adapter_lib.concat_taps(taps, (5, 4))


def test_bad_inputs_raise(adapter):
  with pytest.raises(ValueError, match="out of range"):
    adapter.pool(_features(1), jnp.array([[0, P]], jnp.int32))
  with pytest.raises(ValueError, match="feature width"):
    adapter.pool(jnp.zeros((1, P, 10)), jnp.array([[0, 1]], jnp.int32))


def test_jit_compiles_once_across_index_contents(adapter):
  traces = []

  @nnx.jit
  def run(m, f, idx):
    traces.append(1)
    return m(f, idx)

  rng = np.random.default_rng(0)
  for i in range(3):
    idx = rng.integers(-1, 2 * P, size=(10, 9)).astype(np.int32)
    out = run(adapter, _features(2, seed=i), jnp.asarray(idx))
    assert np.isfinite(np.asarray(out)).all()
  assert len(traces) == 1


def _hf_helpers():
  return pytest.importorskip("tests.models.hf_vision")


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["video", "image"])
def test_adapter_matches_transformers(kind):
  """Video: 3x3 windows of 3 frames; image: 2x2 pooling with -1 padding on 2 crops. fp32, <= 1e-5."""
  pytest.importorskip("transformers")
  import torch
  hf_vision = _hf_helpers()
  hf = hf_vision.tiny_hf_adapter(CFG.adapter, CFG.vit.hidden_size, CFG.llm.hidden_size, seed=1)
  ours = adapter_lib.Adapter(CFG.adapter, vit_hidden=CFG.vit.hidden_size, text_hidden=CFG.llm.hidden_size,
                             rngs=nnx.Rngs(5))
  hf_vision.load_adapter_from_torch(ours, hf)
  idx = video_pool_idx(3) if kind == "video" else image_pool_idx(2)
  assert kind == "video" or (idx < 0).any()
  feats = _features(3 if kind == "video" else 2, seed=3)
  with torch.no_grad():
    ref = hf(torch.from_numpy(np.array(feats)), torch.from_numpy(idx).long()).last_hidden_state.numpy()
  got = ours(feats, jnp.asarray(idx))
  assert got.shape == ref.shape == (idx.shape[0], CFG.llm.hidden_size)
  assert float(np.abs(ref).max()) > 0.3
  np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


@pytest.mark.parity
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 1, 24), (4, 2, 4)], ids=["mqa_wide", "gqa_narrow"])
def test_adapter_attention_variations_match_transformers(heads, kv_heads, head_dim):
  """Pooling attention with fewer kv heads than heads and heads x head_dim != ViT width (96 and 16 vs
  32), as transformers' adapter config allows; image pooling with -1 padding. fp32, <= 1e-5."""
  pytest.importorskip("transformers")
  import dataclasses
  import torch
  from transformers.models.molmo2.configuration_molmo2 import Molmo2AdapterConfig
  from transformers.models.molmo2.modeling_molmo2 import Molmo2Adapter
  hf_vision = _hf_helpers()
  cfg = dataclasses.replace(CFG.adapter, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)
  hf_cfg = Molmo2AdapterConfig(
      vision_feature_layer=list(cfg.vit_layers), hidden_size=CFG.vit.hidden_size, num_attention_heads=heads,
      num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=cfg.intermediate_size,
      text_hidden_size=CFG.llm.hidden_size, attn_implementation="eager")
  hf = hf_vision.randomize_(Molmo2Adapter(hf_cfg), seed=1, std=0.15)
  ours = adapter_lib.Adapter(cfg, vit_hidden=CFG.vit.hidden_size, text_hidden=CFG.llm.hidden_size, rngs=nnx.Rngs(5))
  assert ours.image_pooling_2d.k_proj.kernel.get_value().shape == (64, kv_heads * head_dim)
  hf_vision.load_adapter_from_torch(ours, hf)
  idx = image_pool_idx(2)
  feats = _features(2, seed=3)
  with torch.no_grad():
    ref = hf(torch.from_numpy(np.array(feats)), torch.from_numpy(idx).long()).last_hidden_state.numpy()
  got = ours(feats, jnp.asarray(idx))
  assert float(np.abs(ref).max()) > 0.3
  np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


@pytest.mark.parity
def test_vit_taps_adapter_chain_matches_transformers():
  """HF vision tower -> concat(hidden_states[l+1] for l in vit_layers) -> adapter, vs ours end to end."""
  pytest.importorskip("transformers")
  import torch
  from stts_jax.models import vit as vit_lib
  hf_vision = _hf_helpers()
  layers = max(CFG.adapter.vit_layers) + 1
  hf_vit = hf_vision.tiny_hf_vision(CFG.vit, num_layers=layers, seed=4)
  hf_ad = hf_vision.tiny_hf_adapter(CFG.adapter, CFG.vit.hidden_size, CFG.llm.hidden_size, seed=5)
  vit = vit_lib.VisionTransformer(CFG.vit, num_layers=layers, rngs=nnx.Rngs(0))
  ad = adapter_lib.Adapter(CFG.adapter, vit_hidden=CFG.vit.hidden_size, text_hidden=CFG.llm.hidden_size,
                           rngs=nnx.Rngs(1))
  hf_vision.load_vit_from_torch(vit, hf_vit)
  hf_vision.load_adapter_from_torch(ad, hf_ad)
  torch.manual_seed(6)
  pixels = torch.rand(2, P, CFG.vit.patch_dim) * 2 - 1
  idx = video_pool_idx(2)
  with torch.no_grad():
    hs = hf_vit(pixels, output_hidden_states=True).hidden_states
    feats = torch.cat([hs[l + 1] for l in CFG.adapter.vit_layers], dim=-1)
    ref = hf_ad(feats, torch.from_numpy(idx).long()).last_hidden_state.numpy()
  taps = vit(jnp.asarray(pixels.numpy()), CFG.adapter.vit_layers)
  got = ad(adapter_lib.concat_taps(taps, CFG.adapter.vit_layers), jnp.asarray(idx))
  np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)

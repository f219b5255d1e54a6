import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stts_jax.models import vit as vit_lib
from stts_jax.testing.tiny import tiny_model_config

TOL = 1e-5   # max abs diff, fp32


@pytest.fixture(scope="module")
def cfg():
  return tiny_model_config().vit   # D=32, 2 heads x 16, 6 blocks, 126 px -> 9x9 = 81 patches


@pytest.fixture(scope="module")
def model(cfg):
  return vit_lib.VisionTransformer(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def patches(cfg):
  return jax.random.normal(jax.random.key(1), (2, cfg.num_patches, cfg.patch_dim))


def _unrolled_copy(model, **kw):
  """An unrolled (nnx.List) ViT with the same weights as the stacked `model`."""
  other = vit_lib.VisionTransformer(model.cfg, num_layers=model.num_layers, scan_layers=False,
                                    rngs=nnx.Rngs(99), **kw)
  nnx.update(other.patch_embedding, nnx.state(model.patch_embedding))
  other.positional_embedding[...] = model.positional_embedding[...]
  stacked = nnx.state(model.blocks)
  for i, block in enumerate(other.blocks):
    nnx.update(block, jax.tree.map(lambda a: np.asarray(a)[i], stacked))   # numpy: no per-slice compiles
  return other


@nnx.jit(static_argnames=("taps",))
def forward(m, x, taps):
  return m(x, taps)


@nnx.jit(static_argnames=("start", "stop", "taps"))
def run(m, h, start, stop, taps=(), key_bias=None, segment_ids=None):
  return m.run_blocks(h, start, stop, taps=taps, key_bias=key_bias, segment_ids=segment_ids)


def test_param_shapes_and_logical_names(model, cfg):
  d, f, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  expect = {
      ("patch_embedding", "kernel"): ((cfg.patch_dim, d), ("patch_in", "vit_embed")),
      ("positional_embedding",): ((cfg.num_patches, d), ("vit_pos", "vit_embed")),
      ("blocks", "self_attn", "q_proj", "kernel"): ((l, d, d), ("layers", "vit_embed", "vit_heads")),
      ("blocks", "self_attn", "q_proj", "bias"): ((l, d), ("layers", "vit_heads")),
      ("blocks", "self_attn", "o_proj", "kernel"): ((l, d, d), ("layers", "vit_heads", "vit_embed")),
      ("blocks", "mlp", "fc1", "kernel"): ((l, d, f), ("layers", "vit_embed", "vit_mlp")),
      ("blocks", "mlp", "fc2", "kernel"): ((l, f, d), ("layers", "vit_mlp", "vit_embed")),
      ("blocks", "layer_norm1", "scale"): ((l, d), ("layers", "norm")),
  }
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, (shape, names) in expect.items():
    var = flat[path]
    assert var[...].shape == shape, path
    assert tuple(var.get_metadata()["out_sharding"]) == names, path
  # every parameter is named
  for path, var in flat.items():
    assert len(var.get_metadata()["out_sharding"]) == var[...].ndim, path


def test_num_layers_builds_only_leading_blocks(cfg):
  small = vit_lib.VisionTransformer(cfg, num_layers=3, rngs=nnx.Rngs(0))
  assert small.blocks.mlp.fc1.kernel[...].shape[0] == 3
  with pytest.raises(ValueError, match="outside the 3 built blocks"):
    small(jnp.zeros((1, cfg.num_patches, cfg.patch_dim)), taps=(3,))


def test_scan_equals_unrolled(model, patches):
  other = _unrolled_copy(model)
  a = forward(model, patches, taps=(5, 3, 0))
  b = forward(other, patches, taps=(5, 3, 0))
  assert sorted(a) == sorted(b) == [0, 3, 5]
  for l in a:
    np.testing.assert_allclose(a[l], b[l], atol=TOL, rtol=0)


def _tap2_loss(m, x):
  return jnp.sum(jnp.square(m(x, taps=(2,))[2]))


@pytest.fixture(scope="module")
def reference_grads(model, patches):
  return nnx.jit(nnx.value_and_grad(_tap2_loss))(model, patches)


@pytest.mark.parametrize("scan_layers,remat", [(True, "dots"), (False, "full")])
def test_remat_same_values_and_grads(model, patches, reference_grads, scan_layers, remat):
  if scan_layers:
    other = vit_lib.VisionTransformer(model.cfg, remat=remat, rngs=nnx.Rngs(7))
    nnx.update(other, nnx.state(model))
  else:
    other = _unrolled_copy(model, remat=remat)
  value, grads = nnx.jit(nnx.value_and_grad(_tap2_loss))(other, patches)
  ref_value, ref_grads = reference_grads
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  ref = ref_grads.blocks.mlp.fc1.kernel[...][1]
  got = grads.blocks.mlp.fc1.kernel[...][1] if scan_layers else grads.blocks[1].mlp.fc1.kernel[...]
  assert float(jnp.abs(ref).max()) > 0
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_split_ranges_and_taps(model, patches):
  h0 = model.embed(patches)
  full, taps_full = model.run_blocks(h0, 0, 6, taps=(1, 4, 5, 9))
  assert sorted(taps_full) == [1, 4, 5]                       # 9 is outside the range
  np.testing.assert_array_equal(taps_full[5], full)
  mid, taps_a = model.run_blocks(h0, 0, 2, taps=(1, 4))
  assert sorted(taps_a) == [1]
  out, taps_b = model.run_blocks(mid, 2, 6, taps=(1, 4))
  assert sorted(taps_b) == [4]
  np.testing.assert_allclose(out, full, atol=TOL, rtol=0)
  np.testing.assert_allclose(taps_a[1], taps_full[1], atol=TOL, rtol=0)
  np.testing.assert_allclose(taps_b[4], taps_full[4], atol=TOL, rtol=0)
  # one block at a time gives the same result
  h = h0
  for i in range(6):
    h, _ = model.run_blocks(h, i, i + 1)
  np.testing.assert_allclose(h, full, atol=TOL, rtol=0)
  # empty range is the identity
  same, none = model.run_blocks(h0, 3, 3, taps=(2, 3))
  assert none == {}
  np.testing.assert_array_equal(same, h0)
  # __call__ == embed + run_blocks
  np.testing.assert_allclose(model(patches, taps=(4,))[4], taps_full[4], atol=TOL, rtol=0)


def test_key_bias_large_negative_equals_removed_key(model, patches):
  h0 = model.embed(patches)                                   # [2, 81, D]
  drop = 7
  bias = jnp.zeros(h0.shape[:2]).at[:, drop].set(-1e9)
  biased, _ = model.run_blocks(h0, 0, 3, key_bias=bias)
  keep = np.array([i for i in range(h0.shape[1]) if i != drop])
  removed, _ = model.run_blocks(h0[:, keep], 0, 3)
  np.testing.assert_allclose(biased[:, keep], removed, atol=TOL, rtol=0)
  # a finite bias changes the result (it is not ignored)
  soft_bias = -1.0 * (jnp.arange(81) % 2) * jnp.ones((2, 1))
  soft, _ = model.run_blocks(h0, 0, 3, key_bias=soft_bias)
  unbiased, _ = model.run_blocks(h0, 0, 3)
  assert float(jnp.abs(soft - unbiased).max()) > 1e-3
  # the bias is differentiable (STTS: the only path from the LM loss to the scorer)
  grad = jax.jit(jax.grad(lambda b: jnp.sum(jnp.square(model.run_blocks(h0, 2, 3, key_bias=b)[0]))))(soft_bias)
  assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).min()) > 0


def test_segment_ids_packing_equals_separate_runs(model, patches):
  h0 = model.embed(patches)                                   # frames 0 and 1
  a_idx, b_idx = np.arange(0, 50, 2), np.arange(3, 81, 5)     # 25 and 16 kept patches
  row = jnp.concatenate([h0[0, a_idx], h0[1, b_idx], jnp.full((40, h0.shape[-1]), 3.0)])[None]
  seg = np.concatenate([np.zeros(25), np.ones(16), -np.ones(40)]).astype(np.int32)[None]
  packed, taps = model.run_blocks(row, 0, 4, taps=(1,), segment_ids=jnp.asarray(seg))
  alone_a, _ = model.run_blocks(h0[0:1, a_idx], 0, 4)
  alone_b, _ = model.run_blocks(h0[1:2, b_idx], 0, 4)
  np.testing.assert_allclose(packed[0, :25], alone_a[0], atol=TOL, rtol=0)
  np.testing.assert_allclose(packed[0, 25:41], alone_b[0], atol=TOL, rtol=0)
  assert np.isfinite(np.asarray(packed)).all() and np.isfinite(np.asarray(taps[1])).all()

  # the 40 empty slots (-1) are queries without any visible key: finite outputs and gradients
  def loss(m, x):
    out, _ = m.run_blocks(x, 0, 2, segment_ids=jnp.asarray(seg))
    return jnp.sum(out)

  grads = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(model, row)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads[1][0, 25]).max()) > 0


def test_jit_compiles_once(model, cfg):
  traces = []

  @nnx.jit
  def packed_forward(m, x, seg, bias):
    traces.append(1)
    h, taps = m.run_blocks(m.embed(x), 0, 4, taps=(1, 3), segment_ids=seg, key_bias=bias)
    return h, taps

  rng = np.random.default_rng(0)
  for i in range(3):
    x = jnp.asarray(rng.normal(size=(2, cfg.num_patches, cfg.patch_dim)), jnp.float32)
    seg = jnp.asarray(rng.integers(-1, 3, size=(2, cfg.num_patches)), jnp.int32)
    bias = jnp.asarray(rng.uniform(-2, 0, size=(2, cfg.num_patches)), jnp.float32)
    h, taps = packed_forward(model, x, seg, bias)
    assert sorted(taps) == [1, 3] and np.isfinite(np.asarray(h)).all()
  assert len(traces) == 1


def test_bad_inputs_raise(model, cfg):
  with pytest.raises(ValueError, match="expected P=81"):
    model.embed(jnp.zeros((1, 80, cfg.patch_dim)))
  with pytest.raises(ValueError, match="start <= stop"):
    model.run_blocks(jnp.zeros((1, 81, cfg.hidden_size)), 4, 2)
  with pytest.raises(ValueError, match="remat"):
    vit_lib.VisionTransformer(cfg, remat="some", rngs=nnx.Rngs(0))


def test_bfloat16_compute(model, patches):
  bf = vit_lib.VisionTransformer(model.cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  nnx.update(bf, nnx.state(model))
  out = bf(patches, taps=(5,))[5]
  assert out.dtype == jnp.bfloat16
  ref = model(patches, taps=(5,))[5]
  err = float(jnp.abs(out.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
  assert err < 0.05, err


@pytest.mark.parity
@pytest.mark.parametrize("scan_layers", [True, False])
def test_hidden_states_match_transformers(cfg, scan_layers):
  """Every block output vs HF `hidden_states[l + 1]` (eager attention, fp32), max abs diff <= 1e-5."""
  pytest.importorskip("transformers")
  import torch
  from tests.models import hf_vision

  hf = hf_vision.tiny_hf_vision(cfg, num_layers=cfg.num_layers, seed=0)
  ours = vit_lib.VisionTransformer(cfg, scan_layers=scan_layers, rngs=nnx.Rngs(0))
  hf_vision.load_vit_from_torch(ours, hf)
  torch.manual_seed(2)
  pixels = torch.rand(3, cfg.num_patches, cfg.patch_dim) * 2 - 1
  with torch.no_grad():
    hidden = hf(pixels, output_hidden_states=True).hidden_states
  assert len(hidden) == cfg.num_layers + 1
  x = jnp.asarray(pixels.numpy())
  np.testing.assert_allclose(ours.embed(x), hidden[0].numpy(), atol=TOL, rtol=0)
  taps = forward(ours, x, taps=tuple(range(cfg.num_layers)))
  for l in range(cfg.num_layers):
    ref = hidden[l + 1].numpy()
    assert float(np.abs(ref).max()) > 0.1                     # non-trivial values
    np.testing.assert_allclose(taps[l], ref, atol=TOL, rtol=0, err_msg=f"block {l}")


def test_vision_config_variations():
  """kv heads < heads, heads x head_dim != hidden, non-square images (transformers allows all three)."""
  import dataclasses
  from stts_jax import config as config_lib
  cfg = config_lib.ViTConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                             head_dim=12, patch_size=14, image_size=56, image_width=84)
  assert cfg.grid_hw == (4, 6) and cfg.num_patches == 24 and cfg.kv_heads == 2 and cfg.image_hw == (56, 84)
  with pytest.raises(ValueError, match="4x6.*not square"):
    cfg.grid
  vit = nnx.eval_shape(lambda: vit_lib.VisionTransformer(cfg, rngs=nnx.Rngs(0)))
  shapes = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(vit, nnx.Param))}
  assert shapes[("blocks", "self_attn", "q_proj", "kernel")] == (2, 32, 48)
  assert shapes[("blocks", "self_attn", "k_proj", "kernel")] == (2, 32, 24)
  assert shapes[("blocks", "self_attn", "o_proj", "kernel")] == (2, 48, 32)
  assert shapes[("positional_embedding",)] == (24, 32)
  with pytest.raises(ValueError, match="vit.num_heads 4 must be a multiple of vit.num_kv_heads 3"):
    dataclasses.replace(cfg, num_kv_heads=3).validate()


@pytest.mark.parity
@pytest.mark.parametrize("heads,kv_heads,head_dim,image_hw", [
    (4, 2, 12, (56, 84)),      # GQA, 48 != 32 wide, non-square 4x6 grid
    (2, 1, 24, (70, 70)),      # MQA, 48 != 32 wide, 5x5 grid
], ids=["gqa_nonsquare", "mqa_5x5"])
def test_vision_variations_match_transformers(heads, kv_heads, head_dim, image_hw):
  """transformers' Molmo2VisionModel with the variations its config allows, every block <= 1e-5."""
  pytest.importorskip("transformers")
  import torch
  from transformers.models.molmo2.configuration_molmo2 import Molmo2VisionConfig
  from transformers.models.molmo2.modeling_molmo2 import Molmo2VisionModel
  from stts_jax import config as config_lib
  from tests.models import hf_vision
  cfg = config_lib.ViTConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=heads,
                             num_kv_heads=kv_heads, head_dim=head_dim, patch_size=14, image_size=image_hw[0],
                             image_width=image_hw[1])
  hf_cfg = Molmo2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=heads,
                              num_key_value_heads=kv_heads, head_dim=head_dim, image_size=list(image_hw),
                              patch_size=14, attn_implementation="eager")
  assert hf_cfg.num_position_embeddings == cfg.num_patches
  hf = hf_vision.randomize_(Molmo2VisionModel(hf_cfg), seed=0)
  ours = vit_lib.VisionTransformer(cfg, rngs=nnx.Rngs(0))
  hf_vision.load_vit_from_torch(ours, hf)
  torch.manual_seed(2)
  pixels = torch.rand(3, cfg.num_patches, cfg.patch_dim) * 2 - 1
  with torch.no_grad():
    hidden = hf(pixels, output_hidden_states=True).hidden_states
  taps = forward(ours, jnp.asarray(pixels.numpy()), taps=tuple(range(cfg.num_layers)))
  for l in range(cfg.num_layers):
    np.testing.assert_allclose(taps[l], hidden[l + 1].numpy(), atol=TOL, rtol=0, err_msg=f"block {l}")


@pytest.mark.multidevice
def test_sharded_run_matches_unsharded(model, patches):
  """Params placed by the logical-name rules on a 2x2x2 mesh, activations constrained: same numbers."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec
  from stts_jax.models import partitioning
  from stts_jax.parallel import sharding
  if jax.device_count() < 8:
    pytest.skip("needs 8 (virtual) devices")
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  rules = sharding.make_rules()
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
  assert state["blocks"]["mlp"]["fc1"]["kernel"][...].sharding.spec != PartitionSpec()
  seg = jnp.asarray(np.arange(2 * 81).reshape(2, 81) % 3 - 1, jnp.int32)
  bias = -jnp.asarray(np.arange(2 * 81).reshape(2, 81) % 5, jnp.float32) / 5

  def fn(s, x):
    m = nnx.merge(graphdef, s)
    return m.run_blocks(m.embed(x), 0, 5, taps=(2,), key_bias=bias, segment_ids=seg)

  with jax.set_mesh(mesh), partitioning.activation_rules(mesh, rules):
    x = jax.device_put(patches, NamedSharding(mesh, PartitionSpec("data")))
    out, taps = jax.jit(fn)(state, x)
  ref, ref_taps = run(model, model.embed(patches), 0, 5, taps=(2,), key_bias=bias, segment_ids=seg)
  np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
  np.testing.assert_allclose(taps[2], ref_taps[2], atol=TOL, rtol=0)

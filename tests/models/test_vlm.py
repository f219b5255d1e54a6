"""Molmo2 composition: structure, vision-token mask, feature merge, forward == pieces (HF parity lives
in tests/weights/test_hf_molmo2.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stts_jax.models import vlm
from stts_jax.testing.tiny import tiny_model_config

CFG = tiny_model_config()
TOK = CFG.tokens
P, I = CFG.vit.num_patches, CFG.vit.patch_dim


_video_logits = nnx.jit(lambda m, i, a, x, p: m(i, a, pixel_values_videos=x, video_token_pooling=p))


@pytest.fixture(scope="module")
def model():
  """Random weights written into an abstract model (no XLA compile for the initialisation)."""
  abstract = nnx.eval_shape(lambda: vlm.Molmo2(CFG, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract, nnx.Param)
  rng = np.random.default_rng(0)
  flat = [(path, var.replace(jnp.asarray(rng.normal(0, 0.1, var.get_value().shape) + (path[-1] == "scale"),
                                         jnp.float32)))
          for path, var in nnx.to_flat_state(params)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _video_batch(frames=2):
  """One row: per frame [frame_start, 9 x im_patch, frame_end], then text; 3x3 pooling indices."""
  ids = [TOK.chat_end]
  for _ in range(frames):
    ids += [7, TOK.frame_start] + [TOK.image_patch] * 9 + [TOK.frame_end]
  ids = jnp.asarray([ids + [11, 12, 13]], jnp.int32)
  pool = np.asarray([[t * P + (3 * r + dy) * 9 + 3 * c + dx for dy in range(3) for dx in range(3)]
                     for t in range(frames) for r in range(3) for c in range(3)], np.int32)
  pixels = jax.random.uniform(jax.random.key(0), (frames, P, I), minval=-1, maxval=1)
  return ids, jnp.ones_like(ids), pixels, jnp.asarray(pool)


def test_structure(model):
  assert model.vit.num_layers == max(CFG.adapter.vit_layers) + 1 == 6
  assert model.scorer is None
  assert model.llm.embed_tokens.embedding.get_value().shape == (CFG.llm.vocab_size + 128, CFG.llm.hidden_size)
  assert model.adapter.image_pooling_2d.q_proj.kernel.get_value().shape == (2 * CFG.vit.hidden_size, 32)


def test_vision_token_mask_hand_case():
  ids = jnp.asarray([[TOK.chat_end, 5, TOK.frame_start, TOK.image_patch, TOK.frame_end, TOK.image_col,
                      TOK.low_res_image_start, TOK.image_start, TOK.image_end, TOK.image_low,
                      TOK.video_placeholder, TOK.chat_start]])
  expect = [[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]]
  np.testing.assert_array_equal(np.asarray(vlm.vision_token_mask(ids, TOK)).astype(int), expect)


def test_merge_vision_adds_in_batch_major_order():
  patch = TOK.image_patch
  ids = jnp.asarray([[1, patch, 2, 3], [patch, 4, 5, patch]])
  embeds = jnp.arange(24, dtype=jnp.float32).reshape(2, 4, 3)
  features = jnp.asarray([[100.0] * 3, [200.0] * 3, [300.0] * 3])
  got = np.asarray(vlm.merge_vision(embeds, ids, features, patch))
  expect = np.asarray(embeds).copy()
  expect[0, 1] += 100
  expect[1, 0] += 200
  expect[1, 3] += 300
  np.testing.assert_array_equal(got, expect)


def test_forward_equals_pieces(model):
  ids, mask, pixels, pool = _video_batch()
  logits = _video_logits(model, ids, mask, pixels, pool)
  assert logits.shape == (1, ids.shape[1], CFG.llm.vocab_size)

  def pieces(m, i, x, p):
    features = m.vision_features(x, p)
    embeds = m.merge_vision(m.llm.embed(i), i, features)
    positions = jnp.arange(i.shape[1])[None]
    hidden, _ = m.llm(embeds, positions, jnp.ones(i.shape, bool), m.vision_mask(i))
    return m.llm.logits(hidden)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(nnx.jit(pieces)(model, ids, pixels, pool)), atol=1e-5)
  # images take [n_img, crops, P, I]: the same frames as one 2-crop image give the same logits
  as_image = nnx.jit(lambda m, i, a, x, p: m(i, a, pixel_values=x[None], image_token_pooling=p))(
      model, ids, mask, pixels, pool)
  np.testing.assert_allclose(np.asarray(as_image), np.asarray(logits), atol=1e-6)
  # ... and [total_crops, P, I], the layout transformers' image processor emits
  flat = nnx.jit(lambda m, i, a, x, p: m(i, a, pixel_values=x, image_token_pooling=p))(model, ids, mask, pixels, pool)
  np.testing.assert_allclose(np.asarray(flat), np.asarray(logits), atol=1e-6)
  # the features matter: other pixels, other logits at and after the first patch token
  other = _video_logits(model, ids, mask, -pixels, pool)
  assert np.abs(np.asarray(other) - np.asarray(logits))[0, 3:].max() > 1e-3
  np.testing.assert_allclose(np.asarray(other)[0, :2], np.asarray(logits)[0, :2], atol=1e-6)


def test_bad_inputs(model):
  ids, mask, pixels, pool = _video_batch(1)
  with pytest.raises(ValueError, match="not both"):
    model(ids, mask, pixel_values_videos=pixels, video_token_pooling=pool, pixel_values=pixels[None],
          image_token_pooling=pool)
  with pytest.raises(ValueError, match="needs video_token_pooling"):
    model(ids, mask, pixel_values_videos=pixels)
  with pytest.raises(ValueError, match=r"pixel_values must be \[crops, P, I\] or \[images, crops, P, I\]"):
    model(ids, mask, pixel_values=pixels[None, None], image_token_pooling=pool)


def test_grids_stts_cannot_window_need_method_none():
  """Any patch grid builds unpruned (transformers pads the pooling windows); STTS, which scores and
  packs whole windows, refuses a grid that does not tile into them, naming the grid and the window."""
  import dataclasses
  from stts_jax import config as config_lib
  for vit in (dataclasses.replace(CFG.vit, image_size=70),                        # 5x5
              dataclasses.replace(CFG.vit, image_size=56, image_width=84)):       # 4x6
    unpruned = dataclasses.replace(CFG, vit=vit).validate()
    assert unpruned.stts.method == "none"
    for method in ("stts", "heuristic", "random"):
      pruned = dataclasses.replace(CFG, vit=vit, stts=dataclasses.replace(CFG.stts, method=method))
      rows, cols = vit.grid_hw
      with pytest.raises(ValueError, match=rf"method='{method}'.*patch grid is {rows}x{cols} .*stts.window \(3, 3\)"):
        pruned.validate()
    with pytest.raises(ValueError, match="does not tile"):
      unpruned.windows_per_frame          # the windowed (STTS) video path
  # a square grid that tiles still prunes
  assert dataclasses.replace(CFG, stts=dataclasses.replace(CFG.stts, method="stts")).validate().windows_per_frame == 9
  with pytest.raises(ValueError, match="not a positive multiple of patch_size"):
    config_lib.ViTConfig(image_size=126, image_width=130, patch_size=14).validate()

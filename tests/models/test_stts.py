import jax
import jax.numpy as jnp
import numpy as np

from stts_jax.models import aux_loss
from stts_jax.models import stts


def _np_window_vectors(x_tpd, grid, window):
  t, p, d = x_tpd.shape
  gh, gw = grid
  wh, ww = window
  x = x_tpd.reshape(t, gh // wh, wh, gw // ww, ww, d).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(t, (gh // wh) * (gw // ww), wh * ww * d)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_identical_frames_give_target_zero():
  frame = jax.random.normal(jax.random.key(0), (1, 81, 5))
  x = jnp.repeat(frame, 4, axis=0)
  h = np.asarray(stts.heuristic_scores(x, (9, 9), (3, 3)))
  np.testing.assert_allclose(h[1:], 0.0, atol=1e-6)
  np.testing.assert_allclose(h[0], 1.0)            # zero vector before frame 0: cos 0
  s = jax.random.uniform(jax.random.key(1), (4, 9))
  loss = stts.temporal_aux_loss(s, x, (9, 9), (3, 3))
  np.testing.assert_allclose(float(loss), float(jnp.mean(jnp.square(s[1:]))), rtol=1e-5)


def test_hand_computed_small_case():
  # 3x3 patches, one 3x3 window, D=1: v[t] is the frame's 9 values, normalised.
  f0 = np.arange(1.0, 10.0)
  f1 = f0[::-1].copy()
  f2 = -f0
  x = np.stack([f0, f1, f2])[:, :, None].astype(np.float32)
  c1 = f0 @ f1 / (f0 @ f0)          # |f1| == |f0|
  c2 = f1 @ f2 / (f0 @ f0)
  s = np.array([[0.3], [0.4], [0.9]], np.float32)
  expect = ((0.4 - (1 - c1)) ** 2 + (0.9 - (1 - c2)) ** 2) / 2
  got = float(stts.temporal_aux_loss(jnp.asarray(s), jnp.asarray(x), (3, 3), (3, 3)))
  np.testing.assert_allclose(got, expect, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(stts.heuristic_scores(jnp.asarray(x), (3, 3), (3, 3)))[:, 0],
                             [1.0, 1 - c1, 1 - c2], rtol=1e-6)


def test_random_case_against_numpy_and_t1_is_zero():
  x = np.asarray(jax.random.normal(jax.random.key(2), (3, 36, 4)))
  s = np.asarray(jax.random.uniform(jax.random.key(3), (3, 4)))
  v = _np_window_vectors(x, (6, 6), (3, 3))
  target = 1 - np.sum(v[1:] * v[:-1], -1)
  expect = np.mean((s[1:] - target) ** 2)
  got = float(stts.temporal_aux_loss(jnp.asarray(s), jnp.asarray(x), (6, 6), (3, 3)))
  np.testing.assert_allclose(got, expect, rtol=1e-5)
  assert float(stts.temporal_aux_loss(jnp.asarray(s[:1]), jnp.asarray(x[:1]), (6, 6), (3, 3))) == 0.0


def test_aux_loss_not_detached_and_batched_masking():
  x = jax.random.normal(jax.random.key(4), (2, 3, 36, 4))
  s = jax.random.uniform(jax.random.key(5), (2, 3, 4))
  fm = jnp.array([[1, 1, 0], [1, 1, 1]], bool)
  loss_fn = lambda s, x: aux_loss.temporal_aux_loss_batched(s, x, fm, (6, 6), (3, 3))
  gs, gx = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(s, x)
  assert np.abs(np.asarray(gx[0, :2])).sum() > 0            # target depends on features: not detached
  assert (np.asarray(gx[0, 2]) == 0).all() and (np.asarray(gs[0, 2]) == 0).all()   # padding frame
  assert (np.asarray(gs[:, 0]) == 0).all()                  # frame 0 has no pair
  # value: mean over the 3 real pairs x 4 windows
  l0 = stts.temporal_aux_loss(s[0, :2], x[0, :2], (6, 6), (3, 3))
  l1 = stts.temporal_aux_loss(s[1], x[1], (6, 6), (3, 3))
  np.testing.assert_allclose(float(loss_fn(s, x)), (float(l0) * 4 + float(l1) * 8) / 12, rtol=1e-5)
  # images (prunable False) contribute nothing
  only_video = aux_loss.temporal_aux_loss_batched(s, x, fm, (6, 6), (3, 3), prunable=jnp.array([False, True]))
  np.testing.assert_allclose(float(only_video), float(l1), rtol=1e-5)

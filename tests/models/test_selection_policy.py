"""Sampled keep masks of `train.policy_gradient`: the log-probability is a distribution over drop
orders, sampling matches it, and the training forward samples at the same budget."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stts_jax.models import pruning
from stts_jax.models import selection_policy as sp
from stts_jax.models import video_forward as vf
from tests.models.test_video_forward import _forward, _model, _seq_len, make_batch

# One video of 2 frames x 3 windows: frame 0 is never dropped, so the candidates are frame 1's windows.
SCORES = jnp.asarray([[[0.9, 0.8, 0.7], [0.2, 0.6, 0.9]]], jnp.float32)
FRAMES = jnp.ones((1, 2), bool)


def _keys_for(order, n_windows=3):
  """Keys under which the budget drops frame 1's windows in `order` (ascending keys)."""
  keys = np.full((1, 2, n_windows), 10.0, np.float32)
  for rank, w in enumerate(order):
    keys[0, 1, w] = rank
  return jnp.asarray(keys)


def _log_prob(order, temperature=1.0):
  keys = _keys_for(order)
  keep = jnp.ones((1, 2, 3), bool).at[0, 1, jnp.asarray(order)].set(False)
  return float(sp.drop_log_prob(SCORES, keys, keep, FRAMES, temperature)[0])


def test_drop_orders_form_a_distribution_that_prefers_low_scores():
  for n in (1, 2, 3):
    total = sum(np.exp(_log_prob(o)) for o in itertools.permutations(range(3), n))
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)
  first = [np.exp(_log_prob((w,))) for w in range(3)]     # the lowest score (0.2) goes first most often
  assert first[0] > first[1] > first[2]
  assert np.exp(_log_prob((0,), temperature=100.0)) < first[0]   # hotter: closer to uniform
  np.testing.assert_allclose(np.exp(_log_prob((0,), temperature=1e4)), 1 / 3, rtol=1e-3)


def test_gumbel_keys_sample_that_distribution():
  n_samples, n_drop = 20000, 2
  keys = jax.vmap(lambda k: sp.sample_keys(SCORES, k, 1.0))(jax.random.split(jax.random.key(0), n_samples))
  keep = jax.vmap(lambda k: pruning.budget_keep_mask_batched(k, FRAMES, 0.4))(keys)     # drops 2 of 6
  dropped = ~np.asarray(keep)[:, 0, 1]                                                # [N, 3] frame 1
  assert (dropped.sum(-1) == n_drop).all() and np.asarray(keep)[:, 0, 0].all()
  for pair in itertools.combinations(range(3), n_drop):
    expected = sum(np.exp(_log_prob(o)) for o in itertools.permutations(pair))
    observed = np.mean(dropped[:, list(pair)].all(-1))
    assert abs(observed - expected) < 0.015, (pair, observed, expected)


def test_log_prob_is_finite_with_padding_frames_and_saturated_scores():
  scores = jnp.asarray([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.3], [0.5, 0.5, 0.5]]], jnp.float32)
  frames = jnp.asarray([[True, True, False]])
  keys = sp.sample_keys(scores, jax.random.key(1), 0.5)
  keep = pruning.budget_keep_mask_batched(jnp.where(frames[:, :, None], keys, 0.0), frames, 0.5)
  value, grad = jax.value_and_grad(lambda s: sp.drop_log_prob(s, keys, keep, frames, 0.5)[0])(scores)
  assert np.isfinite(float(value)) and float(value) <= 0 and np.isfinite(np.asarray(grad)).all()
  assert (np.asarray(grad)[0, 2] == 0).all() and (np.asarray(grad)[0, 0] == 0).all()   # padding, frame 0


@pytest.mark.slow   # tiny-Molmo2 forwards in training and evaluation (the sampled step: tests/train/test_step.py)
def test_training_forward_samples_keep_masks_at_the_same_budget_and_evaluation_does_not():
  model = _model(ratio=0.5)
  batch = make_batch(model.config, [3, 3, 2, 3], 3, _seq_len(3))
  f = nnx.jit(functools.partial(vf.forward_video, policy_temperature=1.0), static_argnames=("deterministic",))
  plain = _forward(model, batch, rng=jax.random.key(0), deterministic=False)
  masks = []
  for seed in range(4):
    out = f(model, batch, rng=jax.random.key(seed), deterministic=False)
    np.testing.assert_array_equal(np.asarray(out.num_kept), np.asarray(plain.num_kept))   # same budget
    assert out.selection_logp.shape == (4,) and np.isfinite(np.asarray(out.selection_logp)).all()
    assert (np.asarray(out.selection_logp) <= 0).all()
    np.testing.assert_allclose(float(out.aux_loss), float(plain.aux_loss), rtol=1e-6)   # scorer's own scores
    masks.append(np.asarray(out.keep_mask))
  assert any((m != masks[0]).any() for m in masks[1:])                     # a sample per key
  evaluated = f(model, batch, rng=jax.random.key(0), deterministic=True)
  assert evaluated.selection_logp is None
  np.testing.assert_array_equal(np.asarray(evaluated.keep_mask), np.asarray(_forward(model, batch).keep_mask))

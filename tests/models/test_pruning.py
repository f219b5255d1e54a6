import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stts_jax.models import budget
from stts_jax.models import pruning
from stts_jax.models import stts


def test_budget_keep_mask_hand_case():
  # T=3, W=4, ratio 0.5 -> drop min(6, 8) = 6 of the 8 windows of frames 1-2.
  scores = jnp.array([[0.0, 0.0, 0.0, 0.0],       # frame 0: lowest, still kept
                      [0.9, 0.2, 0.5, 0.1],
                      [0.3, 0.8, 0.4, 0.6]])
  keep = np.asarray(stts.budget_keep_mask(scores, 0.5))
  np.testing.assert_array_equal(keep, [[1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 0, 0]])


def test_ties_drop_lower_flat_index_first():
  keep = np.asarray(stts.budget_keep_mask(jnp.full((3, 4), 0.5), 0.5))
  np.testing.assert_array_equal(keep, [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1]])
  # a tie only among some windows
  scores = jnp.array([[0.1] * 4, [0.3, 0.2, 0.2, 0.9], [0.2, 0.7, 0.7, 0.7]])
  keep = np.asarray(stts.budget_keep_mask(scores, 0.25))   # drop floor(3) = 3
  np.testing.assert_array_equal(keep, [[1, 1, 1, 1], [1, 0, 0, 1], [0, 1, 1, 1]])


def test_cap_drops_all_but_frame_zero_and_single_frame_untouched():
  keep = np.asarray(stts.budget_keep_mask(jnp.arange(8.0).reshape(2, 4), 0.9))
  np.testing.assert_array_equal(keep, [[1, 1, 1, 1], [0, 0, 0, 0]])
  assert np.asarray(stts.budget_keep_mask(jnp.zeros((1, 81)), 0.9)).all()


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.8])
def test_exact_counts_frame_zero_and_padding_batched(ratio):
  b, t, w = 5, 6, 9
  scores = jax.random.uniform(jax.random.key(0), (b, t, w))
  frames = np.array([6, 1, 3, 6, 2])
  frame_mask = jnp.asarray(np.arange(t)[None] < frames[:, None])
  keep = np.asarray(jax.jit(pruning.budget_keep_mask_batched, static_argnums=2)(scores, frame_mask, ratio))
  single_fn = jax.jit(stts.budget_keep_mask, static_argnums=1)
  for i in range(b):
    assert keep[i].sum() == budget.num_kept(int(frames[i]), w, ratio)
    assert keep[i, 0].all()
    assert not keep[i, frames[i]:].any()           # padding frames never kept
    # the batched result equals the single-video one on the real frames
    single = np.asarray(single_fn(scores[i, :frames[i]], ratio))
    np.testing.assert_array_equal(keep[i, :frames[i]], single)
  np.testing.assert_array_equal(np.asarray(pruning.num_kept(jnp.asarray(keep))), keep.sum((1, 2)))


def test_padding_scores_do_not_matter_and_images_untouched():
  t, w = 4, 9
  scores = jax.random.uniform(jax.random.key(1), (2, t, w))
  frame_mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  other = scores.at[0, 3].set(-5.0)                # padding frame with very low scores
  k1 = pruning.budget_keep_mask_batched(scores, frame_mask, 0.5)
  k2 = pruning.budget_keep_mask_batched(other, frame_mask, 0.5)
  np.testing.assert_array_equal(np.asarray(k1), np.asarray(k2))
  keep = pruning.budget_keep_mask_batched(scores, frame_mask, 0.5, prunable=jnp.array([False, True]))
  np.testing.assert_array_equal(np.asarray(keep[0]), np.asarray(frame_mask[0])[:, None].repeat(w, 1))
  assert int(keep[1].sum()) == budget.num_kept(4, w, 0.5)


def test_deterministic_under_jit():
  scores = jnp.round(jax.random.uniform(jax.random.key(2), (3, 5, 9)) * 4) / 4   # many ties
  mask = jnp.ones((3, 5), bool)
  eager = pruning.budget_keep_mask_batched(scores, mask, 0.5)
  jitted = jax.jit(pruning.budget_keep_mask_batched, static_argnums=2)(scores, mask, 0.5)
  np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))
  # reference: sort by (score, flat index), drop the first `dropped` among frames >= 1
  for b in range(3):
    s = np.asarray(scores[b]).reshape(-1)
    cand = [i for i in range(45) if i >= 9]
    order = sorted(cand, key=lambda i: (s[i], i))[:budget.num_dropped(5, 9, 0.5)]
    ref = np.ones(45, bool)
    ref[order] = False
    np.testing.assert_array_equal(np.asarray(eager[b]).reshape(-1), ref)


def test_rescale_and_patch_bias_window_row_hand_case():
  # 6x6 patches, 3x3 windows -> 2x2 windows per frame (rows [w0 w1], [w2 w3]).
  s = jnp.array([[0.5, 0.5, 0.5, 0.5],
                 [0.2, 0.6, 0.3, 0.3]])
  e2 = math.exp(-2)
  bias = np.asarray(stts.scores_to_patch_bias(s, (6, 6), (3, 3)))
  assert bias.shape == (2, 36)
  np.testing.assert_allclose(bias[0], 0.0)                       # frame 0: s' = 1
  hi = e2 + 0.4 * (1 - e2) / (0.4 + 1e-6)
  expect_w = np.log([e2, hi, e2, e2])                            # 2nd window row constant -> e^-2
  patch_window = np.array([0, 0, 0, 1, 1, 1] * 3 + [2, 2, 2, 3, 3, 3] * 3)
  np.testing.assert_allclose(bias[1], expect_w[patch_window], rtol=1e-6, atol=1e-6)
  # "frame" scope: min 0.2, max 0.6 over the whole frame
  r = np.asarray(pruning.rescale_scores(s, (6, 6), (3, 3), "frame"))[1]
  np.testing.assert_allclose(r, e2 + (np.array([0.2, 0.6, 0.3, 0.3]) - 0.2) * (1 - e2) / (0.4 + 1e-6),
                             rtol=1e-6)
  assert r.min() >= e2 - 1e-7 and r.max() <= 1.0
  with pytest.raises(ValueError, match="scope"):
    pruning.rescale_scores(s, (6, 6), (3, 3), "video")


def test_patch_bias_batched_zero_for_frame0_padding_and_images():
  s = jax.random.uniform(jax.random.key(3), (2, 3, 9))
  fm = jnp.array([[1, 1, 0], [1, 1, 1]], bool)
  bias = np.asarray(pruning.scores_to_patch_bias_batched(s, fm, (9, 9), (3, 3),
                                                         prunable=jnp.array([True, False])))
  assert (bias[0, 0] == 0).all() and (bias[0, 2] == 0).all() and (bias[1] == 0).all()
  assert (bias[0, 1] <= 0).all() and (bias[0, 1] >= -2 - 1e-6).all() and bias[0, 1].min() < -1.9
  # gradient reaches the scores through log(rescale) (including min/max)
  g = jax.grad(lambda x: pruning.scores_to_patch_bias_batched(x, fm, (9, 9), (3, 3)).sum())(s)
  assert np.abs(np.asarray(g[0, 1])).sum() > 0 and (np.asarray(g[:, 0]) == 0).all()


def test_keep_patch_mask_and_random_scores():
  keep = jnp.array([[True, False, False, True]])
  km = np.asarray(pruning.keep_patch_mask(keep, (6, 6), (3, 3)))[0].reshape(6, 6)
  assert km[:3, :3].all() and not km[:3, 3:].any() and not km[3:, :3].any() and km[3:, 3:].all()
  r = np.asarray(pruning.random_scores(jax.random.key(0), (2, 3, 4)))
  assert r.shape == (2, 3, 4) and (r >= 0).all() and (r < 1).all()

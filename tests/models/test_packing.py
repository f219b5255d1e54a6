import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stts_jax.models import budget
from stts_jax.models import packing
from stts_jax.models import pruning


def _ffd_reference(counts, capacity):
  """Plain-Python FFD: rows, starts (decreasing count, ties by frame index)."""
  order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
  fills, row, start = [], [-1] * len(counts), [0] * len(counts)
  for i in order:
    c = counts[i]
    if c == 0:
      continue
    for r, f in enumerate(fills):
      if f + c <= capacity:
        row[i], start[i] = r, f
        fills[r] += c
        break
    else:
      row[i], start[i] = len(fills), 0
      fills.append(c)
  return row, start, len(fills)


def _seg_attention(x_npd, seg_np):
  """One attention step (q = k = v = x) with q attending k iff same segment id."""
  logits = jnp.einsum("npd,nqd->npq", x_npd, x_npd)
  ok = seg_np[:, :, None] == seg_np[:, None, :]
  probs = jax.nn.softmax(jnp.where(ok, logits, -1e30), axis=-1)
  return jnp.einsum("npq,nqd->npd", probs, x_npd)


def _keep_from_counts(counts, w, rng):
  """A window keep mask with the given kept windows per frame, random windows."""
  keep = np.zeros((len(counts), w), bool)
  for t, c in enumerate(counts):
    keep[t, rng.choice(w, c, replace=False)] = True
  return keep


def _patterns():
  rng = np.random.default_rng(0)
  t, w = 6, 9
  pats = {
      "frames_dropped": [9, 0, 9, 0, 0, 9],
      "uneven": [9, 1, 5, 3, 0, 8],
      "halves": [9, 5, 5, 5, 5, 5],            # adversarial: no two 5s share a row of 9
      "lone_small": [9, 2, 0, 0, 0, 0],
      "all_kept": [9] * 6,
  }
  out = {k: _keep_from_counts(v, w, rng) for k, v in pats.items()}
  scores = jax.random.uniform(jax.random.key(0), (1, t, w))
  out["budget_0.5"] = np.asarray(pruning.budget_keep_mask_batched(scores, jnp.ones((1, t), bool), 0.5))[0]
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ffd_assign_matches_python(seed):
  counts = np.random.default_rng(seed).integers(0, 10, size=12)
  counts[3] = counts[5] = 4                      # ties
  row, start = packing.ffd_assign(jnp.asarray(counts, jnp.int32), 9)
  r_ref, s_ref, _ = _ffd_reference(counts.tolist(), 9)
  np.testing.assert_array_equal(np.asarray(row), r_ref)
  np.testing.assert_array_equal(np.asarray(start), s_ref)


def test_plans_keep_every_token_and_match_masked_dense_reference():
  grid, window, d = (9, 9), (3, 3), 8
  pats = _patterns()
  keep_btw = jnp.asarray(np.stack(list(pats.values())))
  b, t, w = keep_btw.shape
  p = 81
  # the "halves" pattern needs 6 rows; give every video the full T so nothing overflows here
  plan = jax.jit(lambda k: packing.make_plan(pruning.keep_patch_mask(k, grid, window), num_rows=t))(keep_btw)
  x = jax.random.normal(jax.random.key(1), (b, t, p, d))
  packed = packing.pack(x, plan)
  for i, name in enumerate(pats):
    counts = np.asarray(keep_btw[i]).sum(-1) * 9
    r_ref, s_ref, used = _ffd_reference(counts.tolist(), p)
    assert int(plan.rows_used_b[i]) == used and not bool(plan.overflow_b[i]), name
    dest = np.asarray(plan.dest_btp[i])
    src = np.asarray(plan.src_brp[i]).reshape(-1)
    attend = np.asarray(plan.attend_btp[i])
    keep = np.asarray(plan.keep_btp[i])
    assert (attend >= keep).all()
    # a bijection between attending patches and filled slots
    flat = np.flatnonzero(attend.reshape(-1))
    np.testing.assert_array_equal(src[dest.reshape(-1)[flat]], flat)
    assert (src >= 0).sum() == attend.sum()
    seg = np.asarray(plan.segment_ids_brp[i]).reshape(-1)
    np.testing.assert_array_equal(seg[src >= 0], src[src >= 0] // p)
    assert (seg[src < 0] >= t).all()
    # lone frames are refilled, shared rows are not
    for f in range(t):
      if r_ref[f] >= 0 and r_ref.count(r_ref[f]) == 1:
        assert attend[f].all(), (name, f)
      else:
        np.testing.assert_array_equal(attend[f], keep[f])
  # round trip: kept patches come back exactly, the rest are zeros
  back = packing.unpack(packed, plan)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(x * plan.keep_btp[..., None]))
  # packed attention == per-frame attention over the attending patches, on kept patches
  out_rows = _seg_attention(packed.reshape(b * t, p, d), plan.segment_ids_brp.reshape(b * t, p))
  got = packing.unpack(out_rows.reshape(b, t, p, d), plan)
  seg_dense = packing.dense_segment_ids(plan).reshape(b * t, p)
  ref = _seg_attention(x.reshape(b * t, p, d), seg_dense).reshape(b, t, p, d)
  ref = ref * plan.keep_btp[..., None]
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_overflow_is_flagged_never_silent():
  keep = np.stack([_keep_from_counts([9, 5, 5, 5, 5, 5], 9, np.random.default_rng(3)),
                   _keep_from_counts([9, 9, 9, 0, 0, 0], 9, np.random.default_rng(4))])
  plan = jax.jit(lambda k: packing.make_plan(pruning.keep_patch_mask(k, (9, 9), (3, 3)), num_rows=4))(
      jnp.asarray(keep))
  np.testing.assert_array_equal(np.asarray(plan.rows_used_b), [6, 3])
  np.testing.assert_array_equal(np.asarray(plan.overflow_b), [True, False])
  assert not bool(plan.fits)
  # the fitting video is still packed completely
  x = jax.random.normal(jax.random.key(2), (2, 6, 81, 4))
  back = packing.unpack(packing.pack(x, plan), plan)
  np.testing.assert_array_equal(np.asarray(back[1]), np.asarray(x[1] * plan.keep_btp[1, ..., None]))


def test_budget_patterns_fit_the_proven_bound_under_jit():
  b, t, w = 16, 8, 9
  scores = jax.random.uniform(jax.random.key(5), (b, t, w))
  frames = jnp.asarray(np.random.default_rng(5).integers(1, t + 1, size=b))
  fm = jnp.arange(t)[None] < frames[:, None]
  rows = budget.num_rows(t, w, 0.5)

  @jax.jit
  def f(scores, fm):
    keep = pruning.budget_keep_mask_batched(scores, fm, 0.5)
    return packing.make_plan(pruning.keep_patch_mask(keep, (9, 9), (3, 3)), rows)

  plan = f(scores, fm)
  assert bool(plan.fits) and int(plan.rows_used_b.max()) <= rows
  assert int(np.asarray(plan.keep_btp).sum()) == 9 * sum(budget.num_kept(int(n), w, 0.5) for n in frames)

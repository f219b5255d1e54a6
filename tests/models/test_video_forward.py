"""The STTS video forward on the tiny Molmo2 (126 px frames, 9x9 patches, 9 windows of 3x3 per frame)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stts_jax.models import budget
from stts_jax.models import video_forward as vf
from stts_jax.models.vlm import Molmo2
from stts_jax.testing.tiny import tiny_stts_model

W, P, I = 9, 81, 588


_model = tiny_stts_model


def make_batch(cfg, frames, t, s, seed=0):
  """Videos with a moving square on a static noisy background; Molmo2 prompt layout per frame."""
  rng = np.random.default_rng(seed)
  b = len(frames)
  tok = cfg.tokens
  patches = np.zeros((b, t, P, I), np.uint8)
  ids = np.full((b, s), tok.pad, np.int32)
  token_mask = np.zeros((b, s), bool)
  for i, n in enumerate(frames):
    bg = rng.integers(0, 256, size=(126, 126, 3))
    for f in range(n):
      img = bg.copy()
      y, x = rng.integers(0, 100, size=2)
      img[y:y + 26, x:x + 26] = rng.integers(0, 256, size=3)
      img = (img + rng.normal(0, 3 * (f % 2), img.shape)).clip(0, 255)
      patches[i, f] = img.reshape(9, 14, 9, 14, 3).transpose(0, 2, 1, 3, 4).reshape(P, I)
    seq = [tok.chat_end]
    for f in range(n):
      seq += [10 + f, 11] + [tok.frame_start] + [tok.image_patch] * W + [tok.frame_end]
    seq += [tok.chat_start, 20, 21, 22, tok.chat_end, tok.chat_start, 23] + list(rng.integers(30, 300, size=3))
    assert len(seq) <= s
    ids[i, :len(seq)] = seq
    token_mask[i, :len(seq)] = True
  targets = np.concatenate([ids[:, 1:], np.full((b, 1), tok.pad, np.int32)], axis=1)
  loss_mask = np.zeros((b, s), bool)
  for i in range(b):
    n = int(token_mask[i].sum())
    loss_mask[i, n - 4:n - 1] = True
  frame_mask = np.arange(t)[None] < np.asarray(frames)[:, None]
  return dict(patches=patches, frame_mask=frame_mask, input_ids=ids, token_mask=token_mask,
              target_ids=targets, loss_mask=loss_mask)


def _seq_len(t):
  return 1 + t * (W + 4) + 10


@nnx.jit(static_argnames=("deterministic",))
def _forward(model, batch, rng=None, deterministic=True):
  return vf.forward_video(model, batch, rng=rng, deterministic=deterministic)


@pytest.mark.parametrize("method", ["random", "heuristic"])
def test_training_free_methods_have_no_aux_loss(method):
  """Only the learned scorer has an aux loss: the main job's trained baselines set its weight to 0
  (experiments/main_job.run_config) because for them it contributes nothing."""
  model = _model(ratio=0.5, method=method)
  batch = make_batch(model.config, [3, 2], 3, _seq_len(3))
  out = _forward(model, batch, rng=jax.random.key(0), deterministic=False)
  assert int(np.asarray(out.num_kept).sum()) < 5 * W and float(out.aux_loss) == 0.0
  assert float(_forward(_model(ratio=0.5), batch).aux_loss) > 0.0


def test_ratio_zero_and_none_equal_the_general_forward():
  t = 3
  frames = [3, 2]
  model = _model(ratio=0.0)
  batch = make_batch(model.config, frames, t, _seq_len(t))
  out = _forward(model, batch)
  # the general Molmo2 forward on HF-shaped inputs: real frames only, global pooling indices
  pix = np.concatenate([batch["patches"][i, :n] for i, n in enumerate(frames)])
  pix = (pix.astype(np.float32) * np.float32(1 / 255) - np.float32(0.5)) / np.float32(0.5)
  from stts_jax.models import windows
  idx = windows.window_patch_index((9, 9), (3, 3))
  pool = np.concatenate([idx + f * P for f in range(sum(frames))]).astype(np.int32)
  ref = nnx.jit(lambda m, ids, am, px, pl: m(ids, am, pixel_values_videos=px, video_token_pooling=pl))(
      model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["token_mask"]), jnp.asarray(pix),
      jnp.asarray(pool))
  assert out.logits.shape == ref.shape
  np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out.num_kept), [27, 18])
  assert float(out.aux_loss) == 0.0
  none = _forward(_model(method="none"), batch)
  np.testing.assert_array_equal(np.asarray(none.logits), np.asarray(out.logits))


@pytest.mark.parametrize("method", ["stts", "heuristic", "random"])
def test_exact_counts_frame_zero_padding_and_static_length(method):
  t = 4
  frames = [4, 1, 3]
  model = _model(method=method, ratio=0.5)
  batch = make_batch(model.config, frames, t, _seq_len(t), seed=1)
  out = _forward(model, batch, jax.random.key(3))
  keep = np.asarray(out.keep_mask)
  for i, n in enumerate(frames):
    assert keep[i].sum() == budget.num_kept(n, W, 0.5) == int(out.num_kept[i])
    assert keep[i, 0].all() and not keep[i, n:].any()
  s_out = _seq_len(t) - budget.num_dropped(t, W, 0.5)
  assert out.logits.shape == (3, s_out, 512) and out.loss_mask.shape == (3, s_out)
  np.testing.assert_array_equal(np.asarray(out.num_truncated), 0)
  # every sample keeps its <im_patch> tokens of kept windows, its text and its 3 answer targets
  for i in range(3):
    lm = np.asarray(out.loss_mask[i])
    np.testing.assert_array_equal(np.asarray(out.target_ids[i])[lm], batch["target_ids"][i][batch["loss_mask"][i]])
  again = _forward(model, batch, jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(again.keep_mask), keep)
  np.testing.assert_array_equal(np.asarray(again.logits), np.asarray(out.logits))
  assert (float(out.aux_loss) > 0) == (method == "stts")


def _reference_post(model, hidden_btpd, attend_btp, keep_btp):
  """Each frame alone with only its attending patches, no mask at all; outputs at kept patches.

  Frames with the same number of attending patches run together (one compilation per length)."""
  cfg = model.config
  start, last = cfg.stts.prune_at + 2, max(cfg.adapter.vit_layers) + 1
  taps = tuple(x for x in cfg.adapter.vit_layers if x >= start)
  out = {k: np.zeros(hidden_btpd.shape, np.float32) for k in taps}
  groups = {}
  for b in range(hidden_btpd.shape[0]):
    for t in range(hidden_btpd.shape[1]):
      sel = np.flatnonzero(attend_btp[b, t])
      if len(sel):
        groups.setdefault(len(sel), []).append((b, t, sel))
  for members in groups.values():
    x = jnp.asarray(np.stack([hidden_btpd[b, t, sel] for b, t, sel in members]))
    _, o = model.vit.run_blocks(x, start, last, taps=taps)
    for k in taps:
      for (b, t, sel), rows in zip(members, np.asarray(o[k])):
        keep = keep_btp[b, t, sel]
        out[k][b, t, sel[keep]] = rows[keep]
  return out


def _keep_from_counts(counts, rng):
  keep = np.zeros((len(counts), W), bool)
  for t, c in enumerate(counts):
    keep[t, rng.choice(W, c, replace=False)] = True
  return keep


def test_packed_vit_equals_per_frame_reference_and_fallback_is_exact():
  model = _model()
  t = 6
  rng = np.random.default_rng(0)
  patterns = [[9, 0, 9, 0, 0, 9],        # whole frames dropped
              [9, 1, 5, 4, 0, 8],        # uneven frames
              [9, 5, 5, 5, 3, 0],        # adversarial: the 5s cannot share rows -> 4 rows
              [9, 2, 0, 0, 0, 0]]        # a lone partial frame (refilled with its whole frame)
  keep = jnp.asarray(np.stack([_keep_from_counts(c, rng) for c in patterns]))
  hidden = jax.random.normal(jax.random.key(0), (4, t, P, 32))
  from stts_jax.models import packing, pruning
  plan = jax.jit(lambda k: packing.make_plan(pruning.keep_patch_mask(k, (9, 9), (3, 3)), t))(keep)
  np.testing.assert_array_equal(np.asarray(plan.rows_used_b), [3, 3, 4, 2])
  ref = _reference_post(model, np.asarray(hidden), np.asarray(plan.attend_btp), np.asarray(plan.keep_btp))
  post = nnx.jit(lambda m, h, k, r: vf.vit_after_prune(m, h, k, num_rows=r), static_argnums=3)
  # the proven bound (5 rows for 6 frames at ratio 0.5): packed
  bound = budget.row_bound(t, W, 0.5)
  assert bound == 5
  got, packed = post(model, hidden, keep, bound)
  assert bool(packed)
  for k in ref:
    np.testing.assert_allclose(np.asarray(got[k]), ref[k], rtol=1e-5, atol=1e-5)
  # 3 rows (the minimum for 27 kept windows): the adversarial video needs 4, so the whole batch takes
  # the exact dense fallback; nothing kept is lost
  got3, packed3 = post(model, hidden, keep, budget.min_rows(t, W, 0.5))
  assert not bool(packed3)
  for k in ref:
    np.testing.assert_allclose(np.asarray(got3[k]), ref[k], rtol=1e-5, atol=1e-5)


def test_rows_equal_to_frames_take_the_per_frame_path_with_the_same_result():
  """num_rows >= T: packing saves nothing, so "auto" runs the frames as they are (no cond, no
  pack/unpack gathers) and must equal both the packed path ("always") and the per-frame reference."""
  t = 6
  rng = np.random.default_rng(1)
  keep = jnp.asarray(np.stack([_keep_from_counts(c, rng) for c in ([9, 6, 6, 5, 7, 6], [9, 2, 0, 8, 4, 9])]))
  hidden = jax.random.normal(jax.random.key(1), (2, t, P, 32))
  from stts_jax.models import packing, pruning
  plan = jax.jit(lambda k: packing.make_plan(pruning.keep_patch_mask(k, (9, 9), (3, 3)), t))(keep)
  ref = _reference_post(_model(), np.asarray(hidden), np.asarray(plan.attend_btp), np.asarray(plan.keep_btp))
  results = {}
  for mode in ("auto", "always"):
    model = _model(packing=mode)
    graphdef, state = nnx.split(model)
    fn = lambda s, h, k: vf.vit_after_prune(nnx.merge(graphdef, s), h, k, num_rows=t)  # noqa: E731
    prims = {e.primitive.name for e in jax.make_jaxpr(fn)(state, hidden, keep).jaxpr.eqns}
    assert ("cond" in prims) == (mode == "always"), (mode, prims)
    got, packed = jax.jit(fn)(state, hidden, keep)
    assert bool(packed)
    for k in ref:
      np.testing.assert_allclose(np.asarray(got[k]), ref[k], rtol=1e-5, atol=1e-5)
    results[mode] = got
  for k in ref:
    np.testing.assert_allclose(np.asarray(results["auto"][k]), np.asarray(results["always"][k]), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="stts.packing"):
    _model(packing="never")


def test_one_compilation_over_videos_with_different_keep_patterns():
  t = 4
  model = _model()
  graphdef, state = nnx.split(model)
  traces = []

  @jax.jit
  def step(state, batch):
    traces.append(1)
    out = vf.forward_video(nnx.merge(graphdef, state), batch)
    return out.logits, out.keep_mask, out.num_kept

  seen = set()
  for seed, frames in enumerate([[4, 4], [2, 4], [4, 1], [3, 3], [1, 2], [4, 3]]):
    batch = make_batch(model.config, frames, t, _seq_len(t), seed=seed)
    _, keep, kept = step(state, batch)
    seen.add(np.asarray(keep).tobytes())
    np.testing.assert_array_equal(np.asarray(kept), [budget.num_kept(n, W, 0.5) for n in frames])
  assert len(seen) == 6
  assert len(traces) == 1 and step._cache_size() == 1


@pytest.mark.slow   # ~35 s of CPU: compiles the gradient of the whole model
def test_lm_loss_gradient_reaches_the_scorer_and_matches_finite_differences():
  t = 3
  model = _model()
  # spread the initial scores a little, so a small step does not reorder windows (the keep mask)
  model.scorer.fc3.kernel.set_value(model.scorer.fc3.kernel[...] * 30)
  batch = make_batch(model.config, [3, 3], t, _seq_len(t), seed=4)
  # LM loss on every position whose target is a text token (the frames' tokens included)
  batch["loss_mask"] = batch["token_mask"] & (batch["target_ids"] < model.config.llm.vocab_size)
  graphdef, state = nnx.split(model)

  @jax.jit
  @functools.partial(jax.value_and_grad, has_aux=True)
  def lm_loss(state):
    out = vf.forward_video(nnx.merge(graphdef, state), batch)
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, out.target_ids[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * out.loss_mask) / jnp.sum(out.loss_mask), out.keep_mask

  (loss, keep), grads = lm_loss(state)
  g = np.asarray(grads["scorer"]["fc1"]["kernel"][...])
  assert np.abs(g).max() > 1e-5 and np.isfinite(float(loss))
  v = g / np.linalg.norm(g)
  eps = 5e-3

  def at(sign):
    moved = jax.tree.map(lambda x: x, state)
    kernel = moved["scorer"]["fc1"]["kernel"]
    kernel.set_value(kernel[...] + sign * eps * jnp.asarray(v))
    (value, keep_moved), _ = lm_loss(moved)
    # the step does not change which windows are kept: the loss is smooth there
    np.testing.assert_array_equal(np.asarray(keep_moved), np.asarray(keep))
    return float(value)

  fd = (at(1.0) - at(-1.0)) / (2 * eps)
  np.testing.assert_allclose(fd, float(np.linalg.norm(g)), rtol=0.05)   # d loss / d(step along g/|g|)


@pytest.mark.slow
def test_vit_chunk_gives_the_same_logits_and_gradients():
  """`vit_chunk` runs each example's frames / packed rows in rematerialised chunks (less memory, one
  more ViT forward): logits and the loss gradient (scorer and ViT included) are unchanged."""
  model = _model()
  t = 5
  batch = {k: jnp.asarray(v) for k, v in make_batch(model.config, [5, 3], t, _seq_len(t)).items()}
  chunked = nnx.clone(model)
  chunked.config = dataclasses.replace(model.config, vit_chunk=2).validate()   # 5 frames -> 3 chunks, 1 padded

  def loss(m):
    out = vf.forward_video(m, batch)
    return jnp.sum(jnp.where(out.loss_mask[..., None], jax.nn.log_softmax(out.logits), 0.0)) + out.aux_loss, out.logits

  (l0, lg0), g0 = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
  (l1, lg1), g1 = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(chunked)
  np.testing.assert_allclose(np.asarray(lg1), np.asarray(lg0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  flat0, flat1 = jax.tree.leaves(nnx.state(g0)), jax.tree.leaves(nnx.state(g1))
  assert len(flat0) == len(flat1)
  # Parameter gradients sum over frames in another order (per chunk): float32 reordering of sums over
  # all frames and patches, bounded relative to each tensor.
  for a, b in zip(flat0, flat1):
    a, b = np.asarray(a), np.asarray(b)
    assert np.max(np.abs(b - a)) <= 1e-4 * max(1.0, float(np.max(np.abs(a))))
  scorer_grad = jax.tree.leaves(nnx.state(g0.scorer))
  assert max(float(jnp.max(jnp.abs(x))) for x in scorer_grad) > 0


def test_llm_prune_off_puts_each_kept_window_feature_on_its_own_token():
  """stts.llm_prune=False keeps every window's `<im_patch>` token: kept window (t, w) must add its own
  pooled feature to token t*W + w, dropped windows' tokens get none (compacted features would shift
  later windows onto earlier, dropped windows' tokens)."""
  model = _model(llm_prune=False)
  t = 4
  batch = make_batch(model.config, [4, 3], t, _seq_len(t))
  vision = nnx.jit(lambda m, p, f: vf.vit_features_video(m, p, f))(model, jnp.asarray(batch["patches"]),
                                                                     jnp.asarray(batch["frame_mask"]))
  keep = np.asarray(vision.keep_mask_btw)
  assert keep[batch["frame_mask"]].mean() < 0.9                       # something was dropped
  got = np.asarray(vf.llm_window_features(model, vision))             # [B, T*W, E]
  # Reference: pool every real window in place (all kept: compacted order == window order).
  every = dataclasses.replace(vision, keep_mask_btw=jnp.asarray(np.broadcast_to(batch["frame_mask"][:, :, None], keep.shape)))
  all_feats = np.asarray(vf.pool_windows(model, every, t * W)[0])
  want = np.where(keep.reshape(2, t * W)[..., None], all_feats, 0.0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_explore_selection_replaces_whole_videos_with_random_scores():
  scores = jax.random.uniform(jax.random.key(1), (64, 4, W)) + 2.0     # random scores are < 1
  key = jax.random.key(2)
  np.testing.assert_array_equal(np.asarray(vf.explore_selection(scores, key, 0.0)), np.asarray(scores))
  assert (np.asarray(vf.explore_selection(scores, key, 1.0)) < 1).all()
  out = np.asarray(vf.explore_selection(scores, key, 0.5))
  replaced = (out < 1).all(axis=(1, 2))
  assert ((out < 1).any(axis=(1, 2)) == replaced).all()                # a video is replaced whole or not at all
  assert 16 <= replaced.sum() <= 48
  # example-packed rows: per video of the row
  ids = jnp.asarray(np.tile([0, 0, 1, 1], (64, 1)), jnp.int32)
  out = np.asarray(vf.explore_selection(scores, key, 0.5, ids, num_videos=2))
  first, second = (out[:, :2] < 1).all(axis=(1, 2)), (out[:, 2:] < 1).all(axis=(1, 2))
  assert ((out[:, :2] < 1).any(axis=(1, 2)) == first).all() and ((out[:, 2:] < 1).any(axis=(1, 2)) == second).all()
  assert (first != second).any()


@pytest.mark.slow   # several tiny-Molmo2 compiles: minutes on 2 CPU cores
def test_random_selection_changes_only_training_keep_masks_at_the_same_budget():
  model = _model(ratio=0.5)
  batch = make_batch(model.config, [3, 3, 2, 3], 3, _seq_len(3))
  f = nnx.jit(functools.partial(vf.forward_video, random_selection=1.0), static_argnames=("deterministic",))
  key = jax.random.key(0)
  plain = _forward(model, batch, rng=key, deterministic=False)
  explored = f(model, batch, rng=key, deterministic=False)
  assert (np.asarray(explored.keep_mask) != np.asarray(plain.keep_mask)).any()
  np.testing.assert_array_equal(np.asarray(explored.num_kept), np.asarray(plain.num_kept))   # same budget
  np.testing.assert_allclose(float(explored.aux_loss), float(plain.aux_loss), rtol=1e-6)   # scorer's own scores
  evaluated = f(model, batch, rng=key, deterministic=True)                # evaluation never explores
  np.testing.assert_array_equal(np.asarray(evaluated.keep_mask), np.asarray(_forward(model, batch).keep_mask))


@pytest.mark.slow   # several tiny-Molmo2 compiles: minutes on 2 CPU cores
@pytest.mark.parametrize("llm_prune", [True, False])
def test_selection_gradient_leaves_values_and_adds_a_linear_gradient_to_the_scorer(llm_prune):
  """The gate is exactly 1 in value (same logits); its gradient to the scorer is linear in its weight and
  absent for a weight of 0. With `llm_prune=False` the gated features are placed on their windows' own
  tokens after gating, so the same holds."""
  model = _model(ratio=0.5, llm_prune=llm_prune)
  batch = jax.tree.map(jnp.asarray, make_batch(model.config, [3, 2], 3, _seq_len(3)))
  key = jax.random.key(0)

  def loss(m, g):
    out = vf.forward_video(m, batch, rng=key, deterministic=False, selection_gradient=g)
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, out.target_ids[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(out.loss_mask, picked, 0.0)), out.logits

  grads, logits = {}, {}
  for g in (0.0, 1.0, 2.0):
    (_, logits[g]), grad = nnx.value_and_grad(functools.partial(loss, g=g), has_aux=True)(model)
    grads[g] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(nnx.state(grad.scorer))])
  np.testing.assert_array_equal(np.asarray(logits[1.0]), np.asarray(logits[0.0]))
  d1, d2 = grads[1.0] - grads[0.0], grads[2.0] - grads[0.0]
  assert np.abs(d1).max() > 1e-3 * np.abs(grads[0.0]).max()
  np.testing.assert_allclose(d2, 2 * d1, rtol=1e-2, atol=1e-3 * np.abs(d2).max())
  # only the learned scorer is gated: the heuristic's selection is left alone
  heur = _model(ratio=0.5, method="heuristic")
  plain = vf.forward_video(heur, batch, rng=key, deterministic=False)
  gated = vf.forward_video(heur, batch, rng=key, deterministic=False, selection_gradient=1.0)
  np.testing.assert_array_equal(np.asarray(gated.logits), np.asarray(plain.logits))

"""Example packing on the model side: a packed row computes what one row per example computes.

Tiny Molmo2 in float32; examples of different frame counts (1 to 4 frames) and prompt lengths.
Exactness: per-example answer losses, keep masks, scores and the gradients of the train loss are the
same (float rounding only) whether the examples run one per row or several per packed row, pruned
(STTS 0.5, with the per-video packed ViT rows and without) and unpruned.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stts_jax.data import example_packing as host_packing
from stts_jax.models import budget
from stts_jax.models import example_packing as ep
from stts_jax.models import video_forward as vf
from stts_jax.testing.tiny import tiny_stts_model
from tests.models.test_video_forward import make_batch

W = 9
FRAMES = [4, 2, 3, 1, 4]          # frames of the five examples (T bucket 4)
ROWS = [[0, 1], [2, 3, 4]]        # how the packed batch groups them
T = 4


_model = tiny_stts_model


def _examples(cfg):
  """One-per-row batch and the same examples as processed-example dicts (prompt tails differ in length)."""
  s = 1 + T * (W + 4) + 10
  batch = make_batch(cfg, FRAMES, T, s, seed=3)
  batch["timestamps"] = np.zeros(batch["frame_mask"].shape, np.float32)
  examples = []
  for i in range(len(FRAMES)):
    ex = {k: v[i] for k, v in batch.items()}
    ex.update(example_id=np.int64(i), answer_index=np.int32(-1), option_ids=np.full(4, -1, np.int32),
              prompt_len=np.int32(0), valid=np.bool_(True), skipped=np.bool_(False))
    examples.append(ex)
  return batch, examples


def _packed(cfg, examples, max_frames=8, max_videos=3):
  spec = host_packing.PackSpec(rows=len(ROWS), seq_len=200, max_frames=max_frames, max_videos=max_videos,
                               windows=W, llm_drop_ratio=ep.llm_drop_ratio(cfg), pad_id=cfg.tokens.pad)
  out = host_packing.assemble([[examples[i] for i in row] for row in ROWS], spec)
  return {k: v for k, v in out.items() if v.dtype != np.int64}


@nnx.jit
def _forward(model, batch):
  return vf.forward_video(model, batch)


def _token_ce(out):
  logits = out.logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, out.target_ids[..., None], axis=-1)[..., 0]
  return np.asarray(jnp.where(out.loss_mask, logz - tgt, 0.0))


def _per_example_ce_unpacked(out):
  return _token_ce(out).sum(axis=1)


def _per_example_ce_packed(out):
  ce = _token_ce(out)
  ex = np.asarray(out.example_ids)
  res = {}
  for r, row in enumerate(ROWS):
    for j, i in enumerate(row):
      res[i] = ce[r][ex[r] == j].sum()
  return np.array([res[i] for i in range(len(FRAMES))])


def _per_video(packed_btw, packed_frame_example):
  """Packed [B, F, W] -> {example: [t, W]}."""
  out = {}
  for r, row in enumerate(ROWS):
    for j, i in enumerate(row):
      out[i] = np.asarray(packed_btw)[r][np.asarray(packed_frame_example)[r] == j]
  return out


CASES = {
    "stts": dict(method="stts", ratio=0.5),
    "stts_packed_vit_rows": dict(method="stts", ratio=0.5, num_rows=3, packing="always"),
    "heuristic": dict(method="heuristic", ratio=0.5),
    "none": dict(method="none"),
}
# Default suite: the case that exercises most (scorer, per-video budget, per-video packed ViT rows,
# compacted LLM row); the others take 7-25 s each on 2 cores.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("case", [pytest.param("stts", marks=_SLOW), "stts_packed_vit_rows",
                                  pytest.param("heuristic", marks=_SLOW), pytest.param("none", marks=_SLOW)])
def test_packed_rows_equal_one_example_per_row(case):
  model = _model(**CASES[case])
  cfg = model.config
  batch, examples = _examples(cfg)
  packed = _packed(cfg, examples)
  out = _forward(model, batch)
  pout = _forward(model, packed)
  np.testing.assert_allclose(_per_example_ce_packed(pout), _per_example_ce_unpacked(out), rtol=2e-5, atol=2e-5)
  keep = _per_video(pout.keep_mask, packed["frame_example"])
  scores = _per_video(pout.scores, packed["frame_example"])
  for i, t in enumerate(FRAMES):
    np.testing.assert_array_equal(keep[i], np.asarray(out.keep_mask)[i, :t], err_msg=f"example {i}")
    np.testing.assert_allclose(scores[i], np.asarray(out.scores)[i, :t], rtol=1e-5, atol=1e-6)
    # STTS's budget stays per video: kept(t) of the video's own frame count.
    assert keep[i].sum() == budget.num_kept(t, W, cfg.stts.ratio if cfg.stts.prunes else 0.0)
  np.testing.assert_allclose(float(pout.aux_loss), float(out.aux_loss), rtol=1e-5, atol=1e-7)
  assert int(np.sum(pout.num_truncated)) == 0 and int(np.sum(out.num_truncated)) == 0
  if case == "stts_packed_vit_rows":
    assert bool(pout.packed), "the packed ViT rows should fit (else the dense fallback ran)"


def _loss_and_grads(model, batch):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p, b):
    m = nnx.merge(graphdef, p, rest)
    out = vf.forward_video(m, b)
    return _token_ce_jnp(out) / jnp.maximum(jnp.sum(out.loss_mask), 1) + 0.5 * out.aux_loss

  return jax.jit(jax.value_and_grad(loss_fn))(params, batch)


def _token_ce_jnp(out):
  logits = out.logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, out.target_ids[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(out.loss_mask, logz - tgt, 0.0))


@pytest.mark.slow   # 15-35 s per case on 2 cores
@pytest.mark.parametrize("case", ["stts", "none"])
def test_packed_gradients_equal_one_example_per_row(case):
  """The train loss (answer CE normalised by answer tokens + 0.5 aux) and all its gradients, scorer
  included (its only LM-loss path is the soft-block bias)."""
  model = _model(**CASES[case])
  batch, examples = _examples(model.config)
  packed = _packed(model.config, examples)
  loss, grads = _loss_and_grads(model, batch)
  ploss, pgrads = _loss_and_grads(model, packed)
  np.testing.assert_allclose(float(ploss), float(loss), rtol=1e-5)
  flat, _ = jax.tree_util.tree_flatten_with_path(grads)
  pflat = jax.tree.leaves(pgrads)
  assert len(flat) == len(pflat)
  # Leaves whose gradient is zero in exact arithmetic (e.g. the adapter pooling's key bias: softmax is
  # shift-invariant) hold rounding noise ~1e-10: their tolerance is floored by the largest gradient.
  top = max(float(np.max(np.abs(np.asarray(g)))) for _, g in flat)
  for (path, g), pg in zip(flat, pflat):
    g, pg = np.asarray(g), np.asarray(pg)
    scale = max(float(np.max(np.abs(g))), 1e-3 * top)
    np.testing.assert_allclose(pg, g, rtol=0, atol=2e-5 * scale, err_msg=jax.tree_util.keystr(path))
    if case == "stts" and "scorer" in jax.tree_util.keystr(path) and "fc3" in jax.tree_util.keystr(path):
      assert np.any(g != 0)


def test_positions_restart_and_match_the_host():
  """Unpruned: the model's positions are the host's (0 at every example's first token)."""
  model = _model(method="none")
  batch, examples = _examples(model.config)
  packed = _packed(model.config, examples)
  pos = np.asarray(ep.segment_positions(jnp.where(packed["token_mask"], packed["token_example"], -1)))
  m = packed["token_mask"]
  np.testing.assert_array_equal(pos[m], packed["positions"][m])
  assert (packed["positions"][packed["token_example"] >= 0].min()) == 0


def test_budget_keep_mask_packed_hand_case():
  """Two videos in one row (2 and 3 frames, W=2, ratio 0.5): each drops its own dropped(t)."""
  scores = jnp.asarray([[[.9, .8], [.1, .7], [.5, .5], [.2, .3], [.05, .6], [0., 0.]]], jnp.float32)
  frame_mask = jnp.asarray([[1, 1, 1, 1, 1, 0]], bool)
  vids = jnp.asarray([[0, 0, 1, 1, 1, -1]], jnp.int32)
  keep = np.asarray(ep.budget_keep_mask_packed(scores, frame_mask, vids, 2, 0.5))[0]
  # video 0 (2 frames): drop min(floor(.5*2*2), 2*1) = 2 -> both windows of its frame 1.
  # video 1 (3 frames): drop min(3, 4) = 3 of frames 1-2 -> 0.05, 0.2, 0.3; keeps its frame 0 whole.
  np.testing.assert_array_equal(keep, [[1, 1], [0, 0], [1, 1], [0, 0], [0, 1], [0, 0]])


def test_packed_bounds():
  assert budget.packed_dropped_bound(10, 9, 0.3) == 27
  # 4 frames, up to 3 videos, W = 9, ratio 0.5: kept(1)=9, kept(2)=9, kept(3)=14 ... best split 1+1+2
  kept = [budget.num_kept(t, 9, 0.5) for t in range(5)]
  assert budget.packed_kept_bound(4, 3, 9, 0.5) == max(
      kept[a] + kept[b] + kept[4 - a - b] for a in range(5) for b in range(5 - a))
  assert budget.packed_num_rows(8, 3, 9, 0.5, None) == 8


def test_ffd_per_video_rows_are_each_video_alone_shifted():
  """Two videos in one row of frames: each video's first-fit rows are its own rows, after the
  previous video's, so lone (refilled) frames are those of the video packed alone."""
  from stts_jax.models import packing
  a, b = [9, 3, 5, 0, 4], [9, 6, 2, 2]
  row, start = packing.ffd_assign(jnp.asarray(a + b + [0], jnp.int32), 9,
                                  jnp.asarray([0] * 5 + [1] * 4 + [-1], jnp.int32))
  ra, sa = packing.ffd_assign(jnp.asarray(a, jnp.int32), 9)
  rb, sb = packing.ffd_assign(jnp.asarray(b, jnp.int32), 9)
  used_a = int(np.max(ra)) + 1
  np.testing.assert_array_equal(np.asarray(row[:5]), np.asarray(ra))
  np.testing.assert_array_equal(np.asarray(row[5:9]), np.where(np.asarray(rb) >= 0, np.asarray(rb) + used_a, -1))
  np.testing.assert_array_equal(np.asarray(start[:9]), np.concatenate([np.asarray(sa), np.asarray(sb)]))
  assert int(row[9]) == -1

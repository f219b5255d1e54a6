"""The default dataset's recolour variant (`Spec(variant="recolour")`): a change detector is misled
in pixels and in the demo model's own early features, and the event's colour still gives the answer."""

import numpy as np
import pytest

from stts_jax.data import default_dataset, oracle, preprocess

RECOLOUR = default_dataset.Spec(variant="recolour")
WINDOWS = preprocess.pooling_index((9, 9), (3, 3))


def rendered(split, n):
  out = [default_dataset.render_clip(split, i, RECOLOUR) for i in range(n)]
  return [c for c, _ in out], [m for _, m in out]


def yellow_pixels(frames):
  """Pixels of the event's yellow per (frame, window) [T, W] (orange and lime frames stay out)."""
  p = preprocess.patchify(frames, 14).reshape(frames.shape[0], 81, 14, 14, 3).astype(int)
  return ((p[..., 0] > 190) & (p[..., 1] > 160) & (p[..., 2] < 90)).sum((2, 3))[:, WINDOWS].sum(-1)


def test_recolour_spec_and_stream():
  with pytest.raises(ValueError, match="distractors"):
    default_dataset.Spec(variant="recolour", distractors=False)
  a, meta_a = default_dataset.render_clip("val", 4, RECOLOUR)
  b, meta_b = default_dataset.render_clip("val", 4, RECOLOUR)
  np.testing.assert_array_equal(a, b)
  assert meta_a == meta_b and a.shape == (8, 126, 126, 3) and a.dtype == np.uint8
  hard, _ = default_dataset.render_clip("val", 4, default_dataset.Spec(variant="hard"))
  assert not np.array_equal(a, hard)


def test_recolour_event_is_the_only_yellow_and_its_object_stays_in_place():
  clips, metas = rendered("test", 40)
  for frames, meta in zip(clips, metas):
    ev, w = meta["event_frames"], meta["event_window"]
    assert 1 <= len(ev) <= 2 and ev[0] >= 1 and ev[-1] // 2 == meta["quarter"]
    assert meta["corner"] == (default_dataset.CORNERS.index(w) if w in default_dataset.CORNERS else -1)
    assert not any(t in ev and d == w for t, d in meta["decoys"])
    # The event's object is there on every other frame too (listed as a decoy there) ...
    assert sorted(t for t, d in meta["decoys"] if d == w) == [t for t in range(8) if t not in ev]
    yellow = yellow_pixels(frames)
    for t in ev:
      assert yellow[t, w] >= 400, (meta, yellow[t, w])    # the 36 px frame ring is ~620 px
    # ... and no other (frame, window) is as yellow: the colour alone gives the answer.
    others = yellow.copy()
    others[ev, w] = 0
    assert others.max() < yellow[ev, w].min(), (meta, others.max())


def test_recolour_misleads_the_pixel_heuristic():
  clips, metas = rendered("train", 150)
  rates = oracle.keep_rates(clips, [(m["event_frames"], m["event_window"]) for m in metas], ratio=0.5)
  print(f"\nrecolour, event-window keep rate at 50% pruning: {rates}")
  assert rates["heuristic"] <= 0.4 and rates["random"] - rates["heuristic"] >= 0.15


def test_recolour_misleads_the_models_feature_heuristic_at_init():
  """The demo model's heuristic (1 - cos of block-0 window features, random init) keeps the event
  less often than random pruning: the variant is hard for the selection the model itself runs."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from configs import demo
  from stts_jax.models import video_forward, vlm

  model = vlm.Molmo2(demo.model_config("heuristic", 0.5), rngs=nnx.Rngs(0))
  clips, metas = rendered("train", 128)
  patches = jnp.asarray(np.stack([preprocess.patchify(c, 14) for c in clips]))

  @nnx.jit
  def scores(model, patches):
    scored, _ = video_forward.vit_scored(model, patches, jnp.ones(patches.shape[:2], bool))
    return scored.scores_btw

  s = np.asarray(jax.device_get(scores(model, patches)))
  feature = np.mean([oracle.event_kept(oracle.keep_mask(s[i], 0.5), m["event_frames"], m["event_window"])
                     for i, m in enumerate(metas)])
  rnd = oracle.keep_rates(clips, [(m["event_frames"], m["event_window"]) for m in metas], ratio=0.5)["random"]
  print(f"\nrecolour, feature heuristic at init {feature:.3f}, random {rnd:.3f}")
  assert feature <= 0.45 and rnd - feature >= 0.05

"""Unit tests of the score-exploration plots (stts_jax/viz_scores.py)."""

import os

import numpy as np
import pytest
from matplotlib import patches as mpatches
from PIL import Image

from stts_jax import viz
from stts_jax import viz_scores as vs

T, GRID, PX = 3, 3, 42


def _frames(colour=(200, 40, 10)):
  f = np.zeros((T, GRID * PX, GRID * PX, 3), np.uint8)
  f[:] = colour
  return f


def _keep():
  keep = np.ones((T, GRID * GRID), bool)
  keep[1, [0, 4]] = False
  keep[2, :5] = False
  return keep


def test_grey_dropped_greys_exactly_the_dropped_windows():
  frames, keep = _frames(), _keep()
  out = vs.grey_dropped(frames, keep, GRID, fade=0.5)
  luma = 0.299 * 200 + 0.587 * 40 + 0.114 * 10
  grey = np.rint(0.5 * luma + 0.5 * 128)
  for t in range(T):
    for w in range(GRID * GRID):
      r, c = divmod(w, GRID)
      block = out[t, r * PX:(r + 1) * PX, c * PX:(c + 1) * PX]
      if keep[t, w]:
        np.testing.assert_array_equal(block, frames[t, :PX, :PX])
      else:
        assert np.all(block == grey), (t, w)
  with pytest.raises(ValueError, match="keep mask"):
    vs.grey_dropped(frames, keep[:, :4], GRID)


def _rects(ax, style):
  return [p for p in ax.patches if isinstance(p, mpatches.Rectangle) and p.get_linestyle() == style]


def test_keep_grid_outlines_kept_windows_and_marks_the_event():
  frames, keep = _frames(), _keep()
  rows = [viz.GridRow("stts", keep), viz.GridRow("all", None, scores_tw=np.full((T, 9), 0.25, np.float32))]
  fig = vs.keep_grid(frames, rows, grid=GRID, timestamps=[0.0, 0.5, 1.0], event=([1], 4), title="x")
  axes = np.array(fig.axes).reshape(2, T)
  for t in range(T):
    assert len(_rects(axes[0, t], "solid")) == keep[t].sum()
    assert len(_rects(axes[1, t], "solid")) == GRID * GRID
    assert len(_rects(axes[0, t], "--")) == (1 if t == 1 else 0)
  assert axes[0, 0].get_ylabel() == f"stts\n{keep.sum()}/{keep.size} kept"
  assert axes[0, 1].get_title() == "t=0.5s"
  assert len(axes[1, 0].texts) == 9 and axes[1, 0].texts[0].get_text() == "0.25"
  # dropped windows are grey in the drawn image, kept ones keep their colour
  shown = axes[0, 1].images[0].get_array()
  assert shown[0, 0, 0] == shown[0, 0, 1] and shown[0, PX + 1, 0] == 200
  with pytest.raises(ValueError, match="keep mask"):
    vs.keep_grid(frames, [viz.GridRow("bad", keep[:2])], grid=GRID)


def test_score_panels_heatmap_and_histogram_counts():
  rng = np.random.default_rng(0)
  scores = {"stts": rng.random((T, 9)).astype(np.float32), "random": rng.random((T, 9)).astype(np.float32)}
  keep = {"stts": _keep(), "random": np.ones((T, 9), bool)}
  fig = vs.score_panels(scores, keep, timestamps=[0.0, 1.0, 2.0])
  heat = [ax for ax in fig.axes if ax.images]
  assert len(heat) == 2
  np.testing.assert_allclose(heat[0].images[0].get_array(), scores["stts"])
  assert heat[0].images[0].get_clim() == (scores["stts"][1:].min(), scores["stts"][1:].max())
  assert heat[0].get_yticklabels()[0].get_text() == "0.0s (kept)"
  # dropped cells are marked at (window, frame)
  marks = heat[0].collections[0].get_offsets()
  assert sorted(map(tuple, np.asarray(marks).astype(int))) == sorted((w, t) for t, w in zip(*np.nonzero(~keep["stts"])))
  hists = [ax for ax in fig.axes if ax.get_xlabel() == "score (frames >= 1)"]
  assert len(hists) == 2
  for ax, name in zip(hists, scores):
    heights = sum(p.get_height() for p in ax.patches)   # stacked: kept + dropped bars
    assert heights == (T - 1) * 9
    assert f"kept ({keep[name][1:].sum()})" in [t.get_text() for t in ax.get_legend().get_texts()]
  with pytest.raises((ValueError, TypeError)):   # TypeError: the runtime shape check of the tests
    vs.score_panels({"a": scores["stts"]}, {"a": keep["stts"][:2]})


def test_kept_vs_change_bars_and_correlation():
  change = np.array([np.nan, 0.1, 0.3, 0.2], np.float32)
  kept = {"stts": [9, 2, 8, 5], "random": [9, 4, 4, 4]}
  fig = vs.kept_vs_change(change, kept, windows=9)
  ax, ax2 = fig.axes[0], fig.axes[1]
  heights = [p.get_height() for p in ax.patches]
  assert heights == [9, 2, 8, 5, 9, 4, 4, 4]
  labels = [t.get_text() for t in ax2.get_legend().get_texts()]
  r = np.corrcoef([0.1, 0.3, 0.2], [2, 8, 5])[0, 1]
  assert labels[0] == f"stts (r={r:+.2f})" and labels[1] == "random (r=+nan)"
  assert len(ax2.collections[0].get_offsets()) == 3      # frame 0 (no previous frame) not plotted
  with pytest.raises(ValueError, match="counts"):
    vs.kept_vs_change(change, {"x": [1, 2]}, windows=9)


def test_training_curves_panels_follow_the_history():
  history = [{"step": 1.0, "ce": 3.0, "aux_loss": 0.2}, {"step": 2.0, "eval/event_kept": 0.5},
             {"step": 2.0, "ce": 2.0, "aux_loss": 0.1}]
  fig = vs.training_curves(history, ("ce", "eval/event_kept"), labels={"ce": "CE"},
                           ylims={"eval/event_kept": (0.0, 1.0)}, log_keys=("ce",))
  a, b = fig.axes
  np.testing.assert_array_equal(a.lines[0].get_xydata(), [[1, 3], [2, 2]])
  np.testing.assert_array_equal(b.lines[0].get_xydata(), [[2, 0.5]])
  assert a.get_title() == "CE" and b.get_ylim() == (0.0, 1.0)
  assert a.get_yscale() == "log" and b.get_yscale() == "linear"
  with pytest.raises(ValueError, match="no logged value"):
    vs.training_curves(history, ("grad_norm",))


def test_save_png_writes_a_small_palette_png(tmp_path):
  fig = vs.keep_grid(_frames(), [viz.GridRow("stts", _keep())], grid=GRID)
  path = vs.save_png(fig, str(tmp_path / "sub" / "grid.png"), dpi=60)
  img = Image.open(path)
  assert img.mode == "P" and img.size == (round(fig.get_figwidth() * 60), round(fig.get_figheight() * 60))
  full = viz.save(fig, str(tmp_path / "full.png"), dpi=60)
  assert (tmp_path / "sub" / "grid.png").stat().st_size < (tmp_path / "full.png").stat().st_size
  assert full.endswith("full.png")
  # over the size limit: re-rendered smaller until it fits (here: fewer colours, then lower dpi)
  frames = np.random.default_rng(0).integers(0, 256, (T, GRID * PX, GRID * PX, 3), dtype=np.uint8)
  big = vs.keep_grid(frames, [viz.GridRow("stts", _keep())], grid=GRID)
  unlimited = vs.save_png(big, str(tmp_path / "big.png"), dpi=100, max_kb=None)
  limit_kb = os.path.getsize(unlimited) / 1024 * 0.6
  small = vs.save_png(big, str(tmp_path / "small.png"), dpi=100, max_kb=limit_kb)
  assert os.path.getsize(small) <= limit_kb * 1024
  assert Image.open(small).size[0] <= Image.open(unlimited).size[0]

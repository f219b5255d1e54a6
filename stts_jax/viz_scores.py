"""Plots for exploring STTS window scores (the notebooks' figures); complements `stts_jax.viz`.

Pure numpy + matplotlib `Figure`s (no pyplot state); save them with `stts_jax.viz.save`.

  grey_dropped(frames, keep, grid)      frames with dropped windows turned washed-out grey
  keep_grid(frames, rows, grid=...)     one row per method (or ratio, or training step): dropped
                                        windows greyed out, kept windows outlined in the row colour
  score_panels(scores, keep)            per method: score heatmap (frames x windows, dropped cells
                                        marked) over a histogram of kept vs dropped scores
  kept_vs_change(change, kept, ...)     per-frame kept windows of each method against the
                                        frame-to-frame pixel change
  training_curves(history, keys)        logged training metrics against the step, one panel each
  save_png(fig, path, ...)              a small PNG (palette-quantised, <= max_kb) for docs/README
"""

import io
import os
from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np
from jaxtyping import Bool, Float, UInt8
from matplotlib import patches as mpatches
from matplotlib.figure import Figure
from PIL import Image

from stts_jax import viz


def _check_mask(name: str, keep_tw: np.ndarray, t: int, grid: int) -> None:
  if keep_tw.shape != (t, grid * grid):
    raise ValueError(f"{name}: keep mask {keep_tw.shape} does not match {t} frames x {grid * grid} windows")


def grey_dropped(frames_thwc: UInt8[np.ndarray, "T Y X 3"], keep_tw: Bool[np.ndarray, "T W"], grid: int, *,
                 fade: float = 0.6) -> UInt8[np.ndarray, "T Y X 3"]:
  """Dropped windows (row-major, `grid` per side, H // grid px) become their luminance blended with
  mid-grey by `fade` (0: plain greyscale, 1: flat grey); kept windows are unchanged."""
  t, h, w, _ = frames_thwc.shape
  _check_mask("grey_dropped", keep_tw, t, grid)
  wy, wx = h // grid, w // grid
  x = frames_thwc.astype(np.float32)
  luma = x @ np.array([0.299, 0.587, 0.114], np.float32)
  grey = ((1.0 - fade) * luma + fade * 128.0)[..., None]
  drop_thw = np.zeros((t, h, w), bool)
  for ti, wi in zip(*np.nonzero(~keep_tw)):
    r, c = divmod(int(wi), grid)
    drop_thw[ti, r * wy:(r + 1) * wy, c * wx:(c + 1) * wx] = True
  out = np.where(drop_thw[..., None], grey, x)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def keep_grid(frames_thwc: UInt8[np.ndarray, "T Y X 3"], rows: Sequence[viz.GridRow], *, grid: int,
              timestamps: Optional[Sequence[float]] = None, event: Optional[tuple[Sequence[int], int]] = None,
              colors: Optional[Sequence[str]] = None, title: str = "", frame_size: float = 1.25) -> Figure:
  """Frames of one clip, one row per `GridRow` (method, ratio or training step): dropped windows
  greyed out, kept windows outlined in the row's colour (`colors`, default `viz.color(label)`), the
  kept count on the left. event: (frames, window) outlined dashed yellow on those frames."""
  t, h, _, _ = frames_thwc.shape
  win = h / grid
  fig = Figure(figsize=(frame_size * t + 1.4, frame_size * len(rows) + (0.55 if title else 0.3)))
  axes = fig.subplots(len(rows), t, squeeze=False)
  event_frames = set(event[0]) if event is not None else set()
  for r, row in enumerate(rows):
    keep = np.ones((t, grid * grid), bool) if row.keep_tw is None else np.asarray(row.keep_tw, bool)
    _check_mask("keep_grid", keep, t, grid)
    col = colors[r] if colors is not None else viz.color(row.label)
    shown = grey_dropped(frames_thwc, keep, grid)
    for ti in range(t):
      ax = axes[r, ti]
      ax.imshow(shown[ti], interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      for wi in np.flatnonzero(keep[ti]):
        wr, wc = divmod(int(wi), grid)
        ax.add_patch(mpatches.Rectangle((wc * win + 0.5, wr * win + 0.5), win - 2, win - 2, fill=False,
                                        edgecolor=col, lw=1.2))
      if row.scores_tw is not None:
        for wi in range(grid * grid):
          wr, wc = divmod(wi, grid)
          ax.text(wc * win + 2, wr * win + win - 3, f"{row.scores_tw[ti, wi]:.2f}", color="white", fontsize=4.5,
                  bbox=dict(facecolor="black", alpha=0.45, pad=0.3, lw=0))
      if ti in event_frames:
        wr, wc = divmod(int(event[1]), grid)
        ax.add_patch(mpatches.Rectangle((wc * win + 3, wr * win + 3), win - 7, win - 7, fill=False,
                                        edgecolor="yellow", lw=1.3, ls="--"))
      if r == 0:
        ax.set_title(f"t={timestamps[ti]:.1f}s" if timestamps is not None else f"frame {ti}", fontsize=7)
      if ti == 0:
        ax.set_ylabel(f"{row.label}\n{int(keep.sum())}/{keep.size} kept", fontsize=7, color=col)
  if title:
    fig.suptitle(title, fontsize=8)
  top = 1.0 - (0.5 if title else 0.25) / fig.get_figheight()
  fig.subplots_adjust(left=0.07, right=0.995, bottom=0.01, top=top, wspace=0.04, hspace=0.06)
  return fig


def score_panels(scores: Mapping[str, Float[np.ndarray, "T W"]], keep: Mapping[str, Bool[np.ndarray, "T W"]], *,
                 timestamps: Optional[Sequence[float]] = None, title: str = "") -> Figure:
  """Per method (columns): top, the score heatmap (rows = frames, columns = windows in row-major
  order, dropped cells marked x; the colour scale spans frames >= 1, frame 0 may saturate); bottom, the histogram of scores of frames >= 1 (frame 0 is always
  kept), kept and dropped stacked, with the lowest kept score as a dashed line."""
  names = list(scores)
  fig = Figure(figsize=(3.3 * len(names) + 0.3, 5.6))
  axes = fig.subplots(2, len(names), squeeze=False, gridspec_kw=dict(height_ratios=[1.3, 1.0]))
  for j, name in enumerate(names):
    s = np.asarray(scores[name], np.float32)
    k = np.asarray(keep[name], bool)
    if s.shape != k.shape:
      raise ValueError(f"score_panels: {name}: scores {s.shape} and keep {k.shape} differ")
    t, w = s.shape
    ax = axes[0, j]
    later = s[1:] if t > 1 else s      # colour scale of the prunable frames (frame 0 may saturate)
    im = ax.imshow(s, aspect="auto", cmap="viridis", interpolation="nearest", vmin=float(later.min()),
                   vmax=float(later.max()) if later.max() > later.min() else float(later.min()) + 1e-6)
    ys, xs = np.nonzero(~k)
    ax.scatter(xs, ys, marker="x", s=14, color="white", lw=0.8, label="dropped")
    ax.set_xticks(range(w))
    ax.set_xticklabels([str(i) for i in range(w)], fontsize=6)
    ax.set_yticks(range(t))
    ticks = [f"{timestamps[i]:.1f}s" if timestamps is not None else str(i) for i in range(t)]
    ticks[0] += " (kept)"
    ax.set_yticklabels(ticks, fontsize=6)
    ax.set_xlabel("window (row-major)", fontsize=7)
    if j == 0:
      ax.set_ylabel("frame", fontsize=7)
    ax.set_title(f"{name} scores", fontsize=8, color=viz.color(name))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
    ax = axes[1, j]
    later_s, later_k = s[1:].ravel(), k[1:].ravel()
    bins = np.linspace(float(later_s.min()), float(later_s.max()) + 1e-6, 21) if later_s.size else 20
    ax.hist([later_s[later_k], later_s[~later_k]], bins=bins, stacked=True, color=[viz.color(name), "#bbbbbb"],
            label=[f"kept ({int(later_k.sum())})", f"dropped ({int((~later_k).sum())})"])
    if later_k.any() and (~later_k).any():
      ax.axvline(float(later_s[later_k].min()), color="black", ls="--", lw=0.8)
    ax.set_xlabel("score (frames >= 1)", fontsize=7)
    ax.set_ylabel("windows", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig


def kept_vs_change(change_t: Float[np.ndarray, "T"], kept: Mapping[str, Sequence[int]], *, windows: int,
                   timestamps: Optional[Sequence[float]] = None, title: str = "") -> Figure:
  """Left: kept windows per frame of each method (bars) and the frame-to-frame change (line, right
  axis). Right: kept count against change for frames >= 1, with Pearson r per method."""
  change = np.asarray(change_t, np.float64)
  t = change.shape[0]
  fig = Figure(figsize=(9.0, 3.4))
  ax, ax2 = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[1.6, 1.0]))
  x = np.arange(t)
  width = 0.8 / max(len(kept), 1)
  for i, (name, counts) in enumerate(kept.items()):
    c = np.asarray(counts, float)
    if c.shape != (t,):
      raise ValueError(f"kept_vs_change: {name} has {c.shape} counts, expected ({t},)")
    ax.bar(x + (i - (len(kept) - 1) / 2) * width, c, width, color=viz.color(name), label=name)
    later = ~np.isnan(change)
    r = np.corrcoef(change[later], c[later])[0, 1] if later.sum() > 1 and c[later].std() > 0 else float("nan")
    ax2.scatter(change[later], c[later] + (i - (len(kept) - 1) / 2) * 0.15, color=viz.color(name), s=20,
                marker="osD^v"[i % 5], alpha=0.85, label=f"{name} (r={r:+.2f})")
  ax.set_ylim(0, windows * 1.15)
  ax.set_ylabel("kept windows", fontsize=8)
  ax.set_xticks(x)
  ax.set_xticklabels([f"{timestamps[i]:.1f}s" if timestamps is not None else str(i) for i in x], fontsize=7)
  ax.set_xlabel("frame", fontsize=8)
  twin = ax.twinx()
  twin.plot(x, change, color="black", marker="o", ms=3, lw=1.2, label="change")
  twin.set_ylabel("mean |pixel change| to previous frame", fontsize=7)
  twin.tick_params(labelsize=7)
  twin.set_ylim(0, np.nanmax(change) * 1.3 if np.isfinite(np.nanmax(change)) and np.nanmax(change) > 0 else 1)
  handles = ax.get_legend_handles_labels()
  extra = twin.get_legend_handles_labels()
  ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=6, loc="upper right", ncol=2)
  ax2.set_xlabel("change to previous frame", fontsize=8)
  ax2.set_ylabel("kept windows", fontsize=8)
  ax2.tick_params(labelsize=7)
  ax2.grid(alpha=0.3)
  ax2.legend(fontsize=6)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig


def training_curves(history: Sequence[Mapping[str, float]], keys: Sequence[str] = ("ce", "aux_loss"), *,
                    labels: Optional[Mapping[str, str]] = None,
                    ylims: Optional[Mapping[str, tuple[float, float]]] = None, log_keys: Sequence[str] = (),
                    title: str = "") -> Figure:
  """One panel per metric key of a training history (a list of logged dicts with a "step"); entries
  without the key are skipped (eval entries carry only their own keys). labels / ylims: per key;
  log_keys: keys drawn on a log y axis."""
  labels, ylims = labels or {}, ylims or {}
  fig = Figure(figsize=(3.2 * len(keys) + 0.4, 3.0))
  axes = fig.subplots(1, len(keys), squeeze=False)[0]
  for ax, key in zip(axes, keys):
    pts = [(float(h["step"]), float(h[key])) for h in history if key in h and "step" in h]
    if not pts:
      raise ValueError(f"training_curves: no logged value of {key!r}")
    steps, values = np.array(pts).T
    ax.plot(steps, values, marker="o" if len(pts) < 30 else None, ms=3, color="#1f77b4")
    ax.set_xlabel("step", fontsize=8)
    ax.set_title(labels.get(key, key), fontsize=8)
    if key in log_keys:
      ax.set_yscale("log")
    if key in ylims:
      ax.set_ylim(*ylims[key])
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig


def save_png(fig: Figure, path: str, *, dpi: int = 100, colors: int = 256, max_kb: Optional[float] = 200) -> str:
  """Writes `fig` as a PNG quantised to `colors` palette entries (about 3x smaller than RGBA for
  figures with photos; for committed docs figures). If it exceeds `max_kb`, it is re-rendered with
  fewer colours, then at lower dpi (down to 60), until it fits. Directories are created."""
  attempts = [(dpi, colors)] + [(d, min(colors, 128)) for d in range(dpi, 59, -10)]
  for d, c in attempts:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=d, facecolor="white")
    img = Image.open(buf).convert("RGB")
    if c:
      img = img.quantize(colors=c, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    if max_kb is None or out.tell() <= max_kb * 1024:
      break
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(out.getvalue())
  return path


__all__ = ["grey_dropped", "keep_grid", "kept_vs_change", "save_png", "score_panels", "training_curves"]

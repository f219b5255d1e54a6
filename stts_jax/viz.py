"""Plots for STTS runs: keep masks on video frames, loss curves, accuracy vs ratio, speed.

Pure numpy + matplotlib (`matplotlib.figure.Figure`, no pyplot state), so the same functions work
headless in scripts and inline in notebooks (a returned Figure displays in Jupyter). Every plot
function returns the Figure; `save(fig, path)` writes it.

  frame_grid(rows, ...)             frames of one clip, one row per pruning method: kept windows
                                    bright, dropped ones dimmed and crossed, event window outlined
  loss_curves(curves, ...)          training loss per run (mean and band over seeds)
  accuracy_vs_ratio(series, ...)    accuracy per pruning method as the pruned fraction grows
  speed_bars(groups, ...)           step / prefill times of each variant, annotated with speedups
"""

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np
from jaxtyping import Bool, UInt8
from matplotlib import patches as mpatches
from matplotlib.figure import Figure

COLORS = {"none": "#4d4d4d", "unpruned": "#4d4d4d", "stts": "#1f77b4", "random": "#d62728",
          "heuristic": "#2ca02c"}


def color(name: str) -> str:
  """A stable colour per method name (first word of `name`), grey for unknown names."""
  key = name.split()[0].lower() if name else ""
  return COLORS.get(key, "#9467bd")


def dim_dropped(frames_tyxc: UInt8[np.ndarray, "T Y X 3"], keep_tw: Bool[np.ndarray, "T W"], grid: int,
                *, dim: float = 0.25) -> UInt8[np.ndarray, "T Y X 3"]:
  """Frames with every dropped window's pixels scaled by `dim` (windows row-major, `grid` per side).

  The window size is H // grid; pixels past grid * window (none for 126 px / 3) are left as they are.
  """
  t, h, w, _ = frames_tyxc.shape
  if keep_tw.shape != (t, grid * grid):
    raise ValueError(f"dim_dropped: keep mask {keep_tw.shape} does not match {t} frames x {grid * grid} windows")
  wy, wx = h // grid, w // grid
  scale = np.ones((t, h, w, 1), np.float32)
  for ti in range(t):
    for wi in np.flatnonzero(~keep_tw[ti]):
      r, c = divmod(int(wi), grid)
      scale[ti, r * wy:(r + 1) * wy, c * wx:(c + 1) * wx] = dim
  return np.clip(frames_tyxc.astype(np.float32) * scale, 0, 255).astype(np.uint8)


@dataclasses.dataclass
class GridRow:
  """One row of `frame_grid`: a label and the keep mask `[T, W]` (None: show all windows kept)."""
  label: str
  keep_tw: Optional[np.ndarray] = None
  scores_tw: Optional[np.ndarray] = None   # optional window scores, printed small in each window


def frame_grid(frames_tyxc: UInt8[np.ndarray, "T Y X 3"], rows: Sequence[GridRow], *, grid: int,
               event: Optional[tuple[Sequence[int], int]] = None, title: str = "",
               timestamps: Optional[Sequence[float | int]] = None, frame_size: float = 1.3) -> Figure:
  """One clip, one row per pruning method (see the module docstring).

  event: (frames, window) of the ground-truth event; its window is outlined in yellow on those frames.
  """
  t, h, _, _ = frames_tyxc.shape
  fig = Figure(figsize=(frame_size * t + 1.6, frame_size * len(rows) + (0.6 if title else 0.2)))
  axes = fig.subplots(len(rows), t, squeeze=False)
  win = h / grid
  for r, row in enumerate(rows):
    keep = row.keep_tw if row.keep_tw is not None else np.ones((t, grid * grid), bool)
    shown = dim_dropped(frames_tyxc, keep, grid)
    for ti in range(t):
      ax = axes[r, ti]
      ax.imshow(shown[ti], interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      for wi in range(grid * grid):
        wr, wc = divmod(wi, grid)
        x0, y0 = wc * win, wr * win
        if not keep[ti, wi]:
          ax.plot([x0 + 2, x0 + win - 2], [y0 + 2, y0 + win - 2], color="white", lw=0.6, alpha=0.7)
          ax.plot([x0 + 2, x0 + win - 2], [y0 + win - 2, y0 + 2], color="white", lw=0.6, alpha=0.7)
        if row.scores_tw is not None:
          ax.text(x0 + 2, y0 + win - 3, f"{row.scores_tw[ti, wi]:.2f}", color="white", fontsize=4.5,
                  bbox=dict(facecolor="black", alpha=0.4, pad=0.3, lw=0))
      if event is not None and ti in set(event[0]):
        wr, wc = divmod(int(event[1]), grid)
        ax.add_patch(mpatches.Rectangle((wc * win + 0.5, wr * win + 0.5), win - 1, win - 1, fill=False,
                                        edgecolor="yellow", lw=1.5))
      if r == 0:
        ax.set_title(f"t={timestamps[ti]:.1f}s" if timestamps is not None else f"frame {ti}", fontsize=7)
      if ti == 0:
        kept = int(keep.sum())
        ax.set_ylabel(f"{row.label}\n{kept}/{keep.size} kept", fontsize=7, color=color(row.label))
  if title:
    fig.suptitle(title, fontsize=8)
  fig.subplots_adjust(left=0.08, right=0.995, bottom=0.01, top=0.88 if title else 0.94, wspace=0.03, hspace=0.06)
  return fig


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
  if k <= 1 or y.size < k:
    return y
  pad = np.concatenate([np.full(k - 1, y[0]), y])
  return np.convolve(pad, np.ones(k) / k, mode="valid")


def loss_curves(curves: Mapping[str, Sequence[tuple[Sequence[float | int], Sequence[float | int]]]], *,
                ylabel: str = "training loss (answer CE)", smooth: int = 3, title: str = "") -> Figure:
  """curves: label -> one (steps, values) per seed. Draws the mean over seeds (on the steps all
  seeds share) with a min-max band, each smoothed by a moving average of `smooth` points."""
  fig = Figure(figsize=(6, 3.6))
  ax = fig.subplots()
  for label, runs in curves.items():
    runs = [(np.asarray(s, float), np.asarray(v, float)) for s, v in runs if len(s)]
    if not runs:
      continue
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in runs)))
    if not common:
      continue
    ys = np.stack([_smooth(np.interp(common, s, v), smooth) for s, v in runs])
    c = color(label)
    ax.plot(common, ys.mean(0), color=c, label=f"{label} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
    if len(runs) > 1:
      ax.fill_between(common, ys.min(0), ys.max(0), color=c, alpha=0.2, lw=0)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.set_yscale("log")
  return _finish(fig, ax, title)


def _finish(fig: Figure, ax, title: str) -> Figure:
  """Grid, legend, optional title, tight layout: the common end of the line plots."""
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return fig


@dataclasses.dataclass
class Series:
  """Accuracy (fractions) per ratio: `values[i]` holds one value per seed at `ratios[i]`."""
  label: str
  ratios: Sequence[float | int]
  values: Sequence[Sequence[float | int]]
  linestyle: str = "-"


def accuracy_vs_ratio(series: Sequence[Series], *, chance: Optional[float] = None, title: str = "") -> Figure:
  """Accuracy (%) against the pruned fraction; points are seed means, bars the seed min-max."""
  fig = Figure(figsize=(5.6, 3.8))
  ax = fig.subplots()
  for s in series:
    x = np.asarray(s.ratios, float)
    vals = [np.asarray(v, float) * 100 for v in s.values]
    mean = np.array([v.mean() for v in vals])
    err = np.array([[v.mean() - v.min() for v in vals], [v.max() - v.mean() for v in vals]])
    ax.errorbar(x, mean, yerr=err, color=color(s.label), marker="o", ms=4, capsize=3, ls=s.linestyle,
                label=s.label)
  if chance is not None:
    ax.axhline(chance * 100, color="grey", ls=":", lw=1, label="chance")
  ax.set_xlabel("fraction of vision tokens pruned (ratio)")
  ax.set_ylabel("test accuracy (%)")
  return _finish(fig, ax, title)


def speed_bars(groups: Mapping[str, Mapping[str, float | int]], *, baseline: str, unit: str = "ms",
               title: str = "") -> Figure:
  """groups: measurement (e.g. "train step") -> variant -> seconds. One panel per measurement,
  bars annotated with the speedup over `baseline` (same panel)."""
  fig = Figure(figsize=(3.2 * len(groups) + 0.4, 3.4))
  axes = fig.subplots(1, len(groups), squeeze=False)[0]
  scale = {"ms": 1e3, "s": 1.0}[unit]
  for ax, (name, times) in zip(axes, groups.items()):
    labels = list(times)
    vals = np.array([times[k] * scale for k in labels])
    bars = ax.bar(range(len(labels)), vals, color=[color(k) for k in labels])
    base = times.get(baseline)
    for b, k in zip(bars, labels):
      text = f"{times[k] * scale:.0f}"
      if base and k != baseline:
        text += f"\n{base / times[k]:.2f}x"
      ax.text(b.get_x() + b.get_width() / 2, b.get_height(), text, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7, rotation=15)
    ax.set_ylabel(f"{name} ({unit})", fontsize=8)
    ax.set_ylim(0, vals.max() * 1.3)
    ax.grid(axis="y", alpha=0.3)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig


def save(fig: Figure, path: str, dpi: int = 130) -> str:
  """Writes `fig` to `path` (directories created); returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi)
  return path


__all__ = ["COLORS", "GridRow", "Series", "accuracy_vs_ratio", "color", "dim_dropped", "frame_grid", "loss_curves",
           "save", "speed_bars"]

"""PNG plots of the benchmark rows (`report.summary_rows`): speedup vs frames, time breakdown."""

import os
from collections.abc import Sequence
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PAPER = {"train": {128: 1.62, 256: 2.25}, "ttft": {128: 1.61, 256: 2.22}}   # 50% pruned, Molmo2-4B


def _save(fig, path: str, title: str) -> str:
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _frame_axis(ax, frames: Sequence[int]) -> None:
  ax.set_xscale("log", base=2)
  ticks = sorted(set(frames))
  ax.set_xticks(ticks)
  ax.set_xticklabels([str(f) for f in ticks])
  ax.minorticks_off()
  ax.set_xlabel("frames")


def _by_ratio(rows: Sequence[dict[str, Any]], key: str) -> dict[float, list[tuple[int, float, Optional[float]]]]:
  out: dict[float, list] = {}
  for r in rows:
    # comparison cells (`variant`, e.g. packing=always) are drawn apart, not joined into the ratio's line
    if r["ratio"] > 0 and not r.get("variant") and r.get(f"{key}_speedup") is not None:
      out.setdefault(r["ratio"], []).append((r["frames"], r[f"{key}_speedup"], r.get(f"{key}_flops_ratio")))
  return {k: sorted(v) for k, v in sorted(out.items())}


def speedup_plot(rows: Sequence[dict[str, Any]], path: str, parts: Sequence[str] = ("train", "ttft", "vision", "prefill"),
                 title: str = "") -> str:
  """One panel per part: measured speedup (solid) and analytic FLOP ratio (dashed) vs frames, per ratio."""
  parts = [p for p in parts if any(r.get(f"{p}_speedup") is not None for r in rows)]
  fig, axes = plt.subplots(1, max(len(parts), 1), figsize=(4.2 * max(len(parts), 1), 3.6), squeeze=False)
  names = {"train": "train step", "ttft": "prefill (ViT + LLM)", "vision": "ViT + adapter", "prefill": "LLM prefill",
           "decode": "decode / token"}
  for ax, part in zip(axes[0], parts):
    for i, (ratio, pts) in enumerate(_by_ratio(rows, part).items()):
      color = f"C{i}"
      frames = [p[0] for p in pts]
      ax.plot(frames, [p[1] for p in pts], "o-", color=color, label=f"ratio {ratio:g} measured")
      if all(p[2] is not None for p in pts):
        ax.plot(frames, [p[2] for p in pts], "--", color=color, alpha=0.6, label=f"ratio {ratio:g} FLOPs")
      extra = [r for r in rows if r.get("variant") and r["ratio"] == ratio and r.get(f"{part}_speedup") is not None]
      for variant in sorted({r["variant"] for r in extra}):
        pts_v = sorted((r["frames"], r[f"{part}_speedup"]) for r in extra if r["variant"] == variant)
        ax.plot([p[0] for p in pts_v], [p[1] for p in pts_v], "x", color=color, ms=7,
                label=f"ratio {ratio:g} {variant}")
    ax.axhline(1.0, color="gray", lw=0.8)
    _frame_axis(ax, [r["frames"] for r in rows])
    ax.set_ylabel("speedup vs unpruned")
    ax.set_title(names.get(part, part))
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  return _save(fig, path, title)


def breakdown_plot(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> str:
  """Stacked bars per (frames, ratio): inference prefill = ViT + LLM prefill; train step = STTS
  overhead (scorer + packing, timed alone) + the rest of the step."""
  cells = sorted(rows, key=lambda r: (r["frames"], r["ratio"]))
  labels = [f"{r['frames']}f\n{r['ratio']:g}" + ("\n" + r["variant"].split("=")[-1] if r.get("variant") else "")
            for r in cells]
  x = range(len(cells))
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 0.55 * len(cells) * 2), 3.8))
  vision = [r.get("vision_ms", 0.0) or 0.0 for r in cells]
  prefill = [r.get("prefill_ms", 0.0) or 0.0 for r in cells]
  ax1.bar(x, vision, label="ViT + adapter (incl. scorer, packing)")
  ax1.bar(x, prefill, bottom=vision, label="LLM prefill")
  ax1.set_title("inference prefill")
  overhead = [r.get("overhead_ms", 0.0) or 0.0 for r in cells]
  train = [r.get("train_ms", 0.0) or 0.0 for r in cells]
  ax2.bar(x, [t - o for t, o in zip(train, overhead)], label="train step without STTS overhead")
  ax2.bar(x, overhead, bottom=[t - o for t, o in zip(train, overhead)], label="scorer + packing (timed alone)")
  ax2.set_title("train step")
  for ax in (ax1, ax2):
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("ms")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
  return _save(fig, path, title)


def predicted_plot(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> str:
  """Abstract mode: predicted speedup (FLOP ratio) vs frames per row policy, with the paper's points."""
  fig, ax = plt.subplots(figsize=(5, 3.6))
  series: dict[str, list[tuple[int, float]]] = {}
  for r in rows:
    for key, name in (("train_flops_ratio", "train"), ("inference_flops_ratio", "inference")):
      if r.get(key) is not None:
        series.setdefault(f"{name} ({r['rows']} rows)", []).append((r["frames"], r[key]))
  for i, (name, pts) in enumerate(sorted(series.items())):
    pts = sorted(pts)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=name)
  for part, marker in (("train", "*"), ("ttft", "P")):
    pts = sorted(PAPER[part].items())
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, color="k", ms=10, ls="none",
            label=f"paper {'train' if part == 'train' else 'inference'}")
  _frame_axis(ax, [r["frames"] for r in rows] + [f for p in PAPER.values() for f in p])
  ax.set_ylabel("predicted speedup (FLOP ratio)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title(title or "Molmo2-4B, 50% pruned")
  return _save(fig, path, "")


def write_all(rows: Sequence[dict[str, Any]], out_dir: str, title: str = "") -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  return [speedup_plot(rows, os.path.join(out_dir, "speedup_vs_frames.png"), title=title),
          breakdown_plot(rows, os.path.join(out_dir, "time_breakdown.png"), title=title)]

"""Benchmark results -> one flat row per cell (CSV/JSON) and the checks the issue asks for.

Per part (vision, prefill, decode, overhead, train) and for `ttft` = vision + prefill (the whole
inference prefill, time to first token): seconds, analytic and XLA FLOPs, and against the ratio-0
cell of the same frame count `speedup` = baseline time / time, `flops_ratio` = baseline analytic
FLOPs / analytic FLOPs and `efficiency` = speedup / flops_ratio (1.0: the time saving is exactly
the FLOP saving). `overhead_share` = STTS overhead time / pruned train step time.
`vision_fallback_rate` / `train_fallback_rate`: the share of a cell's batches whose vision call, and
of its train steps, that ran the dense ViT fallback (rows sized without the timed batches can be
too few for some of them; the timings include those calls).

`checks` evaluates the claims; a claim whose values are missing (a part that was asked for but not
measured, no cell at the checked ratio) fails instead of being skipped.
"""

import csv
import json
import math
from collections.abc import Sequence
from typing import Any, Optional

from stts_jax.bench.runner import CellResult

PART_ORDER = ("vision", "prefill", "ttft", "decode", "overhead", "train")


def _part_values(cell: CellResult) -> dict[str, dict[str, Optional[float]]]:
  out = {k: {"seconds": p.seconds, "cpu_seconds": p.timing.cpu_median / p.per_call,
             "analytic": p.analytic_flops / p.per_call,
             # decode runs in a while loop whose body XLA counts once: its count is per token already
             "xla": None if p.xla_flops is None else p.xla_flops / (1 if k == "decode" else p.per_call),
             "memory": p.memory.total_bytes}
         for k, p in cell.parts.items()}
  if "vision" in out and "prefill" in out:
    v, p = out["vision"], out["prefill"]
    xla = None if v["xla"] is None or p["xla"] is None else v["xla"] + p["xla"]
    out["ttft"] = {"seconds": v["seconds"] + p["seconds"], "cpu_seconds": v["cpu_seconds"] + p["cpu_seconds"],
                   "analytic": v["analytic"] + p["analytic"], "xla": xla,
                   "memory": max(v["memory"], p["memory"])}
  return out


def summary_rows(cells: Sequence[CellResult]) -> list[dict[str, Any]]:
  """One flat row per cell, with speedups against the ratio-0 cell of the same frame count."""
  base = {c.frames: _part_values(c) for c in cells if c.ratio == 0.0 and not c.variant}
  rows = []
  for c in cells:
    vals = _part_values(c)
    row: dict[str, Any] = {
        "frames": c.frames, "ratio": c.ratio, "method": c.method, "variant": c.variant, "batch": c.batch_size,
        "seq_len": c.seq_len, "llm_len": c.llm_len, "kept_windows": c.kept_windows, "rows_policy": c.rows_policy,
        "num_rows": c.num_rows, "rows_needed": max(c.rows_needed) if c.rows_needed else None,
        "late_vit": c.late_vit, "fallback_batches": c.packed.count(False),
        "vision_fallback_rate": c.packed.count(False) / len(c.packed) if c.packed else 0.0,
        "train_steps": c.train_steps, "train_fallback_steps": c.train_fallback_steps,
        "train_fallback_rate": c.train_fallback_steps / c.train_steps if c.train_steps else 0.0}
    b = base.get(c.frames, {})
    for k in PART_ORDER:
      if k not in vals:
        continue
      v = vals[k]
      row[f"{k}_ms"] = v["seconds"] * 1e3
      row[f"{k}_cpu_ms"] = v["cpu_seconds"] * 1e3
      row[f"{k}_gflops"] = v["analytic"] / 1e9
      row[f"{k}_xla_gflops"] = None if v["xla"] is None else v["xla"] / 1e9
      row[f"{k}_xla_over_analytic"] = None if not v["xla"] or not v["analytic"] else v["xla"] / v["analytic"]
      row[f"{k}_mem_mb"] = v["memory"] / 1e6
      if k in b and k != "overhead":
        speedup = b[k]["seconds"] / v["seconds"]
        ratio = b[k]["analytic"] / v["analytic"] if v["analytic"] else math.nan
        row[f"{k}_speedup"] = speedup
        row[f"{k}_flops_ratio"] = ratio
        row[f"{k}_efficiency"] = speedup / ratio
        row[f"{k}_cpu_speedup"] = b[k]["cpu_seconds"] / v["cpu_seconds"]
    if "overhead" in vals and "train" in vals:
      row["overhead_share"] = vals["overhead"]["seconds"] / vals["train"]["seconds"]
    row["compiles"] = {k: p.compiles for k, p in c.parts.items()}
    rows.append(row)
  return rows


def checks(rows: Sequence[dict[str, Any]], *, parts: Sequence[str] = ("vision", "prefill", "decode", "overhead", "train"),
           ratio: float = 0.5, min_efficiency: float = 0.85, min_speedup: float = 0.97, max_overhead: float = 0.03,
           flops_tolerance: float = 0.10, interleaved: bool = True) -> dict[str, Any]:
  """The benchmark's claims on the measured rows of the grid (`variant` "" only): `ok` per claim
  plus its numbers. `parts`: the parts that were asked for (claims on the others are not made).

    train / ttft / prefill efficiency at `ratio` >= `min_efficiency` at every frame count, and the
      speedup grows from the fewest to the most frames;
    never_slower: at every pruned ratio and frame count, train and ttft speedup >= `min_speedup`
      (efficiency reported beside it); timed in interleaved rounds (`interleaved`), else it fails:
      cells timed one after the other on a shared machine drift further apart than 3%;
    overhead share <= `max_overhead` at the largest frame count; XLA vs analytic FLOPs within
    `flops_tolerance`; one compilation per part and cell.
  Fallbacks are reported (`fallback`), not checked: with rows sized without the timed batches a
  batch may need the dense fallback, and its time is part of the measurement.
  """
  grid = [r for r in rows if not r.get("variant")]
  missing = lambda why: {"ok": False, "missing": why}   # noqa: E731
  parts = set(parts)
  wanted = [k for k, needs in (("train", {"train"}), ("ttft", {"vision", "prefill"}), ("prefill", {"prefill"}))
            if needs <= parts]
  at = sorted((r for r in grid if r["ratio"] == ratio), key=lambda r: r["frames"])
  out: dict[str, Any] = {"ratio": ratio}
  for k in wanted:
    eff = [r.get(f"{k}_efficiency") for r in at]
    spd = [r.get(f"{k}_speedup") for r in at]
    if not at or any(e is None for e in eff):
      out[f"{k}_efficiency"] = out[f"{k}_speedup_grows"] = missing(
          f"no {k} speedup at ratio {ratio}" + (f" for frames {[r['frames'] for r, e in zip(at, eff) if e is None]}"
                                                if at else " (no cell at that ratio)"))
      continue
    out[f"{k}_efficiency"] = {"values": eff, "ok": min(eff) >= min_efficiency}
    out[f"{k}_speedup_grows"] = {"values": spd, "ok": len(spd) < 2 or spd[-1] > spd[0],
                                 "monotone": all(b >= a for a, b in zip(spd, spd[1:]))}
  pruned = sorted((r for r in grid if r["ratio"] > 0), key=lambda r: (r["ratio"], r["frames"]))
  slow = [k for k in ("train", "ttft") if k in wanted]
  if slow:
    cells = [{"ratio": r["ratio"], "frames": r["frames"], "late_vit": r["late_vit"],
              **{f"{k}_speedup": r.get(f"{k}_speedup") for k in slow},
              **{f"{k}_efficiency": r.get(f"{k}_efficiency") for k in slow}} for r in pruned]
    vals = [c[f"{k}_speedup"] for c in cells for k in slow]
    if not cells or any(v is None for v in vals):
      out["never_slower"] = missing("no pruned cell" if not cells else "a pruned cell lacks a train/ttft speedup")
    else:
      out["never_slower"] = {"min_speedup": min_speedup, "cells": cells, "interleaved": interleaved,
                             "ok": interleaved and min(vals) >= min_speedup}
  if "overhead" in parts and "train" in parts:
    with_share = [r for r in pruned if "overhead_share" in r]
    if not with_share:
      out["overhead_share_at_largest_frames"] = missing("no pruned cell with overhead and train times")
    else:
      largest = max(r["frames"] for r in with_share)
      shares = [r["overhead_share"] for r in with_share if r["frames"] == largest]
      out["overhead_share_at_largest_frames"] = {"frames": largest, "values": shares,
                                                 "ok": max(shares) <= max_overhead}
  # The model's parts; the overhead part's analytic count is only the scorer's matmuls (its
  # gathers, sorts and scatters are not FLOPs in the formula), so it is reported but not checked.
  devs = [abs(r[k] - 1.0) for r in rows for k in r if k.endswith("_xla_over_analytic") and r[k] is not None
          and not k.startswith("overhead")]
  out["xla_vs_analytic"] = ({"max_rel_dev": max(devs), "ok": max(devs) <= flops_tolerance} if devs
                            else {"ok": None, "not_counted": "bench.xla_flops is off"})
  out["one_compile_per_part"] = {"ok": bool(rows) and all(n == 1 for r in rows for n in r["compiles"].values())}
  out["fallback"] = {"ok": None, "cells": [
      {"frames": r["frames"], "ratio": r["ratio"], "variant": r.get("variant", ""), "rows": r["num_rows"],
       "rows_needed": r["rows_needed"], "vision_fallback_rate": r["vision_fallback_rate"],
       "train_fallback_rate": r["train_fallback_rate"]} for r in rows if r["ratio"] > 0]}
  return out


def failed(checks: dict[str, Any]) -> list[str]:
  """Names of the claims that failed (`ok` False); `ok` None marks a report, not a claim."""
  return [k for k, v in checks.items() if isinstance(v, dict) and v.get("ok") is False]


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
  keys: list[str] = []
  for r in rows:
    keys += [k for k in r if k not in keys]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    for r in rows:
      w.writerow({k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()})


def write_json(path: str, **payload: Any) -> None:
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=str)


def _fmt(v: Any, spec: str, suffix: str = "") -> str:
  return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{spec}}{suffix}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """Every measured cell as one markdown table (the docs' tables are this output, verbatim)."""
  head = ("| frames | ratio | variant | late ViT | rows (needed) | kept windows | train ms | train speedup | "
          "FLOP ratio | eff. | vision ms | vision speedup | ttft speedup | eff. | prefill speedup | eff. | "
          "overhead | fallback vision / train |")
  lines = [head, "|" + "---:|" * 2 + "---|---|" + "---:|" * 14]
  for r in sorted(rows, key=lambda r: (r["frames"], r["ratio"], r.get("variant") or "")):
    pruned = r["ratio"] > 0
    rows_cell = f"{r['num_rows']} ({r['rows_needed']})" if pruned and r.get("num_rows") else "-"
    fallback = (f"{r['vision_fallback_rate']:.0%} / {r['train_fallback_rate']:.0%}" if pruned else "-")
    lines.append("| " + " | ".join([
        str(r["frames"]), f"{r['ratio']:g}", r.get("variant") or "-", r.get("late_vit") or "-", rows_cell,
        str(r["kept_windows"]), _fmt(r.get("train_ms"), ".1f"), _fmt(r.get("train_speedup"), ".2f", "x"),
        _fmt(r.get("train_flops_ratio"), ".2f", "x"), _fmt(r.get("train_efficiency"), ".2f"),
        _fmt(r.get("vision_ms"), ".1f"), _fmt(r.get("vision_speedup"), ".2f", "x"),
        _fmt(r.get("ttft_speedup"), ".2f", "x"), _fmt(r.get("ttft_efficiency"), ".2f"),
        _fmt(r.get("prefill_speedup"), ".2f", "x"), _fmt(r.get("prefill_efficiency"), ".2f"),
        _fmt(r.get("overhead_share"), ".1%") if pruned else "-", fallback]) + " |")
  return "\n".join(lines) + "\n"


def write_markdown(rows: Sequence[dict[str, Any]], path: str) -> str:
  with open(path, "w") as f:
    f.write(markdown_table(rows))
  return path

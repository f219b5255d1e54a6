"""The AOT memory table of the authors' recipe (configs/molmo2_4b_stts.py) before vs after issue 17.

  before  attention=xla (materialised [B, N, L, L] float32 scores) and loss=full ([B, S, V] logits)
  after   attention=auto (blockwise on CPU at these sizes, 128-blocks; a fused kernel for the ViT on
          GPU/TPU) and loss=answer (LM head at <= max_answer_tokens answer positions per example)
Cells: STTS 0.5 and unpruned (method none), 64 frames (seq 9686) and 128 frames (seq 11400), micro-batch
1 per device, on 8 virtual devices (fsdp=8, accum=8, global batch 64) and on 64 (fsdp=64, batch=64,
accum=1). Breakdown variants of the 8-device STTS 64-frame "after" cell (see `breakdown`).

Each cell is one `scripts/train.py --aot --noaot_flops --aot_json` process (its own virtual device
count and a fresh attention-choice log), writing `<out>/<cell>.json`; `markdown` renders the table from
those files only. Memory is XLA's CPU `memory_analysis` per device: CPU upcasts many bfloat16 buffers
to float32, so every number is an estimate (an upper bound) for TPU/GPU.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from stts_jax.models import budget

GIB = 1024 ** 3
# The before/after cells pad every example to `seq` (pack=false: the layout they were measured with).
BEFORE = "attention=xla,loss=full,vit_chunk=0,pack=false"
# block 128: on CPU the ViT's attention runs blockwise in place of the fused kernel it gets on GPU/TPU;
# with 64 frames per device a 512 x 512 block is already [64, 16, 512, 512] float32 = 1 GiB.
AFTER = "attention=auto,loss=answer,block=128,vit_chunk=16,pack=false"
# Example packing (issue 20, the config's default): packed rows of `seq` pruned tokens, 128 frames, 8 examples.
PACKED = AFTER.replace("pack=false", "pack=true")
MESH_8 = "fsdp=8,batch=64,accum=8"
MESH_64 = "fsdp=64,batch=64,accum=1"


@dataclasses.dataclass(frozen=True)
class Cell:
  name: str
  devices: int
  arg: str          # the configs/molmo2_4b_stts.py arg string
  role: str         # "table", "packed" or "breakdown"


def _recipe(method: str, frames: int) -> str:
  return f"method={method},frames={frames}"


def cells() -> list[Cell]:
  """Every cell, most important first (the table, then the breakdown variants)."""
  out = []
  for method in ("stts", "none"):
    for frames in (64, 128):
      for when, arg in (("before", BEFORE), ("after", AFTER)):
        out.append(Cell(f"{method}{frames}_{when}_8dev", 8, f"{_recipe(method, frames)},{arg},{MESH_8}", "table"))
  for when, arg in (("after", AFTER), ("before", BEFORE)):
    out.append(Cell(f"stts64_{when}_64dev", 64, f"{_recipe('stts', 64)},{arg},{MESH_64}", "table"))
  for method in ("stts", "none"):
    out.append(Cell(f"{method}64_packed_8dev", 8, f"{_recipe(method, 64)},{PACKED},{MESH_8}", "packed"))
  base = f"{_recipe('stts', 64)},{AFTER}"
  out += [
      # Loss: the after cell with full logits (attention unchanged).
      Cell("bd_full_logits", 8, f"{base.replace('loss=answer', 'loss=full')},{MESH_8}", "breakdown"),
      # Gradient accumulator: one micro-batch (batch 8 = 1 per device) without the accumulation scan.
      Cell("bd_accum1", 8, f"{base},fsdp=8,batch=8,accum=1", "breakdown"),
      # LLM saved activations: decoder layers frozen (no gradient buffers), 36 vs 18 layers.
      Cell("bd_llm_frozen36", 8, f"{base},{MESH_8},freeze=^llm/layers/", "breakdown"),
      Cell("bd_llm_frozen18", 8, f"{base},{MESH_8},freeze=^llm/layers/,llm_layers=18", "breakdown"),
      # ViT: the vision tower and scorer frozen (no backward pass through the ViT at all).
      Cell("bd_vit_frozen", 8, f"{base},{MESH_8},freeze=^(vit|scorer)/", "breakdown"),
      # The gradient accumulator in bfloat16 (train.accum_dtype; the after cell keeps float32).
      Cell("bd_accum_bf16", 8, f"{base},{MESH_8},accum_dtype=bfloat16", "breakdown"),
  ]
  return out


def run_cell(cell: Cell, out_dir: str, *, repo: str, python: str = sys.executable,
             timeout_s: float = 3600) -> dict[str, Any]:
  """Runs one cell's AOT compile in a fresh process; returns its JSON (with `cell`, `log_tail`)."""
  path = os.path.join(out_dir, f"{cell.name}.json")
  cmd = [python, "scripts/train.py", f"--config=configs/molmo2_4b_stts.py:{cell.arg}", "--aot", "--noaot_flops",
         f"--aot_json={path}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={cell.devices}")
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout_s)
  if proc.returncode != 0 or not os.path.exists(path):
    raise RuntimeError(f"aot cell {cell.name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
  with open(path) as f:
    out = json.load(f)
  out["cell"] = dataclasses.asdict(cell)
  out["wall_seconds"] = time.perf_counter() - t0
  # The command as run, environment included (train.py only sees its own argv).
  out["command"] = [f"XLA_FLAGS={env['XLA_FLAGS']}", "JAX_PLATFORMS=cpu"] + cmd
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  return out


def load(out_dir: str) -> dict[str, dict[str, Any]]:
  out = {}
  for cell in cells():
    path = os.path.join(out_dir, f"{cell.name}.json")
    if os.path.exists(path):
      with open(path) as f:
        out[cell.name] = json.load(f)
  return out


def _gib(r: Mapping[str, Any], key: str) -> float:
  return r["bytes_per_device"][key] / GIB


def _params(r: Mapping[str, Any]) -> int:
  return int(r["num_params"])


def breakdown(results: Mapping[str, Mapping[str, Any]]) -> Optional[dict[str, dict[str, Any]]]:
  """Per-category GiB per device of the 8-device STTS 64-frame after cell, each with how it was obtained.

  Needs the cell and every `bd_*` variant; None if one is missing.
  """
  need = ["stts64_after_8dev", "bd_full_logits", "bd_accum1", "bd_llm_frozen36", "bd_llm_frozen18", "bd_vit_frozen"]
  if any(n not in results for n in need):
    return None
  r = {n: results[n] for n in need}
  main = r["stts64_after_8dev"]
  dev = main["devices"]["count"]
  n = _params(main)
  t = lambda name: _gib(r[name], "temp")   # noqa: E731
  llm_layers = main["config"]["model"]["llm"]["num_layers"]
  frozen_llm = r["bd_llm_frozen18"]["config"]["model"]["llm"]["num_layers"]
  llm_saved = (t("bd_llm_frozen36") - t("bd_llm_frozen18")) * llm_layers / (llm_layers - frozen_llm)
  accumulator = t("stts64_after_8dev") - t("bd_accum1")
  vit = t("stts64_after_8dev") - t("bd_vit_frozen")
  loss_full = t("bd_full_logits") - t("stts64_after_8dev")
  out = {
      "arguments (params + AdamW state)": {
          "gib": _gib(main, "argument"),
          "how": f"measured argument bytes; analytic: {n / 1e9:.2f}B float32 params x (4 param + 8 AdamW) "
                 f"B / {dev} devices = {n * 12 / dev / GIB:.2f} GiB"},
      "gradient accumulator (temporaries)": {
          "gib": accumulator,
          "how": f"temp(accum=8, batch 64) - temp(accum=1, batch 8), same micro-batch; analytic float32 "
                 f"accumulator {n * 4 / dev / GIB:.2f} GiB"},
      "LLM saved activations": {
          "gib": llm_saved,
          "how": f"(temp with LLM layers frozen, {llm_layers} - {frozen_llm} layers) x {llm_layers}/"
                 f"{llm_layers - frozen_llm}: the per-layer scan residuals only (frozen: no gradient buffers)"},
      "ViT (saved activations + its gradients and backward)": {
          "gib": vit,
          "how": "temp - temp with ViT and scorer frozen (no backward pass through the ViT)"},
      "loss logits (full [S, V] - answer-only)": {
          "gib": loss_full,
          "how": "temp(loss=full) - temp(loss=answer), attention auto in both"},
  }
  rest = t("stts64_after_8dev") - accumulator - llm_saved - vit
  out["rest: one layer's recompute, micro-batch gradients, weight all-gathers, loss"] = {
      "gib": rest, "how": "temp minus the three temporaries above (residual)"}
  if "bd_accum_bf16" in results:
    bf16 = results["bd_accum_bf16"]
    out["temporaries with a bfloat16 accumulator (train.accum_dtype)"] = {
        "gib": _gib(bf16, "temp"),
        "how": f"the after cell with accum_dtype=bfloat16: {_gib(bf16, 'temp') - t('stts64_after_8dev'):+.2f} GiB "
               f"temporaries; arguments + temporaries {_gib(bf16, 'argument_plus_temp'):.2f} GiB"}
  return out


_TABLE_ROWS = [("stts", 64), ("none", 64), ("stts", 128), ("none", 128)]


def markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
  """The before/after table (GiB per device), targets and the breakdown, from the result files only."""
  lines = ["| devices | method | frames | seq | before: args | before: temps | before: sum | after: args | "
           "after: temps | after: sum | attention (after) |", "|" + "---|" * 11]
  for devices in (8, 64):
    for method, frames in _TABLE_ROWS:
      b = results.get(f"{method}{frames}_before_{devices}dev")
      a = results.get(f"{method}{frames}_after_{devices}dev")
      if b is None and a is None:
        continue
      seq = (a or b)["config"]["data"]["seq_len"]
      cols = []
      for r in (b, a):
        cols += ["n/a"] * 3 if r is None else [f"{_gib(r, 'argument'):.2f}", f"{_gib(r, 'temp'):.2f}",
                                              f"{_gib(r, 'argument_plus_temp'):.2f}"]
      att = "n/a" if a is None else ", ".join(sorted({f"{x['site']}: {x['impl']}" for x in a["attention"]
                                                      if "site" in x}))
      lines.append(f"| {devices} | {method} | {frames} | {seq} | " + " | ".join(cols) + f" | {att} |")
  out = ["### Per-device memory (GiB, XLA CPU memory_analysis: an estimate for TPU/GPU)", "", *lines, ""]
  targets = []
  r8 = results.get("stts64_after_8dev")
  if r8 is not None:
    v = _gib(r8, "temp")
    targets.append(f"- 8 devices, STTS 64 frames: temporaries {v:.2f} GiB (target <= 20): "
                   f"{'met' if v <= 20 else 'NOT met'}")
  n8 = results.get("none64_after_8dev")
  if n8 is not None:
    targets.append(f"- 8 devices, unpruned 64 frames: temporaries {_gib(n8, 'temp'):.2f} GiB (no target; "
                   f"before {_gib(results['none64_before_8dev'], 'temp'):.2f})" if "none64_before_8dev" in results
                   else f"- 8 devices, unpruned 64 frames: temporaries {_gib(n8, 'temp'):.2f} GiB")
  r64 = results.get("stts64_after_64dev")
  if r64 is not None:
    v = _gib(r64, "argument_plus_temp")
    targets.append(f"- 64 devices, STTS 64 frames: arguments + temporaries {v:.2f} GiB (target <= 14): "
                   f"{'met' if v <= 14 else 'NOT met'}")
  if targets:
    out += ["### Targets", "", *targets, ""]
  packed = [(m, results[f"{m}64_packed_8dev"]) for m in ("stts", "none") if f"{m}64_packed_8dev" in results]
  if packed:
    out += ["### With example packing (8 devices, micro-batch 1 packed row per device)", "",
            "| method | packed row: pruned tokens | frames | examples | row input tokens | args | temps | sum | "
            "unpacked after: sum |", "|" + "---|" * 9]
    for method, r in packed:
      d = r["config"]["data"]
      unpacked = results.get(f"{method}64_after_8dev")
      ref = "n/a" if unpacked is None else f"{_gib(unpacked, 'argument_plus_temp'):.2f}"
      st = r["config"]["model"]["stts"]
      ratio = st["ratio"] if st["method"] != "none" else 0.0
      row_in = d["pack_seq_len"] + budget.packed_dropped_bound(d["pack_max_frames"], 81, ratio)
      out.append(f"| {method} | {d['pack_seq_len']} | {d['pack_max_frames']} | {d['pack_max_videos']} | {row_in} | "
                 f"{_gib(r, 'argument'):.2f} | {_gib(r, 'temp'):.2f} | {_gib(r, 'argument_plus_temp'):.2f} | {ref} |")
    out.append("")
  bd = breakdown(results)
  if bd is not None:
    out += ["### Breakdown: 8 devices, STTS 64 frames, after (GiB per device)", "",
            "Each row but the arguments is a difference of peak temporaries between compiles: what removing "
            "that category saves at the step's peak, not the category's size (a buffer that is not live at "
            "the peak saves nothing).", "",
            "| category | GiB | how |", "|---|---|---|"]
    out += [f"| {k} | {v['gib']:.2f} | {v['how']} |" for k, v in bd.items()]
    out.append("")
  first = next(iter(results.values()), None)
  if first is not None:
    commits = sorted({r["git"]["commit"][:12] + (" (dirty)" if r["git"]["dirty"] else "") for r in results.values()})
    out.append(f"Source: {len(results)} result files; commit(s) {', '.join(commits)}; machine "
               f"{first['machine']['host']} ({first['machine']['cpu_count']} CPUs, jax {first['machine']['jax']}).")
  return "\n".join(out) + "\n"


def run(out_dir: str, *, repo: str, only: Sequence[str] = (), resume: bool = True,
        log=print) -> dict[str, dict[str, Any]]:
  """Runs every cell (or `only` these names) not already in `out_dir` (with `resume`), then writes
  `<out_dir>/table.md`. Returns all results found."""
  os.makedirs(out_dir, exist_ok=True)
  for cell in cells():
    if only and cell.name not in only:
      continue
    path = os.path.join(out_dir, f"{cell.name}.json")
    if resume and os.path.exists(path):
      log(f"{cell.name}: exists, skipped")
      continue
    r = run_cell(cell, out_dir, repo=repo)
    log(f"{cell.name}: args {_gib(r, 'argument'):.2f} GiB, temps {_gib(r, 'temp'):.2f} GiB "
        f"({r['wall_seconds']:.0f} s)")
  results = load(out_dir)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(markdown(results))
  return results

"""One attention layer with the Molmo2 LLM mask: `blockwise` vs `xla`, wall time and compiled memory.

  run(out_dir, lengths=(1024, 2048, 4096, 8192)) -> {"rows", "checks", ...}; writes
      attention_layer.csv (one row per length) and attention_layer.json (rows, checks, command,
      commit, environment)
  auto_choices(model_cfg, frames, ratios) -> what `attention="auto"` resolves to at every call site
      of the benchmark grid's cells (traced from shapes, nothing runs)

The layer is the attention op alone, `models.attention.attention(q, k, v, llm_mask(...), impl=...)`:
q, k, v [1, L, 8, 128] float32 -> out [1, L, 8, 128]. "forward" = the output; "forward+backward" =
the output and d(sum(out * w))/d(q, k, v) for a fixed cotangent w [1, L, 8, 128].
The mask (`molmo2_llm_layout`) is the Molmo2 LLM rule with a prompt laid out like Molmo2's: a text
prompt, two video spans of frames (each frame: 4 text tokens - timestamp and frame markers - then
81 vision tokens), a text question between and after them, and padding (5%) at the end; vision
tokens of the example see each other, everything else is causal, padding sees nothing.
Timing: each program is compiled ahead of time (`stts_jax.bench.timing.aot_compile`); a warm-up
call, then `repeats` rounds that time one call of each implementation in turn (so a noisy neighbour
hits both), `block_until_ready` on every output, median reported; any compilation inside the timed
calls is an error. Memory: `Compiled.memory_analysis().temp_size_in_bytes` of each program. A
program runs only where its arguments + temporaries + outputs fit `max_run_bytes` (default: 40% of
the memory available when the run starts); elsewhere its bytes come from compilation alone and its
time is empty. Where both run, blockwise's output and gradients are compared with xla's.
"""

import contextlib
import csv
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from stts_jax.bench import timing
from stts_jax.models import attention as attention_lib

log = logging.getLogger(__name__)

IMPLS = ("xla", "blockwise")
FRAME_TEXT, FRAME_VISION = 4, 81   # Molmo2: per frame, timestamp + markers, then 9x9 pooled windows
PARITY_TOL = 1e-4                  # blockwise vs xla, per tensor, relative to max(1, max |ref|)


def molmo2_llm_layout(length: int) -> tuple[np.ndarray, np.ndarray]:
  """token_mask, vision_mask [L] (bool) of one Molmo2 example (module docstring)."""
  token = np.zeros(length, bool)
  vision = np.zeros(length, bool)
  used = int(length * 0.95)
  token[:used] = True
  pos = 16                                        # system/user prompt text

  def video(end):
    nonlocal pos
    while pos + FRAME_TEXT + FRAME_VISION <= end:
      pos += FRAME_TEXT
      vision[pos:pos + FRAME_VISION] = True
      pos += FRAME_VISION

  video(int(used * 0.45))
  pos += 24                                       # text between the two videos
  video(int(used * 0.9))
  return token, vision


def _layer_fns(impl: str, scale: float, block: int):
  def fwd(q, k, v, mask):
    return attention_lib.attention(q, k, v, mask, scale=scale, impl=impl, block_q=block, block_k=block)

  def fwd_bwd(q, k, v, w, mask):
    out, vjp = jax.vjp(lambda q, k, v: fwd(q, k, v, mask), q, k, v)
    return (out,) + vjp(w)
  return fwd, fwd_bwd


def _max_rel_diff(got, ref) -> float:
  """max |got - ref| / max(1, max |ref|)."""
  ref = np.asarray(ref, np.float64)
  return float(np.abs(np.asarray(got, np.float64) - ref).max() / max(1.0, float(np.abs(ref).max())))


def default_max_run_bytes() -> int:
  """40% of MemAvailable (a shared machine: leave room for the others)."""
  try:
    with open("/proc/meminfo") as f:
      info = dict(line.split(":", 1) for line in f)
    return int(0.4 * int(info["MemAvailable"].split()[0]) * 1024)
  except (OSError, KeyError, ValueError):
    return 8 * 1024 ** 3


def measure_length(length: int, *, heads: int = 8, kv_heads: int = 8, head_dim: int = 128, block: int = 512,
                   repeats: int = 5, max_run_bytes: int, seed: int = 0,
                   progress: Callable[[str], None] = log.info) -> dict[str, Any]:
  """One row: compiled temporaries of both implementations (forward, forward+backward), and, where
  they fit, median times and blockwise-vs-xla differences."""
  rng = np.random.default_rng(seed)
  shape_q, shape_k = (1, length, heads, head_dim), (1, length, kv_heads, head_dim)
  q, w = (jnp.asarray(rng.normal(size=shape_q), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=shape_k), jnp.float32) for _ in range(2))
  token, vision = molmo2_llm_layout(length)
  mask = attention_lib.llm_mask(jnp.asarray(token[None]), jnp.asarray(vision[None]))
  scale = head_dim ** -0.5
  row: dict[str, Any] = dict(length=length, heads=heads, kv_heads=kv_heads, head_dim=head_dim, block=block,
                             vision_tokens=int(vision.sum()), padding=int((~token).sum()))
  compiled, runs = {}, {}
  for impl in IMPLS:
    fwd, fwd_bwd = _layer_fns(impl, scale, block)
    for part, fn, args in (("fwd", fwd, (q, k, v, mask)), ("fwdbwd", fwd_bwd, (q, k, v, w, mask))):
      c = timing.aot_compile(fn, *args, name=f"{impl}_{part}_{length}")
      compiled[impl, part] = (c, args)
      row[f"{impl}_{part}_temp_bytes"] = c.memory.temp_bytes
      row[f"{impl}_{part}_arg_bytes"] = c.memory.argument_bytes
      row[f"{impl}_{part}_compile_s"] = round(c.compile_seconds, 3)
  for (impl, part), (c, _) in compiled.items():
    runs[impl, part] = c.memory.argument_bytes + c.memory.temp_bytes + c.memory.output_bytes <= max_run_bytes
    row[f"{impl}_{part}_ran"] = runs[impl, part]
  row["xla_ran"] = runs["xla", "fwd"] and runs["xla", "fwdbwd"]
  row["blockwise_ran"] = runs["blockwise", "fwd"] and runs["blockwise", "fwdbwd"]
  progress(f"attention layer L={length}: compiled; runs {runs}")
  outs = {key: jax.block_until_ready(c(*args)) for key, (c, args) in compiled.items() if runs[key]}   # warm-up
  for part, key in (("fwd", "max_rel_diff_out"), ("fwdbwd", "max_rel_diff_grads")):
    if runs["xla", part] and runs["blockwise", part]:
      ref, got = outs["xla", part], outs["blockwise", part]
      pairs = [(got, ref)] if part == "fwd" else list(zip(got[1:], ref[1:]))
      row[key] = max(_max_rel_diff(g, r) for g, r in pairs)
    else:
      row[key] = None
  del outs
  seconds: dict[tuple[str, str], list[float]] = {(i, p): [] for i in IMPLS for p in ("fwd", "fwdbwd")}
  with timing.CompileCounter() as cc:
    for _ in range(repeats):
      for part in ("fwd", "fwdbwd"):
        for impl in IMPLS:
          if runs[impl, part]:
            c, args = compiled[impl, part]
            t0 = time.perf_counter()
            jax.block_until_ready(c(*args))
            seconds[impl, part].append(time.perf_counter() - t0)
  row["compilations_while_timing"] = cc.count
  for (impl, part), s in seconds.items():
    row[f"{impl}_{part}_s"] = statistics.median(s) if s else None
    row[f"{impl}_{part}_seconds"] = s
  for part in ("fwd", "fwdbwd"):
    x, b = row[f"xla_{part}_s"], row[f"blockwise_{part}_s"]
    row[f"{part}_time_ratio"] = b / x if x and b else None                        # blockwise / xla
    row[f"{part}_temp_ratio"] = row[f"blockwise_{part}_temp_bytes"] / max(row[f"xla_{part}_temp_bytes"], 1)
  progress(f"attention layer L={length}: " + ", ".join(
      f"{k}={row[k]:.3g}" for k in ("xla_fwd_s", "blockwise_fwd_s", "xla_fwdbwd_s", "blockwise_fwdbwd_s")
      if row[k] is not None))
  return row


def checks(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Named checks (each with `ok` and the numbers behind it); the benchmark fails if any is not ok."""
  lo, hi = min(rows, key=lambda r: r["length"]), max(rows, key=lambda r: r["length"])
  grow = hi["length"] / lo["length"]
  out: dict[str, dict[str, Any]] = {}
  for part in ("fwd", "fwdbwd"):
    b = hi[f"blockwise_{part}_temp_bytes"] / max(lo[f"blockwise_{part}_temp_bytes"], 1)
    x = hi[f"xla_{part}_temp_bytes"] / max(lo[f"xla_{part}_temp_bytes"], 1)
    # linear in L: the temporaries grow like the length (8x from 1k to 8k), with slack for fixed costs
    out[f"blockwise_{part}_temp_linear"] = dict(ok=b <= 1.25 * grow, growth=b, length_growth=grow,
                                                limit=1.25 * grow)
    # the reference materialises [N, L, L] scores: quadratic (64x), which is what blockwise avoids
    out[f"xla_{part}_temp_quadratic"] = dict(ok=x >= 0.5 * grow ** 2, growth=x, limit=0.5 * grow ** 2)
    out[f"blockwise_{part}_smaller_at_{hi['length']}"] = dict(
        ok=hi[f"blockwise_{part}_temp_bytes"] < hi[f"xla_{part}_temp_bytes"],
        blockwise=hi[f"blockwise_{part}_temp_bytes"], xla=hi[f"xla_{part}_temp_bytes"])
  both = [r for r in rows if r["xla_ran"] and r["blockwise_ran"]]
  out["xla_timed_somewhere"] = dict(ok=bool(both), lengths=[r["length"] for r in both])
  diffs = [r[k] for r in rows for k in ("max_rel_diff_out", "max_rel_diff_grads") if r[k] is not None]
  worst = max(diffs, default=float("nan"))
  out["blockwise_equals_xla"] = dict(ok=bool(diffs) and worst <= PARITY_TOL, max_rel_diff=worst, limit=PARITY_TOL)
  out["blockwise_timed_everywhere"] = dict(ok=all(r["blockwise_ran"] for r in rows))
  out["no_compilation_while_timing"] = dict(ok=all(r["compilations_while_timing"] == 0 for r in rows))
  return out


def _commit() -> str:
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, check=True)
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def environment() -> dict[str, Any]:
  cpu = ""
  with contextlib.suppress(OSError):
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
  return {"jax": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "python": platform.python_version(), "machine": platform.machine(), "cpu": cpu,
          "cpu_count": os.cpu_count(), "hostname": platform.node()}


CSV_COLUMNS = ("length", "heads", "kv_heads", "head_dim", "block", "vision_tokens", "padding",
               "xla_fwd_s", "blockwise_fwd_s", "fwd_time_ratio", "xla_fwdbwd_s", "blockwise_fwdbwd_s",
               "fwdbwd_time_ratio", "xla_fwd_temp_bytes", "blockwise_fwd_temp_bytes", "xla_fwdbwd_temp_bytes",
               "blockwise_fwdbwd_temp_bytes", "xla_fwd_ran", "xla_fwdbwd_ran", "blockwise_ran", "max_rel_diff_out",
               "max_rel_diff_grads")


def run(out_dir: str, *, lengths: Sequence[int] = (1024, 2048, 4096, 8192), heads: int = 8, head_dim: int = 128,
        block: int = attention_lib.DEFAULT_BLOCK, repeats: int = 5, max_run_bytes: Optional[int] = None,
        progress: Callable[[str], None] = log.info) -> dict[str, Any]:
  """Measures every length, writes attention_layer.csv/.json to `out_dir`, returns rows and checks."""
  max_run_bytes = default_max_run_bytes() if max_run_bytes is None else max_run_bytes
  os.makedirs(out_dir, exist_ok=True)
  progress(f"attention layer: lengths {list(lengths)}, {heads} heads x {head_dim}, block {block}, "
           f"{repeats} repeats, xla runs under {max_run_bytes / 2 ** 30:.1f} GiB")
  rows = [measure_length(n, heads=heads, kv_heads=heads, head_dim=head_dim, block=block, repeats=repeats,
                         max_run_bytes=max_run_bytes, progress=progress) for n in lengths]
  result = dict(rows=rows, checks=checks(rows), command=" ".join([os.path.basename(sys.executable)] + sys.argv),
                commit=_commit(), environment=environment(), max_run_bytes=max_run_bytes,
                mask="Molmo2 LLM mask (models.attention.llm_mask): causal, OR both vision tokens of the example; "
                     "two video spans of frames (4 text + 81 vision tokens each), text between/after, 5% padding "
                     "at the end (stts_jax.bench.attention_layer.molmo2_llm_layout)",
                dtype="float32", batch=1, time_ratio="blockwise / xla (median wall seconds)")
  with open(os.path.join(out_dir, "attention_layer.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out_dir, "attention_layer.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  progress(f"wrote {out_dir}/attention_layer.csv, attention_layer.json")
  return result


# ------------------------------------------------------------------------------------------------
# which implementation `auto` picks at the measured grid's call sites
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _recording_choices(record: list):
  """Records every `attention_lib.choose` call (mask kind, shapes, resolved) while active."""
  original = attention_lib.choose

  def recording(impl, mask, q_shape, k_shape, backend=None):
    resolved = original(impl, mask, q_shape, k_shape, backend)
    record.append(dict(asked=impl, kind=mask.kind, q_shape=list(q_shape), k_shape=list(k_shape),
                       score_mib=4 * q_shape[0] * q_shape[2] * q_shape[1] * k_shape[1] / 2 ** 20,
                       resolved=resolved))
    return resolved
  attention_lib.choose = recording
  try:
    yield record
  finally:
    attention_lib.choose = original


def auto_choices(model_cfg: Any, frames: Sequence[int], ratios: Sequence[float], *, batch_size: int = 1,
                 rows: str = "bound", new_tokens: int = 8) -> list[dict[str, Any]]:
  """Traces (jax.eval_shape: nothing is compiled or run) each grid cell's train forward (its ViT and
  LLM call sites; the backward reuses the forward's choice), the decoder prefill and one decode step,
  and returns every attention call's resolution on this backend, one dict per call.

  rows: the packed-row policy; "bound" gives the most ViT rows any cell can compile, so an `xla`
  choice there holds for the measured "fit" rows too (the score bytes only grow with the rows).
  """
  from flax import nnx   # the grid's machinery, imported only here (the layer benchmark needs none of it)
  from stts_jax.bench import batches as batches_lib
  from stts_jax.bench import parts
  from stts_jax.bench import runner
  from stts_jax.models import video_forward as vf
  from stts_jax.models import vlm

  sds, b, out = jax.ShapeDtypeStruct, batch_size, []
  for t in frames:
    for ratio in ratios:
      cfg = runner.cell_model_config(model_cfg, t, ratio, rows)
      seq_len = batches_lib.prompt_length(t, cfg.windows_per_frame)
      s_llm = parts.llm_len(cfg, t, seq_len)
      model = nnx.eval_shape(lambda: vlm.Molmo2(cfg, rngs=nnx.Rngs(0)))
      graphdef, state = nnx.split(model)
      llm_graphdef, llm_state = nnx.split(model.llm)
      batch = dict(patches=sds((b, t, cfg.vit.grid ** 2, cfg.vit.patch_size ** 2 * 3), jnp.uint8),
                   frame_mask=sds((b, t), bool), input_ids=sds((b, seq_len), jnp.int32),
                   token_mask=sds((b, seq_len), bool), target_ids=sds((b, seq_len), jnp.int32),
                   loss_mask=sds((b, seq_len), bool))
      llm_in = (sds((b, s_llm, cfg.llm.hidden_size), jnp.float32), sds((b, s_llm), jnp.int32),
                sds((b, s_llm), bool), sds((b, s_llm), bool))

      def train_forward(state, batch):
        model = nnx.merge(graphdef, state)
        return vf.forward_video(model, batch, rng=jax.random.key(0), deterministic=False).logits

      record: list = []
      with _recording_choices(record):
        jax.eval_shape(train_forward, state, batch)
        ends = {"train": len(record)}
        pre = jax.eval_shape(parts.prefill_fn(llm_graphdef, new_tokens), llm_state, *llm_in)
        ends["prefill"] = len(record)
        jax.eval_shape(parts.decode_fn(llm_graphdef, 1, cfg.tokens.pad, s_llm), llm_state, *parts.prefill_arrays(pre))
        ends["decode"] = len(record)
      start = 0
      for program, end in ends.items():
        out += [dict(frames=t, ratio=ratio, program=program, site="vit" if r["kind"].startswith("vit") else "llm",
                     backend=jax.default_backend(), **r) for r in record[start:end]]
        start = end
  return out


def write_auto_choices(out_dir: str, choices: Sequence[dict[str, Any]], **meta: Any) -> dict[str, Any]:
  """auto_choices.json (every call) and auto_choices.csv (one row per cell, program and site)."""
  os.makedirs(out_dir, exist_ok=True)
  cells: dict[tuple, dict[str, Any]] = {}
  for c in choices:
    key = (c["frames"], c["ratio"], c["program"], c["site"])
    row = cells.setdefault(key, dict(frames=c["frames"], ratio=c["ratio"], program=c["program"], site=c["site"],
                                     calls=0, resolved=set(), kinds=set(), max_score_mib=0.0))
    row["calls"] += 1
    row["resolved"].add(c["resolved"])
    row["kinds"].add(c["kind"])
    row["max_score_mib"] = max(row["max_score_mib"], c["score_mib"])
  rows = [dict(r, resolved="|".join(sorted(r["resolved"])), kinds="|".join(sorted(r["kinds"])),
               max_score_mib=round(r["max_score_mib"], 2)) for r in cells.values()]
  summary = dict(resolved=sorted({c["resolved"] for c in choices}),
                 xla_threshold_mib=attention_lib.XLA_MAX_SCORE_BYTES / 2 ** 20,
                 max_score_mib=max(c["score_mib"] for c in choices))
  with open(os.path.join(out_dir, "auto_choices.json"), "w") as f:
    json.dump(dict(summary=summary, cells=rows, calls=list(choices), command=" ".join(sys.argv),
                   commit=_commit(), environment=environment(), **meta), f, indent=1)
  with open(os.path.join(out_dir, "auto_choices.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return summary

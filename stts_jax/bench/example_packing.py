"""Benchmark row: training examples per second with example packing vs padding to frame buckets.

On a variable-length dataset (default_dataset varlen: 4 to 32 frames per clip) and one model, for
each method (unpruned, STTS at `ratio`):
  padding  today's layout with frame buckets: an example of t frames goes to the smallest bucket
           T_b >= t (`BUCKETS`) and is padded to T_b frames and that bucket's token length S_b (the
           longest prompt of the bucket in the stream); batches of `batch` examples of one bucket.
  packing  `data/example_packing.py`: `rows` packed rows of `pack_seq_len` pruned tokens,
           `pack_frames` frames and up to `pack_videos` examples per step.
The same `num_examples` examples (the first ones of the shuffled train split) go through both. Each
layout's train step (the real `train_step`, AdamW, 1 device) is compiled once per shape and timed on
real batches of the stream, in interleaved rounds over all shapes of both methods; the stream's time is
  padding: sum over buckets of ceil(n_b / batch) x step time(T_b, S_b),
  packing: packed steps the packer emitted x packed step time,
and examples/s = num_examples / that time, from each shape's fastest timed call (the least disturbed
on a shared machine; the medians give `*_median` as a cross-check). A bucket's and a packed batch's step time do not depend
on how full its rows are (static shapes), so timing a few batches of each shape is enough.
"""

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import grain
import jax
import numpy as np
from flax import nnx

from stts_jax import config as config_lib
from stts_jax.bench import timing
from stts_jax.data import example_packing as host_packing
from stts_jax.data import pipeline
from stts_jax.data.config import DataConfig
from stts_jax.models import budget
from stts_jax.models import example_packing
from stts_jax.parallel import mesh as mesh_lib
from stts_jax.parallel import sharding
from stts_jax.train import loop
from stts_jax.train.config import MeshConfig, OptimConfig, TrainConfig

BUCKETS = (4, 8, 16, 32)   # inference.FRAME_BUCKETS up to the longest clip
UNPACKED_KEYS = ("patches", "frame_mask", "timestamps", "input_ids", "token_mask", "target_ids", "loss_mask")


@dataclasses.dataclass(frozen=True)
class Settings:
  num_examples: int = 480           # examples of the stream both layouts run
  batch: int = 8                    # padding: examples per step
  rows: int = 8                     # packing: packed rows per step
  pack_seq_len: int = 704           # packing: pruned tokens per row
  pack_frames: int = 40             # packing: frames per row
  pack_videos: int = 8              # packing: examples per row
  lookahead: int = 16               # packing: examples that may wait for a later step
  buckets: tuple[int, ...] = BUCKETS
  timing_batches: int = 2           # distinct batches per timed shape
  warmup: int = 1
  repeats: int = 2                  # timed calls per cell and round
  rounds: int = 4                   # interleaved timing rounds over all cells of a method
  seed: int = 0


def _stream_examples(data_cfg: DataConfig, token_ids: config_lib.TokenIds, num: int, seed: int):
  """The first `num` processed examples of the shuffled train split (a Grain iterator)."""
  source, _ = pipeline.open_source(data_cfg, data_cfg.train_split)
  processor = pipeline.make_processor(data_cfg, token_ids)
  ds = grain.MapDataset.source(source).shuffle(seed=seed)[:num].map(processor)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.num_threads,
                                                   prefetch_buffer_size=data_cfg.prefetch_buffer)))


def _unpack_rows(batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
  """The examples of a packed batch, each as its real frames and tokens (no padding)."""
  out = []
  for r in range(batch["valid"].shape[0]):
    for j in np.flatnonzero(batch["valid"][r]):
      f, s = batch["frame_example"][r] == j, batch["token_example"][r] == j
      out.append({"patches": batch["patches"][r][f], "timestamps": batch["timestamps"][r][f],
                  **{k: batch[k][r][s] for k in ("input_ids", "token_mask", "target_ids", "loss_mask")}})
  return out


def _pad_batch(examples: Sequence[dict[str, np.ndarray]], frames: int, seq: int, pad_id: int) -> dict[str, np.ndarray]:
  """Examples padded to [B, frames] / [B, seq] in the unpacked pipeline layout."""
  b = len(examples)
  ref = examples[0]["patches"]
  out = {"patches": np.zeros((b, frames) + ref.shape[1:], ref.dtype), "frame_mask": np.zeros((b, frames), bool),
         "timestamps": np.zeros((b, frames), np.float32), "input_ids": np.full((b, seq), pad_id, np.int32),
         "token_mask": np.zeros((b, seq), bool), "target_ids": np.full((b, seq), pad_id, np.int32),
         "loss_mask": np.zeros((b, seq), bool)}
  for i, ex in enumerate(examples):
    t, n = ex["patches"].shape[0], ex["input_ids"].shape[0]
    out["patches"][i, :t] = ex["patches"]
    out["frame_mask"][i, :t] = True
    out["timestamps"][i, :t] = ex["timestamps"]
    for k in ("input_ids", "token_mask", "target_ids", "loss_mask"):
      out[k][i, :n] = ex[k]
  return out


def scan(model_cfg: config_lib.ModelConfig, data_cfg: DataConfig, s: Settings) -> dict[str, Any]:
  """Packs the stream for `model_cfg`'s LLM-side ratio: per-example frames/tokens, packed steps and
  fill, a few packed batches and a few examples of every bucket for timing."""
  spec = host_packing.PackSpec(rows=s.rows, seq_len=s.pack_seq_len, max_frames=s.pack_frames,
                               max_videos=s.pack_videos, windows=data_cfg.windows_per_frame,
                               llm_drop_ratio=example_packing.llm_drop_ratio(model_cfg),
                               lookahead=s.lookahead, pad_id=model_cfg.tokens.pad)
  packer = host_packing.ExamplePacker(_stream_examples(data_cfg, model_cfg.tokens, s.num_examples, s.seed), spec,
                                      on_error="raise")
  frames, tokens, packed, steps, fill, frame_fill = [], [], [], 0, [], []
  per_bucket: dict[int, list] = {b: [] for b in s.buckets}
  for batch in packer:
    steps += 1
    if len(packed) < s.timing_batches and steps > 1:   # the first step can be unrepresentative (lookahead)
      packed.append({k: v for k, v in batch.items() if v.dtype != np.int64})
    fill.append(float(batch["pack_tokens"].sum() / batch["pack_capacity"].sum()))
    frame_fill.append(float(batch["frame_mask"].mean()))
    for ex in _unpack_rows(batch):
      t, n = ex["patches"].shape[0], ex["input_ids"].shape[0]
      frames.append(t)
      tokens.append(n)
      bucket = min(b for b in s.buckets if b >= t)
      if len(per_bucket[bucket]) < s.batch * s.timing_batches:
        per_bucket[bucket].append(ex)
  return {"frames": np.asarray(frames), "tokens": np.asarray(tokens), "packed_steps": steps,
          "packed_batches": packed, "per_bucket": per_bucket, "fill": float(np.mean(fill)),
          "frame_fill": float(np.mean(frame_fill)), "spec": spec}


def _prepare(model_fn: Callable[[], nnx.Module], batches: Sequence[dict[str, np.ndarray]], name: str):
  """Compiles the train step for the batches' shape on one device; returns (call(i), compile seconds,
  outputs list of (dense_fallback, truncated_tokens) per call)."""
  cfg = TrainConfig(num_steps=10, optim=OptimConfig(learning_rate=1e-4)).validate()
  mesh = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  rules = sharding.make_rules()
  graphdef, state, shardings = loop.init_state(model_fn, cfg, mesh, rules)
  device = [sharding.shard_batch(loop.device_fields(b), mesh, rules) for b in batches]
  batch_sh = {k: v.sharding for k, v in device[0].items()}
  step = loop.make_step_fn(graphdef, shardings, batch_sh, mesh, rules, cfg)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step.lower(state, device[0]).compile()
  call = timing.StatefulCall(lambda st, i: compiled(st, device[i % len(device)]), state,
                             keep=lambda m: (m["dense_fallback"], m["truncated_tokens"]))
  return call, time.perf_counter() - t0


def _time_interleaved(calls: dict[str, Any], s: Settings) -> dict[str, dict[str, Any]]:
  """`s.rounds` rounds; each times every cell `s.repeats` times (one untimed warm-up call per cell in
  the first round). Interleaving spreads a shared machine's load over all cells alike."""
  seconds = {k: [] for k in calls}
  for r in range(s.rounds):
    for name, call in calls.items():
      t = timing.time_calls(call, warmup=s.warmup if r == 0 else 0, repeats=s.repeats, name=name)
      seconds[name] += list(t.seconds)
  out = {}
  for name, call in calls.items():
    kept = jax.device_get(call.outputs)
    out[name] = {"min_s": min(seconds[name]), "median_s": float(np.median(seconds[name])), "seconds": seconds[name],
                 "dense_fallback": float(sum(float(a) for a, _ in kept)),
                 "truncated": float(sum(float(b) for _, b in kept))}
  return out


def prepare_method(model_cfg: config_lib.ModelConfig, data_cfg: DataConfig, s: Settings) -> dict[str, Any]:
  """Scans the stream for one method and compiles its steps: every bucket's and the packed one."""
  st = model_cfg.stts
  w = data_cfg.windows_per_frame
  sc = scan(model_cfg, data_cfg, s)
  n = int(sc["frames"].shape[0])
  calls, plan = {}, {}
  for b in s.buckets:
    lower = max([x for x in s.buckets if x < b], default=0)
    in_bucket = (sc["frames"] <= b) & (sc["frames"] > lower)
    count = int(in_bucket.sum())
    if not count:
      continue
    seq = int(math.ceil(sc["tokens"][in_bucket].max() / 16) * 16)
    exs = sc["per_bucket"][b]
    batches = [_pad_batch((exs * s.batch * s.timing_batches)[i * s.batch:(i + 1) * s.batch], b, seq, model_cfg.tokens.pad)
               for i in range(s.timing_batches)]
    rows = budget.typical_num_rows(b, w, st.ratio) if st.prunes else None
    cfg_b = dataclasses.replace(model_cfg, stts=dataclasses.replace(st, num_rows=rows)).validate()
    name = f"pad{b}"
    calls[name], compile_s = _prepare(lambda c=cfg_b: _model(c), batches, f"{st.method}_{name}")
    plan[name] = {"examples": count, "frames": b, "seq_len": seq, "steps": -(-count // s.batch),
                  "compile_s": compile_s}
  rows = budget.typical_num_rows(s.pack_frames, w, st.ratio) if st.prunes else None
  cfg_p = dataclasses.replace(model_cfg, stts=dataclasses.replace(st, num_rows=rows)).validate()
  calls["packed"], compile_s = _prepare(lambda: _model(cfg_p), sc["packed_batches"], f"{st.method}_packed")
  plan["packed"] = {"steps": sc["packed_steps"], "rows": s.rows, "row_input_len": sc["spec"].input_len,
                    "examples_per_row": n / (sc["packed_steps"] * s.rows), "fill": sc["fill"],
                    "frame_fill": sc["frame_fill"], "compile_s": compile_s}
  return {"method": st.method, "ratio": st.ratio if st.prunes else 0.0, "examples": n,
          "frames_mean": float(sc["frames"].mean()), "calls": calls, "plan": plan}


def finish_method(prep: dict[str, Any], timed: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """One method's row from its plan and timings: examples/s padded and packed."""
  n = prep["examples"]
  out: dict[str, Any] = {k: prep[k] for k in ("method", "ratio", "examples", "frames_mean")}
  out["buckets"] = {prep["plan"][k]["frames"]: {**prep["plan"][k], **timed[k]} for k in prep["plan"] if k != "packed"}
  out["packed"] = {**prep["plan"]["packed"], **timed["packed"]}
  # Examples/s from the fastest timed call of each shape (the least disturbed by other processes on
  # a shared machine) and, as a cross-check, from the medians.
  for stat in ("min_s", "median_s"):
    pad = sum(e["steps"] * e[stat] for e in out["buckets"].values())
    packed = out["packed"]["steps"] * out["packed"][stat]
    suffix = "" if stat == "min_s" else "_median"
    out[f"padding_examples_per_s{suffix}"] = n / pad
    out[f"packing_examples_per_s{suffix}"] = n / packed
    out[f"packing_speedup{suffix}"] = pad / packed
  return out


def _model(cfg: config_lib.ModelConfig):
  from stts_jax.models import vlm
  return vlm.Molmo2(cfg, rngs=nnx.Rngs(0))


def run(model_cfg_fn: Callable[[str, float], config_lib.ModelConfig], data_cfg: DataConfig, s: Settings, *,
        ratio: float = 0.5, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Both rows (unpruned, STTS `ratio`) and the two checks of issue 20."""
  preps = {"none": prepare_method(model_cfg_fn("none", 0.0), data_cfg, s),
           "stts": prepare_method(model_cfg_fn("stts", ratio), data_cfg, s)}
  # Every cell of both methods in the same interleaved rounds.
  calls = {f"{m}/{k}": c for m, p in preps.items() for k, c in p["calls"].items()}
  timed = _time_interleaved(calls, s)
  rows = {m: finish_method(p, {k: timed[f"{m}/{k}"] for k in p["calls"]}) for m, p in preps.items()}
  for m, r in rows.items():
    for b, e in r["buckets"].items():
      log(f"{m} pad{b}: {e['examples']} examples, {e['steps']} steps, {e['min_s']:.3f} s/step (min), {e['median_s']:.3f} (median)")
    e = r["packed"]
    log(f"{m} packed: {e['steps']} steps, {e['min_s']:.3f} s/step (min), {e['median_s']:.3f} (median), fill {e['fill']:.2f}")
  none, stts = rows["none"], rows["stts"]
  gain_pad = stts["padding_examples_per_s"] / none["padding_examples_per_s"]
  gain_pack = stts["packing_examples_per_s"] / none["packing_examples_per_s"]
  checks = {
      "stts_packing_speedup >= 1.3": {"value": stts["packing_speedup"], "ok": stts["packing_speedup"] >= 1.3},
      "stts gain over unpruned, packed >= padded": {"value": [gain_pack, gain_pad], "ok": gain_pack >= gain_pad},
  }
  return {"settings": dataclasses.asdict(s), "rows": rows, "stts_over_none": {"padding": gain_pad, "packing": gain_pack},
          "checks": checks}


def pad_to_longest_examples_per_s(row: dict[str, Any], batch: int) -> float:
  """Context, from the same timings: every example padded to the longest bucket's shape (its frames
  and the longest prompt of the stream), i.e. no buckets at all."""
  longest = max(row["buckets"], key=int)
  return row["examples"] / (-(-row["examples"] // batch) * row["buckets"][longest]["min_s"])


def frame_slots(result: dict[str, Any]) -> dict[str, dict[str, float]]:
  """Where the time goes, per method, from a result dict: the ViT runs on frame slots, so
  `padding_slots / real_frames` is what perfect packing (every slot a real frame, no per-slot
  overhead) could gain over padding to buckets; the ms per slot say what a packed slot costs.
  Frame slots: padding sum over buckets of steps x batch x bucket frames; packing steps x rows x
  frame budget. ms per slot from each shape's fastest step (as examples/s)."""
  s = result["settings"]
  out = {}
  for name, r in result["rows"].items():
    buckets = r["buckets"]
    pad_slots = sum(e["steps"] * s["batch"] * int(f) for f, e in buckets.items())
    pad_time = sum(e["steps"] * e["min_s"] for e in buckets.values())
    p = r["packed"]
    pack_slots = p["steps"] * s["rows"] * s["pack_frames"]
    real = r["examples"] * r["frames_mean"]
    out[name] = {"real_frames": real, "padding_slots": pad_slots, "packing_slots": pack_slots,
                 "ceiling": pad_slots / real, "slot_ratio": pad_slots / pack_slots,
                 "padding_ms_per_slot": 1e3 * pad_time / pad_slots,
                 "packing_ms_per_slot": 1e3 * p["steps"] * p["min_s"] / pack_slots}
  return out


def markdown(result: dict[str, Any]) -> str:
  """The benchmark row as a small table (from a result dict only: `bench.json` re-renders it)."""
  batch = result["settings"]["batch"]
  lines = ["| method | padding to buckets: examples/s | packing: examples/s | packing / padding | "
           "packed: examples per row | packed: token fill | packed: frame fill | context: padding to the "
           "longest, examples/s (packing / it) |", "|" + "---|" * 8]
  for name, r in result["rows"].items():
    p = r["packed"]
    label = "unpruned" if name == "none" else f"STTS {r['ratio']:g}"
    longest = pad_to_longest_examples_per_s(r, batch)
    lines.append(f"| {label} | {r['padding_examples_per_s']:.2f} | {r['packing_examples_per_s']:.2f} | "
                 f"{r['packing_speedup']:.2f}x | {p['examples_per_row']:.2f} | {p['fill']:.2f} | {p['frame_fill']:.2f} | "
                 f"{longest:.2f} ({r['packing_examples_per_s'] / longest:.2f}x) |")
  g = result["stts_over_none"]
  med = {m: r["packing_speedup_median"] for m, r in result["rows"].items()}
  lines += ["", f"STTS over unpruned: padding {g['padding']:.2f}x, packing {g['packing']:.2f}x. Examples/s from each "
            f"shape's fastest timed step; from the medians instead, packing / padding is {med['none']:.2f}x "
            f"(unpruned) and {med['stts']:.2f}x (STTS).", ""]
  lines += [f"- {k}: {'met' if v['ok'] else 'NOT met'} ({v['value']})" for k, v in result["checks"].items()]
  lines += ["", "Frame slots (the ViT's work): padding to buckets vs packing, and what each slot costs "
            "(`frame_slots`; ceiling = padding slots / real frames, the most perfect packing could gain):", "",
            "| method | real frames | padding: frame slots | packing: frame slots | padding / packing slots | "
            "ms per slot, padding | ms per slot, packing | ceiling |", "|" + "---|" * 8]
  for name, f in frame_slots(result).items():
    label = "unpruned" if name == "none" else f"STTS {result['rows'][name]['ratio']:g}"
    lines.append(f"| {label} | {f['real_frames']:.0f} | {f['padding_slots']} | {f['packing_slots']} | "
                 f"{f['slot_ratio']:.2f}x | {f['padding_ms_per_slot']:.2f} | {f['packing_ms_per_slot']:.2f} | "
                 f"{f['ceiling']:.2f}x |")
  return "\n".join(lines) + "\n"


__all__ = ["BUCKETS", "Settings", "scan", "prepare_method", "finish_method", "run", "markdown", "frame_slots",
           "pad_to_longest_examples_per_s"]

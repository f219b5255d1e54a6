"""Ahead-of-time sizing of inference: the vision stage and the prefill stage (and decode), from shapes only.

`compile_inference(model_cfg, num_frames=T, seq_len=S, max_new_tokens=N)` builds the abstract model
(`nnx.eval_shape`: no weights are allocated), lowers and compiles the jitted stages of the eval
`Predictor` (also what `inference.Pipeline.ask` runs) on the default device (one device, no mesh), and
reads XLA's `memory_analysis` of each:
  vision   `predictor._vision_pure`: ViT + scoring + budget + packing + adapter -> `VisionFeatures`
  prefill  `predictor._prefill_pure`: pruned prompt [B, S'] -> decoder into a KV cache of S' + N slots,
           next-token logits and option log-probs
  decode   `predictor._decode_pure` (optional): N greedy KV-cache steps from the prefill's state
Each stage is compiled under a fresh `jax.jit` of the same pure function (the same program as the
predictor's module-level jits, but with its own trace cache, so the attention choices of this call
are recorded even if the process traced these shapes before).

Live bytes of a stage. The whole model state is resident on the device for every stage (the
predictor places it once), but `jax.jit` drops arguments a program does not read (the vision stage
takes no LLM weights, the prefill no ViT weights), so XLA's argument bytes cover only the used ones;
the unused rest (`resident_unused` = parameters + stage inputs - argument bytes) is added back. The
caller also still holds earlier stages' buffers (`held_bytes`): during the prefill the vision inputs
(patches, frame mask; the vision features are a prefill argument), during decode those plus the
vision features and the prefill outputs that are not decode arguments. No argument is donated, so
outputs are new memory. Per stage:
  total = arguments + resident_unused + held + temporaries + outputs
`peak_bytes` is the larger total of the vision and the prefill stage (one prompt's prefill, the
issue's measure); `args_plus_temps_bytes` is the same without the outputs (the measure the training
AOT reports, `train/aot.py`); with decode compiled, `peak_all_bytes` is the largest of all three.
Generated code is reported, not added.

On CPU, XLA upcasts many bfloat16 buffers to float32 and the ViT's attention runs `blockwise`
where a GPU gets the fused Pallas kernel (`models/attention.py`), so CPU numbers are an estimate
(an upper bound for bfloat16 activations) of a GPU compile.

Sequence length: `prompt_seq_len(T)` sizes the static S of a T-frame prompt the way the evaluation
grows it (`eval/data.py: with_frames`, W + 2 + 8 tokens per frame: pooled tokens, <frame_start>,
<frame_end> and a timestamp of up to 8 Qwen tokens, i.e. " dddd.d " with one token per digit) plus
BOS and a text budget for the chat template and the question.
"""

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stts_jax import config as config_lib
from stts_jax.eval import predictor as predictor_lib
from stts_jax.models import attention as attention_lib
from stts_jax.models import budget
from stts_jax.models import video_forward as vf

GIB = 1024 ** 3
STAGES = ("vision", "prefill")                 # the default: one prompt's prefill
ALL_STAGES = ("vision", "prefill", "decode")   # decode: KV-cache generation of max_new_tokens (greedy)
# Text tokens around a question besides the video: "<|im_start|>user\n", the question (with options)
# and "<|im_end|>\n<|im_start|>assistant\n".
DEFAULT_TEXT_TOKENS = 128
# Timestamp text per frame: " dddd.d " = 1 + 4 + 1 + 1 + 1 Qwen tokens (digits are single tokens),
# enough for videos up to 9999.9 s; the evaluation's default growth per frame (eval/data.py).
TIMESTAMP_TOKENS = 8


def prompt_seq_len(num_frames: int, windows: int = 81, *, timestamp_tokens: int = TIMESTAMP_TOKENS,
                   text_tokens: int = DEFAULT_TEXT_TOKENS) -> int:
  """Static prompt length S of a T-frame video question: BOS + T * (W + 2 + timestamp) + text."""
  return 1 + num_frames * (windows + 2 + timestamp_tokens) + text_tokens


def _nbytes(tree) -> int:
  return int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
                 if hasattr(x, "shape") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)))


def _abstract_leaves(fn, *args, **kwargs) -> tuple[tuple[list, ...], tuple[Any, ...]]:
  """`fn` returns a tuple of pytrees; -> (their ShapeDtypeStruct leaves, their treedefs), from shapes only."""
  defs: list = []

  def flat(*a, **k):
    parts = fn(*a, **k)
    defs[:] = [jax.tree.structure(p) for p in parts]
    return tuple(jax.tree.leaves(p) for p in parts)

  return jax.eval_shape(flat, *args, **kwargs), tuple(defs)


def _memory(compiled) -> dict[str, int]:
  mem = compiled.memory_analysis()
  if isinstance(mem, (list, tuple)):
    mem = mem[0]
  return {"argument": int(mem.argument_size_in_bytes), "output": int(mem.output_size_in_bytes),
          "temp": int(mem.temp_size_in_bytes), "alias": int(mem.alias_size_in_bytes),
          "generated_code": int(mem.generated_code_size_in_bytes)}


def static_shapes(model_cfg: config_lib.ModelConfig, *, num_frames: int, seq_len: int, max_new_tokens: int,
                  batch_size: int = 1) -> dict[str, Any]:
  """The static shapes one (T, S) compile fixes (`models/budget.py`)."""
  st = model_cfg.stts
  w = model_cfg.windows_per_frame
  llm_prunes = st.prunes and st.llm_prune
  pruned = budget.pruned_seq_len(seq_len, num_frames, w, st.ratio) if llm_prunes else seq_len
  kept = budget.num_kept(num_frames, w, st.ratio) if st.prunes else num_frames * w
  return {
      "batch": batch_size, "frames": num_frames, "windows_per_frame": w,
      "patches_per_frame": model_cfg.vit.num_patches,
      "seq_len": seq_len, "pruned_seq_len": pruned, "dropped_tokens": seq_len - pruned,
      "kept_windows": kept, "llm_feature_slots": vf.num_llm_slots(model_cfg, num_frames),
      "vit_packed_rows": budget.num_rows(num_frames, w, st.ratio, st.num_rows) if st.prunes else None,
      "vit_chunk": model_cfg.vit_chunk, "max_new_tokens": max_new_tokens, "cache_slots": pruned + max_new_tokens,
  }


def abstract_model(model_cfg: config_lib.ModelConfig,
                   model_fn: Optional[Callable[[config_lib.ModelConfig], nnx.Module]] = None):
  """(graphdef, abstract state) of the model: shapes and dtypes only, nothing allocated."""
  if model_fn is None:
    from stts_jax.models import vlm
    model_fn = lambda c: vlm.Molmo2(c, rngs=nnx.Rngs(0))   # noqa: E731
  return nnx.split(nnx.eval_shape(lambda: model_fn(model_cfg)))


def compile_inference(model_cfg: config_lib.ModelConfig, *, num_frames: int, seq_len: int,
                      max_new_tokens: int = 256, batch_size: int = 1, num_options: int = 1,
                      per_example_rng: bool = False, stages: Sequence[str] = STAGES,
                      model_fn: Optional[Callable[[config_lib.ModelConfig], nnx.Module]] = None) -> dict[str, Any]:
  """Lowers and compiles the inference stages for one (config, T, S) from abstract shapes (module docstring).

  Returns a JSON-friendly dict: `shapes` (static_shapes), `num_params`, `param_bytes`, `kv_cache_bytes`,
  per stage {bytes (argument/output/temp/alias/generated_code), input_bytes, held_bytes, attention
  (each call site's resolution, `attention.record_choices`), lower_seconds, compile_seconds}, and
  `totals`: `stage_totals_bytes`, `args_plus_temps_bytes`, `peak_bytes`, `peak_stage`, `peak_all_*`.
  stages: a subset of ALL_STAGES (default: vision and prefill); the shapes a stage takes from an earlier
  one come from `jax.eval_shape`, so any subset compiles on its own.
  num_options / per_example_rng: the defaults are what `inference.Pipeline.ask` passes (option_ids
  [B, 1], no example ids); the eval `Predictor` passes [B, max_options] and per-video example ids.
  """
  bad = [s for s in stages if s not in ALL_STAGES]
  if bad or not stages:
    raise ValueError(f"compile_inference: stages must be a non-empty subset of {ALL_STAGES}, got {tuple(stages)}")
  model_cfg = model_cfg.validate()
  graphdef, abs_state = abstract_model(model_cfg, model_fn)
  b, t, s = batch_size, num_frames, seq_len
  sds = jax.ShapeDtypeStruct
  pix = model_cfg.vit.patch_size ** 2 * 3
  vision_in = {"patches": sds((b, t, model_cfg.vit.num_patches, pix), jnp.uint8),
               "frame_mask": sds((b, t), jnp.bool_),
               "rng": jax.eval_shape(lambda: jax.random.key(0)),
               "example_ids": sds((b,), jnp.int32) if per_example_rng else None}

  # Stage outputs are typed dataclasses (`VisionFeatures`, `decoding.Prefill`) whose fields reject
  # ShapeDtypeStructs under a runtime type checker, so the abstract values passed between stages are
  # flat leaf lists, rebuilt into the dataclass inside the next stage's trace (same program).
  def vision_fn(state, patches, frame_mask, rng, example_ids):
    return predictor_lib._vision_pure(graphdef, state, patches, frame_mask, rng, example_ids)

  (vision_leaves,), (vision_def,) = _abstract_leaves(lambda *a, **k: (vision_fn(*a, **k),), abs_state, **vision_in)
  prefill_in = {"input_ids": sds((b, s), jnp.int32), "token_mask": sds((b, s), jnp.bool_),
                "vision": vision_leaves, "option_ids": sds((b, num_options), jnp.int32)}

  def prefill_fn(state, input_ids, token_mask, vision, option_ids):
    return predictor_lib._prefill_pure(graphdef, state, input_ids, token_mask, jax.tree.unflatten(vision_def, vision),
                                       option_ids, max_new_tokens=max_new_tokens)

  def prefill_parts(*a, **k):
    out = prefill_fn(*a, **k)
    return out, out[0].state, out[0].state.cache

  (prefill_leaves, state_leaves, cache_leaves), (_, state_def, _) = _abstract_leaves(prefill_parts, abs_state,
                                                                                    **prefill_in)
  decode_in = {"prefill": state_leaves, "valid": sds((b,), jnp.bool_),
               "rng": jax.eval_shape(lambda: jax.random.key(0))}

  def decode_fn(state, prefill, valid, rng):
    return predictor_lib._decode_pure(graphdef, state, jax.tree.unflatten(state_def, prefill), valid, rng,
                                      max_new_tokens=max_new_tokens, stop_ids=(model_cfg.tokens.chat_end,),
                                      pad_id=model_cfg.tokens.pad, temperature=0.0)

  # What the caller still holds while a stage runs, besides that stage's arguments (the predictor keeps
  # the device batch, the vision features and the prefill output until the end of the call).
  vision_in_bytes, vision_out_bytes = _nbytes(vision_in), _nbytes(vision_leaves)
  held = {"vision": 0, "prefill": vision_in_bytes,
          "decode": vision_in_bytes + vision_out_bytes + _nbytes(prefill_leaves) - _nbytes(state_leaves)}
  outputs = {"vision": vision_leaves, "prefill": prefill_leaves}
  param_bytes = _nbytes(abs_state)
  num_params = int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abs_state, nnx.Param))))
  out: dict[str, Any] = {
      "shapes": static_shapes(model_cfg, num_frames=t, seq_len=s, max_new_tokens=max_new_tokens, batch_size=b),
      "num_params": num_params, "param_bytes": param_bytes, "vision_input_bytes": vision_in_bytes,
      "vision_output_bytes": vision_out_bytes, "kv_cache_bytes": _nbytes(cache_leaves),
      "dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype, "attention_asked": model_cfg.attention,
      "attention_block": model_cfg.attention_block, "method": model_cfg.stts.method, "ratio": model_cfg.stts.ratio,
      "backend": jax.default_backend(), "stages": {},
  }
  for name, fn, inputs in (("vision", vision_fn, vision_in), ("prefill", prefill_fn, prefill_in),
                           ("decode", decode_fn, decode_in)):
    if name not in stages:
      continue
    t0 = time.perf_counter()
    with attention_lib.record_choices() as choices:
      # A fresh wrapper: jit/eval_shape cache traces per function, and a cached trace records nothing.
      lowered = jax.jit(lambda *a, _fn=fn, **k: _fn(*a, **k)).lower(abs_state, **inputs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out["stages"][name] = {"bytes": _memory(compiled), "input_bytes": _nbytes(inputs), "held_bytes": held[name],
                           "output_tree_bytes": _nbytes(outputs[name]) if name in outputs else None,
                           "attention": list(choices), "lower_seconds": t1 - t0, "compile_seconds": t2 - t1}
    del compiled, lowered
  out.update(totals(out))
  return out


def totals(result: Mapping[str, Any]) -> dict[str, Any]:
  """Per-stage and overall live bytes (module docstring) from a `compile_inference` result."""
  stages = result["stages"]
  per_stage = {}
  for name, st in stages.items():
    m = st["bytes"]
    unused = max(0, int(result["param_bytes"]) + int(st["input_bytes"]) - m["argument"])
    resident = m["argument"] + unused + int(st["held_bytes"])
    per_stage[name] = {"resident_unused": unused, "resident_args": resident,
                       "args_plus_temps": resident + m["temp"],
                       "with_outputs": resident + m["temp"] + m["output"] - m["alias"]}
  main = [k for k in per_stage if k in STAGES] or list(per_stage)
  apt = max(per_stage[k]["args_plus_temps"] for k in main)
  peak_stage = max(main, key=lambda k: per_stage[k]["with_outputs"])
  peak = per_stage[peak_stage]["with_outputs"]
  peak_all_stage = max(per_stage, key=lambda k: per_stage[k]["with_outputs"])
  peak_all = per_stage[peak_all_stage]["with_outputs"]
  return {"stage_totals_bytes": per_stage,
          "args_plus_temps_bytes": apt, "peak_bytes": peak, "peak_stage": peak_stage,
          "args_plus_temps_gib": apt / GIB, "peak_gib": peak / GIB,
          "peak_all_bytes": peak_all, "peak_all_gib": peak_all / GIB, "peak_all_stage": peak_all_stage}


def summary_row(name: str, result: Mapping[str, Any]) -> dict[str, Any]:
  """One flat table row (GiB) of a `compile_inference` result."""
  sh = result["shapes"]
  row = {"cell": name, "method": result["method"], "ratio": result["ratio"] if result["method"] != "none" else 0.0,
         "dtype": f"{result['param_dtype']}/{result['dtype']}", "frames": sh["frames"], "S": sh["seq_len"],
         "S'": sh["pruned_seq_len"], "kept windows": sh["kept_windows"], "ViT rows": sh["vit_packed_rows"],
         "vit_chunk": sh["vit_chunk"],
         "params GiB": result["param_bytes"] / GIB}
  for stage in ALL_STAGES:
    st = result["stages"].get(stage)
    if st is None:
      continue
    m = st["bytes"]
    row[f"{stage} args"] = m["argument"] / GIB
    row[f"{stage} temps"] = m["temp"] / GIB
    row[f"{stage} outs"] = m["output"] / GIB
    row[f"{stage} total"] = result["stage_totals_bytes"][stage]["with_outputs"] / GIB
  row["args+temps GiB"] = result["args_plus_temps_gib"]
  row["peak GiB (with outputs)"] = result["peak_gib"]
  row["peak stage"] = result["peak_stage"]
  if "decode" in result["stages"]:
    row["peak GiB incl. decode"] = result["peak_all_gib"]
  row["attention"] = attention_summary(result)
  return row


def attention_summary(result: Mapping[str, Any]) -> str:
  """'site: impl' per call site over all compiled stages, e.g. 'vit_frames: blockwise, llm: xla'."""
  seen: dict[str, set] = {}
  for st in result["stages"].values():
    for a in st["attention"]:
      seen.setdefault(a["site"], set()).add(a["impl"])
  return ", ".join(f"{k}: {'/'.join(sorted(v))}" for k, v in seen.items())


__all__ = ["ALL_STAGES", "STAGES", "abstract_model", "attention_summary", "compile_inference", "prompt_seq_len",
           "static_shapes", "summary_row", "totals"]

"""The main job's trained checkpoints under every attention implementation: same logits, same answers.

For each trained model of a main-job workdir (unpruned weights run unpruned; STTS weights run with
their trained pruning), on the first `num_batches` test batches:
  * teacher-forced logits of the whole (pruned) sequence, `forward_video(..., logits=True)`, with
    attention `xla` (the reference) and each other implementation: max |diff| over real tokens;
  * the evaluation path (`Predictor`: vision, prefill into the KV cache, greedy decode): option
    log-probabilities, the chosen option and the generated tokens must be identical.
And a short training check on the same data: `train_steps` steps of the STTS model's train step from
its checkpoint with each implementation (same batches, same rng): the losses must agree within float
tolerance.

Checks: logits within `logit_tol` (1e-4), identical predictions, loss within `loss_rtol`. A failing
check makes `scripts/compare_attention.py` exit non-zero.
"""

import dataclasses
import itertools
import platform
import subprocess
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stts_jax.eval import generate as gen_lib
from stts_jax.eval import predictor as predictor_lib
from stts_jax.experiments import main_job
from stts_jax.models import video_forward, vlm
from stts_jax.train import step as step_lib


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
  except OSError:
    return "unknown"


def _teacher_forced(model, batches, rng_seed: int = 0) -> list[np.ndarray]:
  """Logits of the real tokens of each batch, float32, flattened per batch."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, batch):
    m = nnx.merge(graphdef, state)
    out = video_forward.forward_video(m, batch, rng=jax.random.key(rng_seed), deterministic=True)
    return out.logits.astype(jnp.float32), out.token_mask

  outs = []
  for b in batches:
    dev = {k: jnp.asarray(b[k]) for k in video_forward.BATCH_KEYS}
    logits, mask = run(state, dev)
    outs.append(np.asarray(logits)[np.asarray(mask)])
  return outs


def _predictions(model, batches, max_new_tokens: int) -> dict[str, np.ndarray]:
  pred = predictor_lib.Predictor(max_new_tokens=max_new_tokens)
  rows = [pred(model, b, generate=True, step=i) for i, b in enumerate(batches)]
  keys = ("option_logprobs", "tokens", "valid")
  out = {k: np.concatenate([np.asarray(r[k]) for r in rows]) for k in keys if k in rows[0]}
  out["valid"] = np.concatenate([np.asarray(b.get("valid", np.ones(len(b["input_ids"]), bool))) for b in batches])
  return out


def _train_losses(model, batches, train_cfg, steps: int) -> list[float]:
  """`steps` train steps from `model`'s weights (a fresh optimizer), one batch each; the losses."""
  state = step_lib.TrainState(nnx.merge(*nnx.split(model)), train_cfg)
  graphdef, st = nnx.split(state)

  @jax.jit
  def one(st, batch):
    ts = nnx.merge(graphdef, st)
    metrics = step_lib.train_step(ts, batch, cfg=train_cfg)
    return nnx.state(ts), metrics["loss"]

  losses = []
  for b in itertools.islice(itertools.cycle(batches), steps):
    st, loss = one(st, {k: jnp.asarray(v) for k, v in b.items() if k in video_forward.BATCH_KEYS or k == "timestamps"})
    losses.append(float(loss))
  return losses


def run(config: Any, workdir: str, *, seed: int = 0, impls=("auto", "blockwise"), num_batches: int = 4,
        train_steps: int = 3, logit_tol: float = 1e-4, loss_rtol: float = 1e-5,
        attention_block: Optional[int] = 16, say=print) -> dict[str, Any]:
  """Runs the checks (module docstring) on the main job in `workdir` (its runs must exist).

  attention_block: block length for `blockwise` (small, so the demo's short sequences span several
  blocks and the block loops, skipping and padding are exercised).
  """
  job = main_job.make_job(config, workdir, say=say)
  batches = list(itertools.islice(main_job._test_data(job).batches(), num_batches))
  if not batches:
    raise ValueError(f"attention check: no test batches in {workdir}")
  result: dict[str, Any] = {"workdir": workdir, "seed": seed, "num_batches": len(batches),
                            "examples": int(sum(len(b["input_ids"]) for b in batches)), "impls": list(impls),
                            "attention_block": attention_block, "logit_tol": logit_tol, "loss_rtol": loss_rtol,
                            "commit": _commit(), "machine": f"{platform.node()} ({platform.machine()}, "
                            f"{jax.device_count()} {jax.default_backend()} devices)", "models": {}}
  checks = []
  for run_name in main_job.RUNS:
    model, _ = main_job.load_model(job, seed, run_name)
    if run_name == "unpruned":
      model = gen_lib.model_variant(model, method="none", ratio=0.0)
    base = vlm.with_attention(model, "xla")
    t0 = time.time()
    ref_logits = _teacher_forced(base, batches)
    ref_pred = _predictions(base, batches, job.eval.max_new_tokens)
    entry = {"method": model.config.stts.method, "ratio": model.config.stts.ratio, "impls": {}}
    for impl in impls:
      variant = vlm.with_attention(model, impl, attention_block)
      logits = _teacher_forced(variant, batches)
      pred = _predictions(variant, batches, job.eval.max_new_tokens)
      diff = max(float(np.max(np.abs(a - b))) for a, b in zip(logits, ref_logits))
      scale = max(float(np.max(np.abs(a))) for a in ref_logits)
      valid = ref_pred["valid"]
      same_option = bool(np.array_equal(np.argmax(pred["option_logprobs"][valid], -1),
                                        np.argmax(ref_pred["option_logprobs"][valid], -1)))
      same_tokens = bool(np.array_equal(pred["tokens"][valid], ref_pred["tokens"][valid]))
      lp_diff = float(np.max(np.abs(np.nan_to_num(pred["option_logprobs"][valid] - ref_pred["option_logprobs"][valid]))))
      entry["impls"][impl] = {"max_abs_logit_diff": diff, "max_abs_ref_logit": scale,
                              "max_abs_option_logprob_diff": lp_diff, "same_chosen_option": same_option,
                              "same_generated_tokens": same_tokens, "tokens_compared": int(sum(len(a) for a in logits))}
      checks.append({"name": f"{run_name} weights, {impl} vs xla: logits within {logit_tol}", "value": diff,
                     "passed": diff <= logit_tol})
      checks.append({"name": f"{run_name} weights, {impl} vs xla: identical predictions",
                     "value": same_option and same_tokens, "passed": same_option and same_tokens})
      say(f"  {run_name} {impl}: max |logit diff| {diff:.2e} (ref max {scale:.1f}), option logprob diff "
          f"{lp_diff:.2e}, same option {same_option}, same tokens {same_tokens}")
    entry["seconds"] = round(time.time() - t0, 1)
    result["models"][run_name] = entry

  # Training: the STTS model's pruned train step, from its checkpoint, with each implementation.
  model, _ = main_job.load_model(job, seed, "stts")
  train_cfg = dataclasses.replace(job.train, grad_accum=1, skip_nonfinite=False)
  ref_losses = _train_losses(vlm.with_attention(model, "xla"), batches, train_cfg, train_steps)
  result["train"] = {"xla": ref_losses}
  for impl in impls:
    variant = vlm.with_attention(model, impl, attention_block)
    losses = _train_losses(variant, batches, train_cfg, train_steps)
    result["train"][impl] = losses
    rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, ref_losses))
    checks.append({"name": f"stts train loss over {train_steps} steps, {impl} vs xla: rel diff <= {loss_rtol}",
                   "value": rel, "passed": rel <= loss_rtol})
    say(f"  train {impl}: losses {['%.6f' % x for x in losses]} vs xla {['%.6f' % x for x in ref_losses]} "
        f"(max rel diff {rel:.1e})")
  result["checks"] = checks
  result["passed"] = all(c["passed"] for c in checks)
  return result


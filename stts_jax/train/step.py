"""One training step on NNX objects: forward, loss, gradients (with in-step accumulation),
non-finite guard, optimizer update. Pure of host state; the loop jits it once.

loss = sum over answer tokens of CE / (answer tokens in the global batch)
       + aux_weight * temporal aux loss (DESIGN.md section 3.10)
       [+ policy_gradient * mean over videos of (CE_v - mean CE) * log p(drop order_v)  (optional)].

The CE (`TrainConfig.loss`): "answer" runs the LM head only at the answer positions (`train/loss.py`:
the first `max_answer_tokens` of each example gathered, with an exact chunked fallback for longer
answers), never a [B, S, V] tensor; "full" computes the logits of every position as the model's
plain forward does (before/after measurements and parity).
"""

import functools
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from stts_jax.models import partitioning
from stts_jax.models import video_forward
from stts_jax.train import loss as loss_lib
from stts_jax.train import optim
from stts_jax.train.config import TrainConfig

# forward(model, batch, *, rng, deterministic) -> VideoOutput (with `logits`); with loss "answer" it is
# called with `logits=False` as well and must return `hidden [B, S, E]` and `lm_head [E, V]` instead.
Forward = Callable[..., Any]


class Counter(nnx.Variable):
  """Integer training counters (not trained, not in the optimizer)."""


class TrainState(nnx.Module):
  """Everything a step changes and a checkpoint stores: model, optimizer, counters.

  step: steps run (applied or skipped); skipped: steps whose update was dropped as non-finite.
  `optimizer.step` counts applied updates (it drives the learning-rate schedule).
  """

  def __init__(self, model: nnx.Module, cfg: TrainConfig):
    self.model = model
    self.optimizer = optim.make_optimizer(model, cfg)
    self.step = Counter(jnp.zeros((), jnp.int32))
    self.skipped = Counter(jnp.zeros((), jnp.int32))


def answer_cross_entropy(logits_bsv: Float[Array, "B S V"], target_ids_bs: Int[Array, "B S"],
                         loss_mask_bs: Bool[Array, "B S"]) -> Float[Array, ""]:
  """Sum of float32 cross entropy over positions where `loss_mask` is True (full logits given)."""
  return loss_lib.full_cross_entropy(logits_bsv, target_ids_bs, loss_mask_bs)


def cross_entropy(forward: Forward, model: nnx.Module, mb: dict[str, jax.Array], rng: jax.Array,
                   cfg: TrainConfig) -> tuple[Any, jax.Array, jax.Array]:
  """(forward output, CE sum over the loss positions, 1.0 if the chunked CE fallback ran)."""
  if cfg.loss == "full":
    out = forward(model, mb, rng=rng, deterministic=False)
    return out, answer_cross_entropy(out.logits, out.target_ids, out.loss_mask), jnp.zeros((), jnp.float32)
  out = forward(model, mb, rng=rng, deterministic=False, logits=False)
  if getattr(out, "hidden", None) is None or getattr(out, "lm_head", None) is None:
    raise ValueError("train.loss='answer': the forward must return `hidden` [B, S, E] and `lm_head` [E, V] "
                     "when called with logits=False (or set train.loss='full')")
  ce, fell_back = loss_lib.answer_cross_entropy(out.hidden, out.lm_head, out.target_ids, out.loss_mask,
                                                max_tokens=cfg.max_answer_tokens)
  return out, ce, fell_back


def _microbatches(batch: dict[str, jax.Array], num_micro: int) -> dict[str, jax.Array]:
  """[B, ...] -> [A, B/A, ...], microbatch a = rows a, a+A, a+2A, ... so every device's
  contiguous block of the batch holds rows of every microbatch (no resharding)."""
  out = {}
  for key, x in batch.items():
    b = x.shape[0]
    if b % num_micro:
      raise ValueError(f"batch field {key!r}: batch {b} not divisible by grad_accum={num_micro}")
    out[key] = jnp.moveaxis(x.reshape(b // num_micro, num_micro, *x.shape[1:]), 1, 0)
  return out


def _constrain_batch(mb: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return {k: partitioning.constrain(v, ("act_batch",) + (None,) * (v.ndim - 1)) for k, v in mb.items()}


def _accum_dtype(cfg: TrainConfig, param: jax.Array):
  """The accumulator dtype of one parameter: `cfg.accum_dtype` for floating parameters (float32
  keeps the parameter's own dtype), else the parameter's."""
  if cfg.accum_dtype == "float32" or not jnp.issubdtype(param.dtype, jnp.floating):
    return param.dtype
  return jnp.dtype(cfg.accum_dtype)


def _apply_update(optimizer: nnx.Optimizer, model: nnx.Module, grads: Any) -> None:
  optimizer.update(model, grads)


def _skip_update(optimizer: nnx.Optimizer, model: nnx.Module, grads: Any) -> None:
  del optimizer, model, grads


def _dense_fallback(model: nnx.Module, out: Any) -> jax.Array:
  """1.0 if this forward pruned but ran the dense ViT fallback (`VideoOutput.packed` False), else 0.0
  (also for unpruned models and forwards without a `packed` field)."""
  packed = getattr(out, "packed", None)
  config = getattr(model, "config", None)
  if packed is None or config is None or not config.stts.prunes:
    return jnp.zeros((), jnp.float32)
  return jnp.logical_not(packed).astype(jnp.float32)


def aux_weight_at(cfg: TrainConfig, step: jax.Array) -> jax.Array:
  """The aux loss's weight at optimizer step `step` (0-based): `aux_weight`, or with `aux_decay_steps`
  n > 0 falling linearly to 0 at step n."""
  if cfg.aux_decay_steps == 0:
    return jnp.asarray(cfg.aux_weight, jnp.float32)
  frac = jnp.clip(1.0 - step.astype(jnp.float32) / cfg.aux_decay_steps, 0.0, 1.0)
  return jnp.float32(cfg.aux_weight) * frac


def policy_term(out: Any, cfg: TrainConfig) -> jax.Array:
  """REINFORCE surrogate of `train.policy_gradient`: mean over the videos of a (micro)batch of
  stop_gradient(CE_v - mean CE) * log p(drop order_v), CE_v the video's mean CE per answer token
  (the reward's baseline is the batch mean, so a batch whose samples all answer alike teaches
  nothing). 0 when off or when the forward sampled no keep masks (no learned scorer)."""
  logp = getattr(out, "selection_logp", None)
  if cfg.policy_gradient <= 0 or logp is None:
    return jnp.zeros((), jnp.float32)
  ce_b = jax.lax.stop_gradient(loss_lib.example_cross_entropy(
      out.hidden, out.lm_head, out.target_ids, out.loss_mask, max_tokens=cfg.max_answer_tokens))
  has_answer = jnp.any(out.loss_mask, axis=-1)
  n = jnp.maximum(jnp.sum(has_answer), 1).astype(jnp.float32)
  advantage = jnp.where(has_answer, ce_b - jnp.sum(jnp.where(has_answer, ce_b, 0.0)) / n, 0.0)
  return jnp.sum(advantage * logp) / n


def train_step(state: TrainState, batch: dict[str, jax.Array], *, cfg: TrainConfig,
               forward: Optional[Forward] = None) -> dict[str, jax.Array]:
  """Runs one step in place on `state`; returns scalar metrics.

  batch: the device batch (global arrays), fields as the data pipeline's (`input_ids [B, S]`,
  `loss_mask [B, S]`, `frame_mask [B, T]`, `patches [B, T, P, 588]`, ...). `loss_mask` counts the
  answer tokens that normalise the loss (pruning never removes answer tokens). Example-packed rows
  (`data.pack_examples`: several examples per row, `token_example`, `frame_example`, per-slot `[B, V]`
  fields) run through the same step: the loss stays per token over the whole batch.
  forward: `forward(model, batch, *, rng, deterministic)` returning an object with `logits`,
  `target_ids`, `loss_mask`, `aux_loss`, `keep_mask`, `num_truncated` (as
  `video_forward.VideoOutput`); default `video_forward.forward_video`.
  Metrics: loss, ce, aux_loss, aux_weight (`aux_weight_at` this step), policy (`policy_term`), kept_ratio (kept / real
  windows), loss_tokens, truncated_tokens (LLM tokens cut by the static length; should stay 0),
  dense_fallback (microbatches whose kept patches did not fit the static packed rows and ran the
  exact but slower dense ViT; should stay near 0, else raise `stts.num_rows`), ce_fallback (microbatches with an example of more than
  `max_answer_tokens` answer tokens, whose exact CE ran chunked over the whole sequence; should stay
  near 0, else raise `train.max_answer_tokens`), grad_norm (before clipping), lr,
  lr_scorer, lr_vision, skipped (this step), skipped_total, step.
  """
  forward = forward or video_forward.forward_video
  # Passed only when set: forwards without a scorer (toy models, tests) need not take the arguments.
  if cfg.aux_gradient != "all":
    forward = functools.partial(forward, aux_gradient=cfg.aux_gradient)
  if cfg.random_selection > 0:
    forward = functools.partial(forward, random_selection=cfg.random_selection)
  if cfg.selection_gradient > 0:
    forward = functools.partial(forward, selection_gradient=cfg.selection_gradient)
  if cfg.policy_gradient > 0:
    forward = functools.partial(forward, policy_temperature=cfg.policy_temperature)
  model, optimizer = state.model, state.optimizer
  num_micro = cfg.grad_accum
  rng = jax.random.fold_in(jax.random.key(cfg.seed), state.step[...])
  normalizer = jnp.maximum(jnp.sum(batch["loss_mask"]), 1).astype(jnp.float32)
  aux_weight = aux_weight_at(cfg, state.step[...])
  graphdef, params, rest = nnx.split(model, optimizer.wrt, ...)

  def micro_loss(params_, mb, micro_rng):
    m = nnx.merge(graphdef, params_, rest, copy=True)
    out, ce_sum, ce_fallback = cross_entropy(forward, m, mb, micro_rng, cfg)
    aux = jnp.asarray(out.aux_loss, jnp.float32)
    loss = ce_sum / normalizer + aux_weight * aux / num_micro
    pg = policy_term(out, cfg)
    loss = loss + cfg.policy_gradient * pg / num_micro
    keep = out.keep_mask & mb["frame_mask"][:, :, None]
    stats = {"ce_sum": ce_sum, "aux_loss": aux / num_micro,
             "kept_windows": jnp.sum(keep).astype(jnp.float32),
             "valid_windows": (jnp.sum(mb["frame_mask"]) * keep.shape[-1]).astype(jnp.float32),
             "loss_tokens": jnp.sum(out.loss_mask).astype(jnp.float32),
             "truncated_tokens": jnp.sum(out.num_truncated).astype(jnp.float32),
             "dense_fallback": _dense_fallback(m, out), "ce_fallback": ce_fallback, "policy": pg / num_micro}
    return loss, stats

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  if num_micro == 1:
    (loss, stats), grads = grad_fn(params, _constrain_batch(batch), rng)
  else:
    micro = _microbatches(batch, num_micro)

    def body(carry, xs):
      i, mb = xs
      (l, st), g = grad_fn(params, _constrain_batch(mb), jax.random.fold_in(rng, i))
      acc_loss, acc_stats, acc_grads = carry
      return (acc_loss + l, jax.tree.map(jnp.add, acc_stats, st),
              jax.tree.map(lambda a, x: a + x.astype(a.dtype), acc_grads, g)), None

    zeros_stats = {k: jnp.zeros((), jnp.float32) for k in
                   ("ce_sum", "aux_loss", "kept_windows", "valid_windows", "loss_tokens",
                    "truncated_tokens", "dense_fallback", "ce_fallback", "policy")}
    zeros_grads = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=_accum_dtype(cfg, p)), params)
    (loss, stats, grads), _ = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros_stats, zeros_grads),
        (jnp.arange(num_micro), micro))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  lr = {name: sched(optimizer.step[...]) for name, sched in optim.schedules(cfg).items()}
  if cfg.skip_nonfinite:
    nnx.cond(ok, _apply_update, _skip_update, optimizer, model, grads)
  else:
    optimizer.update(model, grads)
  skipped = jnp.logical_not(ok).astype(jnp.int32) if cfg.skip_nonfinite else jnp.zeros((), jnp.int32)
  state.skipped[...] += skipped
  state.step[...] += 1
  return {
      "loss": loss,
      "ce": stats["ce_sum"] / normalizer,
      "aux_loss": stats["aux_loss"],
      "aux_weight": aux_weight,
      "kept_ratio": stats["kept_windows"] / jnp.maximum(stats["valid_windows"], 1.0),
      "loss_tokens": stats["loss_tokens"],
      "truncated_tokens": stats["truncated_tokens"],
      "dense_fallback": stats["dense_fallback"],
      "ce_fallback": stats["ce_fallback"],
      "policy": stats["policy"],
      "grad_norm": grad_norm,
      "lr": lr["main"],
      "lr_scorer": lr["scorer"],
      "lr_vision": lr["vision"],
      "skipped": skipped,
      "skipped_total": state.skipped[...],
      "step": state.step[...],
  }

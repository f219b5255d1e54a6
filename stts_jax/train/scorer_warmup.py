"""Scorer warm-up: fit a freshly initialised STTS scorer to the temporal aux target before training.

  warm_up_scorer(model, batches, steps=..., learning_rate=...) -> summary dict

Why. The aux loss (DESIGN.md 3.10) is not detached: its gradient also moves the ViT blocks that
produce the target 1 - cos(v[t-1, w], v[t, w]). A fresh scorer outputs ~0.5 everywhere while the
target of a still video is ~0.02, so the first few hundred joint steps push the early blocks to
*decorrelate* consecutive frames, which erases what a pretrained tower encodes (on the demo: the
event recall of the pretrained tower fell from 99% to 1-11% in the STTS runs, none in the unpruned
ones). Fitting the scorer alone first (ViT frozen, only blocks 0..prune_at evaluated, a few percent
of a train step each) starts joint training with the aux residual already small. This changes the
initialisation only; the loss and the joint training are the authors'.

The warm-up reads the first `steps` batches of the training iterator and the caller rewinds it
(`loop.run` restores the iterator state), so the main phase sees exactly the batches an unpruned run
of the same seed sees.
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stts_jax.models import aux_loss as aux_lib
from stts_jax.models import example_packing
from stts_jax.models import scorer as scorer_lib
from stts_jax.models import video_forward as vf


def scorer_aux_loss(model: nnx.Module, patches: jax.Array, frame_mask: jax.Array,
                    frame_example: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """(aux loss, scores [B, T, W]) of `model.scorer` on ViT block `prune_at` features, which are
  treated as constants (no gradient reaches the ViT). patches [B, T, P, I] (uint8 or float pixels).
  frame_example [B, T]: example-packed rows (each video's first frame has no previous frame)."""
  cfg = model.config
  st = cfg.stts
  b, t, p, i = patches.shape
  grid_hw, window = (cfg.vit.grid, cfg.vit.grid), tuple(st.window)
  hidden = model.vit.embed(vf.normalize_patches(patches).reshape(b * t, p, i))
  hidden, _ = model.vit.run_blocks(hidden, 0, st.prune_at + 1)
  hidden = jax.lax.stop_gradient(hidden.reshape(b, t, p, -1))
  first = None if frame_example is None else example_packing.first_frames(frame_mask, frame_example)
  scores = scorer_lib.window_scores(model.scorer, hidden, grid_hw, window, first)
  return aux_lib.temporal_aux_loss_batched(scores, hidden, frame_mask, grid_hw, window, first=first), scores


SCORER_PARAMS = nnx.All(nnx.Param, nnx.PathContains("scorer"))


@nnx.jit
def _step(model, optimizer, patches, frame_mask, frame_example=None):
  loss_fn = lambda m: scorer_aux_loss(m, patches, frame_mask, frame_example)[0]
  loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, SCORER_PARAMS))(model)
  optimizer.update(model, grads)
  return loss


def warm_up_scorer(model: nnx.Module, batches: Iterable[Mapping[str, Any]], *, steps: int, learning_rate: float,
                   shard: Optional[Callable[[Mapping[str, np.ndarray]], Mapping[str, jax.Array]]] = None,
                   progress: Optional[Callable[[int], Any]] = None,
                   barrier: Optional[Callable[[], None]] = None) -> dict[str, Any]:
  """Trains `model.scorer` in place (Adam, constant `learning_rate`) for `steps` batches of
  `batches` (dicts with `patches` [B, T, P, I] and `frame_mask` [B, T]); every other parameter
  is left untouched. `shard` places a host batch on devices (default: as is). `barrier`
  (multi-process runs): called after the step is compiled and before it first runs, so processes
  whose compile times differ meet at its first collective together.
  Returns {"steps", "aux_loss_first", "aux_loss_last"} (means over the first / last min(10, steps // 2)
  steps, one step each when steps < 4)."""
  if model.scorer is None:
    raise ValueError("scorer warm-up: the model has no STTS scorer (stts.method must be 'stts')")
  if steps < 1 or not learning_rate > 0:
    raise ValueError(f"scorer warm-up: need steps >= 1 and learning_rate > 0, got {steps}, {learning_rate}")
  optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=SCORER_PARAMS)
  losses = []
  it = iter(batches)
  for _ in range(steps):
    try:
      batch = next(it)
    except StopIteration:
      raise ValueError(f"scorer warm-up: the data ran out after {len(losses)} of {steps} batches") from None
    fields = {"patches": batch["patches"], "frame_mask": batch["frame_mask"]}
    if "frame_example" in batch:   # example-packed rows
      fields["frame_example"] = batch["frame_example"]
    fields = shard(fields) if shard is not None else {k: jnp.asarray(v) for k, v in fields.items()}
    args = (fields["patches"], fields["frame_mask"], fields.get("frame_example"))
    if barrier is not None and not losses:
      _step.lower(model, optimizer, *args).compile()
      barrier()
    losses.append(_step(model, optimizer, *args))
    if progress is not None:
      progress(1)
  losses = [float(x) for x in jax.device_get(losses)]
  k = max(1, min(10, len(losses) // 2))
  return {"steps": steps, "aux_loss_first": float(np.mean(losses[:k])), "aux_loss_last": float(np.mean(losses[-k:]))}


__all__ = ["scorer_aux_loss", "warm_up_scorer"]

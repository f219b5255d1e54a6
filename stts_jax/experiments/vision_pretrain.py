"""Stage 0 of the main job: pretrain the demo model's vision tower (ViT + adapter) on window tags.

Why. Molmo2 (and the STTS paper) start from a pretrained SigLIP tower; the demo model is tiny and
random, and nothing may be downloaded. Trained end to end from scratch on the default dataset, its
LLM never finds the event (accuracy stays at chance for 600+ steps): at init every vision token
carries background content whose variation dwarfs the event's, and the answer position cannot learn
where to attend before the ViT has learnt what to show it. Measured on the default dataset: the
same 2-layer LLM learns "when" questions in ~250 steps from clean per-window event codes, and a
linear probe learns the event window from the ViT in ~75 steps, but the two together stay at chance.
So, like a real VLM, the demo gets a pretrained vision tower: a few hundred steps of dense
regression of every pooled window token onto a code of what the window shows, built from the
renderer's metadata (the dataset's own labels, no question or answer):

  target[t, w] = class_codes[tag[t, w]] + position_codes[w]
  tag: 0 nothing rendered, 1 the framed picture (event), 2 a flashing unframed decoy

`position_codes` make "where" readable from a token, as positional features of a real ViT do;
`class_codes[0]` is zero, so plain footage maps to its position code alone. Both trained runs of
the job (unpruned and STTS) start from the same tower and fine-tune it at a tenth of the LLM's rate.

`pruned_ratio` > 0 also regresses the tower's tokens when it runs the way a pruned model runs it
(blocks after `prune_at` on the kept windows only, here a *random* half of them, so no scorer is
favoured) and sums both losses. Without it the tower's codes hold only in the full-context path:
measured on the demo, the event code was recognised in 99.5% of event windows unpruned but in 33%
with half the windows dropped after block 0, so the STTS run had to re-learn its tower first.

  params = pretrain(model_cfg, data_cfg, cfg, out_dir)   # reuses out_dir/vision.npz if complete
  model = load_into(vlm.Molmo2(model_cfg, rngs=...), params)
"""

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float, Int

from stts_jax import config as config_lib
from stts_jax.data import pipeline
from stts_jax.models import video_forward as vf
from stts_jax.parallel import sharding

log = logging.getLogger(__name__)
TAGS = ("none", "event", "decoy")
PARAM_PREFIXES = ("vit/", "adapter/")
FILE = "vision.npz"


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """steps / learning_rate / batch_size: Adam on the ViT + adapter only.
  tag_weight: loss weight of tagged (event, decoy) windows against 1 for plain ones (they are ~3%).
  code_scale / position_scale: RMS of the class and position codes (the adapter output of the random
  tower is ~10 RMS; codes of a few units are easy to reach and dominate the LLM's RMS-normed input).
  event_weight: loss weight of event windows (0: `tag_weight`, as decoys). The recolour variant
  has 1-2 event windows against up to 30-63 decoy windows (framed faces; the event is one of them,
  yellow), so at `tag_weight` the regression settles on "framed face -> decoy code" and never tells
  the event apart.
  freeze_vit_blocks: n > 0 leaves the ViT embeddings and blocks 0..n-1 at their random
  initialisation (`optim.zero_early_vit`), so the features that scorers and the heuristic read are
  not taught the event.
  """
  steps: int = 200
  learning_rate: float = 1e-3
  batch_size: int = 16
  tag_weight: float = 20.0
  code_scale: float = 3.0
  position_scale: float = 1.0
  pruned_ratio: float = 0.0
  seed: int = 0
  freeze_vit_blocks: int = 0
  event_weight: float = 0.0

  def validate(self) -> "PretrainConfig":
    if self.steps < 0 or self.batch_size < 1 or self.learning_rate <= 0:
      raise ValueError(f"vision pretraining: need steps >= 0, batch_size >= 1, learning_rate > 0; got {self}")
    if not 0.0 <= self.pruned_ratio < 1.0:
      raise ValueError(f"vision pretraining: pruned_ratio must be in [0, 1), got {self.pruned_ratio}")
    if self.event_weight < 0:
      raise ValueError(f"vision pretraining: event_weight must be >= 0, got {self.event_weight}")
    if self.freeze_vit_blocks < 0:
      raise ValueError(f"vision pretraining: freeze_vit_blocks must be >= 0, got {self.freeze_vit_blocks}")
    return self


def window_tags(extra: Mapping[str, Any], num_frames: int, windows_per_frame: int) -> Int[np.ndarray, "K"]:
  """Tag of every (frame, window) of one default-dataset clip, flat in (t, w) order [T * W]."""
  tags = np.zeros(num_frames * windows_per_frame, np.int32)
  for t, w in extra.get("decoys", ()):
    if t < num_frames:
      tags[t * windows_per_frame + w] = TAGS.index("decoy")
  for t in extra["event_frames"]:
    if t < num_frames:
      tags[t * windows_per_frame + int(extra["event_window"])] = TAGS.index("event")
  return tags


def target_codes(width: int, windows_per_frame: int, cfg: PretrainConfig) -> tuple[np.ndarray, np.ndarray]:
  """(class codes [3, E] with a zero "none" row, position codes [W, E]); fixed by `cfg.seed`."""
  rng = np.random.default_rng([cfg.seed, 7])
  classes = rng.standard_normal((len(TAGS), width)).astype(np.float32) * cfg.code_scale
  classes[0] = 0.0
  positions = rng.standard_normal((windows_per_frame, width)).astype(np.float32) * cfg.position_scale
  return classes, positions


def window_targets(tags_bk: Int[Array, "B K"], classes: Float[Array, "3 E"],
                   positions: Float[Array, "W E"]) -> Float[Array, "B K E"]:
  w = positions.shape[0]
  pos_k = jnp.tile(positions, (tags_bk.shape[1] // w, 1))
  return classes[tags_bk] + pos_k[None]


def vision_params(model: nnx.Module) -> dict[str, np.ndarray]:
  """The ViT and adapter parameters as {path: array}."""
  out = {}
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = sharding.path_str(path)
    if name.startswith(PARAM_PREFIXES):
      out[name] = np.asarray(jax.device_get(value[...]))
  return out


def load_into(model: nnx.Module, params: Mapping[str, np.ndarray]) -> nnx.Module:
  """Copies `params` ({path: array}, from `vision_params`) into `model`; every ViT/adapter
  parameter must be present with its shape."""
  seen = set()
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = sharding.path_str(path)
    if not name.startswith(PARAM_PREFIXES):
      continue
    if name not in params:
      raise ValueError(f"pretrained vision tower lacks {name!r}")
    value = params[name]
    if tuple(value.shape) != tuple(var[...].shape):
      raise ValueError(f"pretrained vision tower: {name} has shape {value.shape}, model wants {var[...].shape}")
    var[...] = jnp.asarray(value, var[...].dtype)
    seen.add(name)
  extra = sorted(set(params) - seen)
  if extra:
    raise ValueError(f"pretrained vision tower has parameters the model lacks: {extra[:5]}")
  return model


def save(params: Mapping[str, np.ndarray], path: str, meta: Mapping[str, Any]) -> None:
  """Atomic write of the arrays plus a JSON summary under the key `__meta__`."""
  tmp = path + ".tmp.npz"
  np.savez(tmp, __meta__=np.asarray(json.dumps(dict(meta))), **params)
  os.replace(tmp, path)


def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  with np.load(path) as z:
    meta = json.loads(str(z["__meta__"]))
    return {k: z[k] for k in z.files if k != "__meta__"}, meta


class _Tagger(nnx.Module):
  """The tower's window tokens, full context (`model`) and, if given, in the pruned path (`pruned`:
  a view of the same parameters with stts.method 'random')."""

  def __init__(self, model: nnx.Module, pruned: Optional[nnx.Module] = None):
    self.model = model
    self.pruned = pruned

  def __call__(self, patches, frame_mask, rng=None, *, pruned: bool = False):
    """(tokens [B, K, E], valid [B, K], flat window id t*W + w of each slot [B, K]); K = T * W,
    kept windows first in the pruned path."""
    model = self.pruned if pruned else self.model
    k = patches.shape[1] * model.config.windows_per_frame
    vision = vf.vit_features_video(model, patches, frame_mask, rng)
    slots, valid = vf.kept_window_slots(vision.keep_mask_btw, k)
    feats, _ = vf.pool_windows(model, vision, k, slots=(slots, valid))
    return feats, valid, slots


def pretrain(model_cfg: config_lib.ModelConfig, data_cfg: Any, cfg: PretrainConfig, out_dir: str, *,
             progress: Optional[Callable[[int], Any]] = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Pretrains the vision tower of an unpruned copy of `model_cfg` (and, with `cfg.pruned_ratio`, of
  a randomly pruned view sharing its parameters) on `data_cfg`'s train split
  (a default-dataset layout: manifests with event/decoy metadata) and saves it to
  `out_dir/vision.npz`; a complete file made with the same settings is reused.
  Returns (params, summary)."""
  from stts_jax.models import vlm
  cfg.validate()
  path = os.path.join(out_dir, FILE)
  pretrain_settings = dataclasses.asdict(cfg)
  for field in ("freeze_vit_blocks", "event_weight"):   # towers saved before these existed stay reusable
    if not pretrain_settings[field]:
      pretrain_settings.pop(field)
  settings = {"pretrain": pretrain_settings, "model": config_lib.to_dict(model_cfg), "data": data_cfg.path}
  settings = json.loads(json.dumps(settings))
  if os.path.isfile(path):
    params, meta = load(path)
    if meta.get("settings") == settings:
      return params, dict(meta, status="reused")
    raise ValueError(f"{path} was pretrained with other settings; use another workdir or delete it")
  os.makedirs(out_dir, exist_ok=True)
  dense_cfg = dataclasses.replace(model_cfg, stts=dataclasses.replace(model_cfg.stts, method="none", num_rows=None))
  model = vlm.Molmo2(dense_cfg, rngs=nnx.Rngs(cfg.seed))
  pruned = None
  if cfg.pruned_ratio > 0:
    from stts_jax.eval import generate
    pruned = generate.model_variant(model, method="random", ratio=cfg.pruned_ratio,
                                    num_rows=model_cfg.stts.num_rows if cfg.pruned_ratio == model_cfg.stts.ratio
                                    else None)
  tagger = _Tagger(model, pruned)
  trainable = nnx.All(nnx.Param, lambda p, _: sharding.path_str(p).startswith(("model/vit/", "model/adapter/")))
  tx = optax.adam(cfg.learning_rate)
  if cfg.freeze_vit_blocks:
    from stts_jax.train import optim
    tx = optax.chain(optim.zero_early_vit(cfg.freeze_vit_blocks), tx, optim.zero_early_vit(cfg.freeze_vit_blocks))
  optimizer = nnx.Optimizer(tagger, tx, wrt=trainable)
  w = model_cfg.windows_per_frame
  classes, positions = (jnp.asarray(a) for a in target_codes(model_cfg.llm.hidden_size, w, cfg))

  def path_loss(t, patches, frame_mask, tags, rng, pruned):
    feats, valid, slots = t(patches, frame_mask, rng, pruned=pruned)
    slot_tags = jnp.take_along_axis(tags, slots, axis=1)
    positions_k = positions[slots % w]
    tag_weights = jnp.asarray([1.0, cfg.event_weight or cfg.tag_weight, cfg.tag_weight], jnp.float32)
    weight = tag_weights[slot_tags][..., None] * valid[..., None]
    err = jnp.sum(weight * (feats - classes[slot_tags] - positions_k) ** 2)
    loss = err / jnp.maximum(jnp.sum(weight) * feats.shape[-1], 1.0)
    # Event windows whose nearest class code (after removing the position code) is "event".
    nearest = jnp.argmin(jnp.sum(((feats - positions_k)[..., None, :] - classes) ** 2, -1), -1)
    is_event = (slot_tags == 1) & valid
    hits = jnp.sum((nearest == 1) & is_event)
    return loss, hits, jnp.sum(is_event)

  @nnx.jit
  def step(tagger, optimizer, patches, frame_mask, tags, rng):
    def loss_fn(t):
      loss, hits, events = path_loss(t, patches, frame_mask, tags, None, False)
      out = {"loss": loss, "event_recall": hits / jnp.maximum(events, 1)}
      if t.pruned is not None:
        p_loss, p_hits, p_events = path_loss(t, patches, frame_mask, tags, rng, True)
        loss = loss + p_loss
        out.update(pruned_loss=p_loss, pruned_event_recall=p_hits / jnp.maximum(p_events, 1))
      return loss, out
    (_, out), grads = nnx.value_and_grad(loss_fn, has_aux=True, argnums=nnx.DiffState(0, trainable))(tagger)
    optimizer.update(tagger, grads)
    return out

  it = pipeline.train_iterator(dataclasses.replace(data_cfg, batch_size=cfg.batch_size, shuffle_seed=cfg.seed),
                               model_cfg.tokens)
  t0 = time.time()
  history = []
  with open(os.path.join(out_dir, "metrics.jsonl"), "w") as metrics:
    for i in range(cfg.steps):
      batch = next(it)
      t = batch["frame_mask"].shape[1]
      tags = np.stack([window_tags(it.example(int(e)).extra, t, w) for e in batch["example_id"]])
      out = step(tagger, optimizer, jnp.asarray(batch["patches"]), jnp.asarray(batch["frame_mask"]),
                 jnp.asarray(tags), jax.random.fold_in(jax.random.key(cfg.seed), i))
      if (i + 1) % 10 == 0 or i + 1 == cfg.steps:
        rec = {"step": i + 1, **{k: float(v) for k, v in out.items()}}
        history.append(rec)
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()
      if progress is not None:
        progress(1)
  params = vision_params(model)
  last = history[-1] if history else {}
  meta = {"settings": settings, "steps": cfg.steps, "seconds": round(time.time() - t0, 1),
          "final_loss": last.get("loss"), "final_event_recall": last.get("event_recall"),
          "final_pruned_event_recall": last.get("pruned_event_recall")}
  save(params, path, meta)
  return params, dict(meta, status="trained")


__all__ = ["PretrainConfig", "TAGS", "FILE", "window_tags", "target_codes", "window_targets", "vision_params",
           "load_into", "save", "load", "pretrain"]

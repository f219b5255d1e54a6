"""A small NNX video LM with the forward_video output contract, for loop-mechanics tests
(sharding, accumulation, resume, non-finite skip) independent of the Molmo2 model."""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from stts_jax import config as config_lib
from stts_jax.models import partitioning

names = partitioning.with_names
init = nnx.initializers.normal(0.02)


@dataclasses.dataclass
class ToyOutput:
  logits: Optional[jax.Array]
  target_ids: jax.Array
  loss_mask: jax.Array
  aux_loss: jax.Array
  keep_mask: jax.Array
  scores: jax.Array
  num_kept: jax.Array
  num_truncated: jax.Array
  hidden: Optional[jax.Array] = None     # [B, S, E] (logits=False)
  lm_head: Optional[jax.Array] = None    # [E, V] (logits=False)


class ToyVideoLM(nnx.Module):
  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs, width: int = 32):
    pix = cfg.vit.patch_size ** 2 * 3
    v = cfg.llm.embed_rows
    self.cfg = cfg
    self.embed = nnx.Param(names(init, ("vocab", "embed"))(rngs.params(), (v, width)))
    self.patch = nnx.Param(names(init, ("patch_in", "vit_embed"))(rngs.params(), (pix, width)))
    self.scorer = nnx.Param(names(init, ("scorer_in", None))(rngs.params(), (width, 1)))
    self.up = nnx.Param(names(init, ("embed", "mlp"))(rngs.params(), (width, 4 * width)))
    self.down = nnx.Param(names(init, ("mlp", "embed"))(rngs.params(), (4 * width, width)))
    self.norm = nnx.Param(names(nnx.initializers.ones_init(), ("norm",))(rngs.params(), (width,)))
    self.head = nnx.Param(names(init, ("embed", "vocab"))(rngs.params(), (width, v)))


def toy_forward(model: ToyVideoLM, batch, *, rng=None, deterministic=True, logits=True) -> ToyOutput:
  del rng, deterministic
  cfg = model.cfg
  w = cfg.windows_per_frame
  pix = batch["patches"].astype(jnp.float32) / 255.0                       # [B, T, P, 588]
  b, t, p, _ = pix.shape
  win = pix.reshape(b, t, w, p // w, -1).mean(axis=3)                       # [B, T, W, 588]
  feat_btwe = jnp.tanh(win @ model.patch[...])
  scores = jax.nn.sigmoid((feat_btwe @ model.scorer[...])[..., 0])          # [B, T, W]
  frame_feat = jnp.sum(feat_btwe.mean(axis=2) * batch["frame_mask"][..., None], axis=1)
  frame_feat = frame_feat / jnp.maximum(batch["frame_mask"].sum(1, keepdims=True), 1)
  x = model.embed[...][batch["input_ids"]] + frame_feat[:, None, :]         # [B, S, E]
  x = partitioning.constrain(x, ("act_batch", "act_seq", "act_embed"))
  hidden = jax.nn.gelu(x @ model.up[...])
  hidden = partitioning.constrain(hidden, ("act_batch", "act_seq", "act_mlp"))
  x = x + hidden @ model.down[...]
  x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * model.norm[...]
  head = dict(logits=x @ model.head[...]) if logits else dict(logits=None, hidden=x, lm_head=model.head[...])
  target = jnp.abs(win[:, 1:] - win[:, :-1]).mean(-1)                      # [B, T-1, W]
  aux = jnp.mean(jnp.square(scores[:, 1:] - target))
  keep = jnp.ones((b, t, w), bool) & batch["frame_mask"][..., None]
  return ToyOutput(**head, target_ids=batch["target_ids"], loss_mask=batch["loss_mask"],
                   aux_loss=aux, keep_mask=keep, scores=scores, num_kept=keep.sum((1, 2)),
                   num_truncated=jnp.zeros((b,), jnp.int32))

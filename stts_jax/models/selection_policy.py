"""A sampled keep mask and its log-probability: the scorer as a policy over which windows to drop.

Training switch `train.policy_gradient` (demo models only; the authors train the scorer through the
soft key bias and the aux loss alone, DESIGN.md 3.10). Why: neither of those tells the scorer which
windows the *answer* needs. The soft bias only says how block prune_at+1 should attend, and the aux
target is the heuristic itself, which is wrong wherever a distractor changes more than the event.
A REINFORCE estimator does: each training video drops a sample of windows drawn from the scorer's
own ranking, and windows whose sample gave a lower answer loss than the batch's mean become more
likely to be kept.

The distribution (Plackett-Luce over the drop candidates, frames 1.. of each video; frame 0 is never
dropped, as `pruning.budget_keep_mask_batched`): logits l = -logit(s) / temperature for score s in
(0, 1); windows are dropped one at a time, each with probability exp(l_i) / sum over the windows still
there. Sampling it is Gumbel-top-k: the `n` lowest of logit(s) / temperature - Gumbel noise are
dropped, exactly what `budget_keep_mask_batched` does with those keys in place of the scores. The
log-probability of the drop order that the noise drew is

  log p = sum_{i < n} [ l_{pi(i)} - logsumexp_{j >= i} l_{pi(j)} ]   (pi: candidates by key, ascending),

a sum over the sampled order rather than over the unordered set (every order of the same set gives the
same keep mask); its gradient is still an unbiased policy gradient for the ordered sampler.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

_SCORE_EPS = 1e-6   # sigmoid scores saturate to 0 or 1 in float32; logit needs them inside (0, 1)
_NEVER = -1e9


def score_logits(scores_btw: Float[Array, "B T W"], temperature: float) -> Float[Array, "B T W"]:
  """logit(s) / temperature, float32 (the keep side: higher keeps)."""
  s = jnp.clip(scores_btw.astype(jnp.float32), _SCORE_EPS, 1.0 - _SCORE_EPS)
  return (jnp.log(s) - jnp.log1p(-s)) / jnp.float32(temperature)


def sample_keys(scores_btw: Float[Array, "B T W"], rng: jax.Array, temperature: float) -> Float[Array, "B T W"]:
  """Selection keys logit(s) / temperature - Gumbel noise: the budget drops the lowest keys, so the
  drop order is a Plackett-Luce sample with logits -logit(s) / temperature. No gradient flows through
  the keys (the keep mask is discrete)."""
  noise = jax.random.gumbel(rng, scores_btw.shape, jnp.float32)
  return jax.lax.stop_gradient(score_logits(scores_btw, temperature) - noise)


def drop_log_prob(scores_btw: Float[Array, "B T W"], keys_btw: Float[Array, "B T W"],
                  keep_btw: Bool[Array, "B T W"], frame_mask_bt: Bool[Array, "B T"],
                  temperature: float, candidates_btw: Optional[Bool[Array, "B T W"]] = None) -> Float[Array, "B"]:
  """log p of each video's sampled drop order (module docstring); differentiable in `scores_btw`.

  keys_btw: the `sample_keys` that made `keep_btw` (the budget dropped the lowest candidate keys).
  candidates_btw: the windows the budget may drop (default: real frames 1..T-1)."""
  b, t, w = scores_btw.shape
  if candidates_btw is None:
    candidates_btw = (frame_mask_bt & (jnp.arange(t) >= 1))[:, :, None] & jnp.ones((1, 1, w), bool)
  cand_bn = candidates_btw.reshape(b, t * w)
  dropped_b = jnp.sum(cand_bn & ~keep_btw.reshape(b, t * w), axis=-1)
  order_bn = jnp.argsort(jnp.where(cand_bn, keys_btw.reshape(b, t * w), jnp.inf), axis=-1, stable=True)
  drop_logits = -score_logits(scores_btw, temperature).reshape(b, t * w)
  # Non-candidates sort last with a logit of -1e9 (finite, so no NaN reaches the gradient): they add
  # exp(-1e9) = 0 to every remaining set's normaliser.
  l_bn = jnp.take_along_axis(jnp.where(cand_bn, drop_logits, _NEVER), order_bn, axis=-1)
  rest_bn = jax.lax.cumlogsumexp(l_bn, axis=1, reverse=True)
  taken_bn = jnp.arange(t * w)[None, :] < dropped_b[:, None]
  return jnp.sum(jnp.where(taken_bn, l_bn - rest_bn, 0.0), axis=-1)


__all__ = ["drop_log_prob", "sample_keys", "score_logits"]

"""Loss-only logits (train/loss.py): the same CE sum and gradients as full [B, S, V] logits, whether
the answers fit the static maximum (gathered) or not (chunked fallback); one compilation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stts_jax.models import video_forward
from stts_jax.models.vlm import Molmo2
from stts_jax.testing.tiny import tiny_model_config
from stts_jax.train import loss as loss_lib
from stts_jax.train import step as step_lib
from tests.train import helpers, toy_model

B, S, E, V = 3, 37, 16, 50


def _arrays(counts, seed=0):
  """Random hidden [B, S, E], head [E, V], targets, and a loss mask with `counts[b]` positions."""
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(B, S, E)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(E, V)) * 0.3, jnp.float32)
  target = jnp.asarray(rng.integers(0, V, size=(B, S)), jnp.int32)
  mask = np.zeros((B, S), bool)
  for b, n in enumerate(counts):
    mask[b, rng.choice(S, size=n, replace=False)] = True
  return hidden, head, target, jnp.asarray(mask)


def _full(hidden, head, target, mask):
  return loss_lib.full_cross_entropy(hidden @ head, target, mask)


@pytest.mark.parametrize("counts,k,fallback", [((2, 5, 0), 5, 0.0), ((2, 9, 1), 5, 1.0), ((S, 3, 4), 8, 1.0)])
def test_answer_ce_and_grads_equal_full_logits(counts, k, fallback):
  hidden, head, target, mask = _arrays(counts)
  fn = jax.jit(lambda h, w: loss_lib.answer_cross_entropy(h, w, target, mask, max_tokens=k))
  ce, fell_back = fn(hidden, head)
  gh, gw = jax.grad(lambda h, w: fn(h, w)[0], argnums=(0, 1))(hidden, head)
  ref = _full(hidden, head, target, mask)
  rh, rw = jax.grad(_full, argnums=(0, 1))(hidden, head, target, mask)
  assert float(fell_back) == fallback
  np.testing.assert_allclose(ce, ref, rtol=1e-6)
  np.testing.assert_allclose(gh, rh, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-6)
  assert float(ref) > 0 and np.abs(np.asarray(rw)).max() > 0   # not a vacuous comparison


@pytest.mark.parametrize("chunk", [1, 5, 36, 37, 64])
def test_chunked_counts_every_position_once(chunk):
  """Chunk lengths that do and do not divide S (the last chunk overlaps its predecessor)."""
  hidden, head, target, mask = _arrays((S, 11, 1), seed=2)
  got = loss_lib.chunked_cross_entropy(hidden, head, target, mask, chunk=chunk)
  np.testing.assert_allclose(got, _full(hidden, head, target, mask), rtol=1e-6)


def test_gathered_alone_drops_overflow_which_is_why_the_fallback_exists():
  hidden, head, target, mask = _arrays((9, 1, 1), seed=3)
  full = _full(hidden, head, target, mask)
  gathered = loss_lib.gathered_cross_entropy(hidden, head, target, mask, max_tokens=5)
  assert float(gathered) < float(full) - 1e-3
  ce, fell_back = loss_lib.answer_cross_entropy(hidden, head, target, mask, max_tokens=5)
  assert float(fell_back) == 1.0
  np.testing.assert_allclose(ce, full, rtol=1e-6)


def _long_answers(batch, counts):
  """The synthetic batch with `counts[b]` loss positions per row (the last real tokens)."""
  batch = dict(batch)
  mask = np.zeros_like(batch["loss_mask"])
  for b, n in enumerate(counts):
    last = int(np.sum(batch["token_mask"][b])) - 1
    mask[b, last - n:last] = True
  batch["loss_mask"] = mask
  return batch


@pytest.mark.slow   # tiny-Molmo2 forward and backward in both modes (the train step's: default suite)
@pytest.mark.parametrize("method", ["none", "stts"])
def test_molmo2_answer_loss_and_grads_equal_full_logits(method):
  """Tiny Molmo2 (pruned with the STTS scorer, and unpruned): CE sum and gradients of every parameter
  with loss 'answer' equal those with full logits, below and above the static maximum (K = 4)."""
  model = Molmo2(tiny_model_config(method=method, ratio=0.5), rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  base = next(helpers.batches(batch_size=2, num_frames=3, seq_len=64, seed=1))
  cfgs = {m: helpers.train_cfg(loss=m, max_answer_tokens=4) for m in ("answer", "full")}

  @jax.jit
  def ce_and_grads(params, batch):
    out = {}
    for mode, cfg in cfgs.items():
      def ce(p):
        m = nnx.merge(graphdef, p, rest, copy=True)
        _, value, fell_back = step_lib.cross_entropy(video_forward.forward_video, m, batch, jax.random.key(0), cfg)
        return value, fell_back
      out[mode] = jax.value_and_grad(ce, has_aux=True)(params)
    return out

  for counts, fallback in (((2, 3), 0.0), ((2, 7), 1.0)):
    batch = {k: jnp.asarray(v) for k, v in _long_answers(base, counts).items() if k != "example_id"}
    out = ce_and_grads(params, batch)
    ((ce_a, fb), g_a), ((ce_f, _), g_f) = out["answer"], out["full"]
    assert float(fb) == fallback
    np.testing.assert_allclose(ce_a, ce_f, rtol=1e-6)
    flat_a, flat_f = nnx.to_flat_state(g_a), nnx.to_flat_state(g_f)
    for (path, a), (_, f) in zip(flat_a, flat_f):
      a, f = np.asarray(a.get_value()), np.asarray(f.get_value())
      np.testing.assert_allclose(a, f, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(f).max()), err_msg=str(path))
    head = np.asarray(dict(flat_f)[("llm", "lm_head", "kernel")].get_value())
    assert np.abs(head).max() > 0
  assert ce_and_grads._cache_size() == 1


def _step_metrics(model_fn, forward, batches, **cfg_kw):
  """Metrics of one step from the same initial state on each batch, per loss mode; asserts one
  compilation per mode."""
  mesh = helpers.mesh_1()
  metrics = {}
  for mode in ("answer", "full"):
    cfg = helpers.train_cfg(loss=mode, optim={"warmup_steps": 0}, **cfg_kw)
    _, state, step_fn = helpers.build_step(mesh, cfg, model_fn=model_fn, forward=forward, batch=batches[0])
    metrics[mode] = []
    with jax.set_mesh(mesh):
      for b in batches:
        _, m = step_fn(jax.tree.map(jnp.copy, state), helpers.put(b, mesh))
        metrics[mode].append(jax.device_get(m))
    assert step_fn._cache_size() == 1
  for a, f in zip(metrics["answer"], metrics["full"]):
    for key in ("loss", "ce", "grad_norm", "loss_tokens"):
      np.testing.assert_allclose(a[key], f[key], rtol=2e-5, err_msg=key)
  assert all(float(m["ce_fallback"]) == 0.0 for m in metrics["full"])
  return metrics["answer"]


def test_train_step_loss_modes_agree_with_one_compilation():
  """The whole step with grad accumulation 2 (toy model): loss, CE and gradient norm of loss 'answer'
  equal loss 'full'; batches with and without the fallback share one compilation."""
  base = next(helpers.batches(batch_size=4, seq_len=64, seed=2))
  batches = [_long_answers(base, c) for c in ((1, 2, 3, 3), (2, 3, 9, 1), (5, 5, 5, 5))]
  answer = _step_metrics(helpers.toy_model_fn(), toy_model.toy_forward, batches, max_answer_tokens=3,
                         grad_accum=2)
  # Micro-batches = rows (0, 2) and (1, 3): fallback in neither, one, both.
  assert [float(m["ce_fallback"]) for m in answer] == [0.0, 1.0, 2.0]


@pytest.mark.slow
def test_molmo2_train_step_loss_modes_agree():
  """As above on a pruned tiny Molmo2 (the real forward; slow: two compilations of the STTS step)."""
  model_cfg = tiny_model_config(method="stts", ratio=0.5)
  base = next(helpers.batches(batch_size=4, num_frames=3, seq_len=64, seed=2))
  batches = [_long_answers(base, c) for c in ((1, 2, 3, 3), (2, 3, 9, 1))]
  answer = _step_metrics(lambda: Molmo2(model_cfg, rngs=nnx.Rngs(0)), video_forward.forward_video, batches,
                         max_answer_tokens=3, grad_accum=2)
  assert [float(m["ce_fallback"]) for m in answer] == [0.0, 1.0]


def test_answer_mode_rejects_a_forward_without_hidden_states():
  def logits_only(model, batch, *, rng=None, deterministic=True, logits=True):
    out = video_forward.forward_video(model, batch, rng=rng, deterministic=deterministic, logits=True)
    return dataclasses.replace(out, hidden=None)
  model = Molmo2(tiny_model_config(), rngs=nnx.Rngs(0))
  batch = {k: jnp.asarray(v) for k, v in next(helpers.batches(batch_size=1)).items() if k != "example_id"}
  graphdef, state = nnx.split(model)
  with pytest.raises(ValueError, match="hidden"):   # raised while tracing: eval_shape computes nothing
    jax.eval_shape(lambda st: step_lib.cross_entropy(logits_only, nnx.merge(graphdef, st), batch, jax.random.key(0),
                                                     helpers.train_cfg(loss="answer")), state)

"""KV-cache decoding on the tiny decoder: rows of different lengths, stop tokens, sampling."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stts_jax.eval import decoding
from stts_jax.models import llm as llm_lib
from stts_jax.testing import tiny

N = 5
PAD = 511


@pytest.fixture(scope="module")
def setup():
  cfg = tiny.tiny_model_config()
  dec = nnx.jit(lambda: llm_lib.Decoder(cfg.llm, rngs=nnx.Rngs(0)))()
  b, s = 3, 12
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 500, (b, s)).astype(np.int32)
  lens = np.array([12, 7, 9])
  mask = np.arange(s)[None] < lens[:, None]
  vision = np.zeros((b, s), bool)
  vision[:, 2:5] = True        # a bidirectional vision block inside every prompt
  vision &= mask
  pos = np.where(mask, np.arange(s)[None], 0).astype(np.int32)
  return dec, ids, lens, mask, vision, pos


@functools.partial(nnx.jit, static_argnames=("stop_ids", "temperature", "n"))
def _generate(dec, ids, mask, vision, pos, active, rng, stop_ids=(), temperature=0.0, n=N):
  inputs = decoding.LLMInputs(dec.embed(ids), pos, mask, vision)
  state = decoding.prefill(dec, inputs, n)
  return decoding.decode(dec, state, max_new_tokens=n, stop_ids=stop_ids, pad_id=PAD, temperature=temperature,
                         rng=rng, active_b=active, return_logits=True)


def _run(setup, **kw):
  dec, ids, lens, mask, vision, pos = setup
  active = kw.pop("active", np.ones(ids.shape[0], bool))
  rng = kw.pop("rng", jax.random.key(0))
  return _generate(dec, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(vision), jnp.asarray(pos),
                   jnp.asarray(active), rng, **kw)


@nnx.jit
def _uncached_logits(dec, ids, mask, vision):
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  hidden, _ = dec(dec.embed(ids), positions, mask, vision)
  return dec.logits(hidden)


def test_cached_equals_uncached_for_rows_of_different_lengths(setup):
  dec, ids, lens, mask, vision, pos = setup
  gen = _run(setup)
  assert np.array_equal(np.asarray(gen.num_tokens_b), [N] * 3) and not np.any(gen.stopped_b)
  # Reference: each row's prompt followed directly by its generated tokens (no gap), recomputed
  # without a cache; trailing padding is masked and, being later, invisible to causal queries.
  b, s = ids.shape
  full = np.full((b, s + N), PAD, np.int32)
  full_mask = np.zeros((b, s + N), bool)
  full_vision = np.zeros((b, s + N), bool)
  for i, n in enumerate(lens):
    full[i, :n + N] = np.concatenate([ids[i, :n], np.asarray(gen.tokens_bn[i])])
    full_mask[i, :n + N] = True
    full_vision[i, :n] = vision[i, :n]
  logits = np.asarray(_uncached_logits(dec, jnp.asarray(full), jnp.asarray(full_mask), jnp.asarray(full_vision)))
  for i, n in enumerate(lens):
    ref = logits[i, n - 1:n - 1 + N]
    np.testing.assert_allclose(np.asarray(gen.logits_bnv[i]), ref, atol=1e-4, rtol=0)
    assert np.array_equal(np.argmax(ref, -1), np.asarray(gen.tokens_bn[i]))


def test_stop_tokens_end_a_row_and_pad_after_it(setup):
  free = np.asarray(_run(setup).tokens_bn)
  stop = int(free[0, 2])
  assert stop not in free[0, :2]
  gen = _run(setup, stop_ids=(stop,))
  tokens = np.asarray(gen.tokens_bn)
  assert int(gen.num_tokens_b[0]) == 2 and bool(gen.stopped_b[0])
  assert list(tokens[0, :3]) == list(free[0, :3]) and np.all(tokens[0, 3:] == PAD)
  for b in (1, 2):   # the other rows are unaffected up to their own stop
    hit = np.flatnonzero(free[b] == stop)
    n = int(hit[0]) if hit.size else N
    assert int(gen.num_tokens_b[b]) == n and list(tokens[b, :n]) == list(free[b, :n])


def test_inactive_rows_emit_padding_only(setup):
  free = np.asarray(_run(setup).tokens_bn)
  gen = _run(setup, active=np.array([True, False, True]))
  assert np.all(np.asarray(gen.tokens_bn[1]) == PAD) and int(gen.num_tokens_b[1]) == 0
  assert not bool(gen.stopped_b[1])
  assert np.array_equal(np.asarray(gen.tokens_bn)[[0, 2]], free[[0, 2]])


def test_temperature_sampling_is_seeded_and_tends_to_greedy(setup):
  greedy = np.asarray(_run(setup).tokens_bn)
  a = np.asarray(_run(setup, temperature=1.0, rng=jax.random.key(1)).tokens_bn)
  b = np.asarray(_run(setup, temperature=1.0, rng=jax.random.key(1)).tokens_bn)
  c = np.asarray(_run(setup, temperature=1.0, rng=jax.random.key(2)).tokens_bn)
  cold = np.asarray(_run(setup, temperature=1e-4, rng=jax.random.key(3)).tokens_bn)
  assert np.array_equal(a, b) and not np.array_equal(a, c)
  assert np.array_equal(cold, greedy)
  assert a.min() >= 0 and a.max() < 512


def test_option_logprobs():
  logits = jnp.asarray([[0.0, 1.0, 2.0, 3.0]])
  got = np.asarray(decoding.option_logprobs(logits, jnp.asarray([[3, 1, -1]])))
  logp = np.asarray(jax.nn.log_softmax(logits))[0]
  np.testing.assert_allclose(got[0, :2], [logp[3], logp[1]], rtol=1e-6)
  assert got[0, 2] == -np.inf


def test_last_token_index():
  mask = jnp.asarray([[True, True, False], [False, False, False], [True, True, True]])
  assert list(np.asarray(decoding.last_token_index(mask))) == [1, 0, 2]

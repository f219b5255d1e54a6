"""Timing helpers: AOT compile once, warm-up excluded, median of repeats, no compilation while timing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stts_jax.bench import timing


def _matmul(x, w):
  return jnp.tanh(x @ w)


def test_aot_compile_counts_one_compilation_and_reports_xla_costs():
  x = jnp.ones((32, 48), jnp.float32)
  w = jnp.ones((48, 16), jnp.float32)
  with timing.CompileCounter() as cc:
    compiled = timing.aot_compile(_matmul, x, w, name="matmul")
  assert cc.count == 1
  assert compiled.name == "matmul"
  # XLA's count of a dot is 2*M*N*K; tanh is a transcendental, not a flop.
  assert compiled.xla_flops == pytest.approx(2 * 32 * 48 * 16, rel=0.01)
  assert compiled.memory.argument_bytes == (32 * 48 + 48 * 16) * 4
  assert compiled.memory.total_bytes >= compiled.memory.argument_bytes
  assert compiled.compile_seconds > 0
  # New values of the same shapes never compile again; another shape is an error, not a recompile.
  x2, small = 2 * x, jnp.ones((8, 48))
  with timing.CompileCounter() as cc:
    out = compiled(x2, w)
    with pytest.raises(Exception):
      compiled(small, w)
  assert cc.count == 0
  np.testing.assert_allclose(np.asarray(out), np.tanh(2 * 48.0), rtol=1e-6)


def test_time_calls_excludes_warmup_and_takes_the_median():
  compiled = timing.aot_compile(_matmul, jnp.ones((8, 8)), jnp.ones((8, 8)))
  inputs = [(jnp.full((8, 8), v), jnp.ones((8, 8))) for v in (1.0, 2.0, 3.0)]
  seen = []

  def call(i):
    seen.append(i)
    return compiled(*inputs[i % 3])

  t = timing.time_calls(call, warmup=2, repeats=5, name="mm")
  assert seen == list(range(7))
  assert len(t.seconds) == 5 and t.warmup == 2 and t.name == "mm"
  assert t.median == sorted(t.seconds)[2]
  assert t.min <= t.median
  d = t.to_dict()
  assert d["repeats"] == 5 and d["median_s"] == t.median


def test_timing_statistics_on_known_values():
  t = timing.Timing("x", (3.0, 1.0, 2.0, 10.0), warmup=0)
  assert t.median == 2.5
  assert t.min == 1.0
  assert t.spread == pytest.approx((10.0 - 1.0) / 2.5)


def test_time_calls_fails_if_the_timed_region_compiles():
  def call(i):
    # A fresh jitted function per call: compiles inside the timed region.
    return jax.jit(lambda x: x * (i + 1))(jnp.ones(3))

  with pytest.raises(RuntimeError, match="compilation"):
    timing.time_calls(call, warmup=0, repeats=2, name="bad")


def test_stateful_call_threads_a_donated_state_and_keeps_outputs():
  step = jax.jit(lambda s, inc: (s + inc, {"sum": jnp.sum(s)}), donate_argnums=0)
  compiled = timing.aot_compile(step, jnp.zeros(4), jnp.float32(1.0))
  call = timing.StatefulCall(lambda s, i: compiled(s, jnp.float32(i + 1)), jnp.zeros(4), keep=lambda o: o["sum"])
  t = timing.time_calls(call, warmup=1, repeats=3, name="step")
  assert len(t.seconds) == 3
  np.testing.assert_allclose(np.asarray(call.state), 1 + 2 + 3 + 4)
  # every call's output is kept, warm-up included: sums of the state before each call
  assert [float(x) for x in call.outputs] == [0.0, 4.0, 12.0, 24.0]
  call(4)   # still callable after timing (interleaved rounds)
  np.testing.assert_allclose(np.asarray(call.state), 15.0)


def test_bad_counts_are_rejected():
  with pytest.raises(ValueError, match="repeats"):
    timing.time_calls(lambda i: jnp.ones(1), warmup=0, repeats=0)
  with pytest.raises(ValueError, match="warmup"):
    timing.time_calls(timing.StatefulCall(lambda s, i: (s, s), jnp.ones(1)), warmup=-1, repeats=1)


def test_min_seconds_adds_repeats_up_to_the_cap():
  """A cheap call is repeated until `min_seconds` of timed work (capped); an expensive one stops
  at `repeats`."""
  import time as time_lib

  def sleeper(seconds):
    def call(i):
      time_lib.sleep(seconds)
      return jnp.ones(1)
    return call

  cheap = timing.time_calls(sleeper(0.002), warmup=1, repeats=2, min_seconds=0.05, max_repeats=1000)
  assert 0.05 <= sum(cheap.seconds) < 0.05 + 0.02 and 10 <= len(cheap.seconds) <= 25
  capped = timing.time_calls(sleeper(0.002), warmup=0, repeats=2, min_seconds=10.0, max_repeats=6)
  assert len(capped.seconds) == 6
  slow = timing.time_calls(sleeper(0.03), warmup=0, repeats=2, min_seconds=0.05)
  assert len(slow.seconds) == 2
  stateful = timing.StatefulCall(lambda s, i: (s + 1, s), np.zeros(()))
  t = timing.time_calls(stateful, warmup=1, repeats=1, min_seconds=0.0)
  assert len(t.seconds) == 1 and float(stateful.state) == 2.0

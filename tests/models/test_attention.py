"""models/attention.py: every implementation against the `xla` reference, per mask kind.

Parity bound (issue 17), per tensor: max |got - ref| <= 1e-5 * max(1, max |ref|) in float32, for the
output and the gradients w.r.t. q, k, v and the per-key bias. Gradients are taken of
sum(out * w) with a fixed random cotangent w that is non-zero at padding queries too, so a padding
row's zero gradient is the kernel's doing, not the loss's. Shapes are [B, S, N, H] (queries),
[B, S, K, H] (keys/values, K kv heads), [B, S] (masks, bias).
The Pallas kernels (pallas_gpu, splash) run in interpret mode on CPU: small shapes only.
"""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stts_jax.models import attention as A

TOL = 1e-5
SCALE = 0.25   # = 16 ** -0.5, head dim 16


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _assert_close(got, ref, what, tol=TOL):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, what
  assert np.isfinite(got).all(), f"{what}: non-finite values"
  err, bound = np.abs(got - ref).max(), tol * max(1.0, np.abs(ref).max())
  assert err <= bound, f"{what}: max |diff| {err:.3g} > {bound:.3g}"


def _inputs(seed, b, sq, sk, n, kh, h=16, bias=True, dtype=jnp.float32):
  """q [B, Sq, N, H], k/v [B, Sk, K, H], key_bias [B, Sk] (log-like, <= 0) or None, cotangent w [B, Sq, N, H]."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, sq, n, h)), dtype)
  k = jnp.asarray(rng.normal(size=(b, sk, kh, h)), dtype)
  v = jnp.asarray(rng.normal(size=(b, sk, kh, h)), dtype)
  key_bias = jnp.asarray(np.log(rng.uniform(0.05, 1.0, size=(b, sk))), jnp.float32) if bias else None
  w = jnp.asarray(rng.normal(size=(b, sq, n, h)), jnp.float32)
  return q, k, v, key_bias, w


@functools.partial(jax.jit, static_argnames=("impl", "block"))
def _out_and_grads(q, k, v, key_bias, w, mask, *, impl, block=A.DEFAULT_BLOCK):
  """(out [B, Sq, N, H], (dq, dk, dv, dbias)) of sum(out * w); dbias is None without a bias."""
  def loss(q, k, v, key_bias):
    out = A.attention(q, k, v, mask, scale=SCALE, key_bias=key_bias, impl=impl, block_q=block, block_k=block)
    return jnp.sum(out.astype(jnp.float32) * w), out
  argnums = (0, 1, 2) if key_bias is None else (0, 1, 2, 3)
  (_, out), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(q, k, v, key_bias)
  return out, tuple(grads) + ((None,) if key_bias is None else ())


def _assert_dead_rows_are_zero(mask, out, grads, what):
  """Queries that may see no key: exactly zero output and dq; keys nobody may see: exactly zero dk, dv,
  dbias (the cotangent is non-zero everywhere, so this is the kernel's doing)."""
  allowed = np.asarray(mask.dense())
  dead_q, dead_k = ~allowed.any(axis=2), ~allowed.any(axis=1)      # [B, Sq], [B, Sk]
  np.testing.assert_array_equal(np.asarray(out, np.float32)[dead_q], 0.0, err_msg=f"{what} out")
  dq, dk, dv, dbias = grads
  np.testing.assert_array_equal(np.asarray(dq, np.float32)[dead_q], 0.0, err_msg=f"{what} dq")
  for name, g in (("dk", dk), ("dv", dv), ("dbias", dbias)):
    if g is not None:
      np.testing.assert_array_equal(np.asarray(g, np.float32)[dead_k], 0.0, err_msg=f"{what} {name}")
  return dead_q


def _check_parity(impl, mask, q, k, v, key_bias, w, block=A.DEFAULT_BLOCK, tol=TOL):
  """impl vs xla (out and every gradient), and exact zeros at fully masked rows for both."""
  ref, ref_g = _out_and_grads(q, k, v, key_bias, w, mask, impl="xla")
  out, got_g = _out_and_grads(q, k, v, key_bias, w, mask, impl=impl, block=block)
  _assert_close(out, ref, f"{impl} out", tol)
  for name, g, r in zip(("dq", "dk", "dv", "dbias"), got_g, ref_g):
    if r is not None:
      _assert_close(g, r, f"{impl} {name}", tol)
  _assert_dead_rows_are_zero(mask, ref, ref_g, "xla")
  dead_q = _assert_dead_rows_are_zero(mask, out, got_g, impl)
  return out, dead_q


# ------------------------------------------------------------------------------------------------
# masks: one builder per call site, with the layouts the model produces
# ------------------------------------------------------------------------------------------------
def _rows_segments(b, s, seed=0):
  """Packed ViT rows [B, S]: frame segments of uneven lengths, empty slots (-1) at the end; the last
  row has a hole of empty slots between two segments; with B >= 3, row 1 is all empty slots."""
  rng = np.random.default_rng(seed)
  seg = np.full((b, s), -1, np.int32)
  for i in range(b):
    pos, frame, used = 0, 0, s - rng.integers(1, max(2, s // 8))
    while pos < used:
      n = int(rng.integers(max(1, s // 10), max(2, s // 4)))
      seg[i, pos:min(pos + n, used)] = frame
      pos, frame = pos + n, frame + 1
  seg[-1, s // 3: s // 3 + 5] = -1
  if b >= 3:
    seg[1] = -1
  return seg


def _llm_layout(b, s, seed=0):
  """token_mask, vision_mask, example_ids [B, S] for prefill/training.

  Row 0 packs two examples (each: text, a vision span with timestamp text inside it, text) and
  trailing padding; other rows hold one example after left padding, with two vision spans; with
  B >= 3 the last row is all padding."""
  rng = np.random.default_rng(seed)
  tm = np.zeros((b, s), bool)
  vis = np.zeros((b, s), bool)
  ex = np.zeros((b, s), np.int32)

  def example(i, start, end, spans):
    tm[i, start:end] = True
    n = end - start
    for a, c in spans:   # fractions of the example
      lo, hi = start + int(a * n), start + int(c * n)
      vis[i, lo:hi] = True
      # timestamp text inside the span: a couple of non-vision tokens every ~1/4 of it
      for t in range(lo + max(2, (hi - lo) // 4), hi - 1, max(3, (hi - lo) // 4)):
        vis[i, t:t + 2] = False

  half = int(s * 0.45)
  example(0, 0, half, [(0.1, 0.7)])
  example(0, half, int(s * 0.9), [(0.05, 0.5)])
  ex[0, half:] = 1
  for i in range(1, b):
    pad = int(rng.integers(1, max(2, s // 10)))
    example(i, pad, s, [(0.05, 0.35), (0.4, 0.8)])
  if b >= 3:
    tm[-1] = False
  return tm, vis, ex


def _llm(b, s, seed=0):
  tm, vis, ex = _llm_layout(b, s, seed)
  return A.llm_mask(jnp.asarray(tm), jnp.asarray(vis), jnp.asarray(ex))


def _decode(b, t, cache_index, s, seed=0):
  """Queries at cache slots cache_index .. cache_index + s - 1 against a cache of T slots.

  Row 0: slots [0, cache_index + s) valid. Row 1: 3 left-padding slots invalid, and its last query
  is padding (query_mask False). Vision: cache slots [2, 2 + t // 3) with a timestamp hole, and the
  first query is a vision token (it sees the vision keys after it within the queries). With B >= 3,
  row 2's cache is empty: its (valid) queries see no key at all."""
  cv = np.arange(t)[None].repeat(b, 0) < cache_index + s
  cv[1:, :3] = False
  vision = np.zeros((b, t), bool)
  vision[:, 2:2 + t // 3] = True
  vision[:, 2 + t // 6] = False
  qm = np.ones((b, s), bool)
  qv = np.zeros((b, s), bool)
  qv[:, 0] = True
  vision[:, cache_index] = True
  if s > 2:
    vision[:, cache_index + 2] = True   # a later query slot that is vision: visible to query 0
    qv[:, 2] = True
  if b > 1 and s > 1:
    qm[1, -1] = False
    cv[1, cache_index + s - 1] = False
  if cache_index == 0:
    qm[1:, :3] = False   # left padding of a cached prefill: padding queries
  if b >= 3:
    cv[2] = False
  return A.decode_mask(jnp.asarray(qm), jnp.asarray(qv), jnp.asarray(cache_index, jnp.int32), jnp.asarray(cv),
                       jnp.asarray(vision))


def _reference_rule(qs, ks, qi, ki, qv, kv, causal):
  """The mask rule of the module docstring, one (q, k) pair at a time (numpy loops)."""
  b, sq = qs.shape
  sk = ks.shape[1]
  out = np.zeros((b, sq, sk), bool)
  for i in range(b):
    for x in range(sq):
      for y in range(sk):
        ok = qs[i, x] == ks[i, y] and ks[i, y] >= 0
        if causal:
          ok = ok and (ki[i, y] <= qi[i, x] or (qv[i, x] and kv[i, y]))
        out[i, x, y] = ok
  return out


# ------------------------------------------------------------------------------------------------
# masks: hand-computed cases
# ------------------------------------------------------------------------------------------------
def test_llm_mask_hand_computed():
  # row 0: text, vision, vision, timestamp text, vision, text, padding (one example)
  # row 1: example 0 = text, vision, vision; example 1 = text, vision, vision, text
  tm = np.array([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]], bool)
  vis = np.array([[0, 1, 1, 0, 1, 0, 0], [0, 1, 1, 0, 1, 1, 0]], bool)
  ex = np.array([[0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]], np.int32)
  want0 = [[1, 0, 0, 0, 0, 0, 0],
           [1, 1, 1, 0, 1, 0, 0],   # a vision token sees every vision token of its example...
           [1, 1, 1, 0, 1, 0, 0],
           [1, 1, 1, 1, 0, 0, 0],   # ...but the timestamp text inside the span stays causal
           [1, 1, 1, 1, 1, 0, 0],
           [1, 1, 1, 1, 1, 1, 0],
           [0, 0, 0, 0, 0, 0, 0]]   # padding sees nothing
  want1 = [[1, 0, 0, 0, 0, 0, 0],
           [1, 1, 1, 0, 0, 0, 0],   # example 0's vision does not see example 1's
           [1, 1, 1, 0, 0, 0, 0],
           [0, 0, 0, 1, 0, 0, 0],   # example 1 sees nothing of example 0
           [0, 0, 0, 1, 1, 1, 0],
           [0, 0, 0, 1, 1, 1, 0],
           [0, 0, 0, 1, 1, 1, 1]]
  np.testing.assert_array_equal(np.asarray(A.llm_mask(*map(jnp.asarray, (tm, vis, ex))).dense()),
                                np.array([want0, want1], bool))


def test_decode_mask_hand_computed():
  # cache of 6 slots, 2 queries at slots 3 and 4; slot 5 empty; vision at slots 1, 2 and 4
  cv = np.array([[1, 1, 1, 1, 1, 0]], bool)
  cvis = np.array([[0, 1, 1, 0, 1, 0]], bool)
  j = jnp.asarray
  m = A.decode_mask(j([[True, True]]), j([[False, True]]), j(3, jnp.int32), j(cv), j(cvis))
  want = [[1, 1, 1, 1, 0, 0],     # text query at slot 3: causal
          [1, 1, 1, 1, 1, 0]]     # vision query at slot 4
  np.testing.assert_array_equal(np.asarray(m.dense())[0], np.array(want, bool))
  m = A.decode_mask(j([[True, True]]), j([[True, False]]), j(3, jnp.int32), j(cv),
                    j(np.array([[0, 1, 1, 1, 1, 0]], bool)))
  # a vision query at slot 3 sees the vision key at slot 4 (the overlay is bidirectional)
  np.testing.assert_array_equal(np.asarray(m.dense())[0, 0], np.array([1, 1, 1, 1, 1, 0], bool))


@pytest.mark.parametrize("kind", ["rows", "llm", "decode4", "prefill0"])
def test_mask_builders_follow_the_rule(kind):
  m = {"rows": lambda: A.vit_rows_mask(jnp.asarray(_rows_segments(2, 40))), "llm": lambda: _llm(3, 40),
       "decode4": lambda: _decode(2, 24, 11, 4), "prefill0": lambda: _decode(2, 24, 0, 8)}[kind]()
  arrays = [None if x is None else np.asarray(x) for x in
            (m.q_segment, m.k_segment, m.q_index, m.k_index, m.q_vision, m.k_vision)]
  np.testing.assert_array_equal(np.asarray(m.dense()), _reference_rule(*arrays, m.causal))


def test_cached_prefill_equals_the_llm_mask_on_the_prefix():
  tm, vis, ex = _llm_layout(2, 20)
  t = 32
  cv = np.zeros((2, t), bool)
  cv[:, :20] = tm
  cvis = np.zeros((2, t), bool)
  cvis[:, :20] = vis
  j = jnp.asarray
  m = A.decode_mask(j(tm), j(vis), j(0, jnp.int32), j(cv), j(cvis), j(ex), j(np.pad(ex, ((0, 0), (0, t - 20)))))
  np.testing.assert_array_equal(np.asarray(m.dense())[:, :, :20], np.asarray(A.llm_mask(j(tm), j(vis), j(ex)).dense()))
  assert not np.asarray(m.dense())[:, :, 20:].any()


# ------------------------------------------------------------------------------------------------
# blockwise vs xla
# ------------------------------------------------------------------------------------------------
# (mask kind, batch, query length, key length, heads, kv heads, block, key bias). The default run
# keeps one case per mask kind (every length >= 1k where the kind has long sequences); the rest is slow.
BLOCKWISE_CASES = [
    ("rows", 3, 1030, 1030, 4, 2, 128, True),      # >= 1k, not a multiple of the block; an empty row
    ("frames", 2, 200, 200, 4, 2, 48, True),
    ("llm", 3, 1030, 1030, 4, 2, 128, True),       # two examples in row 0; an all-padding row
    ("decode1", 3, 1, 70, 4, 2, 16, False),         # one query against a partly filled cache
    ("decode4", 3, 4, 70, 4, 2, 16, True),          # a few queries
    ("prefill0", 2, 24, 70, 4, 2, 16, True),        # cached prefill, cache_index 0
    pytest.param("rows", 2, 300, 300, 4, 4, 64, False, marks=pytest.mark.slow),
    pytest.param("frames", 1, 1030, 1030, 2, 1, 256, True, marks=pytest.mark.slow),
    pytest.param("llm", 2, 300, 300, 4, 1, 64, False, marks=pytest.mark.slow),
    pytest.param("llm", 2, 77, 77, 4, 2, 512, False, marks=pytest.mark.slow),   # block longer than S
]


def _case_id(c):
  c = c.values if hasattr(c, "values") else c
  return f"{c[0]}-B{c[1]}-L{c[2]}x{c[3]}-N{c[4]}K{c[5]}-blk{c[6]}" + ("-bias" if c[7] else "")


def _mask_for(kind, b, sq, sk):
  if kind == "rows":
    return A.vit_rows_mask(jnp.asarray(_rows_segments(b, sq)))
  if kind == "frames":
    return A.vit_frames_mask(b, sq)
  if kind == "llm":
    return _llm(b, sq)
  cache_index = {"decode1": sk - 20, "decode4": sk - 30, "prefill0": 0}[kind]
  return _decode(b, sk, cache_index, sq)


@pytest.mark.parametrize("kind,b,sq,sk,n,kh,block,bias", BLOCKWISE_CASES, ids=[_case_id(c) for c in BLOCKWISE_CASES])
def test_blockwise_matches_xla(kind, b, sq, sk, n, kh, block, bias):
  mask = _mask_for(kind, b, sq, sk)
  q, k, v, key_bias, w = _inputs(1, b, sq, sk, n, kh, bias=bias)
  out, dead_q = _check_parity("blockwise", mask, q, k, v, key_bias, w, block=block)
  assert np.abs(np.asarray(out)[~dead_q]).max() > 0.1   # not a trivially empty output
  if b >= 3 and kind != "frames":
    assert dead_q[-1 if kind == "llm" else 1 if kind == "rows" else 2].all()   # the whole padded row


# ------------------------------------------------------------------------------------------------
# Pallas kernels (interpret mode on CPU: a few seconds per call, so small shapes)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["pallas_gpu", "splash"])
@pytest.mark.parametrize("kind,s", [("rows", 100), ("frames", 100),
                                    pytest.param("rows", 150, marks=pytest.mark.slow),
                                    pytest.param("frames", 150, marks=pytest.mark.slow)])
def test_fused_kernels_match_xla(impl, kind, s):
  # GQA 4 -> 2 heads. s = 100 pads to one kernel block (128); s = 150 to two, segments straddling them.
  # rows: 3 rows (row 1 all empty slots, the others with a hole and trailing empty slots), no bias;
  # frames: the soft block, with the per-key bias.
  b = 3 if kind == "rows" else 2
  mask = A.vit_rows_mask(jnp.asarray(_rows_segments(b, s, seed=3))) if kind == "rows" else A.vit_frames_mask(b, s)
  q, k, v, key_bias, w = _inputs(2, b, s, s, 4, 2, bias=kind == "frames")
  _check_parity(impl, mask, q, k, v, key_bias, w)


def test_splash_kernel_reused_across_jitted_programs():
  """The same splash shape in two jitted programs (a forward and a train step, say) must both trace."""
  q, k, v, _, _ = _inputs(3, 1, 64, 64, 2, 2, bias=False)
  mask = A.vit_frames_mask(1, 64)
  f = functools.partial(A.splash_attention, mask=mask, scale=SCALE)
  first = jax.jit(lambda q: f(q, k, v))(q)
  second = jax.jit(lambda q: f(q, k, v) * 2.0)(q)   # UnexpectedTracerError if a kernel built under the
  _assert_close(second, 2 * first, "splash, second program")   # first trace is cached with its tracers


@pytest.mark.parametrize("impl", ["pallas_gpu", "splash"])
def test_fused_kernels_never_serve_causal_masks(impl):
  for mask, sq, sk in ((_llm(2, 40), 40, 40), (_decode(2, 30, 10, 4), 4, 30), (_decode(2, 30, 0, 30), 30, 30)):
    shape_q, shape_k = (2, sq, 4, 16), (2, sk, 2, 16)
    assert not A.fused_supports(mask, shape_q, shape_k)
    for backend in ("cpu", "gpu", "tpu"):
      assert A.choose(impl, mask, shape_q, shape_k, backend=backend) == "blockwise"
  q, k, v, _, _ = _inputs(4, 2, 40, 40, 4, 2, bias=False)
  with pytest.raises(ValueError, match="cannot express"):
    getattr(A, f"{impl}_attention")(q, k, v, _llm(2, 40), scale=SCALE)


def test_asking_a_fused_kernel_for_the_llm_mask_runs_the_exact_fallback():
  mask = _llm(3, 40)
  q, k, v, key_bias, w = _inputs(4, 3, 40, 40, 4, 2, bias=False)
  got = jax.jit(lambda q, k, v, m: A.attention(q, k, v, m, scale=SCALE, impl="pallas_gpu", block_q=16,
                                                  block_k=16))
  text = got.lower(q, k, v, mask).as_text()
  assert "pallas" not in text.lower() and "custom_call" not in text   # no kernel was traced at all
  _assert_close(got(q, k, v, mask), A.xla_attention(q, k, v, mask, scale=SCALE), "fallback out")


# ------------------------------------------------------------------------------------------------
# choose / auto
# ------------------------------------------------------------------------------------------------
def _shapes(sq, sk=None):
  """q/k shapes [B, S, N, H] with b = 1, n = 8: float32 scores are 32 * sq * sk bytes."""
  return (1, sq, 8, 64), (1, sk or sq, 8, 64)


def test_auto_resolves_per_backend_and_mask():
  rows = A.AttentionMask(q_segment=jnp.zeros((1, 1), jnp.int32), k_segment=jnp.zeros((1, 1), jnp.int32))
  frames = dataclasses.replace(rows, kind="vit_frames")
  llm, dec = _llm(1, 8), _decode(1, 8, 4, 1)
  # (non-causal ViT masks, causal LLM/decode masks) above the score threshold
  want_big = {"cpu": ("blockwise", "blockwise"), "gpu": ("pallas_gpu", "blockwise"),
              "cuda": ("pallas_gpu", "blockwise"), "rocm": ("pallas_gpu", "blockwise"),
              "tpu": ("splash", "blockwise")}
  for backend, (non_causal, causal) in want_big.items():
    for mask in (rows, frames, llm, dec):
      assert A.choose("auto", mask, *_shapes(1024), backend=backend) == "xla"        # 32 MiB of scores
    for mask in (rows, frames):
      assert A.choose("auto", mask, *_shapes(4096), backend=backend) == non_causal   # 512 MiB
    assert A.choose("auto", llm, *_shapes(4096), backend=backend) == causal
    # queries and keys of different lengths (decode against a long cache) are never fused
    assert A.choose("auto", dec, *_shapes(64, 300_000), backend=backend) == "blockwise"
    assert A.choose("auto", rows, *_shapes(64, 300_000), backend=backend) == "blockwise"
    for impl in ("xla", "blockwise"):
      assert A.choose(impl, llm, *_shapes(4096), backend=backend) == impl
  # the threshold is inclusive: exactly XLA_MAX_SCORE_BYTES of scores still uses xla
  sq = A.XLA_MAX_SCORE_BYTES // (4 * 8 * 2048)
  assert A.choose("auto", llm, *_shapes(sq, 2048), backend="tpu") == "xla"
  assert A.choose("auto", llm, *_shapes(sq + 1, 2048), backend="tpu") == "blockwise"


def test_auto_runs_the_resolved_implementation():
  # on this CPU backend an LLM call over the threshold resolves to blockwise, whose program has the
  # online-softmax loops (while loops); the xla reference under it has none. Lowered only, never run.
  def text(s):
    shape = jax.ShapeDtypeStruct((1, s, 8, 64), jnp.float32)
    mask = _llm(1, s)
    return jax.jit(lambda q, k, v: A.attention(q, k, v, mask, scale=SCALE)).lower(shape, shape, shape).as_text()
  assert "while" in text(6000) and "while" not in text(600)     # 1.1 GiB vs 11 MiB of scores


def test_auto_logs_each_choice_once(caplog):
  mask = _llm(1, 8)
  shapes = ((1, 7777, 8, 64), (1, 7777, 8, 64))   # unique to this test (the log set is process-wide)
  with caplog.at_level(logging.INFO, logger=A.__name__):
    for _ in range(3):
      A.choose("auto", mask, *shapes, backend="tpu")
  lines = [r.getMessage() for r in caplog.records if "7777" in r.getMessage()]
  assert len(lines) == 1 and "llm: blockwise" in lines[0]


def test_bad_arguments_raise():
  q, k, v, _, _ = _inputs(0, 1, 8, 8, 3, 2, bias=False)
  with pytest.raises(ValueError, match="multiple"):
    A.attention(q, k, v, A.vit_frames_mask(1, 8), scale=SCALE, impl="xla")
  q, k, v, _, _ = _inputs(0, 1, 8, 8, 4, 2, bias=False)
  with pytest.raises(ValueError, match="impl"):
    A.attention(q, k, v, A.vit_frames_mask(1, 8), scale=SCALE, impl="flash")


# ------------------------------------------------------------------------------------------------
# one compilation per shape
# ------------------------------------------------------------------------------------------------
def test_blockwise_compiles_once_per_shape():
  b, s = 2, 200

  @jax.jit
  def fwd_and_grad(q, k, v, mask):
    f = lambda q: A.attention(q, k, v, mask, scale=SCALE, impl="blockwise", block_q=64, block_k=64)
    out, vjp = jax.vjp(f, q)
    return out, vjp(out)[0]

  tm, vis, ex = _llm_layout(b, s)
  masks = [_llm(b, s, seed=0), _llm(b, s, seed=7),
           A.llm_mask(*map(jnp.asarray, (tm & (np.arange(s) < s // 2), ~vis, np.zeros_like(ex))))]
  outs = []
  for i, mask in enumerate(masks):
    q, k, v, _, _ = _inputs(10 + i, b, s, s, 4, 2, bias=False)
    out, dq = fwd_and_grad(q, k, v, mask)
    outs.append(np.asarray(out))
    if i == 2:   # the last layout is unlike the others: check it is really applied
      _assert_close(out, A.xla_attention(q, k, v, mask, scale=SCALE), "blockwise out, third mask")
  assert fwd_and_grad._cache_size() == 1
  assert not np.allclose(outs[0], outs[1])


# ------------------------------------------------------------------------------------------------
# bfloat16
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl,kind", [("blockwise", "llm"), ("splash", "rows"),
                                       pytest.param("blockwise", "frames", marks=pytest.mark.slow),
                                       pytest.param("xla", "llm", marks=pytest.mark.slow),
                                       pytest.param("pallas_gpu", "frames", marks=pytest.mark.slow)])
def test_bfloat16_runs_and_is_close_to_float32(impl, kind):
  b, s = 2, 96 if impl in ("pallas_gpu", "splash") else 300
  mask = {"llm": lambda: _llm(b, s), "frames": lambda: A.vit_frames_mask(b, s),
          "rows": lambda: A.vit_rows_mask(jnp.asarray(_rows_segments(b, s)))}[kind]()
  q, k, v, key_bias, w = _inputs(8, b, s, s, 4, 2, bias=kind == "frames")
  ref, ref_g = _out_and_grads(q, k, v, key_bias, w, mask, impl="xla")
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out, got_g = _out_and_grads(*bf, key_bias, w, mask, impl=impl, block=64)
  assert out.dtype == jnp.bfloat16 and got_g[0].dtype == jnp.bfloat16
  # bf16 keeps 8 mantissa bits (relative step 2^-8 ~ 4e-3); inputs are rounded, products accumulate
  # in float32: a few bf16 steps of the output scale
  _assert_close(out, ref, f"{impl} bf16 out", tol=3e-2)
  for name, g, r in zip(("dq", "dk", "dv", "dbias"), got_g, ref_g):
    if r is not None:
      _assert_close(g, r, f"{impl} bf16 {name}", tol=5e-2)


# ------------------------------------------------------------------------------------------------
# whole model: a tiny STTS Molmo2 with blockwise attention equals the same model with xla
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _tiny_pair():
  """The same tiny STTS Molmo2 (ratio 0.5) twice: attention "xla" and "blockwise" with 16-token blocks,
  so the ViT's packed rows (81-slot frames) and the LLM sequence (~60 tokens) span several blocks."""
  from flax import nnx
  from stts_jax.models.vlm import Molmo2
  from stts_jax.testing.tiny import tiny_model_config
  from tests.models.test_video_forward import _seq_len, make_batch
  cfg = tiny_model_config(method="stts", ratio=0.5)
  ref = Molmo2(dataclasses.replace(cfg, attention="xla").validate(), rngs=nnx.Rngs(0))
  blk = Molmo2(dataclasses.replace(cfg, attention="blockwise", attention_block=16).validate(), rngs=nnx.Rngs(0))
  nnx.update(blk, nnx.state(ref, nnx.Param))
  t = 4
  batch = {k: jnp.asarray(v) for k, v in make_batch(cfg, [4, 2], t, _seq_len(t), seed=2).items()}
  return ref, blk, batch


def _video_loss(model, batch):
  """Training loss of one video batch: mean answer cross entropy + the STTS auxiliary loss."""
  from stts_jax.models import video_forward as vf
  from stts_jax.train.step import answer_cross_entropy
  out = vf.forward_video(model, batch, rng=jax.random.key(0), deterministic=False)
  ce = answer_cross_entropy(out.logits, out.target_ids, out.loss_mask) / jnp.maximum(jnp.sum(out.loss_mask), 1)
  return ce + out.aux_loss, out


@pytest.mark.slow   # ~45 s of CPU: builds two tiny Molmo2 and compiles both video forwards
def test_tiny_molmo2_blockwise_logits_equal_xla():
  from flax import nnx
  ref, blk, batch = _tiny_pair()
  run = nnx.jit(lambda m, b: _video_loss(m, b)[1])
  out_ref, out_blk = run(ref, batch), run(blk, batch)
  np.testing.assert_array_equal(np.asarray(out_blk.keep_mask), np.asarray(out_ref.keep_mask))
  assert int(np.asarray(out_ref.num_kept).sum()) < 6 * 9   # STTS pruned windows
  _assert_close(out_blk.logits, out_ref.logits, "tiny Molmo2 logits")


@pytest.mark.slow   # ~2 min of CPU: compiles the gradient of the whole model twice
def test_tiny_molmo2_blockwise_training_gradients_equal_xla():
  from flax import nnx
  ref, blk, batch = _tiny_pair()

  @nnx.jit
  def grads(model, batch):
    params = nnx.state(model, nnx.Param)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    def loss(p):
      return _video_loss(nnx.merge(graphdef, p, rest, copy=True), batch)[0]
    return jax.value_and_grad(loss)(params)

  (loss_ref, g_ref), (loss_blk, g_blk) = grads(ref, batch), grads(blk, batch)
  _assert_close(loss_blk, loss_ref, "loss")
  flat_ref, flat_blk = dict(nnx.to_flat_state(g_ref)), dict(nnx.to_flat_state(g_blk))
  assert flat_ref.keys() == flat_blk.keys()
  scorer = [p for p in flat_ref if p[0] == "scorer"]
  assert scorer and max(np.abs(np.asarray(flat_ref[p].get_value())).max() for p in scorer) > 0   # LM -> scorer
  for path in flat_ref:
    _assert_close(flat_blk[path].get_value(), flat_ref[path].get_value(), f"grad {'.'.join(map(str, path))}")


def test_blockwise_memory_stays_linear_inside_a_differentiated_layer_scan():
  """Regression: inside a scanned, differentiated stack of layers the masks are loop constants, and
  JAX's scan partial evaluation used to hoist the per-block masks/bias broadcasts out of the loop,
  stacked over every (query block, key block) pair: a score-sized [B, N, L, L] buffer again."""
  s, n, kh, h, blk = 2048, 4, 2, 16, 256
  q = jnp.ones((1, s, n, h))
  k = jnp.ones((1, s, kh, h))
  v = jnp.ones((1, s, kh, h))
  mask = A.llm_mask(jnp.ones((1, s), bool), jnp.zeros((1, s), bool))

  def loss(q, k, v):
    def layer(c, _):
      return A.attention(c, k, v, mask, scale=0.25, impl="blockwise", block_q=blk, block_k=blk), None
    out, _ = jax.lax.scan(layer, q, None, length=2)
    return jnp.sum(out ** 2)

  temp = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
  score_bytes = 4 * n * s * s                      # one layer's float32 scores: 64 MiB here
  assert temp < score_bytes / 4, (temp, score_bytes)

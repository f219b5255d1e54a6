"""One attention entry point for every Molmo2/STTS call site, with implementations chosen by config.

Call sites name the mask they need (`AttentionMask`, built from small per-token arrays), never a
kernel. The rule every implementation reproduces exactly (DESIGN.md section 7):

  query q may see key k  iff  seg_q == seg_k  AND  seg_k >= 0
                              AND (not causal  OR  idx_k <= idx_q  OR  (vis_q AND vis_k))

  * ViT packed rows: `segment_ids` = frame segment within the row (-1: empty slot), not causal.
  * ViT full frames (unpruned, and the STTS soft block `prune_at + 1`): one segment per row; the soft
    block adds a per-key bias (`key_bias`, log s'), the only path from the LM loss to the scorer.
  * LLM prefill/training: `example_ids` (-1: padding), causal by sequence index, with the vision overlay
    (vision tokens of the same example see each other; timestamp text inside the span stays causal).
  * Decode / cached prefill: queries at cache slots `cache_index + i`, keys = cache slots, validity and
    vision flags per slot.
A query that may see no key (padding) gets an all-zero output and zero gradients, never NaN.

Implementations (`impl`):
  xla        the einsum reference: materialises [B, N, Sq, Sk] float32 scores (parity tests compare to it).
  blockwise  pure JAX, every backend: online softmax over key blocks inside a loop over query blocks,
             a custom VJP that recomputes each block in the backward pass; never a [Sq, Sk] tensor. Blocks
             that the mask rules out entirely are skipped (`lax.cond`), so causal masks cost about half.
  pallas_gpu the Pallas Triton flash kernel (`jax.experimental.pallas.ops.gpu.attention.mha`, segment ids,
             its own backward kernels); serves the non-causal masks (ViT rows and frames). The per-key bias
             rides as one extra head-dim column (q' = [q, 1], k' = [k, bias/scale]).
  splash     Pallas TPU splash attention (segment ids), same masks and bias trick as pallas_gpu.
  auto       per backend and per call site (`choose`): non-causal masks -> splash on TPU, pallas_gpu on
             GPU; causal masks (the LLM: causal OR same-example vision cannot be expressed by segment
             ids) -> blockwise. Anywhere, a score matrix under `XLA_MAX_SCORE_BYTES` uses `xla` (small
             calls: the demo model, one decode query), which is also what CPU gets at demo size.
  The choice for each (call site, shape) is logged once.
"""

import contextlib
import dataclasses
import functools
import logging
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "pallas_gpu", "splash")
MASK_KINDS = ("vit_rows", "vit_frames", "llm", "decode")

# Finite "minus infinity" for the xla reference (exp underflows to exactly 0 in float32).
MASK_VALUE = -1e30
# auto: calls whose float32 score matrix [B, N, Sq, Sk] stays under this use the xla reference.
XLA_MAX_SCORE_BYTES = 256 * 1024 ** 2
DEFAULT_BLOCK = 512

_log = logging.getLogger(__name__)
_LOGGED: set = set()
_RECORDERS: list = []   # active `record_choices` lists


@struct.dataclass
class AttentionMask:
  """Per-token description of who may attend to whom (module docstring).

  q_segment [B, Sq], k_segment [B, Sk] int32: segment (frame in a packed ViT row, example in an LLM
    sequence); -1 on the key side = invalid key, on the query side = padding query (zero output).
  q_index [B, Sq], k_index [B, Sk] int32: sequence index / cache slot for the causal rule (None unless causal).
  q_vision [B, Sq], k_vision [B, Sk] bool: the bidirectional vision overlay of a causal mask (or None).
  kind: the call site's mask kind (MASK_KINDS), static; causal: static.
  """
  q_segment: Any
  k_segment: Any
  q_index: Any = None
  k_index: Any = None
  q_vision: Any = None
  k_vision: Any = None
  kind: str = struct.field(pytree_node=False, default="vit_rows")
  causal: bool = struct.field(pytree_node=False, default=False)

  def dense(self) -> Bool[Array, "B Sq Sk"]:
    """The full boolean mask (reference and tests only)."""
    return _allowed(self.q_segment, self.k_segment, self.q_index, self.k_index, self.q_vision,
                    self.k_vision, self.causal)


def _allowed(qs, ks, qi, ki, qv, kv, causal: bool):
  ok = (qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] >= 0)
  if causal:
    order = ki[:, None, :] <= qi[:, :, None]
    if qv is not None:
      order = order | (qv[:, :, None] & kv[:, None, :])
    ok = ok & order
  return ok


# ------------------------------------------------------------------------------------------------
# mask constructors: one per call site
# ------------------------------------------------------------------------------------------------
def vit_rows_mask(segment_ids: Int[Array, "B S"]) -> AttentionMask:
  """Packed ViT rows: block-diagonal by frame segment; -1 = empty slot (zero output)."""
  seg = jnp.asarray(segment_ids, jnp.int32)
  return AttentionMask(q_segment=seg, k_segment=seg, kind="vit_rows")


def vit_frames_mask(batch: int, length: int) -> AttentionMask:
  """Whole frames (one segment per row): the unpruned ViT and the STTS soft block."""
  seg = jnp.zeros((batch, length), jnp.int32)
  return AttentionMask(q_segment=seg, k_segment=seg, kind="vit_frames")


def llm_mask(token_mask: Bool[Array, "B S"], vision_mask: Bool[Array, "B S"],
             example_ids: Optional[Int[Array, "B S"]] = None) -> AttentionMask:
  """LLM prefill/training: (causal OR both vision) AND same example AND key valid.

  example_ids: example of each token within a packed sequence (default: one example per row);
  padding tokens (`token_mask` False) get -1 whatever their id.
  """
  token_mask = jnp.asarray(token_mask, bool)
  b, s = token_mask.shape
  ex = jnp.zeros((b, s), jnp.int32) if example_ids is None else jnp.asarray(example_ids, jnp.int32)
  seg = jnp.where(token_mask, ex, -1)
  idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  vis = jnp.asarray(vision_mask, bool)
  return AttentionMask(q_segment=seg, k_segment=seg, q_index=idx, k_index=idx, q_vision=vis, k_vision=vis,
                       kind="llm", causal=True)


def decode_mask(query_mask: Bool[Array, "B S"], query_vision: Bool[Array, "B S"], cache_index: Int[Array, ""],
                cache_valid: Bool[Array, "B T"], cache_vision: Bool[Array, "B T"],
                example_ids: Optional[Int[Array, "B S"]] = None,
                cache_example_ids: Optional[Int[Array, "B T"]] = None) -> AttentionMask:
  """Queries at cache slots `cache_index + i` against the whole (partly filled) cache.

  cache_valid/cache_vision already include the queries' own slots. Padding queries get -1.
  """
  query_mask = jnp.asarray(query_mask, bool)
  b, s = query_mask.shape
  t = cache_valid.shape[1]
  qex = jnp.zeros((b, s), jnp.int32) if example_ids is None else jnp.asarray(example_ids, jnp.int32)
  kex = jnp.zeros((b, t), jnp.int32) if cache_example_ids is None else jnp.asarray(cache_example_ids, jnp.int32)
  q_idx = jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32) + jnp.arange(s, dtype=jnp.int32), (b, s))
  k_idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return AttentionMask(q_segment=jnp.where(query_mask, qex, -1), k_segment=jnp.where(cache_valid, kex, -1),
                       q_index=q_idx, k_index=k_idx, q_vision=jnp.asarray(query_vision, bool),
                       k_vision=jnp.asarray(cache_vision, bool), kind="decode", causal=True)


# ------------------------------------------------------------------------------------------------
# the entry point
# ------------------------------------------------------------------------------------------------
def attention(q: Float[Array, "B Sq N H"], k: Float[Array, "B Sk K H"], v: Float[Array, "B Sk K H"],
              mask: AttentionMask, *, scale: float, key_bias: Optional[Float[Array, "B Sk"]] = None,
              impl: str = "auto", block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK
              ) -> Float[Array, "B Sq N H"]:
  """Softmax attention under `mask`, grouped kv heads (N % K == 0), float32 softmax, output in v's dtype.

  key_bias [B, Sk]: additive logit per key (same for every head and query); gradients flow to it.
  impl: one of IMPLEMENTATIONS; "auto" resolves through `choose`.
  """
  n, h = q.shape[-2:]
  kh = k.shape[-2]
  if n % kh:
    raise ValueError(f"attention: {n} query heads not a multiple of {kh} kv heads")
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention: impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
  resolved = choose(impl, mask, q.shape, k.shape)
  if resolved == "xla":
    return xla_attention(q, k, v, mask, scale=scale, key_bias=key_bias)
  if resolved == "blockwise":
    return blockwise_attention(q, k, v, mask, scale=scale, key_bias=key_bias, block_q=block_q, block_k=block_k)
  if resolved == "pallas_gpu":
    return pallas_gpu_attention(q, k, v, mask, scale=scale, key_bias=key_bias)
  return splash_attention(q, k, v, mask, scale=scale, key_bias=key_bias)


def fused_supports(mask: AttentionMask, q_shape, k_shape) -> bool:
  """Whether the segment-id kernels (pallas_gpu, splash) express `mask` exactly: self-attention with
  one segment array and no causal rule (the ViT's masks)."""
  return (not mask.causal) and tuple(q_shape[:2]) == tuple(k_shape[:2])


def choose(impl: str, mask: AttentionMask, q_shape, k_shape, backend: Optional[str] = None) -> str:
  """Resolves `impl` for one call site and shape (see the module docstring); logs each choice once."""
  backend = backend or jax.default_backend()
  if impl == "auto":
    b, sq, n, _ = q_shape
    score_bytes = 4 * b * n * sq * k_shape[1]
    fused = {"tpu": "splash", "gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu"}.get(backend)
    if score_bytes <= XLA_MAX_SCORE_BYTES:
      resolved = "xla"
    elif fused is not None and fused_supports(mask, q_shape, k_shape):
      resolved = fused
    else:
      resolved = "blockwise"
  elif impl in ("pallas_gpu", "splash") and not fused_supports(mask, q_shape, k_shape):
    resolved = "blockwise"   # the fused kernels cannot express this mask: exact fallback
  else:
    resolved = impl
  key = (impl, resolved, mask.kind, tuple(q_shape), tuple(k_shape), backend)
  entry = {"site": mask.kind, "impl": resolved, "asked": impl, "q": list(q_shape), "k": list(k_shape),
           "backend": backend}
  for recorder in _RECORDERS:
    if entry not in recorder:
      recorder.append(entry)
  if key not in _LOGGED:
    _LOGGED.add(key)
    _log.info("attention %s: %s (q %s, k %s, backend %s, asked %s)", mask.kind, resolved, tuple(q_shape),
              tuple(k_shape), backend, impl)
  return resolved


@contextlib.contextmanager
def record_choices():
  """Collects every (call site, shape) resolution made inside the block (e.g. while a step is lowered),
  as dicts {site, impl, asked, q, k, backend}, each once; independent of what was logged before."""
  recorder: list = []
  _RECORDERS.append(recorder)
  try:
    yield recorder
  finally:
    _RECORDERS.remove(recorder)


# ------------------------------------------------------------------------------------------------
# xla: the reference
# ------------------------------------------------------------------------------------------------
def dense_attention(
    q_bsnh: Float[Array, "*batch Sq N H"],
    k_bskh: Float[Array, "*batch Sk K H"],
    v_bskh: Float[Array, "*batch Sk K H"],
    *,
    scale: float,
    bias: Optional[Float[Array, "..."]] = None,
    mask: Optional[Bool[Array, "..."]] = None,
) -> Float[Array, "*batch Sq N H"]:
  """Softmax attention with grouped kv heads (N % K == 0), float32 logits and softmax.

  bias: additive logits, broadcastable to `[*batch, N, Sq, Sk]`; must be finite (use large negative
    numbers such as -1e9 to suppress a key).
  mask: True = may attend, broadcastable to `[*batch, N, Sq, Sk]`. A query that may attend no key
    gets an all-zero output (no NaN, zero gradient) instead of a uniform average.
  Output is in `v`'s dtype.
  """
  n, h = q_bsnh.shape[-2:]
  k = k_bskh.shape[-2]
  if n % k:
    raise ValueError(f"attention: {n} query heads not a multiple of {k} kv heads")
  g = n // k
  sq = q_bsnh.shape[-3]
  # Heads-major operands ([*B, K, G, Sq, H], [*B, K, Sk, H]; small transposes): both dots are then plain
  # batched matmuls whose [Sq, Sk] operand/result is row-major in the layout the softmax reads. With
  # sequence-major operands XLA:CPU computed the scores as [K, Sk, Sq*G] and inserted two full
  # [B, N, Sq, Sk] transposing copies per call (around the mask select and before the PV dot), which
  # cost several times the dots themselves at a few thousand tokens.
  q_bkgqh = jnp.moveaxis(q_bsnh.reshape(*q_bsnh.shape[:-2], k, g, h), -4, -2)
  k_bksh = jnp.swapaxes(k_bskh, -3, -2)
  v_bksh = jnp.swapaxes(v_bskh, -3, -2)
  logits = jnp.einsum("...kgqh,...ksh->...kgqs", q_bkgqh, k_bksh,
                      preferred_element_type=jnp.float32)
  logits = logits.reshape(*logits.shape[:-4], n, *logits.shape[-2:]) * scale   # [*B, N, Sq, Sk]
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    # Exactly zero for masked keys; all-zero rows for queries without any valid key.
    probs = jnp.where(mask, probs, 0.0)
  probs = probs.astype(v_bskh.dtype)
  probs_bkgqs = probs.reshape(*probs.shape[:-3], k, g, *probs.shape[-2:])
  out = jnp.einsum("...kgqs,...ksh->...kgqh", probs_bkgqs, v_bksh)       # [*B, K, G, Sq, H]
  out = jnp.moveaxis(out, -2, -4)                                           # [*B, Sq, K, G, H]
  return out.reshape(*out.shape[:-4], sq, n, h)



def xla_attention(q, k, v, mask: AttentionMask, *, scale: float, key_bias=None):
  """The einsum reference under `mask`: [B, N, Sq, Sk] float32 logits and softmax."""
  bias = None if key_bias is None else key_bias.astype(jnp.float32)[:, None, None, :]
  # Whole frames need no mask (every key of the row is valid): skip the [B, 1, S, S] select.
  dense = None if mask.kind == "vit_frames" else mask.dense()[:, None]
  return dense_attention(q, k, v, scale=scale, bias=bias, mask=dense)


# ------------------------------------------------------------------------------------------------
# blockwise: online softmax, custom VJP
# ------------------------------------------------------------------------------------------------
def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pad_axis1(x, length: int, value):
  if x is None or x.shape[1] == length:
    return x
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return jnp.pad(x, pad, constant_values=value)


def blockwise_attention(q, k, v, mask: AttentionMask, *, scale: float, key_bias=None,
                        block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK):
  """Memory-efficient exact attention (module docstring). Lengths are padded to the block sizes inside."""
  b, sq, n, h = q.shape
  sk = k.shape[1]
  bq = min(block_q, _round_up(sq, 8))
  bk = min(block_k, _round_up(sk, 8))
  sq_p, sk_p = _round_up(sq, bq), _round_up(sk, bk)
  causal = mask.causal
  qs = _pad_axis1(mask.q_segment.astype(jnp.int32), sq_p, -1)
  ks = _pad_axis1(mask.k_segment.astype(jnp.int32), sk_p, -1)
  if causal:
    qi = _pad_axis1(mask.q_index.astype(jnp.int32), sq_p, 0)
    ki = _pad_axis1(mask.k_index.astype(jnp.int32), sk_p, 0)
    has_vision = mask.q_vision is not None
    qv = _pad_axis1(mask.q_vision, sq_p, False) if has_vision else jnp.zeros((b, sq_p), bool)
    kv = _pad_axis1(mask.k_vision, sk_p, False) if has_vision else jnp.zeros((b, sk_p), bool)
  else:
    qi = jnp.zeros((b, sq_p), jnp.int32)
    ki = jnp.zeros((b, sk_p), jnp.int32)
    qv = jnp.zeros((b, sq_p), bool)
    kv = jnp.zeros((b, sk_p), bool)
  bias = jnp.zeros((b, sk_p), jnp.float32) if key_bias is None else _pad_axis1(key_bias.astype(jnp.float32), sk_p, 0.0)
  qp, kp, vp = _pad_axis1(q, sq_p, 0), _pad_axis1(k, sk_p, 0), _pad_axis1(v, sk_p, 0)
  cfg = _BlockConfig(scale=float(scale), block_q=bq, block_k=bk, causal=causal)
  out = _flash(cfg, qp, kp, vp, bias, qs, ks, qi, ki, qv, kv)
  return out[:, :sq]


@dataclasses.dataclass(frozen=True)
class _BlockConfig:
  scale: float
  block_q: int
  block_k: int
  causal: bool


def _blocks(x, size: int):
  """[B, S, ...] -> [S/size, B, size, ...]."""
  b, s = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, s // size, size, *x.shape[2:]), 1, 0)


def _unblocks(x):
  """[nb, B, size, ...] -> [B, nb*size, ...]."""
  nb, b, size = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(b, nb * size, *x.shape[3:])


def _block_table(cfg, qs, ks, qi, ki, qv, kv):
  """live [nq, nk] bool: may any query of block i see any key of block j, in any row of the batch?

  Built from per-block summaries of the per-token arrays (segment range, index range, any vision),
  so it is a superset of the exact answer (a live block can still be fully masked; a dead one never
  holds an allowed pair). Reducing over the batch once here keeps the loops' `cond` predicates free of
  per-iteration cross-device reductions when the batch is sharded.
  """
  big = jnp.iinfo(jnp.int32).max

  def summary(seg, idx, vis, size, use_max_idx):
    b = seg.shape[0]
    seg, idx, vis = (x.reshape(b, -1, size) for x in (seg, idx, vis))
    valid = seg >= 0
    seg_lo = jnp.min(jnp.where(valid, seg, big), -1)
    seg_hi = jnp.max(jnp.where(valid, seg, -1), -1)
    idx_ext = (jnp.max(jnp.where(valid, idx, -big), -1) if use_max_idx
               else jnp.min(jnp.where(valid, idx, big), -1))
    return jnp.any(valid, -1), seg_lo, seg_hi, idx_ext, jnp.any(valid & vis, -1)

  q_any, q_lo, q_hi, q_idx_max, q_vis = summary(qs, qi, qv, cfg.block_q, True)    # each [B, nq]
  k_any, k_lo, k_hi, k_idx_min, k_vis = summary(ks, ki, kv, cfg.block_k, False)   # each [B, nk]
  e = lambda x: x[:, :, None]
  f = lambda x: x[:, None, :]
  live = e(q_any) & f(k_any) & (e(q_lo) <= f(k_hi)) & (f(k_lo) <= e(q_hi))
  if cfg.causal:
    live = live & ((f(k_idx_min) <= e(q_idx_max)) | (e(q_vis) & f(k_vis)))
  return jnp.any(live, axis=0)


def _scores(cfg, q_blk, k_blk, bias_blk, ok):
  """q_blk [B, bq, K, G, H], k_blk [B, bk, K, H] -> masked float32 scores [B, K, G, bq, bk] (-inf outside)."""
  s = jnp.einsum("bqkgh,bskh->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32) * cfg.scale
  s = s + bias_blk[:, None, None, None, :]
  return jnp.where(ok[:, None, None], s, -jnp.inf)


def _tie_to(x, *masks):
  """Returns `masks` made data-dependent on `x` (an optimisation barrier, no arithmetic).

  Inside a differentiated `lax.scan` over layers the mask arrays are loop constants while q/k/v are
  not. JAX's scan partial evaluation hoists every loop-invariant computation out of the loop, and it
  does so recursively through our block loops: the per-block masks and bias broadcasts ([B, N, bq, bk]
  each) would be computed once outside and stacked over all (query block, key block) pairs, i.e. the
  full [B, N, L, L] score-sized tensor this kernel exists to avoid. Tying them to q keeps them inside.
  """
  out = jax.lax.optimization_barrier((x, *masks))
  return out[1:]


def _flash_forward(cfg: _BlockConfig, q, k, v, bias, qs, ks, qi, ki, qv, kv):
  bias, qs, ks, qi, ki, qv, kv = _tie_to(q, bias, qs, ks, qi, ki, qv, kv)
  b, sq, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  q5 = q.reshape(b, sq, kh, g, h)
  kb, vb = _blocks(k, cfg.block_k), _blocks(v, cfg.block_k)
  biasb, ksb, kib, kvb = _blocks(bias, cfg.block_k), _blocks(ks, cfg.block_k), _blocks(ki, cfg.block_k), _blocks(kv, cfg.block_k)
  live = _block_table(cfg, qs, ks, qi, ki, qv, kv)

  def one_q_block(xs):
    q_blk, qs_blk, qi_blk, qv_blk, live_i = xs
    bq = q_blk.shape[1]
    init = (jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, h), jnp.float32))

    def step(carry, ys):
      k_blk, v_blk, bias_blk, ks_blk, ki_blk, kv_blk, live_ij = ys

      def compute(carry):
        m, l, acc = carry
        ok = _allowed(qs_blk, ks_blk, qi_blk, ki_blk, qv_blk, kv_blk, cfg.causal)
        s = _scores(cfg, q_blk, k_blk, bias_blk, ok)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        l = l * alpha + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
        return m_new, l, acc * alpha[..., None] + pv

      return jax.lax.cond(live_ij, compute, lambda c: c, carry), None

    (m, l, acc), _ = jax.lax.scan(step, init, (kb, vb, biasb, ksb, kib, kvb, live_i))
    live = l > 0
    out = jnp.where(live[..., None], acc / jnp.where(live, l, 1.0)[..., None], 0.0)
    lse = jnp.where(live, jnp.where(jnp.isneginf(m), 0.0, m) + jnp.log(jnp.where(live, l, 1.0)), jnp.inf)
    out = jnp.moveaxis(out, 3, 1).reshape(b, bq, n, h)           # [B, bq, N, H]
    return out.astype(q.dtype), jnp.moveaxis(lse, 3, 1).reshape(b, bq, n)

  outs, lses = jax.lax.map(one_q_block, (_blocks(q5, cfg.block_q), _blocks(qs, cfg.block_q),
                                         _blocks(qi, cfg.block_q), _blocks(qv, cfg.block_q), live))
  return _unblocks(outs), _unblocks(lses)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, bias, qs, ks, qi, ki, qv, kv):
  return _flash_forward(cfg, q, k, v, bias, qs, ks, qi, ki, qv, kv)[0]


def _flash_fwd(cfg, q, k, v, bias, qs, ks, qi, ki, qv, kv):
  out, lse = _flash_forward(cfg, q, k, v, bias, qs, ks, qi, ki, qv, kv)
  return out, (q, k, v, bias, qs, ks, qi, ki, qv, kv, out, lse)


def _flash_bwd(cfg, res, dout):
  q, k, v, bias, qs, ks, qi, ki, qv, kv, out, lse = res
  bias, qs, ks, qi, ki, qv, kv = _tie_to(dout, bias, qs, ks, qi, ki, qv, kv)
  b, sq, n, h = q.shape
  sk, kh = k.shape[1], k.shape[2]
  g = n // kh
  # delta_i = sum_h dO_i * O_i: the softmax-Jacobian term of every query row.
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)     # [B, Sq, N]
  q5b = _blocks(q.reshape(b, sq, kh, g, h), cfg.block_q)
  do5b = _blocks(dout.reshape(b, sq, kh, g, h), cfg.block_q)
  lseb = _blocks(jnp.where(jnp.isinf(lse), 0.0, lse).reshape(b, sq, kh, g), cfg.block_q)
  deltab = _blocks(delta.reshape(b, sq, kh, g), cfg.block_q)
  qsb, qib, qvb = _blocks(qs, cfg.block_q), _blocks(qi, cfg.block_q), _blocks(qv, cfg.block_q)
  nq = sq // cfg.block_q
  live = _block_table(cfg, qs, ks, qi, ki, qv, kv)

  def one_k_block(dq, ys):
    k_blk, v_blk, bias_blk, ks_blk, ki_blk, kv_blk, live_j = ys
    bk = k_blk.shape[1]
    init = (jnp.zeros((b, bk, kh, h), jnp.float32), jnp.zeros((b, bk, kh, h), jnp.float32),
            jnp.zeros((b, bk), jnp.float32), dq)

    def step(carry, i):
      def compute(carry):
        dk, dv, dbias, dq = carry
        q_blk, do_blk, lse_blk, delta_blk = q5b[i], do5b[i], lseb[i], deltab[i]
        ok = _allowed(qsb[i], ks_blk, qib[i], ki_blk, qvb[i], kv_blk, cfg.causal)
        s = _scores(cfg, q_blk, k_blk, bias_blk, ok)                              # [B, K, G, bq, bk]
        p = jnp.exp(s - jnp.moveaxis(lse_blk, 1, 3)[..., None])                    # 0 where masked
        dv = dv + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(do_blk.dtype), do_blk,
                             preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqkgh,bskh->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
        ds = p * (dp - jnp.moveaxis(delta_blk, 1, 3)[..., None])
        dbias = dbias + jnp.sum(ds, axis=(1, 2, 3))
        ds = ds.astype(q_blk.dtype)
        dq_blk = jnp.einsum("bkgqs,bskh->bqkgh", ds, k_blk, preferred_element_type=jnp.float32) * cfg.scale
        dk = dk + jnp.einsum("bkgqs,bqkgh->bskh", ds, q_blk, preferred_element_type=jnp.float32) * cfg.scale
        start = i * cfg.block_q
        cur = jax.lax.dynamic_slice_in_dim(dq, start, cfg.block_q, axis=1)
        dq = jax.lax.dynamic_update_slice_in_dim(dq, cur + dq_blk, start, axis=1)
        return dk, dv, dbias, dq

      return jax.lax.cond(live_j[i], compute, lambda c: c, carry), None

    (dk, dv, dbias, dq), _ = jax.lax.scan(step, init, jnp.arange(nq))
    return dq, (dk, dv, dbias)

  dq0 = jnp.zeros((b, sq, kh, g, h), jnp.float32)
  kb, vb = _blocks(k, cfg.block_k), _blocks(v, cfg.block_k)
  dq, (dkb, dvb, dbiasb) = jax.lax.scan(
      one_k_block, dq0, (kb, vb, _blocks(bias, cfg.block_k), _blocks(ks, cfg.block_k), _blocks(ki, cfg.block_k),
                         _blocks(kv, cfg.block_k), live.T))
  dq = dq.reshape(b, sq, n, h).astype(q.dtype)
  dk, dv, dbias = _unblocks(dkb).astype(k.dtype), _unblocks(dvb).astype(v.dtype), _unblocks(dbiasb)
  # The mask arrays are integer/bool: no cotangent.
  return (dq, dk, dv, dbias.astype(bias.dtype), None, None, None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------------
# fused kernels (non-causal segment masks): Pallas GPU and TPU splash
# ------------------------------------------------------------------------------------------------
def _interpret() -> bool:
  """Pallas kernels run in interpret mode off their native backend (CPU tests)."""
  return jax.default_backend() not in ("gpu", "cuda", "rocm", "tpu")


def _with_bias_column(q, k, v, key_bias, scale: float, head_multiple: int):
  """Appends the per-key bias as one head-dim column (q' = [q, 1], k' = [k, bias/scale]) and zero-pads
  the head dim to `head_multiple`; repeats kv heads for GQA. Returns q', k', v' (same head dim)."""
  n, h = q.shape[-2:]
  kh = k.shape[-2]
  if kh != n:
    k = jnp.repeat(k, n // kh, axis=2)
    v = jnp.repeat(v, n // kh, axis=2)
  if key_bias is not None:
    ones = jnp.ones(q.shape[:-1] + (1,), q.dtype)
    col = jnp.broadcast_to((key_bias / scale).astype(k.dtype)[:, :, None, None], k.shape[:-1] + (1,))
    q, k = jnp.concatenate([q, ones], -1), jnp.concatenate([k, col], -1)
    v = jnp.concatenate([v, jnp.zeros(v.shape[:-1] + (1,), v.dtype)], -1)
  width = _round_up(q.shape[-1], head_multiple)
  pad = [(0, 0)] * 3 + [(0, width - q.shape[-1])]
  return jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)


def _fused_prepare(q, k, v, mask, key_bias, scale, head_multiple, block):
  b, s, n, h = q.shape
  s_p = _round_up(s, block)
  qx, kx, vx = _with_bias_column(q, k, v, key_bias, scale, head_multiple)
  seg = _pad_axis1(mask.q_segment.astype(jnp.int32), s_p, -1)
  return _pad_axis1(qx, s_p, 0), _pad_axis1(kx, s_p, 0), _pad_axis1(vx, s_p, 0), seg


def _fused_finish(out, mask, s: int, h: int):
  out = out[:, :s, :, :h]
  live = (mask.q_segment >= 0)[:, :, None, None]
  return jnp.where(live, out, jnp.zeros((), out.dtype))


def pallas_gpu_attention(q, k, v, mask: AttentionMask, *, scale: float, key_bias=None,
                         block: Optional[int] = None):
  """Pallas (Triton) flash attention with segment ids; non-causal self-attention masks only.

  block: query/key tile (default 128 for 16-bit inputs, 64 for float32: 128-row float32 tiles of the
  padded head dim 128 exceed an H200's 227 KiB of shared memory per block)."""
  if block is None:
    block = 128 if jnp.dtype(q.dtype).itemsize <= 2 else 64
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  if not fused_supports(mask, q.shape, k.shape):
    raise ValueError(f"pallas_gpu cannot express the {mask.kind} mask")
  b, s, n, h = q.shape
  # The kernel pads the head dim to a power of two itself; we only append the bias column.
  qx, kx, vx, seg = _fused_prepare(q, k, v, mask, key_bias, scale, 1, block)
  out = gpu_attention.mha(qx, kx, vx, seg, sm_scale=scale, causal=False,
                          block_sizes=gpu_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=32,
                                                               block_kv_dkv=32, block_q_dq=32, block_kv_dq=32),
                          interpret=_interpret())
  return _fused_finish(out, mask, s, h)


@functools.lru_cache(maxsize=None)
def _splash_kernel(num_heads: int, length: int, block: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  full = sm.MultiHeadMask([sm.FullMask((length, length)) for _ in range(num_heads)])
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  # The kernel object holds mask-info arrays; built under a trace they would be that trace's tracers
  # and leak into every later program that reuses the cached kernel.
  with jax.ensure_compile_time_eval():
    return sk.make_splash_mha(full, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, mask: AttentionMask, *, scale: float, key_bias=None, block: int = 128):
  """TPU splash attention with segment ids; non-causal self-attention masks only."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  if not fused_supports(mask, q.shape, k.shape):
    raise ValueError(f"splash cannot express the {mask.kind} mask")
  b, s, n, h = q.shape
  qx, kx, vx, seg = _fused_prepare(q * jnp.asarray(scale, q.dtype), k, v, mask,
                                   key_bias, 1.0, 128, block)
  kernel = _splash_kernel(n, qx.shape[1], block, _interpret())

  def one(qb, kb, vb, sb):   # [S, N, H] -> kernel layout [N, S, H]
    out = kernel(jnp.swapaxes(qb, 0, 1), jnp.swapaxes(kb, 0, 1), jnp.swapaxes(vb, 0, 1),
                 segment_ids=sk.SegmentIds(q=sb, kv=sb))
    return jnp.swapaxes(out, 0, 1)

  out = jax.vmap(one)(qx, kx, vx, seg)
  return _fused_finish(out, mask, s, h)


__all__ = ["AttentionMask", "IMPLEMENTATIONS", "MASK_KINDS", "attention", "blockwise_attention", "choose",
           "decode_mask", "dense_attention", "fused_supports", "record_choices", "llm_mask", "pallas_gpu_attention", "splash_attention",
           "vit_frames_mask", "vit_rows_mask", "xla_attention"]

"""GPU check of stts_jax/models/attention.py on one H200: parity of the fused and blockwise paths with
the xla reference, then one-layer timings. Imports only jax, numpy and stts_jax.models.attention (the
GPU image has no grain/ml_collections/av), so it runs from a bare checkout.

  python scripts/gpu_attention_check.py --out $OUT/gpu_attention.json     # H200: < 4 min in all
  python scripts/gpu_attention_check.py --smoke --out /tmp/gpu_smoke.json  # tiny sizes, CPU interpret, < 60 s

Parity (forward and d(sum(out * w))/d(q, k, v, key bias), per tensor max |diff| / max(1, max |ref|)):
  * ViT packed rows, segment ids (frames of kept windows in rows of 729 slots, empty slots -1) and
    ViT whole frames with the STTS per-key bias: [8, 729, 16, 72]; pallas_gpu and blockwise vs xla;
  * LLM mask (causal OR same-example vision, padding): [1, 4096, 32 heads / 8 kv heads, 128]; blockwise vs xla;
  float32 (every dot at "highest" precision, so TF32 does not blur the comparison; bound 1e-5) and
  bfloat16 inputs against the float32 reference (bound 3e-2 out, 5e-2 gradients).
Timings (bfloat16, compiled ahead of time, one warm-up, median of --repeats calls, each closed by
jax.block_until_ready): forward and forward+backward of one attention layer
  * LLM mask at L = 1024, 2048, 4096, 8192, 32/8 heads x 128: xla vs blockwise;
  * ViT rows at 729 slots x 64 rows, 16 heads x 72: xla vs pallas_gpu vs blockwise;
with each program's compiled temporary bytes. A failing cell records its error and the run goes on;
cells not started within --budget_s are recorded as skipped. Exit status 1 if any parity cell fails.
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # a bare checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from stts_jax.models import attention as A  # noqa: E402

TOL = {"float32": (1e-5, 1e-5), "bfloat16": (3e-2, 5e-2)}   # (output, gradients)

FULL = dict(vit=dict(batch=8, length=729, heads=16, head_dim=72), llm_parity=dict(length=4096),
            llm=dict(heads=32, kv_heads=8, head_dim=128), lengths=(1024, 2048, 4096, 8192),
            vit_rows=64, repeats=5, block=A.DEFAULT_BLOCK)
# Smoke: every cell of the full run at tiny sizes (CPU, Pallas in interpret mode), under a minute.
SMOKE = dict(vit=dict(batch=2, length=40, heads=2, head_dim=8), llm_parity=dict(length=96),
             llm=dict(heads=4, kv_heads=2, head_dim=16), lengths=(64,), vit_rows=3, repeats=2, block=32)


# ------------------------------------------------------------------------------------------------
# inputs and masks
# ------------------------------------------------------------------------------------------------
def rows_segments(rng, rows: int, length: int) -> np.ndarray:
  """[R, S] int32: each row packs whole windows (9 patches) of a few frames, then empty slots (-1)."""
  seg = np.full((rows, length), -1, np.int32)
  for r in range(rows):
    pos, frame = 0, 0
    used = length - 9 * int(rng.integers(0, max(1, length // 27)))
    while pos < used:
      n = 9 * int(rng.integers(1, max(2, length // 27)))
      seg[r, pos:min(pos + n, used)] = frame
      pos, frame = pos + n, frame + 1
  return seg


def llm_layout(length: int):
  """token_mask, vision_mask [1, L]: text, two vision spans of frames (4 text + up to 81 vision tokens
  each, so timestamps sit inside the spans), text, 5% padding."""
  token = np.zeros(length, bool)
  vision = np.zeros(length, bool)
  used = int(length * 0.95)
  token[:used] = True
  frame = min(81, max(4, length // 40))
  pos = max(2, length // 64)
  for end in (int(used * 0.45), int(used * 0.9)):
    while pos + 4 + frame <= end:
      vision[pos + 4:pos + 4 + frame] = True
      pos += 4 + frame
    pos += max(2, length // 64)
  return jnp.asarray(token[None]), jnp.asarray(vision[None])


def make_inputs(rng, b, s, n, kh, h, dtype):
  """q, w [B, S, N, H], k, v [B, S, K, H] in `dtype`, key_bias [B, S] float32 (log of a keep score)."""
  q, w = (jnp.asarray(rng.normal(size=(b, s, n, h)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(b, s, kh, h)), jnp.float32) for _ in range(2))
  bias = jnp.asarray(np.log(rng.uniform(0.05, 1.0, size=(b, s))), jnp.float32)
  return dict(q=q.astype(dtype), k=k.astype(dtype), v=v.astype(dtype), bias=bias, w=w)


def layer(impl: str, mask, scale: float, block: int, with_bias: bool):
  """(fwd, fwd_bwd): fwd(q, k, v, bias) -> out; fwd_bwd(...) -> (out, dq, dk, dv, dbias)."""
  def fwd(q, k, v, bias):
    return A.attention(q, k, v, mask, scale=scale, key_bias=bias if with_bias else None, impl=impl,
                       block_q=block, block_k=block)

  def fwd_bwd(q, k, v, bias, w):
    out, vjp = jax.vjp(fwd, q, k, v, bias)
    return (out,) + vjp(w.astype(out.dtype))
  return fwd, fwd_bwd


def highest_precision():
  """float32 dots at full precision (no TF32) for the float32 parity, where this jax has the switch."""
  switch = getattr(jax, "default_matmul_precision", None)
  return switch("highest") if switch is not None else contextlib.nullcontext()


def rel_diff(got, ref) -> float:
  ref = np.asarray(ref, np.float64)
  return float(np.abs(np.asarray(got, np.float64) - ref).max() / max(1.0, float(np.abs(ref).max())))


# ------------------------------------------------------------------------------------------------
# cells
# ------------------------------------------------------------------------------------------------
class Runner:
  def __init__(self, budget_s: float, repeats: int):
    self.start, self.budget_s, self.repeats = time.perf_counter(), budget_s, repeats
    self.parity, self.timings = [], []
    self._refs = {}   # (mask name, seed) -> float32 xla output and gradients, shared by impls and dtypes

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def guarded(self, table: list, cell: dict, fn) -> None:
    """Runs fn(cell) unless the time budget is spent; errors are recorded, never raised."""
    if self.elapsed() > self.budget_s:
      cell["skipped"] = f"time budget {self.budget_s:.0f} s spent"
    else:
      t0 = time.perf_counter()
      try:
        fn(cell)
      except Exception as e:   # noqa: BLE001  (one broken cell must not lose the others' results)
        cell["error"] = f"{type(e).__name__}: {e}"[:2000]
        cell["traceback"] = traceback.format_exc()[-3000:]
      cell["cell_s"] = round(time.perf_counter() - t0, 2)
    table.append(cell)
    status = ("skipped" if "skipped" in cell else "ERROR" if "error" in cell
              else "ok" if cell.get("ok", True) else "FAIL")
    shown = {k: cell[k] for k in ("median_s", "max_rel_diff", "temp_bytes", "error") if k in cell}
    print(f"[{self.elapsed():6.1f}s] {status:7s} {cell['name']}: {shown}", flush=True)

  def parity_cell(self, name, mask, shapes, impl, dtype, scale, block, with_bias, seed):
    b, s, n, kh, h = shapes

    def run(cell):
      rng = np.random.default_rng(seed)
      x = make_inputs(rng, b, s, n, kh, h, jnp.float32)
      _, ref_fn = layer("xla", mask, scale, block, with_bias)
      _, got_fn = layer(impl, mask, scale, block, with_bias)
      with highest_precision():
        if (name, seed) not in self._refs:
          self._refs[name, seed] = jax.jit(ref_fn)(x["q"], x["k"], x["v"], x["bias"], x["w"])
        ref = self._refs[name, seed]
        got = jax.jit(got_fn)(*(x[a].astype(dtype) for a in "qkv"), x["bias"], x["w"])
      names = ("out", "dq", "dk", "dv") + (("dbias",) if with_bias else ())
      diffs = {nm: rel_diff(g, r) for nm, g, r in zip(names, got, ref)}
      tol_out, tol_grad = TOL[dtype]
      finite = all(bool(np.isfinite(np.asarray(g, np.float32)).all()) for g in got)
      dead = ~np.asarray(mask.dense()).any(axis=2)
      dead_zero = bool((np.asarray(got[0], np.float32)[dead] == 0).all()) if dead.any() else None
      cell.update(max_rel_diff=diffs, tol=dict(out=tol_out, grads=tol_grad), finite=finite, dead_rows=int(dead.sum()),
                  dead_rows_zero=dead_zero, resolved=A.choose(impl, mask, (b, s, n, h), (b, s, kh, h)),
                  ok=finite and dead_zero is not False and diffs["out"] <= tol_out
                  and all(d <= tol_grad for nm, d in diffs.items() if nm != "out"))

    cell = dict(name=f"parity {name} {impl} {dtype}", mask=name, impl=impl, dtype=dtype, shape=list(shapes))
    self.guarded(self.parity, cell, run)

  def timing_cell(self, name, mask, shapes, impl, scale, block, with_bias, seed, dtype=jnp.bfloat16):
    b, s, n, kh, h = shapes

    def run(cell):
      rng = np.random.default_rng(seed)
      x = make_inputs(rng, b, s, n, kh, h, dtype)
      fwd, fwd_bwd = layer(impl, mask, scale, block, with_bias)
      for part, fn, args in (("fwd", fwd, (x["q"], x["k"], x["v"], x["bias"])),
                             ("fwdbwd", fwd_bwd, (x["q"], x["k"], x["v"], x["bias"], x["w"]))):
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        jax.block_until_ready(compiled(*args))   # warm-up
        secs = []
        for _ in range(self.repeats):
          t0 = time.perf_counter()
          jax.block_until_ready(compiled(*args))
          secs.append(time.perf_counter() - t0)
        cell[part] = dict(median_s=statistics.median(secs), seconds=secs, compile_s=round(compile_s, 2),
                          temp_bytes=None if mem is None else int(mem.temp_size_in_bytes))
      cell["median_s"] = {p: cell[p]["median_s"] for p in ("fwd", "fwdbwd")}
      cell["temp_bytes"] = {p: cell[p]["temp_bytes"] for p in ("fwd", "fwdbwd")}
      cell["resolved"] = A.choose(impl, mask, (b, s, n, h), (b, s, kh, h))

    cell = dict(name=f"time {name} {impl} bf16", mask=name, impl=impl, dtype=jnp.dtype(dtype).name,
                shape=list(shapes), length=s)
    self.guarded(self.timings, cell, run)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_attention.json"))
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, Pallas in interpret mode)")
  parser.add_argument("--budget_s", type=float, default=180.0, help="start no cell after this many seconds")
  parser.add_argument("--repeats", type=int, default=None)
  args = parser.parse_args()
  p = SMOKE if args.smoke else FULL
  runner = Runner(args.budget_s, args.repeats or p["repeats"])
  dev = jax.devices()[0]
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {dev.device_kind}", flush=True)
  rng = np.random.default_rng(0)
  vit, llm, block = p["vit"], p["llm"], p["block"]
  vb, vs, vn, vh = vit["batch"], vit["length"], vit["heads"], vit["head_dim"]
  vscale, lscale = vh ** -0.5, llm["head_dim"] ** -0.5
  rows = A.vit_rows_mask(jnp.asarray(rows_segments(rng, vb, vs)))
  frames = A.vit_frames_mask(vb, vs)
  ll = p["llm_parity"]["length"]
  llm_shapes = (1, ll, llm["heads"], llm["kv_heads"], llm["head_dim"])
  llm_mask = A.llm_mask(*llm_layout(ll))

  def parity(dtype):
    for impl in ("pallas_gpu", "blockwise"):
      runner.parity_cell("vit_rows", rows, (vb, vs, vn, vn, vh), impl, dtype, vscale, block, False, 1)
      runner.parity_cell("vit_frames+bias", frames, (vb, vs, vn, vn, vh), impl, dtype, vscale, block, True, 2)
    runner.parity_cell("llm", llm_mask, llm_shapes, "blockwise", dtype, lscale, block, False, 3)

  # Order: what only a GPU can show and what the docs need most first, so a spent budget skips the rest.
  # 1. float32 parity (the fused path first, then blockwise)
  parity("float32")
  # 2. timings, bfloat16: the LLM layer by length, then the ViT rows (one shape)
  for length in p["lengths"]:
    mask = A.llm_mask(*llm_layout(length))
    for impl in ("xla", "blockwise"):
      runner.timing_cell(f"llm L={length}", mask, (1, length, llm["heads"], llm["kv_heads"], llm["head_dim"]),
                         impl, lscale, block, False, 5)
  r = p["vit_rows"]
  rows_t = A.vit_rows_mask(jnp.asarray(rows_segments(rng, r, vs)))
  for impl in ("xla", "pallas_gpu", "blockwise"):
    runner.timing_cell(f"vit_rows {vs}x{r}", rows_t, (r, vs, vn, vn, vh), impl, vscale, block, False, 4)
  # 3. bfloat16 parity
  parity("bfloat16")

  ok = all(c.get("ok", False) for c in runner.parity)
  result = dict(command=" ".join(["python3"] + sys.argv), commit=os.environ.get("STTS_JAX_COMMIT", "unknown"),
                machine=platform.node(), device=dev.device_kind, platform=dev.platform, jax=jax.__version__, python=platform.python_version(),
                smoke=args.smoke, sizes={k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()},
                blockwise_block=block, elapsed_s=round(runner.elapsed(), 1), parity_ok=ok,
                parity=runner.parity, timings=runner.timings,
                notes="parity: float32 at matmul precision 'highest', bfloat16 vs the float32 reference; "
                      "timings: bfloat16, median wall seconds, compilation excluded")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out} ({runner.elapsed():.0f} s); parity {'ok' if ok else 'FAILED'}", flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())

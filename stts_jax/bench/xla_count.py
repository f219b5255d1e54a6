"""XLA's own FLOP count of a function, with two corrections the raw numbers need.

1. Loops: `cost_analysis()` counts the body of a `scan`/`while` once, whatever its trip count
   (stack_notes.md), so stacked layers are undercounted. Count a copy of the model built with
   `scan_layers=False` (every layer unrolled); `abstract_model_state` builds it from shapes only.
2. Branches: for a `cond` XLA reports the larger branch. The STTS forward has one cond, "packed
   rows fit ? packed path : dense fallback", and the fallback is the larger branch, so the raw
   count of a pruned program is the *fallback's*. `taken_branch_only()` makes `jax.lax.cond` trace
   only its first (true) branch while a program is lowered for counting, which yields the count of
   the packed path (and of the applied optimizer update in the train step). It is only used to
   count; timed programs are never built under it.

`lowered_flops` reads `Lowered.cost_analysis()`: the global count of the whole program (no
compilation, so counting a full-size model is cheap).
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
from flax import nnx


@contextlib.contextmanager
def taken_branch_only() -> Iterator[None]:
  """While active, `jax.lax.cond(pred, true_fun, false_fun, *ops)` returns `true_fun(*ops)`."""
  original = jax.lax.cond

  def first_branch(pred, true_fun, false_fun, *operands, **kwargs):
    del pred, false_fun, kwargs
    return true_fun(*operands)

  jax.lax.cond = first_branch
  try:
    yield
  finally:
    jax.lax.cond = original


def lowered_flops(fn: Callable[..., Any], *args: Any, taken_branch: bool = True, mesh=None) -> float:
  """Global FLOPs of `jax.jit(fn).lower(*args)` (args may be ShapeDtypeStructs).

  jax caches traces per function: a plain `fn` is wrapped in a fresh closure so that a trace made
  with or without `taken_branch` is never reused for the other. An already jitted `fn` (with its
  shardings) is lowered as is and must not have been lowered under the other setting before.
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(lambda *a: fn(*a))
  ctx = taken_branch_only() if taken_branch else contextlib.nullcontext()
  mesh_ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  with ctx, mesh_ctx:
    lowered = jitted.lower(*args)
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def abstract_model_state(model_fn: Callable[[], nnx.Module]) -> tuple[Any, Any]:
  """(graphdef, state of ShapeDtypeStructs) of `model_fn()`; nothing is allocated."""
  abstract = nnx.eval_shape(model_fn)
  return nnx.split(abstract)


def shapes_of(tree: Any) -> Any:
  """ShapeDtypeStructs of every array leaf of `tree` (other leaves unchanged)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x, tree)

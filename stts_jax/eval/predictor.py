"""`Predictor`: the evaluators' predict function. Jitted, timed stage by stage, data-parallel.

Three jitted stages (module-level `jax.jit`s with the model's graphdef static, so a model variant,
i.e. one (method, ratio) config, and one batch shape T/S compile each stage exactly once, and a
second evaluation of the same config reuses the compilations):
  vision   ViT + scoring + pruning + packing + adapter           (`generate.vision_stage`)
  prefill  pruned prompt -> decoder with the KV cache, option scores (`generate.prefill_stage`)
  decode   KV-cache generation of up to `max_new_tokens` tokens  (`decoding.decode`)
Each call is closed by `block_until_ready`, so the stage times are real; the first call of a
new shape includes compilation (the runner warms up before it times).

Randomness is a pure function of the config and the data: random pruning of a video uses
`fold_in(key(stts.random_seed), example_id)` (so an example is pruned the same way whatever its
batch, batch size or device count; batches without `example_id` use `fold_in(.., step)` for the
whole batch), sampling uses `fold_in(key(seed), step)`. Two evaluations of the same checkpoint on
the same data are therefore identical.

Data parallelism: with a `mesh`, parameters are placed once per model by the rules table
(`parallel.sharding.state_shardings`) and each host batch becomes a global array sharded over the
batch axes (`parallel.sharding.shard_batch`); outputs come back to every host in full.
"""

import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stts_jax.eval import decoding
from stts_jax.eval import generate as gen_lib
from stts_jax.models import partitioning
from stts_jax.models import video_forward as vf
from stts_jax.models import vlm

STAGES = ("vision", "prefill", "decode")
DEVICE_KEYS = ("patches", "frame_mask", "input_ids", "token_mask", "option_ids", "valid", "example_id")


def rules_context(mesh, rules):
  """The activation sharding rules of `mesh` (a no-op context without a mesh)."""
  if mesh is None:
    return _Null()
  return partitioning.activation_rules(mesh, rules)


class _Null:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def _vision_pure(graphdef, state, patches, frame_mask, rng, example_ids, *, mesh=None, rules=()):
  with rules_context(mesh, rules):
    if example_ids is not None:   # one key per video
      rng = jax.vmap(lambda i: jax.random.fold_in(rng, i))(example_ids)
    return gen_lib.vision_stage(nnx.merge(graphdef, state), patches, frame_mask, rng)


def _vision_scored_pure(graphdef, state, scored, frame_mask, *, mesh=None, rules=()):
  with rules_context(mesh, rules):
    return gen_lib.vision_stage_scored(nnx.merge(graphdef, state), scored, frame_mask)


def _prefill_pure(graphdef, state, input_ids, token_mask, vision, option_ids, *, max_new_tokens: int,
                  mesh=None, rules=()):
  with rules_context(mesh, rules):
    model = nnx.merge(graphdef, state)
    out = gen_lib.prefill_stage(model, input_ids, token_mask, vision, max_new_tokens)
    return out, decoding.option_logprobs(out.state.logits_bv, option_ids)


def _decode_pure(graphdef, state, prefill, valid, rng, *, max_new_tokens: int, stop_ids: tuple[int, ...],
                 pad_id: int, temperature: float, top_p: float = 1.0, mesh=None, rules=()):
  with rules_context(mesh, rules):
    model = nnx.merge(graphdef, state)
    return decoding.decode(model.llm, prefill, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                           temperature=temperature, rng=rng, active_b=valid, top_p=top_p)


_STATIC = ("graphdef", "mesh", "rules")
_vision_jit = jax.jit(_vision_pure, static_argnames=_STATIC)
_vision_scored_jit = jax.jit(_vision_scored_pure, static_argnames=_STATIC)
_prefill_jit = jax.jit(_prefill_pure, static_argnames=_STATIC + ("max_new_tokens",))
_decode_jit = jax.jit(_decode_pure, static_argnames=_STATIC + ("max_new_tokens", "stop_ids", "pad_id",
                                                               "temperature", "top_p"))


def compile_counts() -> dict[str, int]:
  """Compiled executables held by each stage's jit cache (process-wide)."""
  return {"vision": _vision_jit._cache_size(), "prefill": _prefill_jit._cache_size(),
          "decode": _decode_jit._cache_size()}


def scored_vision_compile_count() -> int:
  """Compiled executables of the vision stage started from a `ScoredVision` (`Predictor(scored=...)`)."""
  return _vision_scored_jit._cache_size()


def to_host(x: Any) -> np.ndarray:
  """A (possibly multi-process, sharded) array -> the full numpy array on this host."""
  if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


class Predictor:
  """`predictor(model, batch, *, generate, step)` -> host dict of predictions for the global batch:
    option_logprobs [B, K] (batches with `option_ids`), num_kept [B] (LLM vision tokens per video),
    prompt_tokens [B] (pruned prompt length), num_truncated [B], packed (), keep_mask [B, T, W] (kept
    windows), scores [B, T, W] (window scores; zeros when unpruned), and with `generate`:
    tokens [B, N], num_tokens [B] (before the stop token), stopped [B].
  `times[stage]` lists the seconds of every call since `reset_times()`.
  """

  def __init__(self, *, max_new_tokens: int = 8, temperature: float = 0.0, stop_ids: Sequence[int] = (),
               seed: int = 0, mesh: Optional[jax.sharding.Mesh] = None, rules: Sequence[tuple[str, Any]] = ()):
    if max_new_tokens < 1:
      raise ValueError("Predictor: max_new_tokens must be >= 1")
    self.max_new_tokens = max_new_tokens
    self.temperature = float(temperature)
    self.extra_stop = tuple(int(s) for s in stop_ids)
    self.seed = seed
    self.mesh = mesh
    self.rules = tuple(rules)
    self.times: dict[str, list[float]] = {s: [] for s in STAGES}
    self._placed: Optional[tuple[Any, Any, Any]] = None   # (model, graphdef, state)

  def reset_times(self) -> None:
    self.times = {s: [] for s in STAGES}

  def _split(self, model: vlm.Molmo2):
    if self._placed is not None and self._placed[0] is model:
      return self._placed[1], self._placed[2]
    graphdef, state = nnx.split(model)
    if self.mesh is not None:
      from stts_jax.parallel import sharding
      state = jax.device_put(state, sharding.state_shardings(state, self.mesh, self.rules))
    self._placed = (model, graphdef, state)
    return graphdef, state

  def _device_batch(self, batch: Mapping[str, np.ndarray], skip: Sequence[str] = ()) -> dict[str, Any]:
    fields = {k: np.asarray(batch[k]) for k in DEVICE_KEYS if k in batch and k not in skip}
    if self.mesh is None:
      return {k: jnp.asarray(v) for k, v in fields.items()}
    from stts_jax.parallel import sharding
    return sharding.shard_batch(fields, self.mesh, self.rules)

  def _timed(self, stage: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    self.times[stage].append(time.perf_counter() - t0)
    return out

  def __call__(self, model: vlm.Molmo2, batch: Mapping[str, np.ndarray], *, generate: bool = True,
               step: int = 0, scored: Optional[vf.ScoredVision] = None) -> dict[str, np.ndarray]:
    """scored: the batch's `video_forward.vit_scored` output (on device), which the vision stage then
    starts from (`patches` unused; the model must prune with "stts" or "heuristic"). The outputs are
    those of the path from the patches; `times["vision"]` then holds the rest of the ViT only."""
    cfg = model.config
    graphdef, state = self._split(model)
    host = gen_lib.prompt_only(batch, cfg.tokens.pad)
    if "option_ids" not in host:
      host["option_ids"] = np.full((host["input_ids"].shape[0], 1), -1, np.int32)
    if "valid" not in host:
      host["valid"] = np.ones(host["input_ids"].shape[0], bool)
    if "example_id" in host:   # -1 (padding slots) -> 0; int32 on device
      host["example_id"] = np.maximum(np.asarray(host["example_id"]), 0).astype(np.int32)
    dev = self._device_batch(host, skip=("patches",) if scored is not None else ())
    ctx = dict(mesh=self.mesh, rules=self.rules)
    prune_rng = jax.random.key(cfg.stts.random_seed)
    example_ids = dev.get("example_id")
    if example_ids is None:
      prune_rng = jax.random.fold_in(prune_rng, step)
    with (jax.set_mesh(self.mesh) if self.mesh is not None else _Null()):
      if scored is None:
        vision = self._timed("vision", _vision_jit, graphdef=graphdef, state=state, patches=dev["patches"],
                             frame_mask=dev["frame_mask"], rng=prune_rng, example_ids=example_ids, **ctx)
      else:
        if not cfg.stts.prunes or cfg.stts.method not in ("stts", "heuristic"):
          raise ValueError("Predictor: `scored` needs a model that prunes with method 'stts' or 'heuristic', "
                           f"got method={cfg.stts.method!r} ratio={cfg.stts.ratio}")
        vision = self._timed("vision", _vision_scored_jit, graphdef=graphdef, state=state, scored=scored,
                             frame_mask=dev["frame_mask"], **ctx)
      pre, option_lp = self._timed("prefill", _prefill_jit, graphdef=graphdef, state=state,
                                   input_ids=dev["input_ids"], token_mask=dev["token_mask"], vision=vision,
                                   option_ids=dev["option_ids"], max_new_tokens=self.max_new_tokens, **ctx)
      out = {"option_logprobs": to_host(option_lp), "num_kept": to_host(pre.num_kept_b),
             "prompt_tokens": to_host(pre.state.prompt_len_b), "num_truncated": to_host(pre.num_truncated_b),
             "packed": to_host(vision.packed), "keep_mask": to_host(vision.keep_mask_btw),
             "scores": to_host(vision.scores_btw)}
      if generate:
        gen = self._timed("decode", _decode_jit, graphdef=graphdef, state=state, prefill=pre.state,
                          valid=dev["valid"], rng=jax.random.fold_in(jax.random.key(self.seed), step),
                          max_new_tokens=self.max_new_tokens, stop_ids=gen_lib.stop_ids_for(model, self.extra_stop),
                          pad_id=cfg.tokens.pad, temperature=self.temperature, **ctx)
        out.update(tokens=to_host(gen.tokens_bn), num_tokens=to_host(gen.num_tokens_b),
                   stopped=to_host(gen.stopped_b))
    return out


__all__ = ["DEVICE_KEYS", "Predictor", "STAGES", "compile_counts", "rules_context", "scored_vision_compile_count",
           "to_host"]

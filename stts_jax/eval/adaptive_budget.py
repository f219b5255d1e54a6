"""Adaptive budget (issue 22): per video, a drop ratio from a small static set of buckets.

STTS drops the same fraction of every video (`stts.budget = "fixed"`). With `"adaptive"` (inference
and evaluation only) each video's ratio is the *largest* bucket at which every window scoring above a
per-method threshold is kept. Shapes stay static: the videos are scored first (one compiled score
pass per frame count), grouped by bucket, and each group runs the ordinary fixed-ratio predictor
(`generate.model_variant(model, ratio=bucket)`) on a batch of the full size, the other rows filled
with copies of the group's first video and marked invalid. So there is one compilation per
(bucket, frame count) per stage, and a video's outputs never depend on its batch-mates.
The score pass runs the ViT up to the soft block (`video_forward.vit_scored`: nothing there depends on
the drop ratio) and keeps that on the device; each bucket pass starts from it (`Predictor(scored=...)`),
so no block runs twice (`reuse_scored=False`: bucket passes start from the patches, same results).

The rule (`choose_buckets`), for a video with t real frames and W windows per frame:
  candidates   = the windows of real frames 1..t-1 (frame 0 is never dropped; `pruning` module)
  n_low        = candidates with score <= threshold
  bucket       = max { r in buckets valid at T : dropped(t, r) <= n_low }
The budget drops the dropped(t, r) lowest-scoring candidates. A window scoring above the threshold
ranks above every candidate scoring <= threshold, so none of it is among the dropped ones exactly
when dropped(t, r) <= n_low (ties among windows above the threshold do not matter).
"Never loses a kept window" therefore means: at the chosen bucket, every real window with score >
threshold is in the keep mask (`budget_keep_mask_batched`); and the next larger valid bucket would
drop at least one of them (the choice is the largest that keeps them all). When not even the
smallest bucket keeps them all, the video gets the smallest bucket and `satisfied` is False (put
0.0 into the buckets for an always-satisfiable set: ratio 0 runs the video unpruned).

The score-mass rule (`AdaptiveRule(m, buckets, kind="mass")`, the issue's alternative): bucket = the
largest valid r whose fixed budget keeps at least the fraction m of the candidates' score mass (the
mass of the dropped(t, r) lowest-scoring candidates is at most (1 - m) of the total). It is
scale-free, so one m serves every method; a video whose candidates all score 0 gets the largest bucket.

Buckets valid at a frame count T (`valid_buckets`): a ratio whose budget is capped at T
(floor(r W T) > W (T - 1): more than all windows but frame 0's) or that drops no more windows at T
than a smaller bucket adds nothing there and is left out. E.g. 8 frames x 9 windows: at most 63
of 72 can go; 0.85 drops 61.

Scores have method-specific scales (sigmoid of the STTS scorer in (0, 1); 1 - cosine of the
heuristic in [0, 2], mostly near 0 for static content), hence one threshold per method.
`random` has no meaningful score and is rejected.
"""

import contextlib
import dataclasses
import fractions
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stts_jax.eval import generate as gen_lib
from stts_jax.eval import predictor as predictor_lib
from stts_jax.models import budget
from stts_jax.models import video_forward as vf
from stts_jax.models import vlm

DEFAULT_BUCKETS = (0.3, 0.5, 0.7, 0.85)
DEFAULT_THRESHOLDS = {"stts": 0.5, "heuristic": 0.05}
DEFAULT_MASS = 0.9
METHODS = ("stts", "heuristic")


RULES = ("threshold", "mass")


@dataclasses.dataclass(frozen=True)
class AdaptiveRule:
  """`kind` "threshold": `threshold` is a score threshold on the method's window scores; "mass":
  `threshold` is the fraction of the candidates' score mass that must stay kept (in (0, 1]).
  `buckets`: drop ratios."""
  threshold: float
  buckets: tuple[float, ...] = DEFAULT_BUCKETS
  kind: str = "threshold"

  def __post_init__(self):
    if self.kind not in RULES:
      raise ValueError(f"adaptive budget: rule must be one of {RULES}, got {self.kind!r}")
    if self.kind == "mass" and not 0.0 < self.threshold <= 1.0:
      raise ValueError(f"adaptive budget: a score-mass fraction must be in (0, 1], got {self.threshold}")
    if not self.buckets:
      raise ValueError("adaptive budget: no buckets")
    for r in self.buckets:
      if not 0.0 <= r < 1.0:
        raise ValueError(f"adaptive budget: bucket ratios must be in [0, 1), got {r}")
    if len(set(self.buckets)) != len(self.buckets):
      raise ValueError(f"adaptive budget: duplicate buckets {self.buckets}")


def rule_for(method: str, threshold: Optional[float] = None,
             buckets: Sequence[float] = DEFAULT_BUCKETS, kind: str = "threshold") -> AdaptiveRule:
  if method not in METHODS:
    raise ValueError(f"adaptive budget works with methods {METHODS}, got {method!r}")
  if threshold is None:
    threshold = DEFAULT_THRESHOLDS[method] if kind == "threshold" else DEFAULT_MASS
  return AdaptiveRule(float(threshold), tuple(float(b) for b in buckets), kind)


def valid_buckets(num_frames: int, windows: int, buckets: Sequence[float]) -> tuple[float, ...]:
  """The buckets (ascending) that mean something at `num_frames` frames (module docstring)."""
  out: list[float] = []
  last = -1
  for r in sorted(buckets):
    d = budget.num_dropped(num_frames, windows, r)
    uncapped = d == math.floor(fractions.Fraction(str(r)) * windows * num_frames)
    if uncapped and d > last:
      out.append(r)
      last = d
  if not out:
    raise ValueError(f"adaptive budget: no bucket of {tuple(buckets)} is valid at {num_frames} frames")
  return tuple(out)


def choose_buckets(scores_btw: np.ndarray, frame_mask_bt: np.ndarray, rule: AdaptiveRule
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Host-side rule -> (ratio per video [B] float64, satisfied [B] bool); see the module docstring.

  Buckets are filtered at the batch's frame dimension T (the compiled shape); each video's counts
  use its real frame count t <= T, as the fixed budget does."""
  scores = np.asarray(scores_btw)
  thr = np.asarray(rule.threshold, scores.dtype)          # compare in the scores' own precision
  fm = np.asarray(frame_mask_bt, bool)
  b, t_max, w = scores.shape
  valid = valid_buckets(t_max, w, rule.buckets)
  ratios = np.empty(b, np.float64)
  satisfied = np.empty(b, bool)
  for i in range(b):
    t = int(fm[i].sum())
    cand = fm[i].copy()
    cand[0] = False
    if rule.kind == "mass":
      kept = _kept_mass_by_drops(scores[i][cand])
      ok = [r for r in valid if kept[budget.num_dropped(t, w, r)] >= rule.threshold]
    else:
      n_low = int(np.sum(scores[i][cand] <= thr))
      ok = [r for r in valid if budget.num_dropped(t, w, r) <= n_low]
    ratios[i] = ok[-1] if ok else valid[0]
    satisfied[i] = bool(ok)
  return ratios, satisfied


def _kept_mass_by_drops(candidate_scores: np.ndarray) -> np.ndarray:
  """[n + 1]: share of the n candidates' score mass left after the budget drops the d lowest, for
  every d (ties do not change the sum); all 1.0 when the mass is 0. Float64, with a relative tolerance
  of 1e-9 in the caller's favour so that "keeps all of it" (m = 1) is met exactly when only zero-score
  windows go."""
  s = np.sort(np.asarray(candidate_scores, np.float64).ravel())
  dropped_mass = np.concatenate([[0.0], np.cumsum(s)])
  total = dropped_mass[-1]
  if total <= 0.0:
    return np.ones_like(dropped_mass)
  return np.minimum(1.0, (total - dropped_mass) / total + 1e-9)


# ----------------------------------------------------------------------------------------------
# Inference: score once, one fixed-ratio pass per bucket
# ----------------------------------------------------------------------------------------------

def _score_pure(graphdef, state, patches, frame_mask, *, mesh=None, rules=()):
  """(`vit_scored` output, window scores [B, T, W] float32 with zeros at padding frames)."""
  with predictor_lib.rules_context(mesh, rules):
    model = nnx.merge(graphdef, state)
    scored, _ = vf.vit_scored(model, patches, frame_mask, None, deterministic=True)
    return scored, jnp.where(frame_mask[:, :, None], scored.scores_btw.astype(jnp.float32), 0.0)


_score_jit = jax.jit(_score_pure, static_argnames=("graphdef", "mesh", "rules"))
# One row of a ScoredVision per video (queues of the grouped path), and a batch from rows again.
_split_rows = jax.jit(lambda tree: [jax.tree.map(lambda x: x[i], tree)   # noqa: E731
                                    for i in range(jax.tree.leaves(tree)[0].shape[0])])
_stack_rows = jax.jit(lambda rows: jax.tree.map(lambda *xs: jnp.stack(xs), *rows))   # noqa: E731


def compile_counts() -> dict[str, int]:
  """`predictor.compile_counts()` plus the bucket passes' vision stage from the score pass
  (`vision_scored`), the score pass, and the split into / stacking of per-video rows (`rows`)."""
  return dict(predictor_lib.compile_counts(), vision_scored=predictor_lib.scored_vision_compile_count(),
              score=_score_jit._cache_size(), rows=_split_rows._cache_size() + _stack_rows._cache_size())


def warm_rows(scored: vf.ScoredVision) -> None:
  """Compiles the row split and stack of the grouped path for `scored`'s batch shape."""
  jax.block_until_ready(_stack_rows(_split_rows(scored)))


def score_pass(model: vlm.Molmo2, batch: Mapping[str, Any], *, mesh: Optional[jax.sharding.Mesh] = None,
               rules: Sequence[tuple[str, Any]] = ()) -> tuple[vf.ScoredVision, np.ndarray]:
  """(`vit_scored` output on the device, window scores [B, T, W] on the host, zeros at padding frames).

  Nothing here depends on the ratio or budget: the pass runs under one canonical config, so it
  compiles once per frame count (and batch shape) whatever the model variant. With a `mesh` the
  parameters are placed by the rules table and the batch is sharded over the batch axes, as in
  `Predictor`; the `ScoredVision` stays sharded on the device."""
  model = gen_lib.model_variant(model, ratio=0.5, num_rows=None, budget="fixed")
  graphdef, state = nnx.split(model)
  fields = {"patches": np.asarray(batch["patches"]), "frame_mask": np.asarray(batch["frame_mask"], bool)}
  if mesh is None:
    dev = {k: jnp.asarray(v) for k, v in fields.items()}
  else:
    from stts_jax.parallel import sharding
    state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
    dev = sharding.shard_batch(fields, mesh, rules)
  rules = tuple(rules)
  with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
    scored, scores = _score_jit(graphdef, state, dev["patches"], dev["frame_mask"], mesh=mesh, rules=rules)
  return scored, predictor_lib.to_host(scores)


def score_videos(model: vlm.Molmo2, batch: Mapping[str, Any]) -> np.ndarray:
  """Window scores [B, T, W] (host) of the model's method, zeros at padding frames (`score_pass`)."""
  return score_pass(model, batch)[1]


class AdaptivePredictor:
  """`adaptive(model, batch, generate=..., step=...)` -> the `Predictor` outputs of every video at its
  own bucket, in the batch's order, plus `bucket` [B] (drop ratio), `budget_satisfied` [B],
  `vision_tokens` [B] (kept windows = LLM vision tokens) and `adaptive_scores` [B, T, W].
  A batch costs the score pass plus one full-size pass per bucket it contains.

  `group_batches=True` (evaluation): `grouped_passes(model, batches)` groups videos by bucket across
  batches, so each bucket pass is full of that bucket's videos (the last one per bucket padded) and
  the data set costs one score pass per batch plus about N_b / B passes per bucket b: the saving of
  the smaller budgets is realised per video. Results per video are the same either way.

  `reuse_scored=True`: bucket passes start from the score pass's `ScoredVision` (kept on the device
  until the video's bucket pass runs: [T, P, D] per waiting video, plus taps at or before the soft
  block); False: from the patches (the ViT up to the soft block runs again per bucket pass). Same
  results either way. Ratio 0 among the buckets always starts from the patches (it does not prune).

  `model` is the fixed-ratio model (its ratio is ignored); variants per bucket are cached."""

  def __init__(self, predictor: predictor_lib.Predictor, rule: AdaptiveRule, *, group_batches: bool = False,
               reuse_scored: bool = True):
    if jax.process_count() > 1:
      # Grouping moves videos between batches, and a process holds only its own rows of each batch.
      raise ValueError(f"--budget adaptive runs in one process (data-parallel over its {jax.local_device_count()} "
                       f"local devices), got {jax.process_count()} processes")
    self.predictor = predictor
    self.rule = rule
    self.group_batches = group_batches
    self.reuse_scored = reuse_scored
    self._variants: dict[tuple[int, float], vlm.Molmo2] = {}
    # seconds of each stage per bucket pass (a full-size batch at that ratio): {ratio: {stage: [s, ...]}}
    self.bucket_times: dict[float, dict[str, list[float]]] = {}
    self.score_times: list[float] = []   # seconds per score pass (one per input batch)

  @property
  def times(self):
    return self.predictor.times

  def reset_times(self) -> None:
    self.predictor.reset_times()
    self.bucket_times, self.score_times = {}, []

  def total_seconds(self) -> float:
    """Every timed pass since `reset_times`: score passes plus every stage of every bucket pass."""
    return sum(self.score_times) + sum(sum(ts) for st in self.bucket_times.values() for ts in st.values())

  def _variant(self, model: vlm.Molmo2, ratio: float) -> vlm.Molmo2:
    key = (id(model), ratio)
    if key not in self._variants:
      self._variants[key] = gen_lib.model_variant(model, ratio=ratio, budget="fixed")
    return self._variants[key]

  def _score(self, model: vlm.Molmo2, batch: Mapping[str, Any], *, rows: bool = False):
    """(scored, scores [B, T, W], buckets [B], satisfied [B]) of a batch; the score pass is timed.
    scored: the batch's `ScoredVision` (rows=True: a list, one per video; None unless `reuse_scored`)."""
    method = model.config.stts.method
    if method not in METHODS:
      raise ValueError(f"adaptive budget works with methods {METHODS}, got {method!r}")
    t0 = time.perf_counter()
    scored, scores = score_pass(self._variant(model, self.rule.buckets[0]), batch,   # host scores: synchronised
                                mesh=self.predictor.mesh, rules=self.predictor.rules)
    if not self.reuse_scored:
      scored = None
    elif rows:
      scored = jax.block_until_ready(_split_rows(scored))
    self.score_times.append(time.perf_counter() - t0)
    ratios, satisfied = choose_buckets(scores, batch["frame_mask"], self.rule)
    return scored, scores, ratios, satisfied

  def _bucket_pass(self, model: vlm.Molmo2, ratio: float, sub: Mapping[str, Any], generate: bool,
                   step: int, scored=None, take: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """One fixed-ratio pass. `scored`: a list of per-video ScoredVision rows, or (with `take`, the
    pass's row of the batch for each slot) the batch's ScoredVision; gathered here and timed as the
    pass's `gather` stage."""
    variant = self._variant(model, ratio)
    times = self.bucket_times.setdefault(float(ratio), {})
    if not variant.config.stts.prunes:
      scored = None
    elif scored is not None:
      t0 = time.perf_counter()
      if take is None:
        scored = _stack_rows(scored)
      else:
        take = jnp.asarray(take)
        scored = jax.tree.map(lambda x: x[take], scored)
      scored = jax.block_until_ready(scored)
      times.setdefault("gather", []).append(time.perf_counter() - t0)
    calls = {stage: len(ts) for stage, ts in self.predictor.times.items()}
    res = self.predictor(variant, sub, generate=generate, step=step, scored=scored)
    for stage, ts in self.predictor.times.items():
      if len(ts) > calls.get(stage, 0):   # only stages this pass ran
        times.setdefault(stage, []).append(ts[-1])
    return {k: np.asarray(v) for k, v in res.items()}

  def __call__(self, model: vlm.Molmo2, batch: Mapping[str, np.ndarray], *, generate: bool = True,
               step: int = 0) -> dict[str, np.ndarray]:
    scored, scores, ratios, satisfied = self._score(model, batch)
    b = scores.shape[0]
    valid = np.asarray(batch.get("valid", np.ones(b, bool)), bool)
    if valid.any():   # padding rows ride along with a real video's bucket (their outputs are unused)
      ratios = np.where(valid, ratios, ratios[np.argmax(valid)])
    out: dict[str, np.ndarray] = {}
    for r in sorted(set(ratios.tolist())):
      rows = np.flatnonzero(ratios == r)
      fill = np.full(b, rows[0])
      fill[rows] = rows
      sub = {k: (np.asarray(v)[fill] if np.ndim(v) >= 1 and np.shape(v)[0] == b else v) for k, v in batch.items()}
      sub["valid"] = np.isin(np.arange(b), rows) & valid
      res = self._bucket_pass(model, r, sub, generate, step, scored, take=fill)
      for k, v in res.items():
        if v.ndim >= 1 and v.shape[0] == b:
          if k not in out:
            out[k] = np.zeros_like(v)
          out[k][rows] = v[rows]
        else:
          out[k] = np.logical_or(out.get(k, False), v) if v.dtype == bool else v
    out.update(bucket=ratios, budget_satisfied=satisfied, vision_tokens=out["num_kept"].copy(),
               adaptive_scores=scores)
    return out

  def grouped_passes(self, model: vlm.Molmo2, batches: Iterable[Mapping[str, np.ndarray]], *,
                     generate: bool = True) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]]:
    """Cross-batch grouping: yields (batch, preds, consumed) for the evaluator's loop.

    Each input batch is scored and yielded once with every row marked invalid and no predictions
    (consumed 1: it carries the pipeline's skipped rows); its valid videos wait in their bucket's
    queue, and a queue that holds a full batch runs as one bucket pass (consumed 0), yielded with its
    own rows and the usual outputs (`__call__`'s keys). After the last batch every non-empty queue
    runs once, padded with copies of its first video marked invalid. Same shapes as the input
    batches: one compilation per (bucket, frame count), as ungrouped. Bucket passes are numbered in
    the order they run (the predictor's `step`): greedy outputs are those of the ungrouped path;
    sampled ones (temperature > 0) draw from the stream of their pass number instead."""
    queues: dict[float, list[dict[str, np.ndarray]]] = {}
    shared: dict[str, Any] = {}
    size = None
    step = 0

    def run(ratio: float, rows: list[dict[str, np.ndarray]]):
      nonlocal step
      fill = rows + [rows[0]] * (size - len(rows))
      sub = {k: np.stack([row[k] for row in fill]) for k in rows[0] if not k.startswith("_")}
      sub.update(shared)
      sub["valid"] = np.arange(size) < len(rows)
      scored = None if "_scored" not in rows[0] else [row["_scored"] for row in fill]
      res = self._bucket_pass(model, ratio, sub, generate, step, scored)
      step += 1
      res.update(bucket=np.full(size, ratio), budget_satisfied=np.stack([row["_satisfied"] for row in fill]),
                 vision_tokens=res["num_kept"].copy(), adaptive_scores=np.stack([row["_scores"] for row in fill]))
      return sub, res, 0

    for batch in batches:
      batch = {k: np.asarray(v) for k, v in batch.items()}
      b = batch["frame_mask"].shape[0]
      if size is None:
        size = b
      elif b != size:
        raise ValueError(f"grouped adaptive evaluation needs batches of one size, got {b} after {size}")
      scored, scores, ratios, satisfied = self._score(model, batch, rows=True)
      per_row = [k for k, v in batch.items() if v.ndim >= 1 and v.shape[0] == b]
      shared = {k: v for k, v in batch.items() if k not in per_row}
      valid = np.asarray(batch.get("valid", np.ones(b, bool)), bool)
      for i in np.flatnonzero(valid):
        row = {k: np.array(batch[k][i]) for k in per_row}   # a copy: the pipeline may reuse its buffers
        row.update(_scores=scores[i], _satisfied=satisfied[i])
        if scored is not None:
          row["_scored"] = scored[i]
        queue = queues.setdefault(float(ratios[i]), [])
        queue.append(row)
        if len(queue) == size:
          yield run(float(ratios[i]), queues.pop(float(ratios[i])))
      yield dict(batch, valid=np.zeros(b, bool)), {}, 1
    for r in sorted(queues):
      yield run(r, queues[r])


__all__ = ["AdaptivePredictor", "AdaptiveRule", "DEFAULT_BUCKETS", "DEFAULT_THRESHOLDS", "choose_buckets",
           "compile_counts", "rule_for", "score_pass", "score_videos", "valid_buckets", "warm_rows"]

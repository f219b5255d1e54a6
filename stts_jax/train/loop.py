"""The training loop: sharded init, one compiled step, metrics, eval hook, checkpoints.

The step is compiled once under `jax.set_mesh(mesh)`: `nnx.split` of the TrainState, a pure
`(state, batch) -> (state, metrics)` under `jax.jit` with in/out shardings from the rules table
and the state donated, then `nnx.merge` inside. Metrics go to `workdir/metrics.jsonl` and
TensorBoard (`workdir/tb`) and the progress bar to stderr, from process 0 only; checkpoints to
`workdir/checkpoints` (written by all processes). With `log_example_ids`, every process appends
`{"step", "example_id"}` lines for its own rows to `workdir/example_ids/process_{i}-of-{n}.jsonl`
(provenance of the data each host read; `example_id` -1 marks padding slots).
Example-packed batches (`data.pack_examples`) add pack_fill, pack_frame_fill, pack_examples_per_row
and examples_per_s to the logged metrics (`_PackStats`).
"""

import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx

from stts_jax.models import partitioning
from stts_jax.train import checkpoint as ckpt_lib
from stts_jax.train import distributed
from stts_jax.train import fork
from stts_jax.parallel import sharding
from stts_jax.train import step as step_lib
from stts_jax.train.config import TrainConfig

log = logging.getLogger(__name__)
KEPT_DIR = "kept_checkpoints"   # `train.keep_checkpoint_steps`, beside `checkpoints`; never pruned

# Host batch fields of these dtypes go to the devices; others (int64 example ids, strings) stay
# on the host (logged, never traced).
_DEVICE_DTYPES = (np.bool_, np.uint8, np.int32, np.float32, np.float16)


@dataclasses.dataclass
class TrainResult:
  graphdef: Any
  state: nnx.State                  # final TrainState state (sharded arrays)
  history: list[dict[str, float]]   # logged metrics (every log_every steps) of this run
  preempted: bool                   # stopped by SIGTERM (checkpoint written)
  compilations: int                 # compilations of the step function in this run


def device_fields(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: v for k, v in batch.items() if np.asarray(v).dtype.type in _DEVICE_DTYPES}


def abstract_state(model_fn: Callable[[], nnx.Module], cfg: TrainConfig, mesh: jax.sharding.Mesh,
                   rules: Sequence[tuple[str, Any]]) -> tuple[Any, nnx.State, Any]:
  """(graphdef, abstract state with sharded ShapeDtypeStructs, shardings); nothing allocated."""
  # No mesh context here: under one, nnx.eval_shape would read the *logical* names as mesh axes.
  abs_ts = nnx.eval_shape(lambda: step_lib.TrainState(model_fn(), cfg))
  graphdef, abs_state = nnx.split(abs_ts)
  shardings = sharding.state_shardings(abs_state, mesh, rules)
  abs_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           abs_state, shardings)
  return graphdef, abs_state, shardings


def init_state(model_fn: Callable[[], nnx.Module], cfg: TrainConfig, mesh: jax.sharding.Mesh,
               rules: Sequence[tuple[str, Any]]) -> tuple[Any, nnx.State, Any]:
  """Sharded init under jit: every array is created directly in its final layout."""
  graphdef, _, shardings = abstract_state(model_fn, cfg, mesh, rules)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda: nnx.split(step_lib.TrainState(model_fn(), cfg))[1],
                    out_shardings=shardings)()
  return graphdef, state, shardings


def warm_up_scorer(graphdef: Any, state: nnx.State, shardings: Any, data_iter: Any, cfg: TrainConfig,
                   mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]]) -> tuple[nnx.State, dict[str, Any]]:
  """`scorer_warmup.warm_up_scorer` on the model of a freshly initialised TrainState, on the first
  `cfg.scorer_warmup_steps` batches of `data_iter`, which is then rewound (the main phase sees the
  batches an unpruned run would). Returns the state in `shardings` and the warm-up summary."""
  from stts_jax.train import scorer_warmup
  train_state = nnx.merge(graphdef, state)
  if train_state.model.scorer is None:
    raise ValueError("train.scorer_warmup_steps > 0 but the model has no STTS scorer (stts.method != 'stts')")
  rewind = data_iter.get_state()
  barrier = None
  if jax.process_count() > 1:
    barrier = lambda: distributed.barrier("stts_jax/scorer_warmup_compiled",  # noqa: E731
                                          timeout_s=cfg.barrier_timeout_s)
  bar = None
  if cfg.progress_bar and jax.process_index() == 0:
    import tqdm
    bar = tqdm.tqdm(total=cfg.scorer_warmup_steps, desc="scorer warm-up", dynamic_ncols=True, leave=False)
  try:
    with jax.set_mesh(mesh):
      summary = scorer_warmup.warm_up_scorer(
          train_state.model, data_iter, steps=cfg.scorer_warmup_steps, learning_rate=cfg.scorer_warmup_lr,
          shard=lambda b: sharding.shard_batch(dict(b), mesh, rules), progress=bar.update if bar else None,
          barrier=barrier)
  finally:
    if bar is not None:
      bar.close()
  data_iter.set_state(rewind)
  log.info("scorer warm-up: %d steps, aux loss %.4f -> %.4f", summary["steps"], summary["aux_loss_first"],
           summary["aux_loss_last"])
  return jax.device_put(nnx.split(train_state)[1], shardings), summary


def ratio_graphdefs(model_fn: Callable[[], nnx.Module], cfg: TrainConfig,
                    base_graphdef: Any) -> dict[float, Any]:
  """{drop ratio: graphdef of the TrainState whose model runs at that ratio} for every ratio other
  than the model's own that training uses: mixed-ratio training's `cfg.stts_ratios`, and ratio 0 for
  the unpruned steps before `cfg.prune_start`. Only the static config differs, so every graphdef fits
  the one state."""
  ratios = [float(r) for r in cfg.stts_ratios] + ([0.0] if cfg.prune_start > 0 else [])
  if not ratios:
    return {}
  base = nnx.eval_shape(lambda: step_lib.TrainState(model_fn(), cfg))
  model_cfg = base.model.config
  if not model_cfg.stts.prunes:
    raise ValueError(f"train.stts_ratios={tuple(cfg.stts_ratios)}, train.prune_start={cfg.prune_start}: "
                     f"needs a pruning model, but stts.method is {model_cfg.stts.method!r} with ratio "
                     f"{model_cfg.stts.ratio}")
  structure = jax.tree.structure(nnx.split(base)[1])
  out = {}
  for r in dict.fromkeys(ratios):
    if r == model_cfg.stts.ratio:
      out[r] = base_graphdef
      continue
    # The config is static metadata: re-splitting the one abstract state with another config gives
    # that ratio's graphdef.
    base.model.config = model_cfg.with_stts(ratio=r)
    graphdef, abs_state = nnx.split(base)
    if jax.tree.structure(abs_state) != structure:
      raise AssertionError(f"ratio {r}: the train state's structure differs from the base model's")
    out[r] = graphdef
  return out


def make_step_fn(graphdef: Any, state_shardings: Any, batch_shardings: Mapping[str, Any],
                 mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]], cfg: TrainConfig,
                 forward: Optional[step_lib.Forward] = None):
  """jit(pure step) with explicit shardings; the state argument is donated."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def pure_step(state, batch):
    with partitioning.activation_rules(mesh, rules):
      ts = nnx.merge(graphdef, state)
      metrics = step_lib.train_step(ts, batch, cfg=cfg, forward=forward)
      return nnx.state(ts), metrics

  return jax.jit(pure_step, in_shardings=(state_shardings, dict(batch_shardings)),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


class _MetricsWriter:
  """JSONL + TensorBoard from process 0; no-op elsewhere."""

  def __init__(self, workdir: str, tensorboard: bool):
    self.active = jax.process_index() == 0
    self.tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      import tensorboardX
      self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.active:
      return
    self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.active:
      self.jsonl.close()
      if self.tb is not None:
        self.tb.close()


class _ExampleIdLog:
  """Per-process JSONL of the example ids of this process's batch rows (if enabled)."""

  def __init__(self, workdir: str, enabled: bool):
    self.file = None
    if enabled:
      directory = os.path.join(workdir, "example_ids")
      os.makedirs(directory, exist_ok=True)
      name = f"process_{jax.process_index()}-of-{jax.process_count()}.jsonl"
      self.file = open(os.path.join(directory, name), "a")

  def write(self, step: int, host_batch: Mapping[str, np.ndarray]) -> None:
    if self.file is None:
      return
    if "example_id" not in host_batch:
      raise KeyError("train.log_example_ids: the data iterator's batches have no 'example_id' field")
    ids = np.asarray(host_batch["example_id"]).reshape(-1).tolist()
    self.file.write(json.dumps({"step": step, "example_id": ids}) + "\n")
    self.file.flush()

  def close(self) -> None:
    if self.file is not None:
      self.file.close()


class _Preemption:
  """SIGTERM -> flag; the loop saves and stops at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del signum, frame
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:   # not the main thread: no handler
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def any_process(self, boundary: bool) -> bool:
    """Single process: the local flag. Multi-process: all processes agree (an all-gather, a host
    sync), so it is only asked at `boundary` steps (log/checkpoint steps) to keep dispatch async."""
    if jax.process_count() == 1:
      return self.requested
    if not boundary:
      return False
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
    return bool(np.any(flags))


def _data_counts(data_iter: Any) -> Optional[tuple[int, int]]:
  """(skipped, read) data examples so far, summed over processes; None if `data_iter` does not
  count them (it has no `check_skipped`). A host sync with several processes (log steps only)."""
  if getattr(data_iter, "check_skipped", None) is None:
    return None
  counts = np.asarray([data_iter.num_skipped, data_iter.num_seen], np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 2).sum(0)
  return int(counts[0]), int(counts[1])


class _PackStats:
  """Fill of example-packed rows (`pack_tokens` / `pack_capacity` host fields) over a log window:
  pack_fill (pruned tokens placed / row capacity), pack_frame_fill (real frames / frame budget),
  pack_examples_per_row, examples_per_s (all processes, assuming each packs alike; this process's rows
  are what is measured). Nothing is logged for unpacked batches."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.rows = self.examples = 0
    self.tokens = self.capacity = self.frames = self.frame_slots = 0

  def add(self, host_batch: Mapping[str, np.ndarray]) -> None:
    if "pack_tokens" not in host_batch:
      return
    self.rows += int(np.shape(host_batch["pack_tokens"])[0])
    self.examples += int(np.sum(np.asarray(host_batch["valid"]) | np.asarray(host_batch["skipped"])))
    self.tokens += int(np.sum(host_batch["pack_tokens"]))
    self.capacity += int(np.sum(host_batch["pack_capacity"]))
    self.frames += int(np.sum(host_batch["frame_mask"]))
    self.frame_slots += int(np.size(host_batch["frame_mask"]))

  def scalars(self, elapsed: float) -> dict[str, float]:
    if not self.rows:
      return {}
    return {"pack_fill": self.tokens / max(self.capacity, 1), "pack_frame_fill": self.frames / max(self.frame_slots, 1),
            "pack_examples_per_row": self.examples / self.rows,
            "examples_per_s": self.examples * jax.process_count() / max(elapsed, 1e-9)}


def _scalars(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


def run(model_fn: Callable[[], nnx.Module], data_iter: Iterator[Mapping[str, np.ndarray]],
        cfg: TrainConfig, mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]], workdir: str, *,
        config_json: Optional[dict] = None, forward: Optional[step_lib.Forward] = None,
        eval_fn: Optional[Callable[[nnx.Module, int], Mapping[str, float]]] = None,
        on_step: Optional[Callable[[int], None]] = None) -> TrainResult:
  """Trains to `cfg.num_steps`, resuming from the latest checkpoint in `workdir/checkpoints`.

  data_iter: yields host batches (this process's rows) and has get_state()/set_state(); if it
    counts bad examples (`pipeline.DataIterator`), every log step checks their fraction.
  eval_fn(model, step) -> metrics, called every `eval_every` steps and at the end (if set).
  on_step(step) is called after each step is dispatched (e.g. `distributed.Supervisor.tick`).
  """
  checkpointer = ckpt_lib.Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                       max_to_keep=cfg.max_to_keep, async_save=cfg.async_checkpoint)
  kept = None
  if cfg.keep_checkpoint_steps:
    kept = ckpt_lib.Checkpointer(os.path.join(os.path.abspath(workdir), KEPT_DIR),
                                 max_to_keep=len(cfg.keep_checkpoint_steps), async_save=cfg.async_checkpoint)
  latest = checkpointer.latest_step()
  warmup_summary = fork_summary = None
  if latest is None:
    graphdef, state, shardings = init_state(model_fn, cfg, mesh, rules)
    if cfg.scorer_warmup_steps:
      state, warmup_summary = warm_up_scorer(graphdef, state, shardings, data_iter, cfg, mesh, rules)
    if cfg.init_from:
      # After the warm-up (scorer only, iterator rewound), as in the run that trains its unpruned steps.
      state, fork_summary = fork.start_from(graphdef, state, shardings, data_iter, cfg, mesh)
  else:
    graphdef, abs_state, shardings = abstract_state(model_fn, cfg, mesh, rules)
    state, _ = checkpointer.restore(latest, abs_state, data_iter)
    log.info("resumed from step %d", latest)
  start = int(jax.device_get(state["step"].get_value()))
  writer = _MetricsWriter(workdir, cfg.tensorboard)
  id_log = _ExampleIdLog(workdir, cfg.log_example_ids)
  history: list[dict[str, float]] = []
  if warmup_summary is not None:
    record = {f"scorer_warmup/{k}": float(v) for k, v in warmup_summary.items()}
    writer.write(0, record)
    history.append({"step": 0.0, **record})
  # Mixed-ratio training and the unpruned steps before `prune_start`: one graphdef (and compiled
  # step) per drop ratio, chosen by the step.
  by_ratio = ratio_graphdefs(model_fn, cfg, graphdef)
  ratios = tuple(float(r) for r in cfg.stts_ratios)
  # Steps before `stts_ratios_start` run at the model's ratio: its own key when it is one of the
  # ratios (one compiled step serves both phases), else the base graphdef's.
  fixed_key = next((r for r, g in by_ratio.items() if g is graphdef), None)
  step_fns: dict[Any, Any] = {}
  step_fn = None
  preempted = False
  config_json = config_json or {}
  progress = None
  if cfg.progress_bar and jax.process_index() == 0:
    import tqdm
    progress = tqdm.tqdm(total=cfg.num_steps, initial=start, desc="train", dynamic_ncols=True)

  def evaluate(step: int) -> None:
    if eval_fn is None:
      return
    model = nnx.merge(graphdef, state).model
    with jax.set_mesh(mesh):
      scores = {f"eval/{k}": float(v) for k, v in eval_fn(model, step).items()}
    writer.write(step, scores)
    history.append({"step": float(step), **scores})

  try:
    if fork_summary is not None and cfg.eval_every and start % cfg.eval_every == 0:
      evaluate(start)   # the point the full run evaluates after its step `start`
    with _Preemption() as preemption, jax.set_mesh(mesh):
      window_start, window_steps, window_tokens = time.perf_counter(), 0, 0.0
      pack_stats = _PackStats()
      for step in range(start, cfg.num_steps):
        host_batch = next(data_iter)
        id_log.write(step + 1, host_batch)
        batch = sharding.shard_batch(device_fields(host_batch), mesh, rules)
        if step < cfg.prune_start:
          key = 0.0
        else:
          key = ratios[step % len(ratios)] if ratios and step >= cfg.stts_ratios_start else fixed_key
        step_fn = step_fns.get(key)
        if step_fn is None:
          batch_shardings = {k: v.sharding for k, v in batch.items()}
          step_fn = step_fns[key] = make_step_fn(by_ratio.get(key, graphdef), shardings, batch_shardings, mesh,
                                                 rules, cfg, forward)
          if jax.process_count() > 1:
            # gloo gives processes 30 s to meet at the first collective of a program; compile
            # times differ by more under load, so compile first and start together.
            step_fn.lower(state, batch).compile()
            distributed.barrier(f"stts_jax/train_step_compiled/{start}/{key}", timeout_s=cfg.barrier_timeout_s)
        state, metrics = step_fn(state, batch)
        window_steps += 1
        window_tokens += float(np.sum(host_batch["token_mask"])) * jax.process_count()
        pack_stats.add(host_batch)
        done = step + 1
        if on_step is not None:
          on_step(done)
        if progress is not None:
          progress.update(1)
        if done % cfg.log_every == 0 or done == cfg.num_steps:
          scalars = _scalars(metrics)
          elapsed = time.perf_counter() - window_start
          scalars["step_time"] = elapsed / window_steps
          scalars["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
          scalars.update(pack_stats.scalars(elapsed))
          data_counts = _data_counts(data_iter)
          if data_counts is not None:
            scalars["data_skipped"] = float(data_counts[0])
          writer.write(done, scalars)
          history.append(scalars)
          if data_counts is not None:
            # More than data.max_skipped_fraction bad examples: stop with the list of files
            # (the same sums on every process, so all of them stop).
            data_iter.check_skipped(num_skipped=data_counts[0], num_seen=data_counts[1])
          if progress is not None:
            progress.set_postfix(loss=f"{scalars['loss']:.4f}", skipped=int(scalars["skipped_total"]))
          window_start, window_steps, window_tokens = time.perf_counter(), 0, 0.0
          pack_stats.reset()
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.num_steps:
          evaluate(done)
        boundary = (done % cfg.log_every == 0 or done == cfg.num_steps
                    or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0))
        if preemption.any_process(boundary):
          checkpointer.save(done, state, data_iter, config_json)
          log.warning("SIGTERM: saved checkpoint at step %d, stopping", done)
          preempted = True
          break
        if done == cfg.num_steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
          checkpointer.save(done, state, data_iter, config_json)
        if kept is not None and done in cfg.keep_checkpoint_steps:
          kept.save(done, state, data_iter, config_json)
      if not preempted and start < cfg.num_steps:
        evaluate(cfg.num_steps)
  finally:
    checkpointer.close()
    if kept is not None:
      kept.close()
    writer.close()
    id_log.close()
    if progress is not None:
      progress.close()
  compilations = sum(fn._cache_size() for fn in step_fns.values())
  return TrainResult(graphdef=graphdef, state=state, history=history, preempted=preempted,
                     compilations=compilations)

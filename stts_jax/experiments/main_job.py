"""The main job: one call builds the data, trains an unpruned and an STTS demo model, evaluates pruning
methods on the held-out test split, times both models side by side and writes the report.

  run(config, workdir, *, seeds=None, steps=None, retime=False, trained_baselines=None,
      results_dir=None, command=None) -> report dict
  exit_status(report, strict=None) -> 0, or 1 when a check failed and the job is strict
  train_only(config, workdir, runs, ...) -> stages 1-2 for some runs alone (train_only.json)

config: a top-level config (`configs/demo.py`) with sections model (the pruned variant: method
"stts", ratio 0.5; the job derives the unpruned one), data, train, mesh, eval and job (`JobConfig`).
Stages, each reusing finished work in `workdir`:
  1 dataset  `default_dataset.build` into `data.path` (reused when a complete build with the same
             spec is there).
  2 train    per seed: `workdir/seed{s}/unpruned` and `workdir/seed{s}/stts`, the same number of
             steps, data parallel over the mesh, with checkpoints. A run whose final checkpoint
             exists is skipped; an interrupted one resumes from its latest checkpoint. A run dir
             trained with a different config is an error (never silently mixed).
             With `job.trained_baselines` also `seed{s}/random` and `seed{s}/heuristic`: the STTS
             run's config with that method (same ratio, rows, steps, data order; no scorer warm-up).
             With `train.prune_start` k > 0 (`job.fork_pruned_runs`), the unpruned run keeps its
             step-k checkpoint and the pruned runs start from it (`train/fork.py`: their first k steps
             are unpruned, so that is the state they would reach themselves; `started_from.json`).
             Every `job.val_every` steps and at the end, each run evaluates its own method at the
             trained ratio on the first `job.val_examples` VALIDATION questions (`validation.val_eval_fn`,
             the test eval's evaluator, compiled once per run); the points go to its metrics.jsonl
             as `eval/val_accuracy` (a resumed run keeps the earlier ones).
  3 eval     per seed, on the test split (`eval.runner`), cached in `seed{s}/eval_{run}/results.json`:
             the unpruned-trained model unpruned and with training-free random / heuristic pruning;
             the STTS-trained model with STTS, random and heuristic pruning at `job.eval_ratios`
             (same weights: only the choice of tokens differs) and unpruned; a trained baseline
             with its own method at the trained ratio. results.json holds every question's outcome
             (the report's paired bootstrap reads it).
  4 speed    first seed: train step (unpruned vs STTS) and prefill (all methods) timed in
             interleaved rounds in this process (`speed.py`); cached in `speed.json` (`retime`
             re-measures).
  5 report   `report.py`: one table, paired bootstrap intervals (`stats.py`), validation curves
             with the plateau diagnostic, checks, report.json (with command, commit, machine),
             table.md, val_curves.json, plots/. With `results_dir`, those files, speed.json and a
             provenance.json are copied there (`copy_results`).
"""

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from stts_jax import config as config_lib
from stts_jax import provenance as provenance_lib
from stts_jax.data import default_dataset
from stts_jax.eval import checkpoints as eval_ckpt
from stts_jax.eval import data as eval_data
from stts_jax.eval import generate as gen_lib
from stts_jax.eval import predictor as predictor_lib
from stts_jax.eval import runner
from stts_jax.eval.config import EvalConfig
from stts_jax.experiments import report as report_lib
from stts_jax.experiments import speed as speed_lib
from stts_jax.experiments import validation as validation_lib
from stts_jax.experiments import vision_pretrain
from stts_jax.models import vlm
from stts_jax.experiments.config import JobConfig
from stts_jax.train import checkpoint as ckpt_lib
from stts_jax.train import loop as loop_lib
from stts_jax.train import main as train_main
from stts_jax.parallel import mesh as mesh_lib
from stts_jax.parallel import sharding
from stts_jax.train.config import MeshConfig, TrainConfig

log = logging.getLogger(__name__)
RUNS = ("unpruned", "stts")                     # always trained; the timing stage compares these two
BASELINE_RUNS = report_lib.BASELINE_RUNS        # ("random", "heuristic"), with job.trained_baselines
STAGES = 5


@dataclasses.dataclass
class Job:
  """Everything the stages share, built once from the config."""
  config: ml_collections.ConfigDict
  workdir: str
  model: config_lib.ModelConfig       # the pruned ("stts") variant
  data: Any                           # DataConfig
  train: TrainConfig
  mesh_cfg: MeshConfig
  eval: EvalConfig
  job: JobConfig
  say: Callable[[str], None]
  mesh: Any = None
  rules: tuple = ()

  @property
  def ratio(self) -> float:
    return self.model.stts.ratio

  @property
  def runs(self) -> tuple[str, ...]:
    return RUNS + (BASELINE_RUNS if self.job.trained_baselines else ())

  def run_dir(self, seed: int, run: str) -> str:
    return os.path.join(self.workdir, f"seed{seed}", run)


def _say(text: str) -> None:
  print(text, flush=True)


def _sections(config: Any, seeds, steps, trained_baselines=None) -> dict[str, Any]:
  config = ml_collections.ConfigDict(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
  if trained_baselines is not None:
    config.job = dict(config.get("job", {}), trained_baselines=bool(trained_baselines))
  if steps is not None:
    config.train.num_steps = int(steps)
    optim = config.train.get("optim", {})
    if "warmup_steps" in optim:
      optim["warmup_steps"] = min(int(optim["warmup_steps"]), int(steps) // 10)
  if seeds is not None:
    config.job = dict(config.get("job", {}), seeds=tuple(int(s) for s in seeds))
  cfgs = config_lib.build(config)
  for name in ("data", "train", "mesh", "eval", "job"):
    if name not in cfgs:
      raise ValueError(f"main job: the config needs a `{name}` section")
  if cfgs["model"].stts.method == "none" or not cfgs["model"].stts.prunes:
    raise ValueError("main job: config.model must be the pruned variant (e.g. stts.method='stts', ratio 0.5); "
                     "the unpruned model is derived from it")
  return dict(cfgs, config=config)


def make_job(config: Any, workdir: str, *, seeds=None, steps=None, trained_baselines=None,
             say: Callable[[str], None] = _say) -> Job:
  c = _sections(config, seeds, steps, trained_baselines)
  mesh = mesh_lib.make_mesh(c["mesh"])
  return Job(config=c["config"], workdir=os.path.abspath(workdir), model=c["model"], data=c["data"],
             train=c["train"], mesh_cfg=c["mesh"], eval=c["eval"], job=c["job"], say=say, mesh=mesh,
             rules=sharding.make_rules(c["mesh"]))


# ---------------------------------------------------------------------------------------------
# 1. dataset
# ---------------------------------------------------------------------------------------------
def ensure_dataset(job: Job, progress: bool = True) -> dict[str, Any]:
  spec = default_dataset.Spec(variant=job.job.dataset_variant,
                              **({} if job.job.dataset_clips is None else {"num_clips": tuple(job.job.dataset_clips)}))
  path = job.data.path
  meta_path = os.path.join(path, "meta.json")
  old = None
  if os.path.isfile(meta_path):
    with open(meta_path) as f:
      old = json.load(f)
  reuse = old is not None and old.get("spec") == json.loads(json.dumps(dataclasses.asdict(spec)))
  if not reuse:
    why = "" if old is None else f" (it held another spec, {old.get('spec')}: rebuilding)"
    job.say(f"  building {sum(spec.num_clips)} clips into {path}{why}; later runs reuse it")
  bar = None
  if not reuse and progress:
    import tqdm
    bar = tqdm.tqdm(total=sum(spec.num_clips), desc="dataset", unit="clip", dynamic_ncols=True)
  t0 = time.time()
  kw = {"progress": bar.update} if bar is not None else {}
  meta = default_dataset.build(path, spec, workers=job.job.dataset_workers or 2 * (os.cpu_count() or 1),
                               with_tfds=False, **kw)
  if bar is not None:
    bar.close()
  counts = {s: meta["counts"][s]["examples"] for s in default_dataset.SPLITS}
  job.say(f"  {'reused' if reuse else 'built'} {path}: {counts} examples "
          f"(event window kept at ratio 0.5 by the heuristic in "
          f"{meta['oracle_keep_rate_50pct']['test']['heuristic']:.0%}, by random in "
          f"{meta['oracle_keep_rate_50pct']['test']['random']:.0%} of test clips)")
  return {"path": os.path.abspath(path), "status": "reused" if reuse else "built", "spec": meta["spec"],
          "counts": meta["counts"], "oracle_keep_rate_50pct": meta["oracle_keep_rate_50pct"],
          "seconds": round(time.time() - t0, 1)}


# ---------------------------------------------------------------------------------------------
# 2. training
# ---------------------------------------------------------------------------------------------
# Training settings of the learned scorer alone (its aux loss; exploration and gradient of its selection):
# the other runs leave them out, so their configs and workdirs do not depend on them.
STTS_ONLY_TRAIN_KEYS = ("aux_gradient", "aux_decay_steps", "random_selection", "selection_gradient",
                        "policy_gradient", "policy_temperature")


def run_config(job: Job, seed: int, run: str) -> dict[str, Any]:
  """The training config of one run: the job's model (unpruned: method none; a trained baseline: its
  method at the same ratio and packed rows), this seed."""
  if run not in RUNS + BASELINE_RUNS:
    raise ValueError(f"main job: unknown run {run!r}; runs are {RUNS + BASELINE_RUNS}")
  d = job.config.to_dict()
  for k in ("job", "eval"):
    d.pop(k, None)
  if run == "unpruned":
    d["model"]["stts"] = dict(d["model"]["stts"], method="none", num_rows=None)
    d["train"] = {k: v for k, v in d["train"].items()                        # nothing to prune
                  if k not in ("stts_ratios", "stts_ratios_start", "prune_start")}
  elif run in BASELINE_RUNS:
    d["model"]["stts"] = dict(d["model"]["stts"], method=run)
  if run != "stts":
    # No learned scorer: nothing to warm up, and the aux loss is identically 0 for these methods
    # (video_forward), so its weight and STTS_ONLY_TRAIN_KEYS are not part of these runs' identity.
    d["train"] = dict({k: v for k, v in d["train"].items() if k not in STTS_ONLY_TRAIN_KEYS},
                      scorer_warmup_steps=0, aux_weight=0.0)
  d["train"] = dict(d["train"], seed=seed)
  d["data"] = dict(d["data"], shuffle_seed=seed)
  d["name"] = f"{d.get('name', 'main_job')}_{run}_seed{seed}"
  return json.loads(json.dumps(d))


def model_config_of(run_cfg: dict[str, Any]) -> config_lib.ModelConfig:
  return config_lib.build_model_config(run_cfg["model"])


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
  return [] if a == b else [prefix.rstrip(".")]


def checkpoint_steps(directory: str) -> list[int]:
  """Steps of the Orbax checkpoints in `directory`, ascending ([] if there is none)."""
  if not os.path.isdir(directory):
    return []
  ck = ckpt_lib.Checkpointer(directory, async_save=False)
  try:
    return sorted(ck.all_steps())
  finally:
    ck.close()


def latest_step(run_dir: str) -> Optional[int]:
  steps = checkpoint_steps(os.path.join(run_dir, "checkpoints"))
  return steps[-1] if steps else None


def read_history(run_dir: str) -> list[dict[str, Any]]:
  """metrics.jsonl of a run, one entry per step (a resumed run's re-logged steps: the last one)."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    return []
  by_step: dict[int, dict[str, Any]] = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        rec = json.loads(line)
        by_step.setdefault(int(rec["step"]), {}).update(rec)
  return [by_step[s] for s in sorted(by_step)]


def pretrain_vision(job: Job, progress: bool = True) -> Optional[tuple[dict[str, np.ndarray], dict[str, Any]]]:
  """Stage 0 (`vision_pretrain.py`): the vision tower every run starts from; None if disabled."""
  steps = job.job.vision_pretrain_steps
  if steps == 0:
    return None
  pcfg = vision_pretrain.PretrainConfig(steps=steps, learning_rate=job.job.vision_pretrain_lr,
                                        batch_size=job.data.batch_size,
                                        pruned_ratio=job.job.vision_pretrain_pruned_ratio,
                                        freeze_vit_blocks=job.job.vision_pretrain_freeze_blocks,
                                        event_weight=job.job.vision_pretrain_event_weight)
  out_dir = os.path.join(job.workdir, "vision_tower")
  bars = []

  def tick(n: int) -> None:
    if not bars:          # created on the first step: a reused tower shows no bar
      import tqdm
      bars.append(tqdm.tqdm(total=steps, desc="vision tower", unit="step", dynamic_ncols=True, leave=False))
    bars[0].update(n)
  try:
    params, meta = vision_pretrain.pretrain(job.model, job.data, pcfg, out_dir, progress=tick if progress else None)
  finally:
    for bar in bars:
      bar.close()
  pruned = meta.get("final_pruned_event_recall")
  job.say(f"  vision tower: {meta['status']} ({meta['steps']} steps, event recall "
          f"{meta['final_event_recall']:.3f}" + ("" if pruned is None else f", {pruned:.3f} with "
          f"{job.job.vision_pretrain_pruned_ratio:g} of the windows dropped") + f") -> {out_dir}")
  return params, meta


FORK_FILE = "started_from.json"


def fork_settings(job: Job, seed: int, run: str, start: Optional[int]) -> dict[str, Any]:
  """Train settings that share the unpruned steps (`job.fork_pruned_runs`): the unpruned run keeps its
  checkpoint at `train.prune_start`; a pruned run not started yet starts from it when it is there (and
  records that in `started_from.json`)."""
  k = job.train.prune_start
  if not job.job.fork_pruned_runs or k == 0:
    return {}
  if run == "unpruned":
    return {"keep_checkpoint_steps": (k,)}
  if start is not None:
    return {}
  source = os.path.join(job.run_dir(seed, "unpruned"), loop_lib.KEPT_DIR)
  if k not in checkpoint_steps(source):
    job.say(f"  seed {seed} {run}: trains its {k} unpruned steps itself ({source} holds no step-{k} checkpoint)")
    return {}
  with open(os.path.join(job.run_dir(seed, run), FORK_FILE), "w") as f:
    json.dump({"init_from": source, "init_from_step": k}, f, indent=1)
  return {"init_from": source, "init_from_step": k}


def read_fork(run_dir: str) -> Optional[dict[str, Any]]:
  path = os.path.join(run_dir, FORK_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def train(job: Job, seed: int, run: str,
          vision: Optional[tuple[dict[str, np.ndarray], dict[str, Any]]] = None) -> dict[str, Any]:
  """Trains (or reuses / resumes) one run, from the pretrained vision tower if given; returns its
  status and summary."""
  run_dir = job.run_dir(seed, run)
  cfg = run_config(job, seed, run)
  # What the run starts from is part of its identity (a different tower must not be resumed).
  recorded = dict(cfg, vision_tower=vision[1]["settings"] if vision else None)
  os.makedirs(run_dir, exist_ok=True)
  cfg_path = os.path.join(run_dir, "run_config.json")
  if os.path.isfile(cfg_path):
    with open(cfg_path) as f:
      old = json.load(f)
    diff = _diff(old, recorded)
    if diff:
      raise ValueError(f"{run_dir} was trained with a different config (differs in {diff}); use another "
                       f"--workdir or delete that directory")
  else:
    with open(cfg_path, "w") as f:
      json.dump(recorded, f, indent=1)
  steps = job.train.num_steps
  start = latest_step(run_dir)
  label = f"seed {seed} {run}"
  if start is not None and start >= steps:
    job.say(f"  {label}: reused ({start} steps done) {run_dir}")
    status = "reused"
    seconds = 0.0
  else:
    job.say(f"  {label}: {'resuming at step ' + str(start) if start else 'training'} to {steps} steps -> {run_dir}")
    t0 = time.time()
    model_fn = None
    if vision is not None:
      model_cfg, params = model_config_of(cfg), vision[0]
      model_fn = lambda: vision_pretrain.load_into(vlm.Molmo2(model_cfg, rngs=nnx.Rngs(seed)), params)
    # The validation cadence and where the unpruned steps come from change what is logged and computed,
    # not what is trained: not part of run_config.json.
    extra = dict(eval_every=job.job.val_every, **fork_settings(job, seed, run, start))
    if extra.get("init_from"):
      job.say(f"  {label}: starts from {extra['init_from']} step {extra['init_from_step']} (the unpruned run's "
              f"state after the {extra['init_from_step']} unpruned steps it shares with this run)")
    result = train_main.train_and_evaluate(
        ml_collections.ConfigDict(dict(cfg, train=dict(cfg["train"], **extra))), run_dir,
        model_fn=model_fn, eval_fn=validation_lib.val_eval_fn(job, run) if job.job.val_every else None)
    seconds = time.time() - t0
    if result.preempted:
      raise KeyboardInterrupt(f"{label}: stopped by SIGTERM (checkpoint saved; re-run to resume)")
    status = "resumed" if start else "trained"
  history = read_history(run_dir)
  losses = [h for h in history if "ce" in h]
  val = [h for h in history if validation_lib.VAL_ACC in h]
  if val:
    job.say(f"  {label}: validation accuracy " + " ".join(f"{int(h['step'])}:{h[validation_lib.VAL_ACC] * 100:.1f}"
                                                          for h in val)
            + f" % ({np.median([h['eval/val_seconds'] for h in val]):.1f} s per evaluation)")
  started = read_fork(run_dir)
  return {"workdir": run_dir, "status": status, "steps": steps, "seconds": round(seconds, 1),
          **({"started_from": started} if started else {}),
          "final_ce": losses[-1]["ce"] if losses else None,
          "final_val_accuracy": val[-1][validation_lib.VAL_ACC] if val else None,
          "loop_step_time_s": float(np.median([h["step_time"] for h in losses[1:]])) if len(losses) > 1 else None}


# ---------------------------------------------------------------------------------------------
# 3. evaluation
# ---------------------------------------------------------------------------------------------
def eval_config_for(job: Job, run: str) -> EvalConfig:
  own: tuple = ()
  if run == "unpruned":
    methods, ratios = ("none", "random", "heuristic"), job.job.baseline_ratios or (job.ratio,)
  elif run in BASELINE_RUNS:
    methods, ratios = (run,), (job.ratio,)     # its own method on its own weights
  else:
    methods = tuple(dict.fromkeys(("none", job.model.stts.method, "random", "heuristic")))
    ratios = tuple(sorted(set(job.job.eval_ratios) | {job.ratio}))
    sweep = job.job.sweep_baselines
    if not (job.job.trained_baselines if sweep is None else sweep):
      own = tuple((m, (job.ratio,)) for m in methods if m not in ("none", job.model.stts.method))
  return dataclasses.replace(job.eval, methods=methods, ratios=tuple(ratios), method_ratios=own,
                             max_examples=job.job.eval_examples
                             if job.job.eval_examples is not None else job.eval.max_examples).validate()


def _has_records(results: dict[str, Any]) -> bool:
  """Whether every evaluated cell keeps its per-question outcomes (the paired bootstrap needs them;
  a results.json without them is recomputed rather than reused)."""
  return all(c.get("note") or (c.get("records") and all(c["records"].values())) for c in results["cells"])


def load_model(job: Job, seed: int, run: str):
  run_dir = job.run_dir(seed, run)
  model, info = eval_ckpt.load_model(run_dir, model_config_of(run_config(job, seed, run)), mesh=job.mesh,
                                     rules=job.rules)
  return model, info


def evaluate(job: Job, seed: int, run: str, progress: bool = True) -> dict[str, Any]:
  """Eval cells of one trained model on the test split, cached by checkpoint step and eval config."""
  eval_cfg = eval_config_for(job, run)
  out_dir = os.path.join(job.workdir, f"seed{seed}", f"eval_{run}")
  path = os.path.join(out_dir, "results.json")
  step = latest_step(job.run_dir(seed, run))
  want = json.loads(json.dumps(config_lib.to_dict(eval_cfg)))
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    if old.get("checkpoint_step") == step and old.get("eval_config") == want and _has_records(old):
      job.say(f"  seed {seed} {run}: reused {path}")
      return old
  model, _ = load_model(job, seed, run)
  job.say(f"  seed {seed} {run}-trained model: {len(eval_cfg.cells(job.data.max_frames))} cells on "
          f"split {eval_cfg.split!r}")
  t0 = time.time()
  results = runner.evaluate(model, job.data, eval_cfg, mesh=job.mesh, rules=job.rules, progress=progress,
                            checkpoint=job.run_dir(seed, run))
  results["checkpoint_step"] = step
  results["seconds"] = round(time.time() - t0, 1)
  runner.write_results(results, out_dir)
  with open(path) as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------------
# 4. speed and keep masks
# ---------------------------------------------------------------------------------------------
def _eval_data(job: Job, split: str, max_examples: Optional[int] = None) -> eval_data.EvalData:
  dcfg = dataclasses.replace(job.data, batch_size=job.eval.batch_size or job.data.batch_size)
  return eval_data.EvalData(dcfg, job.model.tokens, split, max_examples=max_examples)


def _test_data(job: Job, max_examples: Optional[int] = None) -> eval_data.EvalData:
  return _eval_data(job, job.eval.split, max_examples)


def variants(job: Job, models: dict[str, Any]) -> dict[str, Any]:
  """Inference variants at the trained ratio: unpruned (unpruned-trained weights) and the pruning
  methods on the STTS-trained weights."""
  out = {"unpruned": gen_lib.model_variant(models["unpruned"], method="none", ratio=0.0)}
  for m in dict.fromkeys((job.model.stts.method, "random", "heuristic")):
    out[m] = gen_lib.model_variant(models["stts"], method=m, ratio=job.ratio)
  return out


def measure_speed(job: Job, models: dict[str, Any], retime: bool = False, progress: bool = True) -> dict[str, Any]:
  seed = job.job.seeds[0]
  path = os.path.join(job.workdir, "speed.json")
  key = {"steps": {r: latest_step(job.run_dir(seed, r)) for r in RUNS}, "seed": seed,
         "job": {k: getattr(job.job, k) for k in ("speed_batches", "speed_warmup", "speed_repeats")},
         "devices": jax.device_count()}
  key = json.loads(json.dumps(key))
  if os.path.isfile(path) and not retime:
    with open(path) as f:
      old = json.load(f)
    if old.get("key") == key:
      job.say(f"  reused {path} (pass --retime to measure again)")
      return old
  j = job.job
  bar = None
  if progress:
    import tqdm
    bar = tqdm.tqdm(total=(j.speed_warmup + j.speed_repeats) * (2 + len(variants(job, models))), desc="timing",
                    dynamic_ncols=True, leave=False)
  runs = {r: speed_lib.TrainRun(model_config_of(run_config(job, seed, r)), job.train,
                                dataclasses.replace(job.data, shuffle_seed=seed), job.run_dir(seed, r))
          for r in RUNS}
  up = bar.update if bar is not None else None
  train_t = speed_lib.time_train_steps(runs, job.mesh, job.rules, num_batches=j.speed_batches,
                                       warmup=j.speed_warmup, repeats=j.speed_repeats, progress=up)
  data = _test_data(job)
  batches = []
  for b in data.batches():
    batches.append(b)
    if len(batches) == j.speed_batches:
      break
  prefill_t = speed_lib.time_prefill(variants(job, models), batches, mesh=job.mesh, rules=job.rules,
                                     warmup=j.speed_warmup, repeats=j.speed_repeats, progress=up)
  if bar is not None:
    bar.close()
  out = {"key": key, "train_step": train_t.to_dict(), "prefill": prefill_t.to_dict(),
         "load_average": list(os.getloadavg())}
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  return out


def keep_mask_examples(job: Job, models: dict[str, Any]) -> list[dict[str, Any]]:
  """The first `job.grid_clips` distinct test clips with each method's keep mask (as evaluated:
  same batch and step as the eval's first batch, so random pruning draws the same windows)."""
  if job.job.grid_clips == 0:
    return []
  data = _test_data(job)
  batch = next(iter(data.batches()))
  predictor = predictor_lib.Predictor(mesh=job.mesh, rules=job.rules)
  preds = {name: predictor(model, batch, generate=False, step=0) for name, model in variants(job, models).items()
           if name != "unpruned"}
  frames = np.load(os.path.join(job.data.path, f"{job.eval.split}_frames.npy"), mmap_mode="r")
  out, seen = [], set()
  for i, row in enumerate(np.asarray(batch["example_id"])):
    if row < 0 or not batch["valid"][i]:
      continue
    ex = data.source.example(int(row))
    clip = int(ex.extra["row"])
    if clip in seen:
      continue
    seen.add(clip)
    out.append({"example_id": ex.id, "question": ex.question, "answer": ex.answer, "clip_row": clip,
                "frames": np.asarray(frames[clip]), "timestamps": np.asarray(batch["timestamps"][i]).tolist(),
                "event": (list(ex.extra["event_frames"]), int(ex.extra["event_window"])),
                "keep": {m: np.asarray(p["keep_mask"][i]) for m, p in preds.items()},
                "scores": np.asarray(preds[job.model.stts.method]["scores"][i])})
    if len(out) == job.job.grid_clips:
      break
  return out


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------
def enable_compilation_cache(directory: str) -> None:
  """Persistent XLA cache: the timing stage and re-runs reuse the training/eval compilations."""
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def copy_results(report: dict[str, Any], results_dir: str, *, wall_s: float) -> dict[str, str]:
  """Copies what the report was built from into `results_dir` (meant to be committed, e.g. under
  docs/results/): report.json, table.md, speed.json and val_curves.json (if present), plots/*.png,
  and a provenance.json (the report's command, commit, machine and date, with the job's wall seconds
  and workdir)."""
  workdir = report["job"]["workdir"]
  files = {os.path.basename(p): p for p in [report["files"]["report"], report["files"]["table"]]
           + [os.path.join(workdir, x) for x in ("speed.json", "val_curves.json")] if os.path.isfile(p)}
  files.update({f"plots/{os.path.basename(p)}": p for p in report["files"].values() if p.endswith(".png")})
  prov = {k: report[k] for k in ("command", "commit", "machine", "date") if k in report}
  return provenance_lib.copy_with_provenance(files, results_dir, prov, wall_seconds=round(wall_s, 1),
                                             workdir=workdir)


def run(config: Any, workdir: str, *, seeds=None, steps=None, retime: bool = False,
        trained_baselines: Optional[bool] = None, progress: bool = True, compilation_cache: bool = True,
        results_dir: Optional[str] = None, command: Optional[str] = None,
        say: Callable[[str], None] = _say) -> dict[str, Any]:
  """Runs the five stages (module docstring) and returns the report (also written to workdir).
  seeds / steps / trained_baselines: None keeps the config's value. results_dir: also copy the
  result files there with a provenance.json (`copy_results`); command: the command line recorded
  (default: this process's)."""
  t_start = time.time()
  prov = provenance_lib.record(command)
  job = make_job(config, workdir, seeds=seeds, steps=steps, trained_baselines=trained_baselines, say=say)
  os.makedirs(job.workdir, exist_ok=True)
  if compilation_cache:
    enable_compilation_cache(os.path.join(job.workdir, "jax_cache"))
  seeds = job.job.seeds
  env = {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
         "cpus": os.cpu_count(), "mesh": dict(job.mesh.shape), "load_average_start": list(os.getloadavg())}
  say(f"STTS main job -> {job.workdir}\n  {env['devices']} {env['backend']} device(s), mesh {env['mesh']}, "
      f"seeds {list(seeds)}, {job.train.num_steps} steps per run, pruning ratio {job.ratio:g}")
  wall: dict[str, float] = {}

  def stage(i: int, name: str, text: str):
    say(f"[{i}/{STAGES}] {text}")
    return name, time.time()

  name, t0 = stage(1, "dataset", "dataset")
  dataset = ensure_dataset(job, progress)
  wall[name] = time.time() - t0

  trained = ", ".join(["unpruned", job.model.stts.method.upper()] + list(job.runs[len(RUNS):]))
  name, t0 = stage(2, "train", f"train: {trained} (ratio {job.ratio:g}) per seed")
  vision = pretrain_vision(job, progress)
  runs = {f"seed{s}/{r}": train(job, s, r, vision) for s in seeds for r in job.runs}
  wall[name] = time.time() - t0

  name, t0 = stage(3, "eval", f"eval on the {job.eval.split} split")
  evals = {f"seed{s}/{r}": evaluate(job, s, r, progress) for s in seeds for r in job.runs}
  wall[name] = time.time() - t0

  name, t0 = stage(4, "speed", f"timing (seed {seeds[0]} models, interleaved in this process)")
  models = {r: load_model(job, seeds[0], r)[0] for r in RUNS}
  speed = measure_speed(job, models, retime=retime, progress=progress)
  grid = keep_mask_examples(job, models)
  wall[name] = time.time() - t0

  say(f"[5/{STAGES}] report")
  wall["total"] = time.time() - t_start
  env["load_average_end"] = list(os.getloadavg())
  histories = {k: read_history(v["workdir"]) for k, v in runs.items()}
  rep = report_lib.build_report(job_info={"workdir": job.workdir, "config": job.config.to_dict(),
                                          "ratio": job.ratio, "method": job.model.stts.method,
                                          "seeds": list(seeds), "steps": job.train.num_steps,
                                          "train_batch": job.data.batch_size, "job": config_lib.to_dict(job.job),
                                          "vision_tower": None if vision is None else
                                          {k: v for k, v in vision[1].items() if k != "settings"}},
                                env=env, dataset=dataset, runs=runs, evals=evals, speed=speed, wall=wall,
                                histories=histories, provenance=prov)
  files = report_lib.write_all(rep, histories, grid, job.workdir)
  if results_dir:
    copied = copy_results(rep, results_dir, wall_s=time.time() - t_start)
    files = {**files, "results dir": os.path.abspath(results_dir)}
    say(f"  copied {len(copied)} files to {results_dir} (with provenance.json)")
  say(report_lib.console_text(rep, files))
  return rep


def train_only(config: Any, workdir: str, runs: Sequence[str], *, seeds=None, steps=None,
               progress: bool = True, compilation_cache: bool = True, results_dir: Optional[str] = None,
               command: Optional[str] = None, say: Callable[[str], None] = _say) -> dict[str, Any]:
  """Stages 1 and 2 for `runs` alone (e.g. ("stts",): the STTS model for `scripts/evaluate.py`'s sweeps,
  without the unpruned run it is compared with in the report). The runs are the ones `run` trains in
  the same workdir (same run configs; a pruned run whose unpruned run kept no step-k checkpoint trains
  its k unpruned steps itself, the state it would start from). Writes `train_only.json` (per run:
  status, steps, seconds, final CE, validation curve; command, commit, machine) and, with `results_dir`,
  copies it there with a provenance.json. Returns that dict."""
  t_start = time.time()
  prov = provenance_lib.record(command)
  job = make_job(config, workdir, seeds=seeds, steps=steps, say=say)
  bad = [r for r in runs if r not in job.runs]
  if not runs or bad:
    raise ValueError(f"main job: train_only runs must be among {job.runs}, got {list(runs)}")
  os.makedirs(job.workdir, exist_ok=True)
  if compilation_cache:
    enable_compilation_cache(os.path.join(job.workdir, "jax_cache"))
  say(f"STTS main job, training only {', '.join(runs)} -> {job.workdir}: seeds {list(job.job.seeds)}, "
      f"{job.train.num_steps} steps per run")
  dataset = ensure_dataset(job, progress)
  vision = pretrain_vision(job, progress)
  out = {"runs": {}}
  for s in job.job.seeds:
    for r in runs:
      summary = train(job, s, r, vision)
      out["runs"][f"seed{s}/{r}"] = dict(summary,
                                         val_accuracy=validation_lib.val_curve(read_history(summary["workdir"])))
  out.update(prov, dataset={k: v for k, v in dataset.items() if k in ("path", "spec")},
             val_examples=job.job.val_examples, wall_seconds=round(time.time() - t_start, 1))
  path = os.path.join(job.workdir, "train_only.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  if results_dir:
    provenance_lib.copy_with_provenance({"train_only.json": path}, results_dir,
                                        {k: out[k] for k in ("command", "commit", "machine", "date")},
                                        wall_seconds=out["wall_seconds"], workdir=job.workdir)
    say(f"  copied train_only.json to {results_dir} (with provenance.json)")
  return out


def exit_status(report: dict[str, Any], strict: Optional[bool] = None, say: Callable[[str], None] = _say) -> int:
  """The job's exit status: 1 when a check failed (`report_lib.failed_checks`) and the job is strict,
  else 0. strict: None -> the report's `job.strict`. Says which checks failed either way."""
  if strict is None:
    strict = bool(report["job"]["job"].get("strict", True))
  failed = report_lib.failed_checks(report)
  if not failed:
    say("All checks passed.")
    return 0
  say(f"{len(failed)} check(s) FAILED: " + "; ".join(c["name"] for c in failed)
      + ("" if strict else " (not strict: exit status 0)"))
  return 1 if strict else 0


__all__ = ["BASELINE_RUNS", "Job", "RUNS", "copy_results", "ensure_dataset", "eval_config_for", "evaluate",
           "exit_status", "keep_mask_examples", "latest_step", "make_job", "measure_speed", "read_history", "run",
           "run_config", "train", "train_only"]

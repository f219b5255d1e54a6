"""`JobConfig`: the `job` section of the main job's config (registered with stts_jax.config on import).

Example (configs/demo.py):
  config.job = dict(seeds=(0,), eval_ratios=(0.25, 0.5, 0.75), speed_repeats=8)
The other sections are the usual ones: `model` (the STTS variant; the job derives the unpruned one),
`data`, `train`, `mesh` and `eval` (split, evaluator, batch size; the job sets methods and ratios).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

from stts_jax import config as config_lib


@dataclasses.dataclass(frozen=True)
class JobConfig:
  """What `stts_jax.experiments.main_job.run` does besides training.

  seeds: one unpruned + one STTS training per seed; accuracies are reported as mean and spread.
  dataset_clips: (train, val, test) clips of the default dataset; None -> its standard spec.
  dataset_variant: which default dataset the job builds into `data.path` (one of
    `default_dataset.VARIANTS`, `Spec.variant`; a dir holding the other variant is rebuilt, never mixed).
  dataset_workers: render/encode processes for the dataset build (0: two per CPU, as each waits on
    its video encoder and file writes part of the time).
  eval_ratios: pruned fractions of the accuracy-vs-ratio sweep on the STTS-trained model; the
    trained ratio is always included.
  sweep_baselines: random and heuristic pruning of the STTS-trained model at every `eval_ratios`
    too (False: at the trained ratio only, STTS alone sweeps; None: when `trained_baselines` is set,
    i.e. the evidence run sweeps all three and the first command, whose time is budgeted, STTS alone).
  baseline_ratios: ratios of the training-free random / heuristic pruning of the unpruned-trained
    model (None -> the trained ratio only).
  eval_examples: evaluate the first N test examples (None: the whole split).
  speed_batches / speed_warmup / speed_repeats: the side-by-side timing (distinct batches, untimed
    calls per variant, timed rounds; every round times each variant once on the same batch).
  grid_clips: test clips drawn in the keep-mask frame grid.
  min_train_speedup / max_accuracy_gap / min_gain_over_random: the checks printed with the table.
    The accuracy checks hold the lower bound of the paired bootstrap interval (`stats.py`) to the
    bound: STTS - unpruned >= -max_accuracy_gap, STTS - random >= min_gain_over_random (None: that
    interval is reported, not checked).
  min_gain_over_heuristic: also check STTS - heuristic >= this at the lower bound (None: the
    interval is reported, not checked).
  bootstrap_resamples / bootstrap_seed / confidence_level: the paired bootstrap over test
    questions behind those checks (numpy seed; percentile interval at this level).
  strict: `scripts/main_job.py` exits non-zero when a check fails (False: only report).
  trained_baselines: also train one model with random and one with heuristic pruning (same ratio,
    steps and training otherwise), each evaluated with its own method on its own weights; the
    checks then compare STTS with these trained baselines.
  vision_pretrain_steps / vision_pretrain_lr: stage 0, the vision tower pretraining shared by every
    run (`vision_pretrain.py`); 0 steps: the runs start from a random tower.
  vision_pretrain_pruned_ratio: also pretrain the tower in the pruned path (random windows dropped
    at this ratio after `prune_at`); 0: full-context path only (ignored when vision_pretrain_steps is 0).
  vision_pretrain_freeze_blocks: stage 0 leaves the ViT embeddings and this many first blocks at their
    random initialisation (`PretrainConfig.freeze_vit_blocks`).
  vision_pretrain_event_weight: stage 0's loss weight of event windows (0: as decoys;
    `PretrainConfig.event_weight`).
  fork_pruned_runs: with `train.prune_start` k > 0, the pruned runs (STTS and the trained baselines)
    start from the unpruned run's checkpoint at step k (`train.init_from`, `train/fork.py`: the state
    they would reach by training their k unpruned steps themselves) instead of recomputing those
    steps. Used when the unpruned run kept that checkpoint (it does when it trains with this set);
    False: every run trains from its own init.
  val_every: every this many training steps (and at the last step) each run evaluates its own method
    at the trained ratio on the validation split (multiple-choice likelihood, the test eval's
    evaluator); the points go to the run's metrics.jsonl as `eval/val_accuracy` (0: off). Decisions
    (learning rate, steps, aux weight) are made on these curves, never on the test split.
  val_examples: the first N validation questions (None: the whole split).
  chance_margin / rise_window / rise_tolerance: the plateau rule of the report (`validation.plateau`):
    a run has left the chance plateau when its last val accuracy is above chance + chance_margin, and
    has stopped rising when the mean of its last `rise_window` val points is at most rise_tolerance
    above the mean of the `rise_window` points before them (fewer than 2 * rise_window points:
    undecided, i.e. not stopped).
  require_converged: add a check that every run left the chance plateau and stopped rising (False:
    the diagnostic is reported only).
  """
  seeds: tuple[int, ...] = (0,)
  dataset_clips: Optional[tuple[int, int, int]] = None
  dataset_variant: str = "default"
  dataset_workers: int = 0
  eval_ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
  sweep_baselines: Optional[bool] = None
  baseline_ratios: Optional[tuple[float, ...]] = None
  eval_examples: Optional[int] = None
  speed_batches: int = 4
  speed_warmup: int = 1
  speed_repeats: int = 8
  grid_clips: int = 2
  min_train_speedup: float = 1.3
  max_accuracy_gap: Optional[float] = 0.03
  min_gain_over_random: Optional[float] = 0.05
  min_gain_over_heuristic: Optional[float] = None
  bootstrap_resamples: int = 10000
  bootstrap_seed: int = 0
  confidence_level: float = 0.95
  strict: bool = True
  trained_baselines: bool = False
  vision_pretrain_steps: int = 0
  vision_pretrain_lr: float = 1e-3
  vision_pretrain_pruned_ratio: float = 0.0
  vision_pretrain_freeze_blocks: int = 0
  vision_pretrain_event_weight: float = 0.0
  fork_pruned_runs: bool = True
  val_every: int = 100
  val_examples: Optional[int] = 256
  chance_margin: float = 0.10
  rise_window: int = 2
  rise_tolerance: float = 0.01
  require_converged: bool = False

  def validate(self) -> "JobConfig":
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"job.seeds must be distinct and non-empty, got {self.seeds}")
    if self.dataset_clips is not None and (len(self.dataset_clips) != 3 or min(self.dataset_clips) < 1):
      raise ValueError(f"job.dataset_clips must be 3 positive counts (train, val, test), got {self.dataset_clips}")
    from stts_jax.data import default_dataset
    if self.dataset_variant not in default_dataset.VARIANTS:
      raise ValueError(f"job.dataset_variant must be one of {default_dataset.VARIANTS}, got {self.dataset_variant!r}")
    for r in self.eval_ratios + (self.baseline_ratios or ()):
      if not 0.0 < r < 1.0:
        raise ValueError(f"job: eval ratios must be in (0, 1), got {r}")
    if self.eval_examples is not None and self.eval_examples < 1:
      raise ValueError("job.eval_examples must be >= 1 or None")
    if min(self.speed_batches, self.speed_repeats) < 1 or self.speed_warmup < 0:
      raise ValueError("job: speed_batches and speed_repeats must be >= 1, speed_warmup >= 0")
    if self.vision_pretrain_steps < 0 or self.vision_pretrain_lr <= 0:
      raise ValueError("job: vision_pretrain_steps must be >= 0 and vision_pretrain_lr > 0")
    if self.vision_pretrain_freeze_blocks < 0:
      raise ValueError("job: vision_pretrain_freeze_blocks must be >= 0")
    if self.vision_pretrain_event_weight < 0:
      raise ValueError("job: vision_pretrain_event_weight must be >= 0")
    if not 0.0 <= self.vision_pretrain_pruned_ratio < 1.0:
      raise ValueError(f"job: vision_pretrain_pruned_ratio must be in [0, 1), got {self.vision_pretrain_pruned_ratio}")
    if self.bootstrap_resamples < 100:
      raise ValueError(f"job.bootstrap_resamples must be >= 100, got {self.bootstrap_resamples}")
    if not 0.0 < self.confidence_level < 1.0:
      raise ValueError(f"job.confidence_level must be in (0, 1), got {self.confidence_level}")
    if self.val_every < 0 or (self.val_examples is not None and self.val_examples < 1):
      raise ValueError(f"job: val_every must be >= 0 and val_examples >= 1 or None, got {self.val_every}, "
                       f"{self.val_examples}")
    if self.rise_window < 1 or self.rise_tolerance < 0 or not 0.0 <= self.chance_margin < 1.0:
      raise ValueError("job: rise_window must be >= 1, rise_tolerance >= 0, chance_margin in [0, 1)")
    if self.require_converged and not self.val_every:
      raise ValueError("job.require_converged needs validation curves: set job.val_every > 0")
    if self.grid_clips < 0 or self.dataset_workers < 0:
      raise ValueError("job: grid_clips and dataset_workers must be >= 0")
    return self


def job_settings(job: Mapping[str, Any]) -> dict[str, Any]:
  """A job section (dict, e.g. from report.json) with JobConfig's defaults for the keys it lacks."""
  return {**dataclasses.asdict(JobConfig()), **job}


def build_job_config(cfg: Any) -> JobConfig:
  return config_lib.from_dict(JobConfig, cfg, "job").validate()


config_lib.register_section("job", build_job_config)

__all__ = ["JobConfig", "build_job_config", "job_settings"]

"""The `train` section of the top-level config (TrainConfig with nested OptimConfig), registered
with `stts_jax.config.register_section` on import. The `mesh` section (MeshConfig) is shared
infrastructure: `stts_jax/parallel/config.py` (re-exported here).

Example (configs/*.py):
  config.train = dict(num_steps=900, grad_accum=1, aux_weight=0.5,
                      optim=dict(learning_rate=3e-4, scorer_learning_rate=1e-3, warmup_steps=50))
  config.mesh = dict(data=1, fsdp=-1, tensor=1)
"""

import dataclasses
import re
from typing import Optional

from stts_jax import config as config_lib
from stts_jax.models import aux_loss
from stts_jax.parallel.config import MeshConfig, build_mesh_config  # noqa: F401  (re-export)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup + cosine decay and global-norm clipping.

  Parameter paths are '/'-joined NNX paths (e.g. 'vit/blocks/attn/q_proj/kernel').
  freeze: regexes (re.search) over paths; matching params get no gradient and no optimizer state.
  freeze_vit_blocks: n > 0 holds the ViT's patch and positional embeddings and its first n blocks at
    their initial weights (their gradients leave the clipping norm and their updates are zeroed; the
    stacked blocks' rows 0..n-1, which no path regex can select). With n = prune_at + 1 the features
    that every scorer, the heuristic and the aux target read stay those of the starting tower.
  scorer_pattern / scorer_learning_rate: params matching the pattern use their own peak learning
    rate (None = the main one) under the same schedule shape.
  vision_pattern / vision_learning_rate: the same for the vision tower (ViT + adapter; the scorer
    pattern is matched first), e.g. a low rate for a pretrained tower under a fresh LLM.
  Weight decay applies to params of rank >= 2 only (not norms or biases).
  """
  learning_rate: float = 1e-5
  scorer_learning_rate: Optional[float] = None
  scorer_pattern: str = r"(^|/)scorer(/|$)"
  vision_learning_rate: Optional[float] = None
  vision_pattern: str = r"^(vit|adapter)/"
  freeze: tuple[str, ...] = ()
  freeze_vit_blocks: int = 0
  warmup_steps: int = 0
  decay_steps: Optional[int] = None      # cosine length after warmup; None -> train.num_steps - warmup
  min_lr_ratio: float = 0.0              # final lr = peak * min_lr_ratio
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0                 # 0 disables clipping

  def validate(self):
    if min(self.learning_rate, self.scorer_learning_rate or 0.0, self.vision_learning_rate or 0.0) < 0:
      raise ValueError("optim: learning rates must be >= 0")
    if self.warmup_steps < 0 or (self.decay_steps is not None and self.decay_steps < 1):
      raise ValueError("optim: warmup_steps must be >= 0 and decay_steps >= 1")
    if self.clip_norm < 0:
      raise ValueError("optim.clip_norm must be >= 0")
    if self.freeze_vit_blocks < 0:
      raise ValueError(f"optim.freeze_vit_blocks must be >= 0, got {self.freeze_vit_blocks}")
    for pattern in (self.scorer_pattern, self.vision_pattern, *self.freeze):
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"optim: bad regex {pattern!r}: {e}") from e
    return self


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop. One step = one optimizer update on one global batch.

  grad_accum: the global batch is split into this many microbatches inside the step (scan);
    the loss is normalised by the answer-token count of the whole batch, so any grad_accum gives
    the same update as grad_accum=1 (up to float rounding).
  skip_nonfinite: a step whose loss or gradient norm is not finite leaves params and optimizer
    state unchanged and increments the `skipped` counter (in the compiled step).
  scorer_warmup_steps / scorer_warmup_lr: before step 1 of a fresh run, fit the STTS scorer alone
    to the temporal aux target on this many training batches (Adam at this rate, ViT frozen; the
    data iterator is rewound afterwards). See `stts_jax/train/scorer_warmup.py`. 0: off.
  aux_decay_steps: 0 (default): the aux weight is `aux_weight` every step. n > 0: it falls linearly from
    `aux_weight` at step 0 to 0 at step n and stays 0, so the aux loss holds the scorer near the
    heuristic while the model first learns and leaves it to the task loss afterwards.
  aux_gradient: where the aux loss's gradient goes. "all" (default, the authors'): into the scorer and,
    through its target (the heuristic, 1 - cos of block-prune_at window features) and the scorer's
    input, into the ViT blocks 0..prune_at. "scorer": into the scorer's parameters only, so the aux
    loss holds the scorer near the heuristic without reshaping the features it reads (the task loss
    still trains everything). Passed to the forward as `aux_gradient=` when not "all".
  random_selection: probability, drawn per training video and step, that the video's keep mask comes
    from random scores instead of its own (`video_forward.explore_selection`): exploration for a scorer
    held near a heuristic that drops the event. The soft bias and the aux loss still use the scorer's
    scores; evaluation never explores. 0 (default): off. Passed to the forward when > 0.
  selection_gradient: > 0: the task loss also reaches the score of every window the LLM reads, through a
    gate of value 1 on its pooled feature (`video_forward.selection_gate`), at this weight: a signal about
    which kept windows the answer uses. 0 (default): off (the authors': the scorer learns from the task
    loss only through the soft bias). Passed to the forward when > 0.
  policy_gradient: > 0: each training video's keep mask is a sample from the scorer's own ranking
    (`models/selection_policy.py`, at `policy_temperature`), and a REINFORCE term at this weight,
    mean over videos of (answer CE of the video - the batch's mean) x log p(its drop order), makes the
    samples that answered better more likely: a signal about which windows the answer needs, also for
    windows the scorer would drop. Learned scorer only, one video per row, without `random_selection`.
    0 (default): off (the authors' top-k keep mask). Evaluation never samples.
  policy_temperature: the sampler's temperature: logits logit(s) / temperature for score s.
  loss: "answer" (default) runs the LM head only at the answer positions (`stts_jax/train/loss.py`),
    never [B, S, V] logits; "full" computes the logits of every position (the plain forward; for
    before/after measurements and parity). Both give the same loss and gradients.
  max_answer_tokens: loss "answer": answer positions per example gathered for the LM head (static;
    the logits are [B, K, V] float32). A micro-batch with a longer answer takes the exact chunked
    fallback (metric `ce_fallback`), so this only trades memory against speed, never correctness.
  accum_dtype: dtype of the gradient accumulator carried across microbatches (grad_accum > 1):
    "float32" (default; exact sum of the float32 microbatch gradients) or "bfloat16" (half the
    accumulator memory; each microbatch gradient is rounded to bfloat16 before it is added, and
    the sum is cast back to the parameter dtype for clipping and the optimizer).
  stts_ratios: mixed-ratio training (for `stts.budget = "adaptive"` at inference, which runs the
    model at several drop ratios): step s runs at drop ratio stts_ratios[s % n] (by step, so a
    resumed run continues the cycle), one compiled step per ratio; a ratio other than the model's
    `stts.ratio` runs with `stts.num_rows` None (the proven row bound: exact, the packed ViT saves
    less). () (default): every step at the model's ratio.
  prune_start: steps before it run the pruning model unpruned (drop ratio 0: every token, no scorer in
    the path; one more compiled step), then at its ratio (or `stts_ratios`). A stand-in for what STTS
    starts from, a VLM that already answers from all of its tokens: a model whose language model starts
    from scratch learns the task while pruned only if its selection keeps what the task needs, and
    a selection learns what the task needs only from a model that answers. 0 (default): pruned from the
    first step.
  keep_checkpoint_steps: steps whose checkpoints are also written to `workdir/kept_checkpoints` and
    never deleted by `max_to_keep` (what another run starts from with `init_from`).
  init_from / init_from_step: a pruning run with `prune_start` > 0 starts from the checkpoint of step
    `init_from_step` (<= `prune_start`) in the directory `init_from` (another run's `kept_checkpoints`),
    the unpruned run of the same config, instead of recomputing its unpruned steps (`train/fork.py`:
    the state the full run holds at that step). Used only when `workdir` has no checkpoint yet.
    "" (default): from the run's own init.
  stts_ratios_start: the first step of the mixed ratios; steps before it run at the model's
    `stts.ratio` (a model that learns at the fixed ratio first, then at every bucket). 0 (default):
    mixed from the first step.
  """
  num_steps: int = 1000
  grad_accum: int = 1
  accum_dtype: str = "float32"
  aux_weight: float = 0.5
  aux_decay_steps: int = 0
  aux_gradient: str = "all"
  random_selection: float = 0.0
  selection_gradient: float = 0.0
  policy_gradient: float = 0.0
  policy_temperature: float = 1.0
  scorer_warmup_steps: int = 0
  scorer_warmup_lr: float = 3e-3
  seed: int = 0
  loss: str = "answer"
  max_answer_tokens: int = 256
  skip_nonfinite: bool = True
  log_every: int = 10
  eval_every: int = 0                    # 0: no eval hook calls during training
  checkpoint_every: int = 500            # 0: only the final (and SIGTERM) checkpoints
  max_to_keep: int = 3
  async_checkpoint: bool = True
  tensorboard: bool = True
  progress_bar: bool = True
  barrier_timeout_s: float = 3600.0      # multi-process: how long processes wait for each other
                                         # to finish compiling the step before the first one
  stts_ratios: tuple[float, ...] = ()
  stts_ratios_start: int = 0
  prune_start: int = 0
  keep_checkpoint_steps: tuple[int, ...] = ()
  init_from: str = ""
  init_from_step: int = 0
  log_example_ids: bool = False          # each process appends its batches' example ids to
                                         # workdir/example_ids/process_{i}-of-{n}.jsonl
  optim: OptimConfig = OptimConfig()

  def validate(self):
    if self.num_steps < 1 or self.grad_accum < 1:
      raise ValueError("train: num_steps and grad_accum must be >= 1")
    if self.scorer_warmup_steps < 0 or not self.scorer_warmup_lr > 0:
      raise ValueError(f"train: scorer_warmup_steps must be >= 0 and scorer_warmup_lr > 0, got "
                       f"{self.scorer_warmup_steps}, {self.scorer_warmup_lr}")
    if self.log_every < 1 or self.eval_every < 0 or self.checkpoint_every < 0:
      raise ValueError("train: log_every >= 1, eval_every >= 0, checkpoint_every >= 0")
    if self.barrier_timeout_s <= 0:
      raise ValueError("train.barrier_timeout_s must be > 0")
    if self.aux_weight < 0 or self.aux_decay_steps < 0:
      raise ValueError(f"train: aux_weight and aux_decay_steps must be >= 0, got {self.aux_weight}, "
                       f"{self.aux_decay_steps}")
    if self.selection_gradient < 0:
      raise ValueError(f"train.selection_gradient must be >= 0, got {self.selection_gradient}")
    if self.policy_gradient < 0 or not self.policy_temperature > 0:
      raise ValueError(f"train: policy_gradient must be >= 0 and policy_temperature > 0, got "
                       f"{self.policy_gradient}, {self.policy_temperature}")
    if self.policy_gradient > 0 and self.random_selection > 0:
      raise ValueError("train: policy_gradient samples its own keep masks; set random_selection to 0")
    if self.policy_gradient > 0 and self.loss != "answer":
      raise ValueError("train.policy_gradient needs train.loss='answer' (its reward is each video's answer CE)")
    if not 0.0 <= self.random_selection <= 1.0:
      raise ValueError(f"train.random_selection must be in [0, 1], got {self.random_selection}")
    if self.aux_gradient not in aux_loss.GRADIENT_MODES:
      raise ValueError(f"train.aux_gradient must be one of {aux_loss.GRADIENT_MODES}, got {self.aux_gradient!r}")
    if self.loss not in ("answer", "full"):
      raise ValueError(f"train.loss must be 'answer' or 'full', got {self.loss!r}")
    if self.accum_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"train.accum_dtype must be 'float32' or 'bfloat16', got {self.accum_dtype!r}")
    if self.max_answer_tokens < 1:
      raise ValueError(f"train.max_answer_tokens must be >= 1, got {self.max_answer_tokens}")
    if self.max_to_keep < 1:
      raise ValueError("train.max_to_keep must be >= 1")
    if any(not 0.0 < float(r) < 1.0 for r in self.stts_ratios):
      raise ValueError(f"train.stts_ratios: every drop ratio must be in (0, 1), got {tuple(self.stts_ratios)}")
    if self.prune_start < 0:
      raise ValueError(f"train.prune_start must be >= 0, got {self.prune_start}")
    if any(int(s) < 1 for s in self.keep_checkpoint_steps):
      raise ValueError(f"train.keep_checkpoint_steps must be >= 1, got {tuple(self.keep_checkpoint_steps)}")
    if self.init_from and not 1 <= self.init_from_step <= self.prune_start:
      raise ValueError(f"train.init_from_step={self.init_from_step}: a run starts from another run's checkpoint "
                       f"only within its unpruned steps (1 <= init_from_step <= train.prune_start={self.prune_start})")
    if self.stts_ratios_start < 0:
      raise ValueError(f"train.stts_ratios_start must be >= 0, got {self.stts_ratios_start}")
    self.optim.validate()
    return self

  @property
  def decay_steps(self) -> int:
    if self.optim.decay_steps is not None:
      return self.optim.decay_steps
    return max(self.num_steps - self.optim.warmup_steps, 1)


def build_train_config(cfg) -> TrainConfig:
  return config_lib.from_dict(TrainConfig, cfg, "train").validate()


config_lib.register_section("train", build_train_config)

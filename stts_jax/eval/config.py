"""`EvalConfig`: the `eval` section of a top-level config (registered with stts_jax.config).

Example (configs/*.py):
  config.eval = dict(split="test", methods=("none", "random", "heuristic", "stts"),
                     ratios=(0.3, 0.5, 0.7), frames=(8, 16), evaluators=("multiple_choice",))
One run evaluates every (method, ratio, frames) cell on the same examples. `none` is evaluated
once per frame count (its ratio is irrelevant); a ratio of 0 for another method is the same
computation as `none` and is folded into it.
"""

import dataclasses
from typing import Any

from stts_jax import config as config_lib

EVALUATORS = ("multiple_choice", "open_ended")
MC_MODES = ("likelihood", "generate")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What to evaluate and how.

  split: data split (manifest `{data.path}/{split}.jsonl`, TFDS split, ...).
  methods / ratios: pruning variants of the same params (`ModelConfig.stts.method` / `.ratio`).
  method_ratios: ((method, ratios), ...): the ratios of the methods it names, instead of `ratios`
    (e.g. (("random", (0.5,)),): random at 0.5 only while the others sweep `ratios`).
  frames: frame counts T to evaluate (test-time scaling, e.g. (8, 16) with ratio 0.5 at 16 keeps
    the LLM token budget of 8 unpruned frames); () -> `data.max_frames` only. The sequence length
    grows with T by `tokens_per_extra_frame` (None -> W + 2 + 8: pooled tokens, frame markers and
    a timestamp of up to 8 tokens).
  max_fps: frame-rate cap of the sampler for this eval (None keeps `data.max_fps`; set it higher,
    or 0 for "uniform over the whole video", so longer T actually samples more frames).
  evaluators: registered evaluator names (`stts_jax.eval.evaluators.REGISTRY`).
  mc_modes: multiple choice by option-letter likelihood and/or by the generated letter.
  max_new_tokens / temperature / stop: generation (temperature 0 = greedy; stop: extra stop token
    ids besides `<|im_end|>`).
  seed: sampling seed; random pruning is seeded by `model.stts.random_seed` and the batch index.
  batch_size: global eval batch (None -> data.batch_size); it must divide over the mesh's batch axes.
  max_examples: evaluate only the first N examples of the split (None: all).
  warmup: untimed passes over the first batch per cell before timing (compile excluded anyway).
  output_dir: where results.json / results.md go ("" -> workdir/eval).
  """
  split: str = "test"
  methods: tuple[str, ...] = ("none", "random", "heuristic", "stts")
  ratios: tuple[float, ...] = (0.3, 0.5, 0.7)
  method_ratios: tuple[tuple[str, tuple[float, ...]], ...] = ()
  frames: tuple[int, ...] = ()
  tokens_per_extra_frame: int | None = None
  max_fps: float | None = None
  evaluators: tuple[str, ...] = ("multiple_choice",)
  mc_modes: tuple[str, ...] = MC_MODES
  max_new_tokens: int = 8
  temperature: float = 0.0
  stop: tuple[int, ...] = ()
  seed: int = 0
  batch_size: int | None = None
  max_examples: int | None = None
  warmup: int = 1
  output_dir: str = ""

  def validate(self) -> "EvalConfig":
    bad = [m for m in self.methods if m not in config_lib.PRUNING_METHODS]
    if bad or not self.methods:
      raise ValueError(f"eval.methods {list(self.methods)}: each must be one of {config_lib.PRUNING_METHODS}")
    for r in self.ratios + tuple(r for _, rs in self.method_ratios for r in rs):
      if not 0.0 <= r < 1.0:
        raise ValueError(f"eval.ratios: {r} outside [0, 1)")
    named = [m for m, _ in self.method_ratios]
    if len(set(named)) != len(named) or any(m not in self.methods for m in named):
      raise ValueError(f"eval.method_ratios names {named}: each must be one of eval.methods {list(self.methods)}, "
                       f"at most once")
    if any(f < 1 for f in self.frames):
      raise ValueError(f"eval.frames must be >= 1, got {self.frames}")
    unknown = [e for e in self.evaluators if e not in EVALUATORS]
    if unknown or not self.evaluators:
      raise ValueError(f"eval.evaluators {list(self.evaluators)}: each must be one of {EVALUATORS}")
    if not self.mc_modes or any(m not in MC_MODES for m in self.mc_modes):
      raise ValueError(f"eval.mc_modes {list(self.mc_modes)}: each must be one of {MC_MODES}")
    if self.max_new_tokens < 1:
      raise ValueError("eval.max_new_tokens must be >= 1")
    if self.temperature < 0:
      raise ValueError("eval.temperature must be >= 0")
    if self.batch_size is not None and self.batch_size < 1:
      raise ValueError("eval.batch_size must be >= 1")
    if self.max_examples is not None and self.max_examples < 1:
      raise ValueError("eval.max_examples must be >= 1")
    if self.warmup < 0:
      raise ValueError("eval.warmup must be >= 0")
    if self.max_fps is not None and self.max_fps < 0:
      raise ValueError("eval.max_fps must be >= 0 (0: no cap) or None")
    return self

  def cells(self, default_frames: int) -> list[tuple[str, float, int]]:
    """(method, ratio, frames) to evaluate, in table order, without duplicates."""
    frames = self.frames or (default_frames,)
    own = dict(self.method_ratios)
    out: list[tuple[str, float, int]] = []
    for f in frames:
      for m in self.methods:
        ratios = (0.0,) if m == "none" else own.get(m, self.ratios)
        for r in ratios:
          cell = ("none", 0.0, f) if r == 0.0 else (m, float(r), f)
          if cell not in out:
            out.append(cell)
    return out


def build_eval_config(cfg: Any) -> EvalConfig:
  return config_lib.from_dict(EvalConfig, cfg, "eval").validate()


config_lib.register_section("eval", build_eval_config)

__all__ = ["EvalConfig", "build_eval_config", "EVALUATORS", "MC_MODES"]

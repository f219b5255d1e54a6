"""Library entry point behind `scripts/evaluate.py`: config + checkpoint -> results files.

`evaluate_from_config(config, checkpoint, ...)`: builds the sections (`model`, `data`, `eval`, and
`mesh` if present; eval defaults to a data-parallel mesh over all devices), applies command-line
overrides to the eval section, loads the checkpoint (Orbax run or HF directory), runs
`runner.evaluate` and writes `results.json` / `results.md`.
"""

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any, Optional

import jax
import ml_collections

from stts_jax import config as config_lib
from stts_jax.eval import checkpoints
from stts_jax.eval import runner
from stts_jax.eval.config import EvalConfig

log = logging.getLogger(__name__)


def parse_list(text: Optional[str], kind) -> Optional[tuple]:
  """"a,b,c" -> a tuple of `kind`; None/"" -> None (keep the config's value)."""
  if not text:
    return None
  try:
    return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
  except ValueError as e:
    raise ValueError(f"cannot parse {text!r} as a comma-separated list of {kind.__name__}") from e


def _mesh(cfgs: dict[str, Any]):
  from stts_jax.parallel import mesh as mesh_lib
  from stts_jax.parallel import sharding
  from stts_jax.parallel.config import MeshConfig
  mesh_cfg = cfgs.get("mesh") or MeshConfig(data=-1, fsdp=1, tensor=1)
  return mesh_lib.make_mesh(mesh_cfg), sharding.make_rules(mesh_cfg)


def evaluate_from_config(config: Any, checkpoint: str, *, methods: Optional[Sequence[str]] = None,
                         ratios: Optional[Sequence[float]] = None, frames: Optional[Sequence[int]] = None,
                         split: Optional[str] = None, max_examples: Optional[int] = None,
                         step: Optional[int] = None, out_dir: Optional[str] = None,
                         use_mesh: bool = True, progress: bool = True) -> tuple[dict[str, Any], str, str]:
  """Evaluates `checkpoint` as configured; returns (results, results.json path, results.md path)."""
  if not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(dict(config))
  cfgs = config_lib.build(config)
  if "data" not in cfgs:
    raise ValueError("evaluate: the config needs a `data` section (dataset path, frames, sequence length)")
  eval_cfg: EvalConfig = cfgs.get("eval") or EvalConfig()
  overrides = {k: v for k, v in dict(methods=methods, ratios=ratios, frames=frames, split=split,
                                     max_examples=max_examples).items() if v is not None}
  eval_cfg = dataclasses.replace(eval_cfg, **{k: tuple(v) if isinstance(v, (list, tuple)) else v
                                              for k, v in overrides.items()}).validate()
  model_cfg = cfgs["model"]
  if "stts" in eval_cfg.methods and checkpoints.is_hf_dir(checkpoint):
    model_cfg = checkpoints.with_scorer_config(model_cfg)   # build the scorer slot; reported if fresh
  mesh, rules = _mesh(cfgs) if use_mesh else (None, ())
  log.info("jax %s, %d processes, %d devices, mesh %s", jax.__version__, jax.process_count(), jax.device_count(),
           dict(mesh.shape) if mesh is not None else None)
  model, info = checkpoints.load_model(checkpoint, model_cfg, step=step, mesh=mesh, rules=rules)
  log.info("loaded %s checkpoint %s%s", info["format"], checkpoint,
           f" (step {info['step']})" if "step" in info else "")
  if info["fresh_scorer"]:
    log.warning("checkpoint has no scorer weights: 'stts' cells are reported as not run")
  results = runner.evaluate(model, cfgs["data"], eval_cfg, mesh=mesh, rules=rules, progress=progress,
                            fresh_scorer=bool(info["fresh_scorer"]), checkpoint=os.path.abspath(checkpoint))
  results["checkpoint_info"] = info
  if not (out_dir or eval_cfg.output_dir):   # Orbax: <workdir>/eval next to checkpoints/; HF: <dir>/eval
    base = os.path.dirname(info["directory"]) if info["format"] == "orbax" else info["directory"]
    out_dir = os.path.join(base, "eval")
  out_dir = out_dir or eval_cfg.output_dir
  json_path, md_path = runner.write_results(results, out_dir)
  return results, json_path, md_path


def adaptive_from_config(config: Any, checkpoint: str, *, method: str, thresholds: Sequence[float],
                         buckets: Optional[Sequence[float]] = None, ratios: Optional[Sequence[float]] = None,
                         split: Optional[str] = None, max_examples: Optional[int] = None,
                         step: Optional[int] = None, out_dir: Optional[str] = None,
                         extra: Optional[dict[str, Any]] = None, rule: str = "threshold",
                         group_batches: bool = True, reuse_scored: bool = True,
                         use_mesh: bool = True) -> tuple[dict[str, Any], list[str]]:
  """`--budget adaptive`: fixed ratios vs adaptive thresholds (or score-mass fractions, `rule`)
  (`adaptive_eval.sweep`), data-parallel over this process's devices (as `evaluate_from_config`;
  one process only); writes adaptive.{json,md,png} to `out_dir` (default <workdir>/eval_adaptive)."""
  from stts_jax.eval import adaptive_budget as ab
  from stts_jax.eval import adaptive_eval
  if not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(dict(config))
  cfgs = config_lib.build(config)
  eval_cfg: EvalConfig = cfgs.get("eval") or EvalConfig()
  overrides = {k: v for k, v in dict(ratios=tuple(ratios) if ratios else None, split=split,
                                     max_examples=max_examples).items() if v is not None}
  eval_cfg = dataclasses.replace(eval_cfg, **overrides).validate()
  model_cfg = cfgs["model"]
  if method == "stts" and checkpoints.is_hf_dir(checkpoint):
    model_cfg = checkpoints.with_scorer_config(model_cfg)
  mesh, rules = _mesh(cfgs) if use_mesh else (None, ())
  model, info = checkpoints.load_model(checkpoint, model_cfg, step=step, mesh=mesh, rules=rules)
  if method == "stts" and info["fresh_scorer"]:
    raise ValueError("adaptive budget with method 'stts' needs a checkpoint with scorer weights")
  results = adaptive_eval.sweep(model, cfgs["data"], eval_cfg, method=method, thresholds=thresholds,
                                buckets=tuple(buckets) if buckets else ab.DEFAULT_BUCKETS,
                                checkpoint=os.path.abspath(checkpoint), rule=rule, group_batches=group_batches,
                                reuse_scored=reuse_scored, mesh=mesh, rules=rules)
  results["checkpoint_info"] = {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))}
  if not out_dir:
    base = os.path.dirname(info["directory"]) if info["format"] == "orbax" else info["directory"]
    out_dir = os.path.join(base, "eval_adaptive")
  paths = adaptive_eval.write(results, out_dir, extra)
  return results, paths


__all__ = ["adaptive_from_config", "evaluate_from_config", "parse_list"]

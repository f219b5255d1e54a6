"""Library entry points behind `scripts/train.py`: config -> mesh, model, data -> loop / AOT.

  init_distributed(...)                 multi-process setup (before any other JAX call)
  train_and_evaluate(config, workdir)   builds everything from a top-level config and trains
  aot_from_config(config, ...)          compiles the step from abstract shapes and reports sizes
  write_aot_json(report, path, ...)     its machine-readable form (`scripts/train.py --aot_json`)
"""

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax
import ml_collections
from flax import nnx

from stts_jax import config as config_lib
from stts_jax.train import aot
from stts_jax.train import distributed
from stts_jax.train import loop
from stts_jax.parallel import mesh as mesh_lib
from stts_jax.parallel import sharding
from stts_jax.train.config import MeshConfig, TrainConfig

log = logging.getLogger(__name__)


def init_distributed(*, coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                     process_id: Optional[int] = None, cpu_collectives: str = "gloo",
                     heartbeat_timeout_s: int = 100) -> None:
  """`jax.distributed.initialize` for multi-process runs. With all arguments None it relies on the
  cluster environment (TPU pods, SLURM, ...). On CPU, cross-process collectives use `gloo`.
  See `stts_jax.train.distributed` (also for failure handling)."""
  distributed.initialize(coordinator, num_processes, process_id, from_env=True,
                         heartbeat_timeout_s=heartbeat_timeout_s, cpu_collectives=cpu_collectives)


def _sections(config: Any) -> dict[str, Any]:
  if not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(dict(config))
  cfgs = config_lib.build(config)
  cfgs.setdefault("train", TrainConfig())
  cfgs.setdefault("mesh", MeshConfig())
  return cfgs


def model_builder(model_cfg: config_lib.ModelConfig, seed: int) -> Callable[[], nnx.Module]:
  """Zero-argument constructor of the Molmo2 model (called under eval_shape / jit)."""
  from stts_jax.models import vlm
  return lambda: vlm.Molmo2(model_cfg, rngs=nnx.Rngs(seed))


def check_fixed_budget(model_cfg: config_lib.ModelConfig) -> None:
  """Training runs the fixed ratio only; `stts.budget="adaptive"` is an inference/evaluation mode."""
  if model_cfg.stts.budget != "fixed":
    raise ValueError(f"model.stts.budget={model_cfg.stts.budget!r} is for inference and evaluation only; training "
                     "uses the fixed ratio model.stts.ratio (set model.stts.budget='fixed')")


def train_and_evaluate(config: Any, workdir: str, *, data_iter: Any = None,
                       model_fn: Optional[Callable[[], nnx.Module]] = None,
                       forward: Optional[Callable[..., Any]] = None,
                       eval_fn: Optional[Callable[[nnx.Module, int], Mapping[str, float]]] = None,
                       on_step: Optional[Callable[[int], None]] = None) -> loop.TrainResult:
  """Trains per `config` (ConfigDict or dict with sections model, data, train, mesh) in `workdir`,
  resuming from its latest checkpoint. Each process reads its own shard of the training data."""
  cfgs = _sections(config)
  model_cfg, train_cfg, mesh_cfg = cfgs["model"], cfgs["train"], cfgs["mesh"]
  check_fixed_budget(model_cfg)
  if train_cfg.scorer_warmup_steps and model_cfg.stts.method != "stts":
    raise ValueError(f"train.scorer_warmup_steps={train_cfg.scorer_warmup_steps} needs an STTS scorer, but "
                     f"model.stts.method is {model_cfg.stts.method!r}; set it to 0")
  mesh = mesh_lib.make_mesh(mesh_cfg)
  rules = sharding.make_rules(mesh_cfg)
  log.info("jax %s, %d processes, %d devices, mesh %s", jax.__version__, jax.process_count(),
           jax.device_count(), dict(mesh.shape))
  if data_iter is None:
    from stts_jax.data import pipeline
    data_cfg = cfgs["data"]
    data_cfg.check_model(model_cfg)
    from stts_jax.models import example_packing
    data_iter = pipeline.train_iterator(data_cfg, model_cfg.tokens, process_index=jax.process_index(),
                                        process_count=jax.process_count(),
                                        llm_drop_ratio=example_packing.llm_drop_ratio(model_cfg))
  data_cfg = cfgs.get("data")
  if data_cfg is not None and jax.process_index() == 0 and os.path.isfile(data_cfg.tokenizer_path):
    # What `stts_jax.inference.Pipeline` needs to ask the run's checkpoints about new videos.
    from stts_jax import inference
    from stts_jax.data import tokenizer as tokenizer_lib
    inference.save_run_files(workdir, data_cfg, tokenizer_lib.load_tokenizer(data_cfg.tokenizer_path))
  raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  return loop.run(model_fn or model_builder(model_cfg, train_cfg.seed), data_iter, train_cfg, mesh, rules,
                  workdir, config_json=raw, forward=forward, eval_fn=eval_fn, on_step=on_step)


def aot_from_config(config: Any, *, batch_size: Optional[int] = None, num_frames: Optional[int] = None,
                    seq_len: Optional[int] = None, count_flops: bool = True,
                    forward: Optional[Callable[..., Any]] = None) -> aot.AotReport:
  """AOT-compiles the step of `config` on the mesh of its `mesh` section over all devices.
  Batch shape: the `data` section's (global batch_size, max_frames, seq_len) unless given."""
  cfgs = _sections(config)
  model_cfg, train_cfg, mesh_cfg = cfgs["model"], cfgs["train"], cfgs["mesh"]
  check_fixed_budget(model_cfg)
  data_cfg = cfgs.get("data")
  pick = lambda given, name: given if given is not None else getattr(data_cfg, name)
  if data_cfg is None and None in (batch_size, num_frames, seq_len):
    raise ValueError("aot: config has no data section; pass batch_size, num_frames and seq_len")
  if data_cfg is not None and data_cfg.pack_examples:
    # Example-packed rows (data.pack_examples): frames = the row's frame budget, seq_len = its pruned tokens.
    batch = aot.abstract_packed_batch(model_cfg, rows=pick(batch_size, "batch_size"),
                                      max_frames=num_frames or data_cfg.packed_max_frames,
                                      seq_len=seq_len or data_cfg.packed_seq_len,
                                      max_videos=data_cfg.pack_max_videos, max_options=data_cfg.max_options)
  else:
    batch = aot.abstract_batch(model_cfg, batch_size=pick(batch_size, "batch_size"),
                               num_frames=pick(num_frames, "max_frames"), seq_len=pick(seq_len, "seq_len"))
  mesh = mesh_lib.make_mesh(mesh_cfg)
  return aot.compile_train_step(model_cfg, train_cfg, mesh, sharding.make_rules(mesh_cfg), batch,
                                model_fn=lambda c: model_builder(c, train_cfg.seed)(),
                                forward=forward, count_flops=count_flops)


def write_aot_json(report: aot.AotReport, path: str, config: Any, command: Sequence[str]) -> dict[str, Any]:
  """Writes `aot.report_json` of `report` (with the config as a dict) to `path`; returns it."""
  raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  out = aot.report_json(report, config=raw, command=command)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=1, default=str)
  log.info("AOT report written to %s", path)
  return out

"""Slow end-to-end runs of the real model: the tiny STTS Molmo2 learns on the default dataset;
the sharded step of the real model equals the single-device step; AOT on the tiny config."""

import numpy as np
import pytest
from flax import nnx

from tests.train import helpers


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.timeout(2400)
def test_tiny_stts_loss_goes_down_on_default_dataset(tmp_path_factory):
  """A smaller build of the default dataset (800 train clips), 120 steps of batch 16 with the
  tiny STTS model (~1 min unloaded, data parallel over the 8 virtual devices)."""
  from configs import train_tiny
  from stts_jax.data import default_dataset
  from stts_jax.train import main as train_main

  data_dir = str(tmp_path_factory.mktemp("default_dataset"))
  default_dataset.build(data_dir, default_dataset.Spec(num_clips=(800, 40, 40)), workers=2, with_tfds=False)
  cfg = train_tiny.get_config(f"data={data_dir},steps=120,batch=16,lr=1e-3")
  cfg.train.log_every = 10
  cfg.train.progress_bar = False
  cfg.train.tensorboard = False
  result = train_main.train_and_evaluate(cfg, str(tmp_path_factory.mktemp("workdir")))
  ce = np.array([h["ce"] for h in result.history if "ce" in h])
  print("ce every 10 steps:", np.round(ce, 3).tolist())
  print("step time (s):", [round(h["step_time"], 3) for h in result.history[1:]])
  assert len(ce) == 12 and np.isfinite(ce).all()
  assert ce[-3:].mean() < 0.5 * ce[:2].mean()
  assert ce[-3:].mean() < ce[4:6].mean()           # still improving after the first drop
  assert result.compilations == 1
  assert all(h["skipped_total"] == 0 and h["truncated_tokens"] == 0 for h in result.history)
  assert 0.45 < result.history[-1]["kept_ratio"] < 0.6   # ratio 0.5 (frame 0 always kept)


@pytest.mark.slow
@pytest.mark.multidevice
def test_molmo2_sharded_step_equals_single_device_and_compiles_once():
  from stts_jax.models import video_forward, vlm
  from stts_jax.testing import synthetic_batches, tiny

  model_cfg = tiny.tiny_model_config(method="stts")
  model_fn = lambda: vlm.Molmo2(model_cfg, rngs=nnx.Rngs(0))
  it = synthetic_batches.SyntheticBatches(model_cfg, batch_size=4, num_frames=4, seq_len=80, seed=3)
  batches = [next(it) for _ in range(3)]
  # eps 1e-4: some gradients are exactly zero in exact arithmetic (e.g. the pooling k_proj bias,
  # softmax is shift invariant) and float noise there (~1e-9, different on each layout) would be
  # blown up to +-lr by Adam's normalisation with a tiny eps, hiding the comparison.
  cfg = helpers.train_cfg(optim={"warmup_steps": 0, "learning_rate": 1e-3, "eps": 1e-4})
  results = {}
  for name, mesh in (("sharded", helpers.mesh_8()), ("single", helpers.mesh_1())):
    import jax
    _, state, step_fn = helpers.build_step(mesh, cfg, model_fn=model_fn, forward=video_forward.forward_video,
                                           batch=batches[0])
    metrics = []
    with jax.set_mesh(mesh):
      for b in batches:
        state, m = step_fn(state, helpers.put(b, mesh))
        metrics.append(jax.device_get(m))
    assert step_fn._cache_size() == 1, name
    results[name] = (helpers.flat_arrays(state), metrics)
  (p8, m8), (p1, m1) = results["sharded"], results["single"]
  # Different numbers of real frames, hence different kept counts, all through one compilation.
  assert len({int(b["frame_mask"].sum()) for b in batches}) > 1
  for a, b in zip(m8, m1):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-5)
  for k in p1:
    np.testing.assert_allclose(p8[k], p1[k], rtol=1e-5, atol=1e-5, err_msg=k)
  assert any(k.startswith("model/scorer/") for k in p1)


@pytest.mark.slow
def test_script_aot_on_tiny_config(tmp_path):
  """scripts/train.py --aot compiles the tiny STTS step on 8 virtual devices from abstract shapes."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, os.path.join(root, "scripts", "train.py"),
         "--config", os.path.join(root, "configs", "train_tiny.py") + ":runlocal=true",
         "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--aot"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=root)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} (8 devices)" in text
  assert "FLOPs per step:" in text and "n/a" not in text
  assert "per-device memory:" in text

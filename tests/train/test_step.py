"""train_step: sharded == single device, accumulation == one batch, non-finite skip, one compile."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train import helpers, toy_model


FALLBACK_SEED = 9   # synthetic videos of 3 and 6 frames: 2 and 4 rows needed (of 3)


def _run(mesh, cfg, batch_list, initial=None, **kw):
  _, state, step_fn = helpers.build_step(mesh, cfg, batch=batch_list[0], **kw)
  if initial is not None:
    initial.update(helpers.flat_arrays(state))
  metrics = []
  with jax.set_mesh(mesh):
    for b in batch_list:
      state, m = step_fn(state, helpers.put(b, mesh))
      metrics.append(jax.device_get(m))
  return state, metrics, step_fn


@pytest.mark.multidevice
def test_sharded_step_equals_single_device():
  cfg = helpers.train_cfg(optim={"warmup_steps": 0})
  batch_list = [next(helpers.batches())]
  s8, m8, _ = _run(helpers.mesh_8(), cfg, batch_list)
  before = {}
  s1, m1, _ = _run(helpers.mesh_1(), cfg, batch_list, initial=before)
  np.testing.assert_allclose(m8[0]["loss"], m1[0]["loss"], rtol=1e-5, atol=1e-5)
  a, b = helpers.flat_arrays(s8), helpers.flat_arrays(s1)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)
  # The update moved the params (so the comparison above is not vacuous).
  assert np.abs(before["model/up"] - a["model/up"]).max() > 1e-4
  # Params and optimizer moments are laid out as the rules say.
  model, opt = s8["model"], s8["optimizer"]
  P = jax.sharding.PartitionSpec
  assert model["embed"].get_value().sharding.spec == P(("tensor", "fsdp"), None)
  assert model["head"].get_value().sharding.spec == P("fsdp", "tensor")
  assert model["up"].get_value().sharding.spec == P("fsdp", "tensor")
  assert model["norm"].get_value().sharding.spec == P(None)
  mu_up = opt["opt_state"][1]["inner_states"]["main"]["inner_state"][0]["mu"]["up"]
  assert mu_up.get_value().sharding.spec == P("fsdp", "tensor")
  shard_shape = model["up"].get_value().addressable_shards[0].data.shape
  assert shard_shape == (32 // 2, 128 // 2)


def test_grad_accumulation_equals_full_batch():
  batch_list = [next(helpers.batches(batch_size=4))]
  mesh = helpers.mesh_1()
  s1, m1, _ = _run(mesh, helpers.train_cfg(grad_accum=1), batch_list)
  s4, m4, _ = _run(mesh, helpers.train_cfg(grad_accum=2), batch_list)
  np.testing.assert_allclose(m4[0]["loss"], m1[0]["loss"], rtol=1e-6)
  np.testing.assert_allclose(m4[0]["grad_norm"], m1[0]["grad_norm"], rtol=1e-5)
  a, b = helpers.flat_arrays(s1), helpers.flat_arrays(s4)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_bfloat16_grad_accumulation_is_close_to_float32():
  """train.accum_dtype=bfloat16: the same step up to bfloat16 rounding of each microbatch gradient;
  the accumulated gradient goes back to the float32 parameters' dtype."""
  batch_list = [next(helpers.batches(batch_size=4))]
  mesh = helpers.mesh_1()
  s32, m32, _ = _run(mesh, helpers.train_cfg(grad_accum=2), batch_list)
  s16, m16, _ = _run(mesh, helpers.train_cfg(grad_accum=2, accum_dtype="bfloat16"), batch_list)
  np.testing.assert_allclose(m16[0]["loss"], m32[0]["loss"], rtol=1e-6)
  np.testing.assert_allclose(m16[0]["grad_norm"], m32[0]["grad_norm"], rtol=1e-2)
  a, b = helpers.flat_arrays(s32), helpers.flat_arrays(s16)
  for k in a:
    assert a[k].dtype == b[k].dtype, k
  np.testing.assert_allclose(a["model/up"], b["model/up"], rtol=0, atol=2e-2)   # <= 2 lr (Adam steps ~lr)
  with pytest.raises(ValueError, match="accum_dtype"):
    helpers.train_cfg(accum_dtype="float16")


def _nan_forward(model, batch, *, rng=None, deterministic=True, logits=True):
  """toy_forward whose logits (or hidden states) turn NaN when a timestamp is NaN (poisons loss and grads)."""
  out = toy_model.toy_forward(model, batch, rng=rng, deterministic=deterministic, logits=logits)
  poison = jnp.sum(batch["timestamps"]) * 0.0
  if logits:
    return dataclasses.replace(out, logits=out.logits + poison)
  return dataclasses.replace(out, hidden=out.hidden + poison)


@pytest.mark.multidevice
def test_nonfinite_step_is_skipped_and_counted_with_one_compilation():
  it = helpers.batches()
  b0, b1, b2 = next(it), next(it), next(it)
  b1 = dict(b1, timestamps=np.full_like(b1["timestamps"], np.nan))
  mesh = helpers.mesh_8()
  cfg = helpers.train_cfg(optim={"warmup_steps": 0})
  _, state, step_fn = helpers.build_step(mesh, cfg, forward=_nan_forward, batch=b0)
  snapshots, metrics = [], []
  with jax.set_mesh(mesh):
    for b in (b0, b1, b2):
      state, m = step_fn(state, helpers.put(b, mesh))
      snapshots.append(helpers.flat_arrays(state))
      metrics.append(jax.device_get(m))
  assert [int(m["skipped"]) for m in metrics] == [0, 1, 0]
  assert [int(m["skipped_total"]) for m in metrics] == [0, 1, 1]
  assert [int(m["step"]) for m in metrics] == [1, 2, 3]
  assert not np.isfinite(metrics[1]["loss"])
  assert np.isfinite(metrics[2]["loss"])
  for k, v in snapshots[0].items():   # skipped: params, moments and optimizer step unchanged
    if k not in ("step", "skipped"):
      np.testing.assert_array_equal(snapshots[1][k], v, err_msg=k)
  assert int(snapshots[1]["optimizer/step"]) == 1 and int(snapshots[2]["optimizer/step"]) == 2
  assert np.abs(snapshots[2]["model/up"] - snapshots[1]["model/up"]).max() > 0
  assert all(np.isfinite(v).all() for v in snapshots[2].values())
  assert step_fn._cache_size() == 1   # one compilation across three different batches


def test_freeze_and_scorer_learning_rate():
  cfg = helpers.train_cfg(optim={"freeze": ("^patch$",), "scorer_learning_rate": 0.0, "warmup_steps": 0})
  mesh = helpers.mesh_1()
  b = next(helpers.batches())
  _, state, step_fn = helpers.build_step(mesh, cfg, batch=b)
  before = helpers.flat_arrays(state)
  assert not any(k.endswith("/patch") for k in before if k.startswith("optimizer/"))  # no state
  assert any(k.endswith("/mu/scorer") for k in before)
  with jax.set_mesh(mesh):
    state, m = step_fn(state, helpers.put(b, mesh))
  after = helpers.flat_arrays(state)
  np.testing.assert_array_equal(after["model/patch"], before["model/patch"])     # frozen
  np.testing.assert_array_equal(after["model/scorer"], before["model/scorer"])   # lr 0
  assert np.abs(after["model/up"] - before["model/up"]).max() > 1e-4
  assert float(m["lr_scorer"]) == 0.0 and float(m["lr"]) == pytest.approx(1e-2)


@pytest.mark.slow   # several tiny-Molmo2 step compiles
def test_dense_fallback_metric_counts_the_microbatches_that_outgrow_the_packed_rows():
  """A tiny STTS Molmo2 with the fewest packed rows (3 for 6 frames of 9 windows at ratio 0.5) and
  one video per micro-batch: `dense_fallback` counts the videos whose kept windows need more rows,
  as computed independently from their keep masks (one fits, one does not)."""
  from flax import nnx

  from stts_jax.bench import parts
  from stts_jax.models import budget
  from stts_jax.models import video_forward
  from stts_jax.models.vlm import Molmo2
  from stts_jax.testing.tiny import tiny_model_config
  t = 6
  rows = budget.min_rows(t, 9, 0.5)
  model_cfg = tiny_model_config(method="stts", ratio=0.5, num_rows=rows)
  batch = next(helpers.batches(batch_size=2, num_frames=t, seq_len=128, seed=FALLBACK_SEED))
  model = Molmo2(model_cfg, rngs=nnx.Rngs(0))
  keep = video_forward.vit_features_video(model, jnp.asarray(batch["patches"]),
                                          jnp.asarray(batch["frame_mask"])).keep_mask_btw
  needed = np.asarray(jax.jit(parts.rows_needed_fn(model_cfg, t))(keep))
  assert np.sum(needed <= rows) == 1 and np.sum(needed > rows) == 1, (needed, rows)   # one of each
  mesh = helpers.mesh_1()
  _, state, step_fn = helpers.build_step(mesh, helpers.train_cfg(grad_accum=2), batch=batch,
                                         model_fn=lambda: Molmo2(model_cfg, rngs=nnx.Rngs(0)),
                                         forward=video_forward.forward_video)
  with jax.set_mesh(mesh):
    _, m = step_fn(state, helpers.put(batch, mesh))
  assert float(m["dense_fallback"]) == 1.0
  assert np.isfinite(float(m["loss"]))


@pytest.mark.slow   # several tiny-Molmo2 compiles: minutes on 2 CPU cores
def test_aux_gradient_scorer_trains_only_the_scorer_with_the_aux_loss():
  """train.aux_gradient="scorer": the aux loss moves the scorer exactly as the authors' "all" does, and
  nothing else (every other parameter moves as with aux weight 0); "all" moves the early ViT too."""
  from flax import nnx

  from stts_jax.models import video_forward
  from stts_jax.models.vlm import Molmo2
  from stts_jax.testing.tiny import tiny_model_config
  model_cfg = tiny_model_config(method="stts", ratio=0.5)
  batch = next(helpers.batches(batch_size=2, num_frames=4, seq_len=128, seed=1))
  mesh = helpers.mesh_1()

  def one_step(**kw):
    # Adam with eps far above every |gradient| steps by lr * g / eps: the updates are the gradients
    # (scaled), so float noise in gradients that are zero in exact arithmetic stays noise.
    cfg = helpers.train_cfg(optim={"warmup_steps": 0, "clip_norm": 0.0, "learning_rate": 1.0, "eps": 1e4}, **kw)
    _, state, step_fn = helpers.build_step(mesh, cfg, batch=batch, model_fn=lambda: Molmo2(model_cfg, rngs=nnx.Rngs(0)),
                                           forward=video_forward.forward_video)
    before = helpers.flat_arrays(state)
    with jax.set_mesh(mesh):
      state, m = step_fn(state, helpers.put(batch, mesh))
    after = helpers.flat_arrays(state)
    return {k: after[k] - before[k] for k in after if k.startswith("model/")}, jax.device_get(m)

  all_, m_all = one_step(aux_weight=100.0)
  scorer, m_scorer = one_step(aux_weight=100.0, aux_gradient="scorer")
  no_aux, _ = one_step(aux_weight=0.0)
  assert float(m_all["aux_loss"]) > 0
  np.testing.assert_allclose(m_scorer["aux_loss"], m_all["aux_loss"], rtol=1e-6)   # same values
  is_scorer = lambda k: "/scorer/" in k
  assert any(map(is_scorer, all_)) and any(not is_scorer(k) for k in all_)
  scale = max(np.abs(v).max() for v in all_.values())
  for k in all_:
    np.testing.assert_allclose(scorer[k], (all_ if is_scorer(k) else no_aux)[k], rtol=1e-3, atol=1e-5 * scale,
                               err_msg=k)
  vit = [k for k in all_ if k.startswith("model/vit/") and not is_scorer(k)]
  assert max(np.abs(all_[k] - no_aux[k]).max() for k in vit) > 1e-2 * scale   # "all": the aux loss reaches the ViT


def test_aux_gradient_must_be_known():
  with pytest.raises(ValueError, match="train.aux_gradient"):
    helpers.train_cfg(aux_gradient="target")


def test_aux_weight_decays_linearly_to_zero_in_one_compiled_step():
  from stts_jax.train import step as step_lib
  cfg = helpers.train_cfg(aux_weight=2.0, aux_decay_steps=2, optim={"warmup_steps": 0})
  assert [float(step_lib.aux_weight_at(cfg, jnp.asarray(s))) for s in (0, 1, 2, 5)] == [2.0, 1.0, 0.0, 0.0]
  assert float(step_lib.aux_weight_at(dataclasses.replace(cfg, aux_decay_steps=0), jnp.asarray(7))) == 2.0
  _, metrics, step_fn = _run(helpers.mesh_1(), cfg, [next(helpers.batches(seed=s)) for s in range(3)])
  assert [float(m["aux_weight"]) for m in metrics] == [2.0, 1.0, 0.0]
  for m in metrics:   # the loss is CE + this step's weight x the aux loss
    assert float(m["aux_loss"]) > 0
    np.testing.assert_allclose(m["loss"], m["ce"] + m["aux_weight"] * m["aux_loss"], rtol=1e-5)
  assert step_fn._cache_size() == 1
  with pytest.raises(ValueError, match="aux_decay_steps"):
    helpers.train_cfg(aux_decay_steps=-1)


def test_random_selection_must_be_a_probability():
  with pytest.raises(ValueError, match="train.random_selection"):
    helpers.train_cfg(random_selection=1.5)


@pytest.mark.slow   # several tiny-Molmo2 compiles: minutes on 2 CPU cores
def test_random_selection_reaches_the_forward_of_the_train_step():
  """train.random_selection = 1: every keep mask random, so the CE changes; the aux loss (the scorer's own
  scores) does not."""
  from flax import nnx

  from stts_jax.models import video_forward
  from stts_jax.models.vlm import Molmo2
  from stts_jax.testing.tiny import tiny_model_config
  model_cfg = tiny_model_config(method="stts", ratio=0.5)
  batch = next(helpers.batches(batch_size=2, num_frames=4, seq_len=128, seed=1))
  mesh = helpers.mesh_1()
  metrics = []
  for p in (0.0, 1.0):
    _, state, step_fn = helpers.build_step(mesh, helpers.train_cfg(random_selection=p), batch=batch,
                                           model_fn=lambda: Molmo2(model_cfg, rngs=nnx.Rngs(0)),
                                           forward=video_forward.forward_video)
    with jax.set_mesh(mesh):
      metrics.append(jax.device_get(step_fn(state, helpers.put(batch, mesh))[1]))
  np.testing.assert_allclose(metrics[1]["aux_loss"], metrics[0]["aux_loss"], rtol=1e-6)
  assert abs(float(metrics[1]["ce"]) - float(metrics[0]["ce"])) > 1e-6


def test_selection_gradient_must_be_non_negative():
  with pytest.raises(ValueError, match="train.selection_gradient"):
    helpers.train_cfg(selection_gradient=-1.0)


def test_policy_gradient_settings_are_checked():
  with pytest.raises(ValueError, match="policy_gradient"):
    helpers.train_cfg(policy_gradient=-1.0)
  with pytest.raises(ValueError, match="policy_temperature"):
    helpers.train_cfg(policy_gradient=1.0, policy_temperature=0.0)
  with pytest.raises(ValueError, match="random_selection"):
    helpers.train_cfg(policy_gradient=1.0, random_selection=0.5)
  with pytest.raises(ValueError, match="train.loss='answer'"):
    helpers.train_cfg(policy_gradient=1.0, loss="full")


def test_policy_term_weighs_each_video_log_prob_by_its_answer_loss_above_the_batch_mean():
  import types

  from stts_jax.train import loss as loss_lib
  from stts_jax.train import step as step_lib
  rng = np.random.default_rng(0)
  b, s, e, v = 3, 7, 8, 11
  hidden = jnp.asarray(rng.normal(size=(b, s, e)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(e, v)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, size=(b, s)), jnp.int32)
  mask = np.zeros((b, s), bool)
  mask[0, 2:4] = True
  mask[1, 5] = True                                   # video 2 has no answer token: no reward, no weight
  mask = jnp.asarray(mask)
  ce_b = loss_lib.example_cross_entropy(hidden, head, targets, mask, max_tokens=4)
  total = loss_lib.full_cross_entropy(jnp.einsum("bse,ev->bsv", hidden, head), targets, mask)
  np.testing.assert_allclose(float(ce_b[0] * 2 + ce_b[1]), float(total), rtol=1e-5)   # per token means
  assert float(ce_b[2]) == 0.0
  cfg = helpers.train_cfg(policy_gradient=1.0)

  def term(logp):
    out = types.SimpleNamespace(selection_logp=logp, hidden=hidden, lm_head=head, target_ids=targets,
                                loss_mask=mask)
    return step_lib.policy_term(out, cfg)

  grad = np.asarray(jax.grad(term)(jnp.zeros(b, jnp.float32)))
  mean = float(ce_b[0] + ce_b[1]) / 2
  np.testing.assert_allclose(grad, [(float(ce_b[0]) - mean) / 2, (float(ce_b[1]) - mean) / 2, 0.0], rtol=1e-5)
  assert float(step_lib.policy_term(types.SimpleNamespace(selection_logp=None), cfg)) == 0.0


def test_policy_gradient_reaches_the_forward_and_the_loss_in_one_compiled_step():
  from flax import nnx

  from stts_jax.models import video_forward
  from stts_jax.models.vlm import Molmo2
  from stts_jax.testing.tiny import tiny_model_config
  model_cfg = tiny_model_config(method="stts", ratio=0.5)
  batches = [next(helpers.batches(batch_size=2, num_frames=4, seq_len=128, seed=s)) for s in (1, 2)]
  mesh = helpers.mesh_1()
  cfg = helpers.train_cfg(policy_gradient=2.0, aux_weight=0.5)
  _, state, step_fn = helpers.build_step(mesh, cfg, batch=batches[0],
                                         model_fn=lambda: Molmo2(model_cfg, rngs=nnx.Rngs(0)),
                                         forward=video_forward.forward_video)
  with jax.set_mesh(mesh):
    for batch in batches:
      state, m = step_fn(state, helpers.put(batch, mesh))
      m = jax.device_get(m)
      assert float(m["policy"]) != 0.0
      np.testing.assert_allclose(m["loss"], m["ce"] + 0.5 * m["aux_loss"] + 2.0 * m["policy"], rtol=1e-5)
  assert step_fn._cache_size() == 1

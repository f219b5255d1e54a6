"""Issue 12: the authors' scorer layout <-> WindowScorer, against a PyTorch scorer written from the table."""
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stts_jax.config import STTSConfig
from stts_jax.models import stts
from stts_jax.models.scorer import WindowScorer
from stts_jax import weights
from stts_jax.weights import scorer as scorer_weights


def _torch_scorer(torch, d, f, heads):
  """From issue 12's table: pooler wq/wk/wv/wo with bias (query = mean of the window's patches),
  MLP w1 [prev, cur] -> SiLU -> w2 -> SiLU -> w3 -> sigmoid."""
  nn = torch.nn

  class Pooler(nn.Module):
    def __init__(self):
      super().__init__()
      self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))

    def forward(self, win):                                     # [T, W, M, D]
      t, w, m, _ = win.shape
      hd = d // heads
      q = self.wq(win.mean(2)).view(t, w, heads, hd)
      k = self.wk(win).view(t, w, m, heads, hd)
      v = self.wv(win).view(t, w, m, heads, hd)
      att = torch.softmax(torch.einsum("twnh,twmnh->twnm", q, k) / math.sqrt(hd), dim=-1)
      return self.wo(torch.einsum("twnm,twmnh->twnh", att, v).reshape(t, w, d))

  class Mlp(nn.Module):
    def __init__(self):
      super().__init__()
      self.w1, self.w2, self.w3 = nn.Linear(2 * d, f), nn.Linear(f, f), nn.Linear(f, 1)

    def forward(self, x):
      return self.w3(nn.functional.silu(self.w2(nn.functional.silu(self.w1(x))))).squeeze(-1)

  class Scorer(nn.Module):
    def __init__(self):
      super().__init__()
      self.patch_token_pooler, self.mlp = Pooler(), Mlp()

    def forward(self, x, grid, window):                         # x [T, P, D]
      t = x.shape[0]
      (gh, gw), (wh, ww) = grid, window
      win = x.view(t, gh // wh, wh, gw // ww, ww, d).permute(0, 1, 3, 2, 4, 5)
      win = win.reshape(t, (gh // wh) * (gw // ww), wh * ww, d)
      feat = self.patch_token_pooler(win)
      prev = torch.cat([torch.zeros_like(feat[:1]), feat[:-1]], 0)
      return torch.sigmoid(self.mlp(torch.cat([prev, feat], -1)))

  return Scorer()


def _random_state(d, f, seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"patch_token_pooler.wq": (d, d), "patch_token_pooler.wk": (d, d), "patch_token_pooler.wv": (d, d),
            "patch_token_pooler.wo": (d, d), "mlp.w1": (f, 2 * d), "mlp.w2": (f, f), "mlp.w3": (1, f)}
  out = {}
  for name, shape in shapes.items():
    out[f"{scorer_weights.SCORER_PREFIX}{name}.weight"] = rng.normal(0, 0.3, shape).astype(np.float32)
    out[f"{scorer_weights.SCORER_PREFIX}{name}.bias"] = rng.normal(0, 0.1, shape[:1]).astype(np.float32)
  return out


@pytest.mark.parametrize("hub", [False, True])
def test_round_trip_is_exact_with_either_prefix(hub):
  sd = _random_state(8, 12)
  if hub:
    sd = {"model." + k: v for k, v in sd.items()}
  sd["model.vision_backbone.image_vit.patch_embedding.weight"] = np.zeros((3, 3), np.float32)  # ignored
  sc = weights.scorer_from_torch(sd, num_heads=2)
  assert isinstance(sc, WindowScorer) and sc.num_heads == 2 and sc.mlp_size == 12
  prefix = scorer_weights.HUB_SCORER_PREFIX if hub else scorer_weights.SCORER_PREFIX
  back = weights.scorer_to_torch(sc, prefix=prefix)
  src = {k: v for k, v in sd.items() if "temporal_token_scorer" in k}
  assert set(back) == set(src)
  for k in src:
    assert back[k].dtype == src[k].dtype and back[k].shape == src[k].shape
    np.testing.assert_array_equal(back[k], src[k])


def test_missing_and_misshaped_tensors_are_errors():
  sd = _random_state(8, 12)
  del sd[scorer_weights.SCORER_PREFIX + "mlp.w2.bias"]
  with pytest.raises(KeyError, match="mlp.w2.bias"):
    weights.scorer_from_torch(sd, num_heads=2)
  sd = _random_state(8, 12)
  sd[scorer_weights.SCORER_PREFIX + "mlp.w1.weight"] = np.zeros((12, 10), np.float32)
  with pytest.raises(ValueError, match="mlp.w1.weight"):
    weights.scorer_from_torch(sd, num_heads=2)


def test_export_of_fresh_scorer_loads_back():
  sc = WindowScorer(16, STTSConfig(method="stts", scorer_hidden=24, scorer_heads=4), rngs=nnx.Rngs(1))
  sd = weights.scorer_to_torch(sc)
  assert sd[scorer_weights.SCORER_PREFIX + "mlp.w1.weight"].shape == (24, 32)
  back = weights.scorer_from_torch(sd, num_heads=4)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 81, 16)).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(sc(x, (9, 9), (3, 3))), np.asarray(back(x, (9, 9), (3, 3))))


@pytest.mark.parity
@pytest.mark.parametrize("grid,heads", [((3, 3), 2), ((6, 6), 4), ((9, 9), 2), ((6, 9), 1)])
def test_scores_match_torch_reference(grid, heads):
  torch = pytest.importorskip("torch")
  d, f = 16, 24
  torch.manual_seed(0)
  ref = _torch_scorer(torch, d, f, heads)
  with torch.no_grad():
    for prm in ref.parameters():
      prm.normal_(0, 0.3)
  sd = {scorer_weights.HUB_SCORER_PREFIX + k: v.numpy() for k, v in ref.state_dict().items()}
  sc = weights.scorer_from_torch(sd, num_heads=heads)
  rng = np.random.default_rng(1)
  score_fn = nnx.jit(lambda m, x: stts.window_scores(m, x, grid, (3, 3)))
  for t in range(1, 6):
    x = rng.normal(size=(t, grid[0] * grid[1], d)).astype(np.float32)
    with torch.no_grad():
      want = ref(torch.from_numpy(x), grid, (3, 3)).numpy()
    got = np.asarray(score_fn(sc, jnp.asarray(x)))
    assert got.shape == want.shape == (t, (grid[0] // 3) * (grid[1] // 3))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want - 0.5).max() > 0.05          # the weights are not trivially saturated/flat


def _authors_checkpoint(path, with_scorer, vision_keys):
  """A tiny checkpoint in the authors' layout: hub tensors (+ scorer), config.json without our key."""
  import json
  import os
  from safetensors.numpy import load_file, save_file
  from stts_jax.models.vlm import Molmo2
  from stts_jax.testing.tiny import tiny_model_config
  weights.save_molmo2(Molmo2(tiny_model_config(), rngs=nnx.Rngs(0)), str(path))
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  del hf["stts_jax"]
  hf["vision_config"].update(vision_keys)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)
  tensors = load_file(os.path.join(path, "model.safetensors"))
  scorer = {}
  if with_scorer:
    scorer = {"model." + k: v for k, v in _random_state(32, 20, seed=5).items()}
    tensors.update(scorer)
  save_file(tensors, os.path.join(path, "model.safetensors"))
  return scorer


def test_load_molmo2_picks_up_the_authors_scorer_and_settings(tmp_path):
  scorer = _authors_checkpoint(tmp_path, True, dict(prune=True, prune_method="scorer", topk=0.3, prune_at=1))
  model, report = weights.load_molmo2_with_report(str(tmp_path))
  st = model.config.stts
  assert (st.method, st.ratio, st.prune_at, st.scorer_hidden, st.scorer_heads) == ("stts", 0.3, 1, 20, 2)
  assert report.fresh == [] and report.scorer_tensors == {}
  back = weights.scorer_to_torch(model.scorer, prefix=scorer_weights.HUB_SCORER_PREFIX)
  assert set(back) == set(scorer)
  for k in scorer:
    np.testing.assert_array_equal(back[k], scorer[k])
  # explicit settings win over the checkpoint's
  other = weights.load_molmo2(str(tmp_path), stts=STTSConfig(method="stts", ratio=0.5, prune_at=1,
                                                              scorer_hidden=20, scorer_heads=4))
  assert other.config.stts.ratio == 0.5 and other.scorer.num_heads == 4


def test_load_molmo2_without_scorer_weights_initialises_fresh_with_a_warning(tmp_path, caplog):
  _authors_checkpoint(tmp_path, False, dict(prune_method="scorer", topk=0.5, prune_at=1))
  with caplog.at_level("WARNING"):
    model, report = weights.load_molmo2_with_report(str(tmp_path))
  assert model.config.stts.method == "stts" and model.scorer is not None
  assert any("freshly initialised" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
  assert len(report.fresh) == 14
  assert (np.asarray(model.scorer.fc1.bias[...]) == 0).all()
  w = np.asarray(model.scorer.q_proj.kernel[...])
  assert 0.01 < w.std() < 0.03


def test_stts_config_from_hf_mapping():
  f = scorer_weights.stts_config_from_hf
  assert f({"vit_config": {}}, False) is None
  assert f({"vit_config": {}}, True).method == "stts"
  st = f({"vit_config": {"prune": True, "prune_method": "random", "topk": 0.8, "prune_at": 5,
                         "image_num_heads": 8}}, False)
  assert (st.method, st.ratio, st.prune_at, st.scorer_heads) == ("random", 0.8, 5, 8)
  assert f({"vit_config": {"prune": False, "prune_method": "scorer"}}, True).method == "none"
  assert f({"vision_config": {"prune_method": "easy"}}, False).method == "heuristic"
  with pytest.raises(ValueError, match="prune_method"):
    f({"vit_config": {"prune_method": "merge"}}, False)

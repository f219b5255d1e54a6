"""The notebooks run top to bottom headless (nbclient, this venv's python3 kernel, CPU), and what they
produce is checked: figures (displayed and saved as PNGs), keep-mask counts, training snapshots.

Settings are overridden by a cell inserted after the cell tagged `parameters` (as papermill does):
small data, few steps, outputs in tmp_path. The kernel runs with 1 CPU device (no forced 8).
"""

import os
import re

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from PIL import Image  # noqa: E402

from stts_jax import notebook_utils as nbu  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("explore_scores.ipynb", "train_tiny.ipynb")
ALLOWED_IMPORTS = ("stts_jax", "numpy", "matplotlib")


def _read(name: str):
  return nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)


def execute(name: str, overrides: dict, cwd: str, monkeypatch, timeout: int = 900):
  """Runs notebook `name` with `overrides` in a fresh kernel (cwd `cwd`); returns the executed notebook."""
  nb = _read(name)
  idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  lines = [f"{k} = {v!r}" for k, v in overrides.items()]
  nb.cells.insert(idx + 1, nbformat.v4.new_code_cell("# @title Test overrides\n" + "\n".join(lines)))
  monkeypatch.delenv("XLA_FLAGS", raising=False)      # one CPU device in the kernel
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                   resources={"metadata": {"path": cwd}})
  client.execute()
  return nb


def _text(nb) -> str:
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      if o.output_type == "stream":
        out.append(o.text)
      elif "text/plain" in o.get("data", {}):
        out.append(o.data["text/plain"])
  return "\n".join(out)


def _images(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def _check_png(path: str, min_side: int = 200) -> None:
  assert os.path.isfile(path), path
  img = Image.open(path)
  assert min(img.size) >= min_side, (path, img.size)
  assert len(np.unique(np.asarray(img.convert("L")))) > 8, f"{path} looks blank"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_layout(name):
  """Colab-ready: purpose first, guarded install, `# @title` everywhere, allowed imports, no outputs."""
  nb = _read(name)
  assert nb.cells[0].cell_type == "markdown"
  assert all(k in nb.cells[0].source for k in ("**Purpose.**", "**Runtime.**", "**Config.**"))
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.source.startswith("# @title") for c in code)
  assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "clear outputs"
  install = code[0].source
  assert "if importlib.util.find_spec(\"stts_jax\") is None:" in install and "%pip install" in install
  assert "parameters" in code[1].metadata.get("tags", [])
  for cell in code[1:]:
    for mod in re.findall(r"^\s*(?:from|import)\s+([\w.]+)", cell.source, flags=re.M):
      assert mod.split(".")[0] in ALLOWED_IMPORTS, (name, mod)
  assert "/work/" not in "".join(c.source for c in nb.cells), "no local paths"


@pytest.mark.slow   # executes the notebook (~45 s)
def test_explore_scores_runs(tmp_path, monkeypatch):
  out = tmp_path / "figs"
  nb = execute("explore_scores.ipynb", dict(OUT_DIR=str(out), FIT_STEPS=8, CHECKPOINTS=(str(tmp_path / "none"),)),
               str(tmp_path), monkeypatch)
  text = _text(nb)
  assert "model: freshly initialised model" in text
  before, after = map(float, re.search(r"on this clip only: ([\d.]+) -> ([\d.]+)", text).groups())
  assert after < before
  assert _images(nb) >= 4
  for fig in ("explore_methods", "explore_scores", "explore_ratios", "explore_change", "explore_answers"):
    _check_png(str(out / f"{fig}.png"))
  # the ask pipeline answered with each method's budget (8 frames x 9 windows, ratio 0.5)
  for m in nbu.METHODS:
    assert re.search(rf"^{m} +36/72 vision tokens -> answer '.*' \((\d+) tokens\)$", text, flags=re.M), m
  with np.load(out / "explore_scores.npz") as z:
    ratio, ratios = float(z["ratio"]), z["ratios"]
    t, w = z["keep_stts"].shape
    assert (t, w) == (8, 9) and not bool(z["trained"])
    for m in nbu.METHODS:
      keep, scores = z[f"keep_{m}"], z[f"scores_{m}"]
      assert keep.sum() == nbu.expected_kept(t, w, ratio) == 36, m
      assert keep[0].all(), f"{m}: frame 0 is always kept"
      # the model's mask is the budget rule on its own scores
      np.testing.assert_array_equal(nbu.keep_by_ratio(scores, [ratio])[ratio], keep)
    assert not np.array_equal(z["keep_random"], z["keep_heuristic"])
    for r, keep in zip(ratios, z["keep_by_ratio"]):
      assert keep.sum() == nbu.expected_kept(t, w, float(r))
    np.testing.assert_array_equal(z["keep_by_ratio"][list(ratios).index(ratio)], z["keep_stts"])
    assert np.isnan(z["change"][0]) and np.all(z["change"][1:] > 0)


def _train_overrides(tmp_path, steps: int) -> dict:
  return dict(DATA_DIR=str(tmp_path / "data"), CLIPS=(32, 4, 8), BUILD_WORKERS=1, WORKDIR=str(tmp_path / "run"),
              STEPS=steps, BATCH=8, SNAPSHOT_EVERY=2, SNAPSHOT_CLIPS=4, OUT_DIR=str(tmp_path / "figs"))


def _check_train_outputs(nb, tmp_path, steps: int, snapshot_every: int):
  out = tmp_path / "figs"
  text = _text(nb)
  assert f"{steps} steps in" in text
  assert _images(nb) >= 2
  for fig in ("train_tiny_curves", "train_tiny_keep_masks"):
    _check_png(str(out / f"{fig}.png"))
  with np.load(out / "train_tiny.npz") as z:
    want = list(range(snapshot_every, steps, snapshot_every)) + [steps]
    assert z["steps"].tolist() == want
    s, n, t, w = z["keep"].shape
    assert (s, n, t, w) == (len(want), 4, 8, 9)
    assert np.all(z["keep"].sum(axis=(2, 3)) == nbu.expected_kept(t, w, float(z["ratio"])))
    assert z["keep"][:, :, 0].all()
    assert np.all((z["scores"] >= 0) & (z["scores"] <= 1))
    assert np.all(np.isfinite(z["ce"])) and np.all(np.isfinite(z["aux_loss"]))
    ce, aux = z["ce"], z["aux_loss"]
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / str(steps))
  return ce, aux


def test_train_tiny_runs(tmp_path, monkeypatch):
  nb = execute("train_tiny.ipynb", _train_overrides(tmp_path, 4), str(tmp_path), monkeypatch)
  assert "built in" in _text(nb)
  _check_train_outputs(nb, tmp_path, 4, 2)


@pytest.mark.slow
def test_train_tiny_default_length_learns(tmp_path, monkeypatch):
  """The notebook's own step count on a small build: losses go down (minutes on CPU)."""
  over = _train_overrides(tmp_path, 300)
  over.update(CLIPS=(400, 20, 40), BATCH=16, SNAPSHOT_EVERY=100, SNAPSHOT_CLIPS=4, BUILD_WORKERS=2)
  nb = execute("train_tiny.ipynb", over, str(tmp_path), monkeypatch, timeout=1800)
  ce, aux = _check_train_outputs(nb, tmp_path, 300, 100)
  assert ce[-3:].mean() < 0.5 * ce[:2].mean(), ce
  assert aux[-3:].mean() < aux[:2].mean(), aux


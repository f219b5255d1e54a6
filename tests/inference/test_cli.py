"""scripts/ask.py as a user runs it: answers and JSON on stdout, one-line errors with exit code 2."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.data import videos  # noqa: E402
from tests.inference import checkpoint_dirs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ask(*args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "ask.py"), *args], capture_output=True,
                        text=True, env=env, timeout=600)


def test_ask_cli_json_and_errors(tmp_path):
  ckpt = checkpoint_dirs.write_checkpoint(checkpoint_dirs.SETUPS[0], str(tmp_path / "ckpt"))
  clip = videos.write_video(str(tmp_path / "clip"), videos.moving_frames(12, 32, 48), 6.0)
  out_file = tmp_path / "answers.json"
  proc = _ask("--checkpoint", ckpt, "--video", clip, "--question", "What moves?", "--question", "Where?",
              "--option", "left", "--option", "right", "--method", "heuristic", "--ratio", "0.5", "--prune_at", "1",
              "--max_new_tokens", "5", "--json", "--out", str(out_file))
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  recs = [json.loads(line) for line in lines[-2:]]
  assert [r["question"] for r in recs] == ["What moves?", "Where?"]
  for r in recs:
    assert r["num_frames"] == 4 and 0 < len(r["token_ids"]) <= 5
    assert r["vision_tokens"]["kept"] < r["vision_tokens"]["total"] == 4 * 9
    assert {"video_decode", "vision", "prefill", "decode", "decode_tokens_per_s"} <= set(r["timings_s"])
  saved = json.loads(out_file.read_text())
  assert saved["answers"] == recs and saved["commit"]["commit"] and saved["sampled"]["num_frames"] == 4

  text = _ask("--checkpoint", ckpt, "--video", clip, "--question", "What moves?", "--max_new_tokens", "3")
  assert text.returncode == 0 and text.stdout.startswith("Q: What moves?\nA: ") and "vision tokens 36/36" in text.stdout

  # (the other bad inputs raise the same AskError / VideoError types: tests/inference/test_pipeline.py)
  bad = _ask("--checkpoint", ckpt, "--method", "stts", "--prune_at", "1", "--video", clip, "--question", "q")
  assert bad.returncode == 2, bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith("ask.py: error: ") and "needs a trained scorer" in bad.stderr
  assert "Traceback" not in bad.stderr
  bad = _ask("--checkpoint", ckpt, "--video", str(tmp_path / "missing.mp4"), "--question", "q")
  assert bad.returncode == 2 and "missing.mp4: file not found" in bad.stderr and "Traceback" not in bad.stderr

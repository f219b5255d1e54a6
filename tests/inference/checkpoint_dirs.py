"""Test helper: tiny random transformers Molmo2 checkpoints saved as a user would get them
(`save_pretrained` of the model and of the processor, tokenizer.json, generation_config.json), and
transformers' own greedy generation on a video file (its PyAV reader, its processor)."""

import dataclasses
import os

import numpy as np
import pytest

from stts_jax.data import default_dataset
from stts_jax.data import prompt as prompt_lib
from tests.data import hf
from tests.weights import molmo2_hf_cases as cases


@dataclasses.dataclass(frozen=True)
class Setup:
  case: cases.Case
  num_frames: int = 8
  max_fps: float = 2.0
  use_frame_special_tokens: bool = True
  video_use_col_tokens: bool = False


SETUPS = (
    Setup(cases.CASES[0], num_frames=8, max_fps=2.0),
    Setup(cases.CASES[1], num_frames=5, max_fps=4.0),
    Setup(cases.CASES[2], num_frames=12, max_fps=10.0, use_frame_special_tokens=False, video_use_col_tokens=True),
)


def write_checkpoint(setup: Setup, directory: str, seed: int = 0) -> str:
  """Model + tokenizer + processor + generation config in `directory` (eos = <|im_end|>)."""
  torch = pytest.importorskip("torch")
  del torch
  os.makedirs(directory, exist_ok=True)
  model = cases.hf_model(setup.case, seed=seed)
  ids = default_dataset.tiny_token_ids()
  model.generation_config.eos_token_id = ids.chat_end
  model.generation_config.pad_token_id = ids.pad
  model.generation_config.bos_token_id = ids.chat_end
  model.save_pretrained(directory)
  tok = default_dataset.build_tokenizer(ids)
  tok.save(os.path.join(directory, "tokenizer.json"))
  proc = hf.processor(os.path.join(directory, "tokenizer.json"),
                      use_frame_special_tokens=setup.use_frame_special_tokens,
                      video_use_col_tokens=setup.video_use_col_tokens)
  vp = proc.video_processor
  vp.size = {"height": 126, "width": 126}
  vp.num_frames = setup.num_frames
  vp.max_fps = setup.max_fps
  proc.save_pretrained(directory)
  return directory


def hf_generate(directory: str, video_path: str, question: str, max_new_tokens: int):
  """transformers end to end: PyAV reader + Molmo2 processor + greedy `generate` from `directory`.
  Returns (new token ids, per-step top-2 logit margins, sampled frame indices)."""
  import torch
  from transformers import Molmo2ForConditionalGeneration
  from transformers.video_utils import load_video
  model = Molmo2ForConditionalGeneration.from_pretrained(directory, attn_implementation="eager",
                                                         dtype=torch.float32).eval()
  proc = _saved_processor(directory)
  vp = proc.video_processor
  frames, meta = load_video(video_path, backend="pyav",
                            sample_indices_fn=lambda metadata, **kw: np.arange(metadata.total_num_frames))
  meta.frames_indices = None
  indices = vp.sample_frames(meta).numpy()
  inputs = proc(text=["<|video|>" + prompt_lib.user_turn_text(question)], videos=[frames], video_metadata=[meta],
                return_tensors="pt")
  with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
  new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
  margins = []
  for score in out.scores:
    top2 = torch.topk(score[0].float(), 2).values
    margins.append(float(top2[0] - top2[1]))
  return new, margins, indices


def _saved_processor(directory: str):
  """The processor as saved in `directory` (its settings), with the test's torchvision-free resize."""
  import json
  with open(os.path.join(directory, "processor_config.json")) as f:
    saved = json.load(f)
  video = {k: v for k, v in saved["video_processor"].items() if k in ("num_frames", "max_fps", "size", "patch_size",
                                                                      "pooling_size")}
  proc = hf.processor(os.path.join(directory, "tokenizer.json"),
                      use_frame_special_tokens=saved["use_frame_special_tokens"],
                      video_use_col_tokens=saved["video_use_col_tokens"])
  for k, v in video.items():
    setattr(proc.video_processor, k, v)
  return proc

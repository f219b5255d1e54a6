"""Hand-made eval sets: small real mp4 files, a JSONL manifest, the tiny model's tokenizer."""

import json
import os
from fractions import Fraction

import av
import numpy as np

from stts_jax.data import default_dataset
from stts_jax.data.config import DataConfig

OPTIONS = ("top left", "top right", "bottom left", "bottom right")   # words the tiny tokenizer knows


def write_mp4(path: str, frames: np.ndarray, fps: int = 2) -> None:
  with av.open(path, mode="w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=Fraction(fps))
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": "18", "preset": "veryfast"}
    for f in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def make_mc_dataset(root: str, *, n: int = 8, frames: int = 4, size: int = 126, corrupt=(), missing=(),
                    open_ended: bool = False, split: str = "test", seed: int = 0, **data_overrides) -> DataConfig:
  """`n` examples; example i has answer option i % 4 (letter "ABCD"[i % 4]) and id "ex{i}".

  Rows in `corrupt` point at a file of garbage bytes, rows in `missing` at a file that does not exist.
  With `open_ended`, examples have no options and the answer is the option text.
  """
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "videos"), exist_ok=True)
  lines = []
  for i in range(n):
    name = f"videos/v{i}.mp4"
    path = os.path.join(root, name)
    if i in corrupt:
      with open(path, "wb") as f:
        f.write(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    elif i in missing:
      name = f"videos/missing{i}.mp4"
    else:
      write_mp4(path, rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8))
    rec = {"id": f"ex{i}", "video": name, "question": "Where does the framed picture appear?"}
    if open_ended:
      rec["answer"] = OPTIONS[i % 4]
    else:
      rec.update(options=list(OPTIONS), answer=OPTIONS[i % 4])
    lines.append(json.dumps(rec))
  with open(os.path.join(root, f"{split}.jsonl"), "w") as f:
    f.write("\n".join(lines) + "\n")
  tok = default_dataset.build_tokenizer(default_dataset.tiny_token_ids())
  tok.save(os.path.join(root, "tokenizer.json"))
  kw = dict(path=root, format="manifest", image_size=size, patch_size=14, pool=(3, 3), max_frames=frames,
            max_fps=2.0, seq_len=1 + frames * 20 + 96, max_options=4, batch_size=4, eval_splits=(split,))
  kw.update(data_overrides)
  return DataConfig(**kw).validate()


def video_batch(cfg, frames, t: int, answer_len: int = 3, extra: int = 8, seed: int = 0) -> dict:
  """A pipeline-shaped batch for the tiny model: videos with `frames[i]` real frames of a moving
  square on noise (different content -> different keep patterns), Molmo2 prompt layout, a
  `prompt_len` before `answer_len` answer tokens, and `extra` spare slots at the end."""
  rng = np.random.default_rng(seed)
  tok = cfg.tokens
  w, p, pix = cfg.windows_per_frame, cfg.vit.num_patches, cfg.vit.patch_dim
  g, ps = cfg.vit.grid, cfg.vit.patch_size
  size = g * ps
  s = 1 + t * (w + 4) + 8 + answer_len + extra
  b = len(frames)
  patches = np.zeros((b, t, p, pix), np.uint8)
  ids = np.full((b, s), tok.pad, np.int32)
  token_mask = np.zeros((b, s), bool)
  prompt_len = np.zeros(b, np.int32)
  for i, n in enumerate(frames):
    bg = rng.integers(0, 256, size=(size, size, 3))
    seq = [tok.chat_end]
    for f in range(n):
      img = bg.copy()
      y, x = rng.integers(0, size - 30, size=2)
      img[y:y + 28, x:x + 28] = rng.integers(0, 256, size=3)
      patches[i, f] = img.reshape(g, ps, g, ps, 3).transpose(0, 2, 1, 3, 4).reshape(p, pix)
      seq += [10 + f, 11, tok.frame_start] + [tok.image_patch] * w + [tok.frame_end]
    seq += [tok.chat_start, 20, 21, 22, tok.chat_end, tok.chat_start, 23]
    prompt_len[i] = len(seq)
    seq += list(rng.integers(30, 300, size=answer_len))
    ids[i, :len(seq)] = seq
    token_mask[i, :len(seq)] = True
  targets = np.concatenate([ids[:, 1:], np.full((b, 1), tok.pad, np.int32)], axis=1)
  loss_mask = token_mask & (np.arange(s)[None] >= prompt_len[:, None] - 1)
  frame_mask = np.arange(t)[None] < np.asarray(frames)[:, None]
  return dict(patches=patches, frame_mask=frame_mask, input_ids=ids, token_mask=token_mask, target_ids=targets,
              loss_mask=loss_mask, prompt_len=prompt_len, valid=np.ones(b, bool))

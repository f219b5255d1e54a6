"""Hand-made eval sets: small real mp4 files, a JSONL manifest, the tiny model's tokenizer."""

import json
import os
from fractions import Fraction

import av
import numpy as np

from stts_jax.data import default_dataset
from stts_jax.data.config import DataConfig

OPTIONS = ("red", "green", "blue", "yellow")


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
  With `open_ended`, examples have no options and the answer is the colour word.
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
    rec = {"id": f"ex{i}", "video": name, "question": "Which colour is shown?"}
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

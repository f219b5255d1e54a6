"""TFDS builder: a JSONL manifest -> ArrayRecord dataset read with `tfds.data_source` (no TensorFlow).

Storage choice: each record holds the *encoded video file bytes* (mp4/webm/... as on disk), so
the dataset is as small as the videos and any `max_frames` / `max_fps` / `image_size` can be
chosen at read time; decoding runs in the Grain workers (`video.sample_frames` accepts bytes).
Record fields: `index` (line order in the manifest, the pipeline's example id), `id`, `video`
(bytes), `video_name` (the original path, for error messages), `question`, `options`
(list; empty = open-ended), `answer`, `answer_index` (-1 if open-ended), `extra` (JSON of the
manifest's other fields). ArrayRecord returns records in hashed order, hence `index`.
"""

import json
import logging
import os
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from stts_jax.data import manifest as manifest_lib


class VideoQa(tfds.core.GeneratorBasedBuilder):
  """Video question answering from JSONL manifests (one split per manifest)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Encoded video bytes + question/options/answer."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default resolves the package through `importlib_resources`, which is not installed
    # (and not needed): point it at this file directly.
    return epath.Path(__file__)

  def __init__(self, *, manifests: Optional[dict[str, str]] = None, on_error: str = "raise", **kwargs):
    self._manifests = dict(manifests or {})
    self._on_error = on_error
    self.num_skipped = 0
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "index": tfds.features.Scalar(dtype=np.int64),
            "id": tfds.features.Text(),
            "video": tfds.features.Tensor(shape=(), dtype=np.object_),
            "video_name": tfds.features.Text(),
            "question": tfds.features.Text(),
            "options": tfds.features.Sequence(tfds.features.Text()),
            "answer": tfds.features.Text(),
            "answer_index": tfds.features.Scalar(dtype=np.int32),
            "extra": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    if not self._manifests:
      raise ValueError("VideoQa needs manifests={split: path.jsonl} to prepare")
    return {split: self._generate_examples(path) for split, path in self._manifests.items()}

  def _generate_examples(self, path: str):
    examples, errors = manifest_lib.read_manifest(path, on_error=self._on_error)
    self.num_skipped += len(errors)
    for index, ex in enumerate(examples):
      try:
        with open(ex.video, "rb") as f:
          data = f.read()
        if not data:
          raise OSError("file is empty (0 bytes)")
      except OSError as e:
        msg = f"{path}: example {ex.id!r}: cannot read video {ex.video} ({e})"
        if self._on_error == "raise":
          raise manifest_lib.ManifestError(msg) from e
        logging.warning("skipping: %s", msg)
        self.num_skipped += 1
        continue
      yield ex.id, {
          "index": index,
          "id": ex.id,
          "video": data,
          "video_name": ex.video,
          "question": ex.question,
          "options": list(ex.options or []),
          "answer": ex.answer,
          "answer_index": ex.answer_index,
          "extra": json.dumps(ex.extra, sort_keys=True),
      }


def build(manifests: dict[str, str], data_dir: str, *, on_error: str = "raise") -> str:
  """Converts manifests ({split: path}) to ArrayRecord under `data_dir`; returns the dataset dir.

  Idempotent: an already prepared dataset is left as is.
  """
  tfds.disable_progress_bar()
  builder = VideoQa(manifests=manifests, data_dir=data_dir, on_error=on_error)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return builder.data_dir


def dataset_dir(data_dir: str) -> str:
  """The versioned directory `build` writes (`{data_dir}/video_qa/1.0.0`)."""
  return os.path.join(data_dir, "video_qa", str(VideoQa.VERSION))


def data_source(data_dir: str, split: str):
  """Random-access ArrayRecord source of a prepared split (no TensorFlow, no builder class needed)."""
  path = dataset_dir(data_dir)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no prepared TFDS dataset (run tfds_builder.build first)")
  return tfds.builder_from_directory(path).as_data_source(split=split)


def record_to_raw(record: dict) -> dict:
  """A tfds record -> the pipeline's raw record (strings decoded, video bytes kept)."""
  def text(v):
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)
  options = [text(o) for o in record["options"]]
  return {
      "index": int(record["index"]),
      "id": text(record["id"]),
      "video": bytes(record["video"]),
      "video_name": text(record["video_name"]),
      "question": text(record["question"]),
      "options": options or None,
      "answer": text(record["answer"]),
      "answer_index": int(record["answer_index"]),
  }


__all__ = ["VideoQa", "build", "dataset_dir", "data_source", "record_to_raw"]

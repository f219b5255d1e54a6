"""Generation with STTS pruning == uncached recomputation through `video_forward.forward_video`."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stts_jax.eval import generate as gen_lib
from stts_jax.models import budget
from stts_jax.models import video_forward as vf
from tests.eval import helpers

N = 4


@nnx.jit
def _generate(model, batch):
  return gen_lib.generate(model, batch, max_new_tokens=N, stop_ids=(), return_logits=True)


@nnx.jit
def _forward(model, batch):
  return vf.forward_video(model, batch)


def test_cached_generation_equals_uncached_forward_with_pruning(stts_model):
  model = stts_model          # method "stts" (scorer), ratio 0.5
  cfg = model.config
  t = 4
  batch = helpers.video_batch(cfg, [4, 3], t, extra=N, seed=1)
  prompt = gen_lib.prompt_only(batch, cfg.tokens.pad)
  keys = ("patches", "frame_mask", "input_ids", "token_mask", "valid")
  gen, pre = _generate(model, {k: jnp.asarray(prompt[k]) for k in keys})
  tokens = np.asarray(gen.tokens_bn)

  # Uncached reference: the prompt followed by the generated tokens, through the training forward
  # (ViT, pruning, compaction, decoder, all recomputed); its logits at the last prompt token and
  # at each generated token must be what the cache produced.
  ref = {k: np.array(prompt[k]) for k in vf.BATCH_KEYS}
  for b, n in enumerate(batch["prompt_len"]):
    ref["input_ids"][b, n:n + N] = tokens[b]
    ref["token_mask"][b, n:n + N] = True
  out = _forward(model, ref)
  keep = np.asarray(out.keep_mask)
  w = cfg.windows_per_frame
  assert [int(keep[b].sum()) for b in range(2)] == [budget.num_kept(4, w, 0.5), budget.num_kept(3, w, 0.5)]
  assert np.array_equal(keep, np.asarray(pre.keep_mask_btw))   # the same windows were pruned
  assert not np.array_equal(keep[0, :3], keep[1, :3])           # different keep patterns in the batch
  assert out.logits.shape[1] == ref["input_ids"].shape[1] - budget.num_dropped(t, w, 0.5)   # pruned length S'
  for b in range(2):
    n = int(np.sum(out.token_mask[b]))            # pruned prompt + N generated tokens
    assert n - N == int(pre.state.prompt_len_b[b])
    ref_logits = np.asarray(out.logits[b, n - N - 1:n - 1])
    np.testing.assert_allclose(np.asarray(gen.logits_bnv[b]), ref_logits, atol=1e-4, rtol=0)
    assert np.array_equal(np.argmax(ref_logits, -1), tokens[b])

import jax.numpy as jnp
import numpy as np
import pytest

from stts_jax.models import sequence

PATCH, FS, FE, PAD = 7, 5, 6, 0


def _prompt(frames, w, text=(1, 2), answer=(3, 4)):
  """[text] per frame: FS, W patches, FE, then the answer; targets = next token."""
  ids = list(text)
  for _ in range(frames):
    ids += [FS] + [PATCH] * w + [FE]
  q_end = len(ids)
  ids += list(answer)
  loss = [False] * len(ids)
  for i in range(q_end - 1, len(ids) - 1):
    loss[i] = True
  return ids, loss


def _batch(specs, s, w):
  ids = np.full((len(specs), s), PAD, np.int32)
  mask = np.zeros((len(specs), s), bool)
  tgt = np.zeros((len(specs), s), np.int32)
  loss = np.zeros((len(specs), s), bool)
  for b, frames in enumerate(specs):
    i, l = _prompt(frames, w)
    ids[b, :len(i)] = i
    mask[b, :len(i)] = True
    tgt[b, :len(i) - 1] = i[1:]
    loss[b, :len(l)] = l
  return ids, mask, tgt, loss


def test_prune_sequence_hand_case():
  w, t = 4, 3
  ids, mask, tgt, loss = _batch([3, 2], 24, w)
  keep = np.zeros((2, t, w), bool)
  keep[0, 0] = True
  keep[0, 1, [1, 3]] = True
  keep[0, 2, 2] = True
  keep[1, 0] = True
  keep[1, 1, 0] = True
  out = sequence.prune_sequence(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(tgt), jnp.asarray(loss),
                                jnp.asarray(keep), PATCH, out_len=19, pad_id=PAD)
  want0 = [1, 2, FS] + [PATCH] * 4 + [FE, FS] + [PATCH] * 2 + [FE, FS, PATCH, FE, 3, 4]
  np.testing.assert_array_equal(np.asarray(out.input_ids_bs[0]), want0 + [PAD] * (19 - len(want0)))
  want1 = [1, 2, FS] + [PATCH] * 4 + [FE, FS, PATCH, FE, 3, 4]
  np.testing.assert_array_equal(np.asarray(out.input_ids_bs[1]), want1 + [PAD] * (19 - len(want1)))
  np.testing.assert_array_equal(np.asarray(out.token_mask_bs.sum(-1)), [len(want0), len(want1)])
  # targets still are the next token; loss stays on the answer
  for b, want in enumerate([want0, want1]):
    n = len(want)
    np.testing.assert_array_equal(np.asarray(out.target_ids_bs[b, :n - 1]), want[1:])
    lm = np.asarray(out.loss_mask_bs[b])
    assert lm.sum() == 2 and lm[n - 3] and lm[n - 2]
  np.testing.assert_array_equal(np.asarray(out.num_truncated_b), [0, 0])
  src = np.asarray(out.src_bs[0])
  np.testing.assert_array_equal(ids[0][src[:len(want0)]], want0)
  assert (src[len(want0):] == -1).all()


def test_truncation_is_reported_and_pruned_next_token_loses_loss():
  w = 2
  ids, mask, tgt, loss = _batch([2], 12, w)
  keep = np.ones((1, 2, w), bool)
  out = sequence.prune_sequence(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(tgt), jnp.asarray(loss),
                                jnp.asarray(keep), PATCH, out_len=10, pad_id=PAD)
  assert int(out.num_truncated_b[0]) == 2        # 12 tokens, nothing pruned, 10 slots
  # a position right before a pruned token gets the next surviving token as target
  keep2 = np.array([[[True, False], [False, True]]])
  out2 = sequence.prune_sequence(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(tgt), jnp.asarray(loss),
                                 jnp.asarray(keep2), PATCH, out_len=10, pad_id=PAD)
  want = [1, 2, FS, PATCH, FE, FS, PATCH, FE, 3, 4]
  np.testing.assert_array_equal(np.asarray(out2.input_ids_bs[0]), want)
  np.testing.assert_array_equal(np.asarray(out2.target_ids_bs[0, :9]), want[1:])
  with pytest.raises(ValueError, match="out_len"):
    sequence.compact(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(tgt), jnp.asarray(loss),
                     jnp.asarray(mask), 13, PAD)


def test_patch_window_index_of_tokens():
  ids, mask, _, _ = _batch([2], 14, 3)
  is_patch, k = sequence.patch_window_of_tokens(jnp.asarray(ids), jnp.asarray(mask), PATCH)
  assert int(is_patch.sum()) == 6
  np.testing.assert_array_equal(np.asarray(k[0])[np.asarray(is_patch[0])], np.arange(6))

"""The fused chunked cross-entropy = the plain one over whole logits: sums and gradients, every layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ift_jax import losses

B, L, D, V = 4, 12, 16, 40


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, L, D)).astype(np.float32)
  w = (0.3 * rng.standard_normal((D, V))).astype(np.float32)
  targets = rng.integers(0, V, (B, L)).astype(np.int32)
  weights = (rng.random((B, L)) < 0.5).astype(np.float32)
  weights[1] = 0.0  # a row with nothing to learn
  weights[2, :] = 1.0  # a row that is all completion
  weights[3, :L - 2] = 0.0  # targets only at the very end: moved to the front, the other chunks skipped
  weights[0, 3] = 2.5  # weights are weights, not flags
  return jnp.asarray(x), jnp.asarray(w), jnp.asarray(targets), jnp.asarray(weights)


def _reference(x, w_DxV, targets, weights, softcap=None):
  logits = jnp.einsum("BLD,DV->BLV", x, w_DxV, preferred_element_type=jnp.float32)
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  return losses.weighted_sums(logits, targets, weights)


def _both(fn, x, w):
  sums = fn(x, w)
  grads = jax.grad(lambda x, w: fn(x, w)["loss"], argnums=(0, 1))(x, w)
  return sums, grads


@pytest.mark.parametrize("chunk", [1, 4, 5, 12])  # 5 does not divide L: padded, never weighted
@pytest.mark.parametrize("vocab_major", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_sums_and_gradients_match_whole_logits(chunk, vocab_major, softcap):
  x, w, targets, weights = _inputs()
  head_w = w.T if vocab_major else w
  fused = jax.jit(lambda x, hw: losses.fused_head_sums(x, hw, targets, weights, chunk, vocab_major=vocab_major,
                                                       softcap=softcap))
  ref = jax.jit(lambda x, hw: _reference(x, hw.T if vocab_major else hw, targets, weights, softcap))
  (sums, (dx, dw)), (ref_sums, (ref_dx, ref_dw)) = _both(fused, x, head_w), _both(ref, x, head_w)
  for key in ("loss", "correct", "weight"):
    np.testing.assert_allclose(sums[key], ref_sums[key], rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(dx, ref_dx, atol=1e-5)
  np.testing.assert_allclose(dw, ref_dw, atol=1e-5)
  assert float(jnp.abs(dx[1]).max()) == 0.0  # the unweighted row gets no gradient
  assert float(jnp.abs(dw).max()) > 0


def test_fused_gradient_scales_with_the_cotangent():
  """The gradients are made in the forward pass; the backward pass must still scale them (loss / count)."""
  x, w, targets, weights = _inputs(1)
  fused = lambda x, w: losses.fused_head_sums(x, w, targets, weights, 4, vocab_major=False)["loss"] / 7.0
  ref = lambda x, w: _reference(x, w, targets, weights)["loss"] / 7.0
  for a, b in zip(jax.grad(fused, argnums=(0, 1))(x, w), jax.grad(ref, argnums=(0, 1))(x, w)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_fused_bfloat16_keeps_dtypes_and_tracks_float32():
  x, w, targets, weights = _inputs(2)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  fn = lambda x, w: losses.fused_head_sums(x, w, targets, weights, 4, vocab_major=False)["loss"]
  dx, dw = jax.grad(fn, argnums=(0, 1))(xb, wb)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  ref_dx, ref_dw = jax.grad(fn, argnums=(0, 1))(x, w)
  np.testing.assert_allclose(np.asarray(dw, np.float32), ref_dw, atol=0.05 * float(jnp.abs(ref_dw).max()))
  np.testing.assert_allclose(np.asarray(dx, np.float32), ref_dx, atol=0.05 * float(jnp.abs(ref_dx).max()))


def test_fused_skips_chunks_without_targets():
  """Chunks holding no weighted position are never projected: poison their hidden states with NaN, which any
  projection would spread into the sums (0 · NaN = NaN), and the results stay those of the clean positions."""
  x, w, targets, _ = _inputs()
  rng = np.random.default_rng(3)
  weights = np.zeros((B, L), np.float32)
  for row in range(B):  # 4 weighted positions per row, anywhere: after the per-row sort they fill chunk 0
    weights[row, rng.choice(L, 4, replace=False)] = 1.0
  poisoned = jnp.where(jnp.asarray(weights)[..., None] > 0, x, jnp.nan)
  fn = lambda x, w: losses.fused_head_sums(x, w, targets, jnp.asarray(weights), 4, vocab_major=False)
  sums, (dx, dw) = _both(fn, poisoned, w)
  ref_sums, (ref_dx, ref_dw) = _both(lambda x, w: _reference(x, w, targets, jnp.asarray(weights)), x, w)
  np.testing.assert_allclose(sums["loss"], ref_sums["loss"], rtol=1e-5)
  np.testing.assert_allclose(dw, ref_dw, atol=1e-5)
  np.testing.assert_allclose(dx, ref_dx, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 5, 12])
def test_chunked_token_losses_match_whole_logits_at_weighted_positions(chunk):
  """Evaluation's chunked per-position losses: those of the whole logits wherever there is a weight (rows with
  none, all, or only trailing weights; chunks that do not divide the row), 0 where there is none."""
  x, w, targets, weights = _inputs()
  logits_fn = lambda x: jnp.einsum("BLD,DV->BLV", x, w, preferred_element_type=jnp.float32)
  # Every other position's target is the model's top token, so hits and misses are both checked.
  top = jnp.argmax(logits_fn(x), axis=-1).astype(targets.dtype)
  targets = jnp.where(jnp.arange(L) % 2 == 0, top, targets)
  ce, hit = jax.jit(lambda x: losses.chunked_token_losses(logits_fn, x, targets, weights, chunk))(x)
  ref_ce, ref_hit = losses.cross_entropy_and_hit(logits_fn(x), targets)
  weighted = np.asarray(weights) != 0
  np.testing.assert_allclose(np.asarray(ce)[weighted], np.asarray(ref_ce)[weighted], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(hit)[weighted], np.asarray(ref_hit)[weighted])
  assert not np.asarray(ce)[~weighted].any() and not np.asarray(hit)[~weighted].any()
  assert np.asarray(hit)[weighted].any() and not np.asarray(hit)[weighted].all()


def test_chunked_token_losses_skip_chunks_without_targets():
  """As in training, chunks with no weighted position are never projected: the vocabulary projection runs once
  (chunk 0 of 3, where the per-row sort puts each row's 4 weighted positions), not three times."""
  x, w, targets, _ = _inputs()
  rng = np.random.default_rng(4)
  weights = np.zeros((B, L), np.float32)
  for row in range(B):
    weights[row, rng.choice(L, 4, replace=False)] = 1.0
  projected = []

  def logits_fn(x_BxCxD):
    jax.debug.callback(lambda: projected.append(1))
    return jnp.einsum("BLD,DV->BLV", x_BxCxD, w, preferred_element_type=jnp.float32)

  ce, _ = jax.jit(lambda x: losses.chunked_token_losses(logits_fn, x, targets, jnp.asarray(weights), 4))(x)
  jax.effects_barrier()
  assert len(projected) == 1
  ref_ce, _ = losses.cross_entropy_and_hit(logits_fn(x), targets)
  np.testing.assert_allclose(np.asarray(ce), np.where(weights > 0, ref_ce, 0.0), rtol=1e-5)

"""Masked token cross-entropy and accuracy: pure functions of (logits, targets, weights).

Shape letters: B batch rows, L length, V vocabulary, S segment slots per row.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from ift_jax import sharding


def token_cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """-log p(target) per position, in float32 (the log-sum-exp is taken in float32 whatever the logits' dtype)."""
  return cross_entropy_and_hit(logits_BxLxV, targets_BxL)[0]


def cross_entropy_and_hit(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(-log p(target), 1.0 where the target has the highest logit) per position, in float32.

  The hit reuses the log-sum-exp's max instead of a separate argmax pass over the vocabulary (a tie for the top
  logit counts as a hit, where argmax would pick the lower id).
  """
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  max_BxL = jax.lax.stop_gradient(jnp.max(logits_BxLxV, axis=-1))
  log_z_BxL = max_BxL + jnp.log(jnp.sum(jnp.exp(logits_BxLxV - max_BxL[..., None]), axis=-1))
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return log_z_BxL - target_logit_BxL, (target_logit_BxL >= max_BxL).astype(jnp.float32)


def weighted_sums(logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array) -> dict[str, jax.Array]:
  """Sums over weighted positions: `loss` (cross-entropy), `correct` (argmax hits) and `weight` (target count).

  Sums rather than means, so the caller divides once by the global target count: then micro-batching and any
  mesh give the same value as one big batch.
  """
  ce_BxL, correct_BxL = cross_entropy_and_hit(logits_BxLxV, targets_BxL)
  return {
      "loss": jnp.sum(ce_BxL * weights_BxL),
      "correct": jnp.sum(correct_BxL * weights_BxL),
      "weight": jnp.sum(weights_BxL),
  }


def per_segment_sums(logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array,
                     segment_ids_BxL: jax.Array, num_slots: int) -> dict[str, jax.Array]:
  """Per-example sums for packed rows: `loss`, `correct` and `weight`, each shaped (B, S).

  Slot s of row b holds the example with segment id s (slot 0 collects padding, which has weight 0). Reduced
  on device with a segment sum, so only B×S numbers per batch ever reach the host — never the logits.
  """
  ce_BxL, correct_BxL = cross_entropy_and_hit(logits_BxLxV, targets_BxL)
  return segment_sums(ce_BxL, correct_BxL, weights_BxL, segment_ids_BxL, num_slots)


def segment_sums(ce_BxL: jax.Array, correct_BxL: jax.Array, weights_BxL: jax.Array, segment_ids_BxL: jax.Array,
                 num_slots: int) -> dict[str, jax.Array]:
  """per_segment_sums of per-position cross-entropies and hits (from whole or chunked logits)."""
  b = ce_BxL.shape[0]
  slot_BxL = segment_ids_BxL + num_slots * jnp.arange(b)[:, None]
  def reduce(values_BxL):
    return jax.ops.segment_sum((values_BxL * weights_BxL).reshape(-1), slot_BxL.reshape(-1),
                               num_segments=b * num_slots).reshape(b, num_slots)
  return {"loss": reduce(ce_BxL), "correct": reduce(correct_BxL), "weight": reduce(jnp.ones_like(ce_BxL))}


def chunked_token_losses(logits_fn: Callable[[jax.Array], jax.Array], x_BxLxD: jax.Array, targets_BxL: jax.Array,
                         weights_BxL: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
  """Per-position (cross-entropy, hit) of logits_fn(x) at weighted positions (0 elsewhere), for evaluation.

  The same numbers as cross_entropy_and_hit of the whole logits wherever the weight is nonzero, but never more
  than B×chunk×V float32 logits exist at once (llama-1b at 8×2048: 8.4 GB whole), so evaluation fits wherever
  training does. As in `fused_head_sums`, each row's weighted positions are moved to its front and chunks
  without any are skipped: an SFT batch pays the vocabulary projection only for its completion tokens.
  Forward only.
  """
  b, l, _ = x_BxLxD.shape
  order_BxM, x_NxBxCxD, targets_NxBxC, weights_NxBxC = _weighted_first_chunks(x_BxLxD, targets_BxL, weights_BxL,
                                                                              chunk)

  def one_chunk(xs):
    x_BxCxD, targets_BxC, weights_BxC = xs
    weighted_BxC = weights_BxC != 0

    def compute():
      ce_BxC, hit_BxC = cross_entropy_and_hit(logits_fn(x_BxCxD), targets_BxC)
      return jnp.where(weighted_BxC, ce_BxC, 0.0), jnp.where(weighted_BxC, hit_BxC, 0.0)

    zeros = lambda: (jnp.zeros(targets_BxC.shape, jnp.float32),) * 2
    return jax.lax.cond(jnp.any(weighted_BxC), compute, zeros)

  ce_NxBxC, hit_NxBxC = jax.lax.map(one_chunk, (x_NxBxCxD, targets_NxBxC, weights_NxBxC))
  back_BxM = jnp.argsort(order_BxM, axis=1)  # the inverse permutation: each position's place in the sorted row
  unchunk = lambda a_NxBxC: jnp.take_along_axis(a_NxBxC.swapaxes(0, 1).reshape(b, -1), back_BxM, axis=1)[:, :l]
  return unchunk(ce_NxBxC), unchunk(hit_NxBxC)


def _weighted_first_chunks(x_BxLxD: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array, chunk: int
                           ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(order_BxM, x_NxBxCxD, targets_NxBxC, weights_NxBxC): each row's weighted positions moved to its front, in
  order (a stable per-row sort, so rows stay on their shards), the rows padded with unweighted positions to
  M = n·chunk and cut into n chunks; order_BxM is each row's permutation."""
  b, l, _ = x_BxLxD.shape
  pad = -l % chunk
  if pad:  # unweighted padding positions: their chunks are skipped
    x_BxLxD = jnp.pad(x_BxLxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxL, weights_BxL = (jnp.pad(a, ((0, 0), (0, pad))) for a in (targets_BxL, weights_BxL))
  order_BxM = jnp.argsort((weights_BxL == 0).astype(jnp.int32), axis=1, stable=True)
  x_BxMxD = jnp.take_along_axis(x_BxLxD, order_BxM[..., None], axis=1)
  targets_BxM, weights_BxM = (jnp.take_along_axis(a, order_BxM, axis=1) for a in (targets_BxL, weights_BxL))
  chunks = lambda a: a.reshape(b, -1, chunk, *a.shape[2:]).swapaxes(0, 1)  # (B, n·C, ...) -> (n, B, C, ...)
  return order_BxM, chunks(x_BxMxD), chunks(targets_BxM), chunks(weights_BxM)


def fused_head_sums(x_BxLxD: jax.Array, head_w: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array,
                    chunk: int, *, vocab_major: bool, softcap: float | None = None) -> dict[str, jax.Array]:
  """`weighted_sums` of the logits x·W (W = head_w, or head_wᵀ when `vocab_major`), fused with their gradients.

  A linear + cross-entropy that never holds more than B×chunk×V float32 logits, and skips work on positions
  that carry no loss:
  - each row's weighted positions are moved to its front (a stable per-row sort, so rows stay on their shards)
    and the rows are cut into `chunk`-position chunks; a chunk without any weighted position is skipped, so an
    SFT batch pays the vocabulary projection only for its completion tokens (plus the last chunk's remainder);
  - each chunk's logits are made once: the forward pass also writes the gradient of the loss sum with respect
    to x and W (softmax − one-hot, times the weights), so the backward pass only scales them by the incoming
    cotangent — no second vocabulary projection (as `jax.checkpoint` would make) and no saved logits.
  `softcap` applies Gemma's cap·tanh(z/cap) to the logits (and its derivative to the gradient).
  The sums are the same as `weighted_sums` of the whole logits, up to float summation order.
  """
  _, x_NxBxCxD, targets_NxBxC, weights_NxBxC = _weighted_first_chunks(x_BxLxD, targets_BxL, weights_BxL, chunk)
  loss, correct = _fused_loss_and_hits(x_NxBxCxD, head_w, targets_NxBxC, weights_NxBxC, vocab_major, softcap)
  return {"loss": loss, "correct": correct, "weight": jnp.sum(weights_BxL)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_loss_and_hits(x_NxBxCxD, head_w, targets_NxBxC, weights_NxBxC, vocab_major, softcap):
  return _fused_forward(x_NxBxCxD, head_w, targets_NxBxC, weights_NxBxC, vocab_major, softcap)[0]


def _fused_forward(x_NxBxCxD, head_w, targets_NxBxC, weights_NxBxC, vocab_major, softcap):
  """((loss sum, hit sum), (d loss/d x, d loss/d head_w)), one chunk at a time."""
  d = x_NxBxCxD.shape[-1]
  contract_w = 1 if vocab_major else 0  # the head's D axis

  def compute(dw, x_BxCxD, targets_BxC, weights_BxC):
    x_TxD, targets_T, weights_T = x_BxCxD.reshape(-1, d), targets_BxC.reshape(-1), weights_BxC.reshape(-1)
    logits_TxV = jax.lax.dot_general(x_TxD, head_w, (((1,), (contract_w,)), ((), ())),
                                     preferred_element_type=jnp.float32)
    if softcap is not None:
      logits_TxV = jnp.tanh(logits_TxV / softcap) * softcap
    max_T = jnp.max(logits_TxV, axis=-1)
    exp_TxV = jnp.exp(logits_TxV - max_T[:, None])
    sum_T = jnp.sum(exp_TxV, axis=-1)
    # The target's logit by comparison with a vocabulary iota: no gather, and vocabulary-sharded logits work.
    hit_TxV = jax.lax.broadcasted_iota(jnp.int32, logits_TxV.shape, 1) == targets_T[:, None]
    target_logit_T = jnp.sum(jnp.where(hit_TxV, logits_TxV, 0.0), axis=-1)
    loss = jnp.sum((max_T + jnp.log(sum_T) - target_logit_T) * weights_T)
    correct = jnp.sum((target_logit_T >= max_T).astype(jnp.float32) * weights_T)
    grad_TxV = (exp_TxV / sum_T[:, None] - hit_TxV.astype(jnp.float32)) * weights_T[:, None]
    if softcap is not None:
      grad_TxV = grad_TxV * (1.0 - jnp.square(logits_TxV / softcap))
    grad_TxV = grad_TxV.astype(head_w.dtype)
    dx_TxD = jax.lax.dot_general(grad_TxV, head_w, (((1,), (1 - contract_w,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    dims = (((0,), (0,)), ((), ()))  # sum over the chunk's tokens
    dw = dw + (jax.lax.dot_general(grad_TxV, x_TxD, dims, preferred_element_type=jnp.float32) if vocab_major
               else jax.lax.dot_general(x_TxD, grad_TxV, dims, preferred_element_type=jnp.float32))
    return dw, loss, correct, dx_TxD.reshape(x_BxCxD.shape)

  def skip(dw, x_BxCxD, targets_BxC, weights_BxC):
    zero = jnp.zeros((), jnp.float32)
    return dw, zero, zero, jnp.zeros(x_BxCxD.shape, jnp.float32)

  def body(carry, xs):
    dw, loss, correct = carry
    dw, chunk_loss, chunk_correct, dx_BxCxD = jax.lax.cond(jnp.any(xs[2] != 0), compute, skip, dw, *xs)
    return (dw, loss + chunk_loss, correct + chunk_correct), dx_BxCxD

  zero = jnp.zeros((), jnp.float32)
  # The float32 gradient accumulator is laid out like the head (vocabulary-sharded), not replicated.
  dw = sharding.constrain(jnp.zeros(head_w.shape, jnp.float32),
                          ("vocab", "embed") if vocab_major else ("embed", "vocab"))
  (dw, loss, correct), dx_NxBxCxD = jax.lax.scan(
      body, (dw, zero, zero), (x_NxBxCxD, targets_NxBxC, weights_NxBxC))
  return (loss, correct), (dx_NxBxCxD, dw)


def _fused_fwd(x_NxBxCxD, head_w, targets_NxBxC, weights_NxBxC, vocab_major, softcap):
  sums, grads = _fused_forward(x_NxBxCxD, head_w, targets_NxBxC, weights_NxBxC, vocab_major, softcap)
  # Float32 gradients wait for the cotangent; the zero-size arrays carry the dtypes to cast them back to.
  return sums, (grads, jnp.zeros((0,), x_NxBxCxD.dtype), jnp.zeros((0,), head_w.dtype))


def _fused_bwd(vocab_major, softcap, residuals, cotangents):
  (dx_NxBxCxD, dw), x_dtype, w_dtype = residuals
  g_loss = cotangents[0]  # the hit count is piecewise constant: no gradient
  return ((dx_NxBxCxD * g_loss).astype(x_dtype.dtype), (dw * g_loss).astype(w_dtype.dtype), None, None)


_fused_loss_and_hits.defvjp(_fused_fwd, _fused_bwd)

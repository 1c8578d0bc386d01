"""Masked token cross-entropy and accuracy: pure functions of (logits, targets, weights).

Shape letters: B batch rows, L length, V vocabulary, S segment slots per row.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def token_cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """-log p(target) per position, in float32 (the log-sum-exp is taken in float32 whatever the logits' dtype)."""
  return _cross_entropy_and_hit(logits_BxLxV, targets_BxL)[0]


def _cross_entropy_and_hit(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
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
  ce_BxL, correct_BxL = _cross_entropy_and_hit(logits_BxLxV, targets_BxL)
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
  b, l = targets_BxL.shape
  ce_BxL, correct_BxL = _cross_entropy_and_hit(logits_BxLxV, targets_BxL)
  slot_BxL = segment_ids_BxL + num_slots * jnp.arange(b)[:, None]
  def reduce(values_BxL):
    return jax.ops.segment_sum((values_BxL * weights_BxL).reshape(-1), slot_BxL.reshape(-1),
                               num_segments=b * num_slots).reshape(b, num_slots)
  return {"loss": reduce(ce_BxL), "correct": reduce(correct_BxL), "weight": reduce(jnp.ones_like(ce_BxL))}


def chunked_weighted_sums(head: Callable[[jax.Array], jax.Array], x_BxLxD: jax.Array, targets_BxL: jax.Array,
                          weights_BxL: jax.Array, chunk: int) -> dict[str, jax.Array]:
  """`weighted_sums` of head(x) computed `chunk` positions at a time: never the whole B×L×V logits at once.

  Each chunk's logits are made, reduced to three sums and dropped; under `jax.checkpoint` the backward pass
  makes them again chunk by chunk instead of keeping them, so the float32 logits held at any moment are
  B×chunk×V instead of B×L×V (for Llama-3's 128k vocabulary at 8×2048: 0.5 GB per 128 positions instead of 8 GB).
  """
  b, l, d = x_BxLxD.shape
  n = l // chunk
  x_NxBxCxD = x_BxLxD.reshape(b, n, chunk, d).swapaxes(0, 1)
  targets_NxBxC = targets_BxL.reshape(b, n, chunk).swapaxes(0, 1)
  weights_NxBxC = weights_BxL.reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one(x_BxCxD, targets_BxC, weights_BxC):
    return weighted_sums(head(x_BxCxD), targets_BxC, weights_BxC)

  def body(total, xs):
    sums = one(*xs)
    return jax.tree.map(jnp.add, total, sums), None

  zeros = {k: jnp.zeros((), jnp.float32) for k in ("loss", "correct", "weight")}
  total, _ = jax.lax.scan(body, zeros, (x_NxBxCxD, targets_NxBxC, weights_NxBxC))
  return total

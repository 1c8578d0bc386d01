"""Masked token cross-entropy and accuracy: pure functions of (logits, targets, weights).

Shape letters: B batch rows, L length, V vocabulary, S segment slots per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """-log p(target) per position, in float32 (the log-sum-exp is taken in float32 whatever the logits' dtype)."""
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return log_z_BxL - target_logit_BxL


def weighted_sums(logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array) -> dict[str, jax.Array]:
  """Sums over weighted positions: `loss` (cross-entropy), `correct` (argmax hits) and `weight` (target count).

  Sums rather than means, so the caller divides once by the global target count: then micro-batching and any
  mesh give the same value as one big batch.
  """
  ce_BxL = token_cross_entropy(logits_BxLxV, targets_BxL)
  correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32)
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
  ce_BxL = token_cross_entropy(logits_BxLxV, targets_BxL)
  correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32)
  slot_BxL = segment_ids_BxL + num_slots * jnp.arange(b)[:, None]
  def reduce(values_BxL):
    return jax.ops.segment_sum((values_BxL * weights_BxL).reshape(-1), slot_BxL.reshape(-1),
                               num_segments=b * num_slots).reshape(b, num_slots)
  return {"loss": reduce(ce_BxL), "correct": reduce(correct_BxL), "weight": reduce(jnp.ones_like(ce_BxL))}

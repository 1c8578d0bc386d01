"""The Optax chain: global-norm clipping, then AdamW on a warmup + cosine schedule."""

from __future__ import annotations

from typing import Any

import jax
import optax


def learning_rate_schedule(*, lr: float, warmup_steps: int, total_steps: int, end_lr_ratio: float
                           ) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `lr * end_lr_ratio` at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=lr * end_lr_ratio)


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: matrices and embeddings, not norm scales or biases.

  Decided by name, not by rank: layer-stacked norm scales are 2-D (layers × hidden) yet must not decay.
  """
  def keep(path, _):
    name = jax.tree_util.keystr(path)
    return "norm" not in name and "bias" not in name
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(*, lr: float, warmup_steps: int, total_steps: int, end_lr_ratio: float, weight_decay: float,
                   b1: float, b2: float, eps: float, clip_norm: float) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(lr=lr, warmup_steps=warmup_steps, total_steps=total_steps,
                                    end_lr_ratio=end_lr_ratio)
  return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask),
  )

"""Loops the eval step over a split and reduces per-example sums to metrics, overall and per template.

Only (B, S) per-example sums leave the device for each batch, so host memory stays flat however many examples
are evaluated. Metrics: `loss` (mean over target tokens), `token_accuracy` (argmax equals target, over target
tokens), `exact_match` (share of examples whose every target token is right, teacher-forced).
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ift_jax import sharding
from ift_jax.data import loader, tokenize


def to_global(mesh: Mesh, local: dict[str, np.ndarray], batch_sharding) -> dict[str, jax.Array]:
  """Builds global arrays from this process's rows (identical to device_put on one process)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}


def fetch(x: jax.Array) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate(eval_fn: Callable, params: Any, examples: Sequence[tokenize.Example], *, mesh: Mesh, seq_len: int,
             batch_size: int, packed: bool) -> dict[str, float]:
  """Metrics of `params` on `examples`: overall keys and "<source>/<template>/<metric>" keys."""
  totals: dict[str, np.ndarray] = collections.defaultdict(lambda: np.zeros(5))  # loss, correct, tokens, n, exact
  batch_sh = sharding.batch_sharding(mesh)
  share = slice(jax.process_index() * batch_size // jax.process_count(),
                (jax.process_index() + 1) * batch_size // jax.process_count())
  pending = None
  for eval_batch in loader.eval_batches(examples, seq_len=seq_len, batch_size=batch_size, packed=packed):
    local = {k: v[share] for k, v in eval_batch.arrays.items()}
    sums = eval_fn(params, to_global(mesh, local, batch_sh))
    if pending is not None:  # read the previous batch's sums while this one computes
      _accumulate(totals, examples, *pending)
    pending = (eval_batch.examples, sums)
  if pending is not None:
    _accumulate(totals, examples, *pending)
  return _metrics(totals)


def _accumulate(totals, examples, layout: list[list[int]], sums: dict[str, jax.Array]) -> None:
  loss, correct, weight = (fetch(sums[k]) for k in ("loss", "correct", "weight"))
  for row, example_ids in enumerate(layout):
    for slot, index in enumerate(example_ids, start=1):  # slot 0 is padding
      exact = float(correct[row, slot] == weight[row, slot])
      totals[examples[index].template] += (loss[row, slot], correct[row, slot], weight[row, slot], 1.0, exact)


def _metrics(totals: dict[str, np.ndarray]) -> dict[str, float]:
  out: dict[str, float] = {}
  overall = sum(totals.values(), np.zeros(5))
  for prefix, (loss, correct, tokens, n, exact) in [("", overall), *[(f"{t}/", v) for t, v in totals.items()]]:
    out[f"{prefix}loss"] = float(loss / max(tokens, 1.0))
    out[f"{prefix}token_accuracy"] = float(correct / max(tokens, 1.0))
    out[f"{prefix}exact_match"] = float(exact / max(n, 1.0))
    out[f"{prefix}examples"] = int(n)
  return out

"""Loops the eval step over a split and reduces per-example sums to metrics, overall and per template.

Only (B, S) per-example sums leave the device for each batch, so host memory stays flat however many examples
are evaluated. Each process accounts for its own rows and the per-template totals are summed over processes.
Metrics: `loss` (mean over target tokens), `token_accuracy` (argmax equals target, over target tokens),
`exact_match` (share of examples whose every target token is right, teacher-forced).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from ift_jax import distributed, sharding
from ift_jax.data import loader, tokenize

_FIELDS = ("loss", "correct", "tokens", "examples", "exact")


def to_global(local: dict[str, np.ndarray], batch_sharding) -> dict[str, jax.Array]:
  """Global arrays from this process's rows (identical to device_put when there is one process)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}


def evaluate(eval_fn: Callable, params: Any, shards: Mapping[int, Sequence[tokenize.Example]], *, mesh: Mesh,
             template_names: Sequence[str], seq_len: int, batch_size: int, packed: bool,
             on_batch: Callable[[], None] = lambda: None) -> dict[str, float]:
  """Metrics of `params` on the examples of every process: overall and "<source>/<template>/<metric>" keys.
  `on_batch` is called as each batch's results arrive (the training loop's watchdog counts it as progress)."""
  index = {name: i for i, name in enumerate(template_names)}
  totals = np.zeros((len(template_names), len(_FIELDS)))
  batch_sh = sharding.batch_sharding(mesh)
  rows = slice(jax.process_index() * batch_size // jax.process_count(),
               (jax.process_index() + 1) * batch_size // jax.process_count())
  pending = None
  for eval_batch in loader.eval_batches(shards, rows_per_batch=rows.stop - rows.start, seq_len=seq_len,
                                        packed=packed):
    sums = eval_fn(params, to_global(eval_batch.arrays, batch_sh))
    if pending is not None:  # read the previous batch's sums while this one computes
      _accumulate(totals, index, *pending)
      on_batch()
    pending = (eval_batch.examples, sums, rows)
  if pending is not None:
    _accumulate(totals, index, *pending)
  return _metrics(distributed.global_sum(totals), template_names)


def _accumulate(totals: np.ndarray, index: Mapping[str, int], layout: list[list[tokenize.Example]],
                sums: dict[str, jax.Array], rows: slice) -> None:
  # The sums are replicated (tiny), so every process reads the whole batch and keeps its own rows.
  loss, correct, weight = (np.asarray(jax.device_get(sums[k]))[rows] for k in ("loss", "correct", "weight"))
  for row, examples in enumerate(layout):
    for slot, example in enumerate(examples, start=1):  # slot 0 is padding
      exact = float(correct[row, slot] == weight[row, slot])
      totals[index[example.template]] += (loss[row, slot], correct[row, slot], weight[row, slot], 1.0, exact)


def _metrics(totals: np.ndarray, template_names: Sequence[str]) -> dict[str, float]:
  out: dict[str, float] = {}
  named = [("", totals.sum(axis=0))] + [(f"{t}/", v) for t, v in zip(template_names, totals) if v[3] > 0]
  for prefix, (loss, correct, tokens, n, exact) in named:
    out[f"{prefix}loss"] = float(loss / max(tokens, 1.0))
    out[f"{prefix}token_accuracy"] = float(correct / max(tokens, 1.0))
    out[f"{prefix}exact_match"] = float(exact / max(n, 1.0))
    out[f"{prefix}examples"] = int(n)
  return out

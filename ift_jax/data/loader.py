"""From sources and templates to batches: deterministic, resumable, and per process.

The training order is a pure function of (seed, epoch): each epoch shuffles the examples with its own seeded
permutation and packs them next-fit. A position is just {"epoch", "batch"}, so a checkpoint stores two integers
and a resumed run rebuilds exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from typing import Any, Iterator, Sequence

import numpy as np

from ift_jax.data import pack, sources, templates, tokenize
from ift_jax.errors import UserError

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Prepared:
  """Tokenized examples per split, and what was done to them, line by line, for the log."""

  splits: dict[str, list[tokenize.Example]]
  notes: list[str]


def prepare(tokenizer: Any, *, source_specs: Sequence[str], templates_spec: str, seq_len: int, chat: bool,
            seed: int, validation_fraction: float, test_fraction: float, skip_malformed: bool,
            max_train_examples: int, max_eval_examples: int) -> Prepared:
  """Loads every source, applies its templates, tokenizes each split and applies the configured caps."""
  all_templates = templates.load_templates(templates_spec)
  examples: dict[str, list[tokenize.Example]] = {s: [] for s in SPLITS}
  notes = []
  for spec in source_specs:
    src = sources.load_source(spec, seed=seed, validation_fraction=validation_fraction,
                              test_fraction=test_fraction, skip_malformed=skip_malformed)
    chosen = templates.templates_for(all_templates, src.name)
    sizes = ", ".join(f"{s} {len(src.splits[s])}" for s in SPLITS)
    notes.append(f"source {src.name}: {sizes} records; {src.skipped} skipped; templates {sorted(chosen)}")
    for split in SPLITS:
      stats = tokenize.TokenizeStats()
      examples[split] += tokenize.tokenize_split(tokenizer, chosen, src.splits[split], source=src.name,
                                                 seq_len=seq_len, chat=chat, stats=stats)
      notes.append(f"  {split}: {stats.summary()}")
  caps = {"train": max_train_examples, "validation": max_eval_examples, "test": max_eval_examples}
  for split in SPLITS:
    examples[split], note = _cap(examples[split], caps[split], per_template=split != "train", seed=seed)
    if note:
      notes.append(f"  {split}: {note}")
  if not examples["train"]:
    raise UserError(f"data.source={','.join(source_specs)!r}: no training examples after templating; check "
                    "data.source and data.templates")
  return Prepared(examples, notes)


def _cap(examples: list[tokenize.Example], cap: int, *, per_template: bool, seed: int
         ) -> tuple[list[tokenize.Example], str]:
  """Keeps a seeded random subset of at most `cap` examples (per template for eval splits), in a stable order."""
  if cap <= 0:
    return examples, ""
  order = np.random.default_rng(seed).permutation(len(examples))
  taken: collections.Counter = collections.Counter()
  keep = []
  for i in order:
    key = examples[i].template if per_template else ""
    if taken[key] < cap:
      taken[key] += 1
      keep.append(int(i))
  if len(keep) == len(examples):
    return examples, ""
  scope = "per template" if per_template else "in all"
  return ([examples[i] for i in sorted(keep)],
          f"using {len(keep)} of {len(examples)} examples (cap {cap} {scope})")


@dataclasses.dataclass(frozen=True)
class Position:
  """Where the training stream is: the next batch to yield."""

  epoch: int = 0
  batch: int = 0

  def to_json(self) -> dict[str, int]:
    return {"epoch": self.epoch, "batch": self.batch}


class TrainLoader:
  """Global batches shaped (A, B/A, L) from per-epoch shuffled, packed rows; this process's share only."""

  def __init__(self, examples: Sequence[tokenize.Example], *, seq_len: int, batch_size: int, grad_accum: int,
               packed: bool, seed: int, process_index: int = 0, process_count: int = 1):
    self._examples, self._seq_len, self._packed, self._seed = examples, seq_len, packed, seed
    self._batch_size, self._accum = batch_size, grad_accum
    self._process_index, self._process_count = process_index, process_count
    self._rows_cache: tuple[int, pack.Rows] | None = None

  def rows(self, epoch: int) -> pack.Rows:
    if self._rows_cache is None or self._rows_cache[0] != epoch:
      order = np.random.default_rng([self._seed, epoch]).permutation(len(self._examples))
      rows = pack.pack([self._examples[i] for i in order], seq_len=self._seq_len, packed=self._packed)
      self._rows_cache = (epoch, rows)
    return self._rows_cache[1]

  def batches_in_epoch(self, epoch: int) -> int:
    return math.ceil(len(self.rows(epoch)) / self._batch_size)

  def steps_for_epochs(self, epochs: int) -> int:
    return sum(self.batches_in_epoch(e) for e in range(epochs))

  def batch(self, position: Position) -> tuple[dict[str, np.ndarray], Position]:
    """This process's part of the batch at `position`, and the position after it."""
    rows = self.rows(position.epoch)
    begin = position.batch * self._batch_size
    global_batch = _slice_rows(rows, begin, begin + self._batch_size)
    per_process = self._batch_size // self._process_count
    lo = self._process_index * per_process
    local = {k: v[lo:lo + per_process] for k, v in global_batch.items()}
    local = {k: v.reshape(self._accum, -1, *v.shape[1:]) for k, v in local.items()}
    following = Position(position.epoch, position.batch + 1)
    if following.batch >= self.batches_in_epoch(position.epoch):
      following = Position(position.epoch + 1, 0)
    return local, following


def _slice_rows(rows: pack.Rows, begin: int, end: int) -> dict[str, np.ndarray]:
  """Rows [begin, end), padded with empty rows (weight 0, segment 0) when the epoch runs out."""
  out = {}
  for key in ("inputs", "targets", "weights", "segment_ids", "positions"):
    part = getattr(rows, key)[begin:end]
    missing = (end - begin) - len(part)
    if missing:
      part = np.concatenate([part, np.zeros((missing, part.shape[1]), part.dtype)])
    out[key] = part
  return out


@dataclasses.dataclass(frozen=True)
class EvalBatch:
  arrays: dict[str, np.ndarray]  # (B, L) each
  examples: list[list[int]]  # per row, the example index of segment 1, 2, ...


def eval_batches(examples: Sequence[tokenize.Example], *, seq_len: int, batch_size: int, packed: bool
                 ) -> Iterator[EvalBatch]:
  """Every example exactly once, in order, in fixed-shape batches (the last one padded with empty rows)."""
  rows = pack.pack(examples, seq_len=seq_len, packed=packed)
  for begin in range(0, len(rows), batch_size):
    layout = rows.layout[begin:begin + batch_size]
    yield EvalBatch(_slice_rows(rows, begin, begin + batch_size), [list(r) for r in layout])


def max_segments(examples: Sequence[tokenize.Example], *, seq_len: int, packed: bool) -> int:
  """The most examples any eval row holds; fixes the eval step's static per-row slot count."""
  if not examples:
    return 1
  rows = pack.pack(examples, seq_len=seq_len, packed=packed)
  return max(len(r) for r in rows.layout)

"""From sources and templates to batches: deterministic, resumable, and per process.

Examples are dealt into `num_shards` fixed shards by their index (record-major, templates in name order):
example i belongs to shard i % num_shards. Each process owns a contiguous block of shards and tokenizes only
those examples. Every epoch, each shard shuffles its examples with a permutation seeded by (seed, epoch, shard)
and packs them next-fit; global batch b is the concatenation, shard by shard, of each shard's rows
[b·r, (b+1)·r) with r = batch_size / num_shards. So the batches do not depend on the number of processes or
devices (only on num_shards), process p's rows are one contiguous block of every global batch, and a loader
position is just {"epoch", "batch"}.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ift_jax import distributed
from ift_jax.data import pack, sources, templates, tokenize
from ift_jax.errors import UserError

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class ShardPlan:
  """Which of the `num_shards` data shards this process owns: a contiguous block."""

  num_shards: int
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if self.num_shards % self.process_count:
      raise UserError(f"data.shards={self.num_shards} must be a multiple of the {self.process_count} processes")

  @property
  def mine(self) -> range:
    per = self.num_shards // self.process_count
    return range(self.process_index * per, (self.process_index + 1) * per)


@dataclasses.dataclass(frozen=True)
class Prepared:
  """This process's tokenized examples, per split and shard, and what was done to them (all processes)."""

  splits: dict[str, dict[int, list[tokenize.Example]]]
  notes: list[str]
  template_names: list[str]  # every "source/template", the same list on every process

  def examples(self, split: str) -> list[tokenize.Example]:
    return [e for shard in sorted(self.splits[split]) for e in self.splits[split][shard]]


def prepare(tokenizer: Any, *, source_specs: Sequence[str], templates_spec: str, seq_len: int, chat: bool,
            seed: int, validation_fraction: float, test_fraction: float, skip_malformed: bool,
            max_train_examples: int, max_eval_examples: int, plan: ShardPlan,
            holdout_templates: Sequence[str] = ()) -> Prepared:
  """Loads every source, applies its templates, tokenizes this process's shards of each split, with caps.

  `holdout_templates` ("source/template") are left out of the train split only: validation and test keep
  them, so evaluation shows whether the model learned the task or only the wording of its training prompts.
  """
  all_templates = templates.load_templates(templates_spec)
  caps = {"train": max_train_examples, "validation": max_eval_examples, "test": max_eval_examples}
  splits: dict[str, dict[int, list[tokenize.Example]]] = {s: {k: [] for k in plan.mine} for s in SPLITS}
  notes, names = [], []
  offsets = dict.fromkeys(SPLITS, 0)  # example indices continue across sources
  for spec in source_specs:
    src = sources.load_source(spec, seed=seed, validation_fraction=validation_fraction,
                              test_fraction=test_fraction, skip_malformed=skip_malformed)
    chosen = templates.templates_for(all_templates, src.name)
    names += [f"{src.name}/{t}" for t in sorted(chosen)]
    sizes = ", ".join(f"{s} {len(src.splits[s])}" for s in SPLITS)
    notes.append(f"source {src.name}: {sizes} records; {src.skipped} skipped; templates {sorted(chosen)}")
    held = {n for n in chosen if f"{src.name}/{n}" in holdout_templates}
    if held:
      notes.append(f"  held out of training: {', '.join(f'{src.name}/{n}' for n in sorted(held))}")
    for split in SPLITS:
      used = {n: t for n, t in chosen.items() if split != "train" or n not in held}
      stats, capped = _tokenize_shards(tokenizer, used, src, split, splits[split], offsets[split],
                                       cap=caps[split], seed=seed, plan=plan, seq_len=seq_len, chat=chat)
      offsets[split] += len(src.splits[split]) * len(used)
      notes.append(f"  {split}: {stats}{capped}")
  unknown = sorted(set(holdout_templates) - set(names))
  if unknown:
    raise UserError(f"data.holdout_templates: {unknown[0]!r} is not a template of the data; use "
                    f"source/template names from {', '.join(sorted(names))}")
  if not distributed.global_max(sum(len(v) for v in splits["train"].values())):
    raise UserError(f"data.source={','.join(source_specs)!r}: no training examples after templating; check "
                    "data.source and data.templates")
  return Prepared(splits, notes, sorted(names))


@dataclasses.dataclass(frozen=True)
class EvalSelection:
  """One source's evaluated (record, template) pairs of a split: the same pairs `prepare` keeps."""

  source: sources.Source
  templates: dict[str, templates.Template]
  pairs: list[tuple[int, str]]  # (record index in the split, template name), record-major


def select_eval(source_specs: Sequence[str], *, templates_spec: str, splits: Sequence[str], seed: int,
                validation_fraction: float, test_fraction: float, skip_malformed: bool,
                cap: int) -> dict[str, list[EvalSelection]]:
  """Per eval split, the (record, template) pairs `prepare` evaluates, per source; each source is read once.

  `ift-jax eval` scores generations on exactly the examples whose teacher-forced metrics training logged.
  """
  if "train" in splits:
    raise ValueError("select_eval picks validation or test pairs")
  all_templates = templates.load_templates(templates_spec)
  out: dict[str, list[EvalSelection]] = {split: [] for split in splits}
  offsets = dict.fromkeys(splits, 0)  # as in `prepare`: example indices continue across sources
  for spec in source_specs:
    src = sources.load_source(spec, seed=seed, validation_fraction=validation_fraction,
                              test_fraction=test_fraction, skip_malformed=skip_malformed)
    chosen = templates.templates_for(all_templates, src.name)
    names = sorted(chosen)
    for split in splits:
      records = src.splits[split]
      keep = _capped(len(records), len(names), cap, per_template=True, seed=seed + offsets[split])
      out[split].append(EvalSelection(src, chosen, [(i // len(names), names[i % len(names)]) for i in keep]))
      offsets[split] += len(records) * len(names)
  return out


def _tokenize_shards(tokenizer, chosen, src, split, shards, offset, *, cap, seed, plan, seq_len, chat):
  """Tokenizes the (record, template) pairs of `split` that fall in this process's shards and pass the cap."""
  records, names = src.splits[split], sorted(chosen)
  keep = _capped(len(records), len(names), cap, per_template=split != "train", seed=seed + offset)
  stats = tokenize.TokenizeStats()
  mine = [local for local in keep if (offset + local) % plan.num_shards in shards]
  pairs = [(chosen[names[local % len(names)]], records[local // len(names)], local // len(names)) for local in mine]
  examples = tokenize.tokenize_all(tokenizer, pairs, seq_len=seq_len, chat=chat, stats=stats, source=src.name)
  for local, example in zip(mine, examples):
    if example is not None:
      shards[(offset + local) % plan.num_shards].append(example)
  counts = distributed.global_sum(np.array([[c.examples, c.truncated, c.dropped] for c in (
      stats.counts.get(f"{src.name}/{n}", tokenize.TemplateCounts()) for n in names)] or np.zeros((0, 3))))
  summary = ", ".join(f"{src.name}/{n}: {e}/{t}/{d}" for n, (e, t, d) in zip(names, counts.astype(int)))
  total = counts.sum(axis=0).astype(int) if len(counts) else (0, 0, 0)
  capped = f"; cap {cap} {'per template' if split != 'train' else 'in all'} kept {len(keep)} of " \
           f"{len(records) * len(names)}" if len(keep) < len(records) * len(names) else ""
  return (f"{total[0]} examples ({total[1]} truncated, {total[2]} dropped); per template "
          f"examples/truncated/dropped: {summary or 'none'}"), capped


def _capped(num_records: int, num_templates: int, cap: int, *, per_template: bool, seed: int) -> list[int]:
  """Indices (record-major) of the (record, template) pairs kept: a seeded random subset of at most `cap`
  (per template for eval splits), in the original order; the same on every process."""
  total = num_records * num_templates
  if cap <= 0 or (cap >= num_records if per_template else cap >= total):
    return list(range(total))
  order = np.random.default_rng(seed).permutation(total)
  taken: collections.Counter = collections.Counter()
  keep = []
  for i in order:
    key = i % num_templates if per_template else 0
    if taken[key] < cap:
      taken[key] += 1
      keep.append(int(i))
  return sorted(keep)


@dataclasses.dataclass(frozen=True)
class Position:
  """Where the training stream is: the next batch to yield."""

  epoch: int = 0
  batch: int = 0

  def to_json(self) -> dict[str, int]:
    return {"epoch": self.epoch, "batch": self.batch}



class TrainLoader:
  """This process's part, shaped (A, B/(A·P), L), of each global batch; see the module docstring."""

  def __init__(self, shards: Mapping[int, Sequence[tokenize.Example]], *, num_shards: int, seq_len: int,
               batch_size: int, grad_accum: int, packed: bool, seed: int):
    if batch_size % num_shards:
      raise UserError(f"train.batch_size={batch_size} must be a multiple of data.shards={num_shards}")
    self._shards, self._num_shards, self._seq_len = shards, num_shards, seq_len
    self._rows_per_shard, self._accum, self._packed, self._seed = batch_size // num_shards, grad_accum, packed, seed
    self._cache: dict[int, tuple[dict[int, pack.Rows], int]] = {}

  def _epoch(self, epoch: int) -> tuple[dict[int, pack.Rows], int]:
    """Each owned shard's rows for `epoch`, and the epoch's batch count (the same on every process)."""
    if epoch not in self._cache:
      rows = {}
      for shard, examples in self._shards.items():
        order = np.random.default_rng([self._seed, epoch, shard]).permutation(len(examples))
        rows[shard] = pack.pack([examples[i] for i in order], seq_len=self._seq_len, packed=self._packed)
      longest = distributed.global_max(max((len(r) for r in rows.values()), default=0))
      self._cache = {epoch: (rows, math.ceil(longest / self._rows_per_shard))}  # keep one epoch in memory
    return self._cache[epoch]

  def batches_in_epoch(self, epoch: int) -> int:
    return self._epoch(epoch)[1]

  def steps_for_epochs(self, epochs: int) -> int:
    return sum(self.batches_in_epoch(e) for e in range(epochs))

  def batch(self, position: Position) -> tuple[dict[str, np.ndarray], Position]:
    """This process's part of the batch at `position`, and the position after it."""
    rows, count = self._epoch(position.epoch)
    begin = position.batch * self._rows_per_shard
    parts = [_slice_rows(rows[s], begin, begin + self._rows_per_shard) for s in sorted(rows)]
    local = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    local = {k: v.reshape(self._accum, -1, *v.shape[1:]) for k, v in local.items()}
    following = Position(position.epoch, position.batch + 1)
    if following.batch >= count:
      following = Position(position.epoch + 1, 0)
    return local, following


def _slice_rows(rows: pack.Rows, begin: int, end: int) -> dict[str, np.ndarray]:
  """Rows [begin, end), padded with empty rows (weight 0, segment 0) when the shard runs out."""
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
  arrays: dict[str, np.ndarray]  # this process's (B/P, L) rows
  examples: list[list[tokenize.Example]]  # per local row, the examples of segment 1, 2, ... (empty: padding)


def eval_batches(shards: Mapping[int, Sequence[tokenize.Example]], *, rows_per_batch: int, seq_len: int,
                 packed: bool) -> Iterator[EvalBatch]:
  """This process's `rows_per_batch` rows of every eval batch: each example exactly once; the same batch count
  on every process.

  The process's examples, from all its shards, are packed together tightly (pack.pack(tight=True)): order does
  not matter here, and fewer rows are fewer forward passes. Rows past the end are empty (weight 0).
  """
  examples = [e for s in sorted(shards) for e in shards[s]]
  rows = pack.pack(examples, seq_len=seq_len, packed=packed, tight=True)
  count = math.ceil(distributed.global_max(len(rows)) / rows_per_batch)
  for b in range(count):
    begin, end = b * rows_per_batch, (b + 1) * rows_per_batch
    layout = [[examples[i] for i in row] for row in _pad(rows.layout[begin:end], rows_per_batch)]
    yield EvalBatch(_slice_rows(rows, begin, end), layout)


def _pad(layout: list[list[int]], size: int) -> list[list[int]]:
  return layout + [[] for _ in range(size - len(layout))]


def max_segments(prepared: Prepared, *, splits: Sequence[str], seq_len: int, packed: bool) -> int:
  """The most examples any eval row holds (over all processes); fixes the eval step's static slot count."""
  most = 1
  for split in splits:
    if examples := prepared.examples(split):  # packed as eval_batches packs them
      most = max(most, max(len(r) for r in pack.pack(examples, seq_len=seq_len, packed=packed, tight=True).layout))
  return distributed.global_max(most)

"""Tests for ift_jax.data.pack: golden layouts, padding mode, and the every-token-once invariant."""

import numpy as np
import pytest

from ift_jax.data import loader
from ift_jax.data.pack import Rows, pack
from ift_jax.data.tokenize import Example
from ift_jax.errors import UserError


def _example(ids, weights, index=0):
  return Example(ids=np.asarray(ids, np.int32), weights=np.asarray(weights, np.float32), template="s/t",
                 record_index=index)


A = _example([2, 10, 11, 3], [0, 0, 1, 1])       # 3 slots
B = _example([2, 12, 3], [0, 1, 1])              # 2 slots
C = _example([2, 13, 14, 15, 16, 3], [0, 0, 0, 1, 1, 1])  # 5 slots


def test_packed_golden():
  rows = pack([A, B, C], seq_len=6, packed=True)
  # A (3) + B (2) fill 5 of 6 slots; C (5) does not fit the last slot and opens row 2.
  assert rows.layout == [[0, 1], [2]]
  np.testing.assert_array_equal(rows.inputs, [[2, 10, 11, 2, 12, 0], [2, 13, 14, 15, 16, 0]])
  np.testing.assert_array_equal(rows.targets, [[10, 11, 3, 12, 3, 0], [13, 14, 15, 16, 3, 0]])
  np.testing.assert_array_equal(rows.weights, [[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0]])
  np.testing.assert_array_equal(rows.segment_ids, [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(rows.positions, [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 0]])
  assert [a.dtype for a in (rows.inputs, rows.targets, rows.weights, rows.segment_ids, rows.positions)] == [
      np.int32, np.int32, np.float32, np.int32, np.int32]
  assert len(rows) == 2


def test_next_fit_does_not_look_back():
  # Next-fit keeps order: B would fit after A in row 1, but C already opened row 2.
  rows = pack([A, C, B], seq_len=6, packed=True)
  assert rows.layout == [[0], [1], [2]]
  rows = pack([A, B, B, A], seq_len=5, packed=True)
  assert rows.layout == [[0, 1], [2, 3]]
  np.testing.assert_array_equal(rows.segment_ids, [[1, 1, 1, 2, 2], [1, 1, 2, 2, 2]])


def test_padding_mode_golden():
  rows = pack([A, B], seq_len=4, packed=False)
  assert rows.layout == [[0], [1]]
  np.testing.assert_array_equal(rows.inputs, [[2, 10, 11, 0], [2, 12, 0, 0]])
  np.testing.assert_array_equal(rows.targets, [[10, 11, 3, 0], [12, 3, 0, 0]])
  np.testing.assert_array_equal(rows.weights, [[0, 1, 1, 0], [1, 1, 0, 0]])
  np.testing.assert_array_equal(rows.segment_ids, [[1, 1, 1, 0], [1, 1, 0, 0]])
  np.testing.assert_array_equal(rows.positions, [[0, 1, 2, 0], [0, 1, 0, 0]])


def test_empty_input():
  rows = pack([], seq_len=8, packed=True)
  assert rows.inputs.shape == (0, 8) and rows.layout == []


@pytest.mark.parametrize("ids", [[5], list(range(2, 12))])
def test_examples_that_do_not_fit_are_errors(ids):
  with pytest.raises(UserError, match=r"example 1 \(s/t, record 4\) has \d+ tokens; packing needs 2..9"):
    pack([A, _example(ids, [1] * len(ids), index=4)], seq_len=8, packed=True)


def _rebuild(rows: Rows, index: int) -> tuple[list[int], list[float]]:
  """An example's ids and target weights, read back from its row by segment id."""
  row = next(r for r, members in enumerate(rows.layout) if index in members)
  mask = rows.segment_ids[row] == rows.layout[row].index(index) + 1
  inputs, targets = rows.inputs[row][mask], rows.targets[row][mask]
  assert rows.positions[row][mask].tolist() == list(range(mask.sum()))
  return [int(inputs[0])] + targets.tolist(), rows.weights[row][mask].tolist()


def _random_examples(count: int, seq_len: int, seed: int) -> list[Example]:
  """`count` examples of 2 .. seq_len + 1 tokens with random weights."""
  rng = np.random.default_rng(seed)
  examples = []
  for i in range(count):
    n = int(rng.integers(2, seq_len + 2))
    examples.append(_example(rng.integers(1, 1000, n), (rng.random(n) > 0.5).astype(np.float32), index=i))
  return examples


@pytest.mark.parametrize("packed", [True, False])
def test_every_example_appears_exactly_once_and_rows_fit(packed):
  seq_len = 16
  examples = _random_examples(200, seq_len, seed=0)
  rows = pack(examples, seq_len=seq_len, packed=packed)
  assert sorted(i for members in rows.layout for i in members) == list(range(200))
  assert [i for members in rows.layout for i in members] == list(range(200))  # order kept
  assert rows.inputs.shape == (len(rows.layout), seq_len)
  for i, example in enumerate(examples):
    ids, weights = _rebuild(rows, i)
    assert ids == example.ids.tolist() and weights == example.weights[1:].tolist()
  used = (rows.segment_ids > 0).sum()
  assert used == sum(len(e.ids) - 1 for e in examples)  # nothing duplicated, nothing lost
  assert not rows.weights[rows.segment_ids == 0].any() and not rows.inputs[rows.segment_ids == 0].any()
  if packed:  # next-fit: no row could have taken the next row's first example
    for r in range(len(rows.layout) - 1):
      free = seq_len - (rows.segment_ids[r] > 0).sum()
      assert len(examples[rows.layout[r + 1][0]].ids) - 1 > free


def test_tight_packing_golden():
  # Best-fit decreasing: C (5) first, then A (3) into a new row (C's row has 1 free slot), B (2) into the row
  # with the least room that fits it (A's: 3 free). Next-fit in the given order needs 3 rows for [A, C, B].
  rows = pack([A, C, B], seq_len=6, packed=True, tight=True)
  assert rows.layout == [[1], [0, 2]]
  np.testing.assert_array_equal(rows.segment_ids, [[1, 1, 1, 1, 1, 0], [1, 1, 1, 2, 2, 0]])


def test_tight_packing_keeps_every_example_in_fewer_rows():
  seq_len = 32
  examples = _random_examples(300, seq_len, seed=1)
  tight, loose = (pack(examples, seq_len=seq_len, packed=True, tight=t) for t in (True, False))
  assert sorted(i for members in tight.layout for i in members) == list(range(300))
  assert all(members == sorted(members) for members in tight.layout)
  for i, example in enumerate(examples):
    ids, weights = _rebuild(tight, i)
    assert ids == example.ids.tolist() and weights == example.weights[1:].tolist()
  slots = sum(len(e.ids) - 1 for e in examples)
  assert (tight.segment_ids > 0).sum() == slots
  lower_bound = -(-slots // seq_len)
  assert len(tight) < len(loose) and len(tight) <= 11 * lower_bound // 9 + 1, (len(tight), len(loose), lower_bound)
  # Without packing, one example per row in order, as before.
  assert pack(examples, seq_len=seq_len, packed=False, tight=True).layout == [[i] for i in range(300)]


def test_eval_batches_hold_every_example_once_packed_tightly():
  """Evaluation pools a process's shards and packs them tightly; every batch has rows_per_batch rows (empty ones
  at the end), and each row's layout names the examples its segments hold."""
  rng = np.random.default_rng(2)
  lengths = {s: rng.integers(2, 18, int(rng.integers(3, 9))) for s in range(4)}
  shards = {s: [_example(rng.integers(1, 1000, n), np.ones(n), index=10 * s + i) for i, n in enumerate(ns)]
            for s, ns in lengths.items()}
  batches = list(loader.eval_batches(shards, rows_per_batch=3, seq_len=16, packed=True))
  every = sorted(e.record_index for ex in shards.values() for e in ex)
  seen = []
  for batch in batches:
    assert batch.arrays["inputs"].shape == (3, 16) and len(batch.examples) == 3
    for row, members in enumerate(batch.examples):
      assert batch.arrays["segment_ids"][row].max() == len(members)
      for segment, example in enumerate(members, start=1):
        mask = batch.arrays["segment_ids"][row] == segment
        assert batch.arrays["inputs"][row][mask].tolist() == example.ids[:-1].tolist()
        seen.append(example.record_index)
  assert sorted(seen) == every
  slots = sum(len(e.ids) - 1 for ex in shards.values() for e in ex)
  assert len(batches) == -(-len(pack([e for s in sorted(shards) for e in shards[s]], seq_len=16, packed=True,
                                     tight=True)) // 3)
  assert sum(len(m) > 0 for b in batches for m in b.examples) <= 11 * -(-slots // 16) // 9 + 1

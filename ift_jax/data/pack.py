"""Examples -> fixed-shape rows of length seq_len, packed several to a row or one per row.

An example of n tokens fills n - 1 slots: inputs ids[:-1], targets ids[1:], weights weights[1:] (the weight
of a token as a target). Packing is next-fit in the given order: an example goes into the current row if it
fits, else it opens a new row. Examples are never split across rows. With seq_len = 8 and examples
A = [2, 10, 11, 3] (weights [0, 0, 1, 1]) and B = [2, 12, 3] (weights [0, 1, 1]):

  inputs       [ 2, 10, 11,  2, 12,  0,  0,  0]
  targets      [10, 11,  3, 12,  3,  0,  0,  0]
  weights      [ 0,  1,  1,  1,  1,  0,  0,  0]
  segment_ids  [ 1,  1,  1,  2,  2,  0,  0,  0]   attention stays within a segment; 0 is padding
  positions    [ 0,  1,  2,  0,  1,  0,  0,  0]   restart per example, as if it were alone
  layout       [[0, 1]]                           example indices of segments 1, 2, ...

Evaluation, where order does not matter, packs tighter (`tight=True`): best-fit decreasing, the longest example
first, each into the fullest row it fits.

Shapes: R rows x L = seq_len slots.
"""

import bisect
import dataclasses
from collections.abc import Sequence

import numpy as np

from ift_jax.data.tokenize import Example
from ift_jax.errors import UserError

PAD_ID = 0  # padding slots carry weight 0 and segment 0, so the id only has to be a valid token


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no truth value for ==
class Rows:
  """Packed rows; every array is (R, seq_len).

  Attributes:
    inputs: int32 input token ids (PAD_ID on padding).
    targets: int32 next-token ids (PAD_ID on padding).
    weights: float32 loss weight per target (0 on prompt and padding).
    segment_ids: int32 1..k for the k examples in a row, 0 on padding.
    positions: int32 position of each input within its example (0 on padding).
    layout: per row, the indices (into the packed sequence) of its examples, in segment-id order.
  """
  inputs: np.ndarray
  targets: np.ndarray
  weights: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  layout: list[list[int]]

  def __len__(self) -> int:
    return len(self.layout)


def pack(examples: Sequence[Example], *, seq_len: int, packed: bool, tight: bool = False) -> Rows:
  """Lays examples out in rows of seq_len slots (next-fit if packed, else one example per row).

  With `tight` (and `packed`), best-fit decreasing instead: fewer rows, but the rows no longer follow the order
  of the examples — for evaluation, not for training's shuffled order.

  Raises:
    UserError: an example has fewer than 2 or more than seq_len + 1 tokens (tokenize with this seq_len).
  """
  sizes = [_slots(e, index=i, seq_len=seq_len) for i, e in enumerate(examples)]
  if not packed:
    layout = [[i] for i in range(len(examples))]
  else:
    layout = _best_fit_decreasing(sizes, seq_len=seq_len) if tight else _next_fit(sizes, seq_len=seq_len)
  return _fill(examples, layout, seq_len=seq_len)


def _slots(example: Example, *, index: int, seq_len: int) -> int:
  n = len(example.ids)
  if not 2 <= n <= seq_len + 1:
    raise UserError(f"example {index} ({example.template}, record {example.record_index}) has {n} tokens; "
                    f"packing needs 2..{seq_len + 1} (seq_len + 1): tokenize with the same seq_len")
  return n - 1


def _next_fit(sizes: Sequence[int], *, seq_len: int) -> list[list[int]]:
  """Next-fit bin packing: deterministic, one pass, keeps examples in order."""
  layout: list[list[int]] = []
  used = seq_len  # forces a new row for the first example
  for i, size in enumerate(sizes):
    if used + size > seq_len:
      layout.append([])
      used = 0
    layout[-1].append(i)
    used += size
  return layout


def _best_fit_decreasing(sizes: Sequence[int], *, seq_len: int) -> list[list[int]]:
  """Longest first, each into the row with the least room that still fits it (a new row if none does):
  deterministic, within 11/9 of the fewest rows possible plus one. Within a row, examples keep their order."""
  layout: list[list[int]] = []
  room: list[tuple[int, int]] = []  # (free slots, row), sorted: the best fit is the first with enough room
  for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
    at = bisect.bisect_left(room, (sizes[i], -1))
    if at == len(room):
      layout.append([])
      free, row = seq_len, len(layout) - 1
    else:
      free, row = room.pop(at)
    layout[row].append(i)
    if free > sizes[i]:
      bisect.insort(room, (free - sizes[i], row))
  return [sorted(members) for members in layout]


def _fill(examples: Sequence[Example], layout: list[list[int]], *, seq_len: int) -> Rows:
  shape = (len(layout), seq_len)
  inputs = np.full(shape, PAD_ID, np.int32)
  targets = np.full(shape, PAD_ID, np.int32)
  weights = np.zeros(shape, np.float32)
  segment_ids = np.zeros(shape, np.int32)
  positions = np.zeros(shape, np.int32)
  for row, members in enumerate(layout):
    start = 0
    for segment, index in enumerate(members, start=1):
      ids, w = examples[index].ids, examples[index].weights
      end = start + len(ids) - 1
      inputs[row, start:end] = ids[:-1]
      targets[row, start:end] = ids[1:]
      weights[row, start:end] = w[1:]
      segment_ids[row, start:end] = segment
      positions[row, start:end] = np.arange(end - start)
      start = end
  return Rows(inputs=inputs, targets=targets, weights=weights, segment_ids=segment_ids,
              positions=positions, layout=layout)

"""(prompt, completion) -> token ids and loss weights, cut to fit a sequence length.

An Example holds ids = prompt_ids + completion_ids + [eos] and weights 0 on the prompt, 1 on the completion
and EOS: the model learns only what it should produce. With a tokenizer that adds BOS (<s>=2) by default,
"Review: Fun.\\nSentiment:" -> [2, 40, 41, 42, 43] and " positive" -> [50], eos </s>=3:

  ids      = [2, 40, 41, 42, 43, 50, 3]
  weights  = [0,  0,  0,  0,  0,  1, 1]

A row of seq_len slots holds inputs ids[:-1] and targets ids[1:] (see pack.py), so an example may have at
most seq_len + 1 tokens. A longer one has the longest record field its prompt uses cut (keeping the head)
and the prompt re-rendered, so the instruction and the answer cue ("Sentiment:") survive; if that cannot
make it fit, or the completion alone does not fit, the example is dropped. Both are counted per template.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ift_jax.data.templates import Template
from ift_jax.errors import UserError

_BATCH = 1024  # records per tokenizer call: the per-call overhead amortized, the texts' memory bounded


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no truth value for ==
class Example:
  """One tokenized example.

  Attributes:
    ids: int32 (n,) token ids, prompt then completion then EOS.
    weights: float32 (n,) loss weight of each token as a target: 0 prompt, 1 completion and EOS.
    template: "source/template" that produced it.
    record_index: index of the record in its split.
  """
  ids: np.ndarray
  weights: np.ndarray
  template: str
  record_index: int


@dataclasses.dataclass
class TemplateCounts:
  """Per-template counters (mutable: tokenize() increments them as it goes)."""
  examples: int = 0
  truncated: int = 0
  dropped: int = 0


@dataclasses.dataclass
class TokenizeStats:
  """What tokenization did, per "source/template" (mutable accumulator passed to `tokenize`)."""
  counts: dict[str, TemplateCounts] = dataclasses.field(default_factory=dict)

  def add(self, template: str, *, examples: int = 0, truncated: int = 0, dropped: int = 0) -> None:
    c = self.counts.setdefault(template, TemplateCounts())
    c.examples += examples
    c.truncated += truncated
    c.dropped += dropped

  def total(self) -> TemplateCounts:
    return TemplateCounts(examples=sum(c.examples for c in self.counts.values()),
                          truncated=sum(c.truncated for c in self.counts.values()),
                          dropped=sum(c.dropped for c in self.counts.values()))

  def summary(self) -> str:
    """One line, e.g. "2960 examples (12 truncated, 1 dropped); imdb/sentiment: 2960/12/1"."""
    t = self.total()
    parts = [f"{name}: {c.examples}/{c.truncated}/{c.dropped}" for name, c in sorted(self.counts.items())]
    return (f"{t.examples} examples ({t.truncated} truncated, {t.dropped} dropped); "
            f"per template examples/truncated/dropped: {', '.join(parts) or 'none'}")


def tokenize(tokenizer: Any, template: Template, record: Mapping[str, Any], *, seq_len: int, chat: bool,
             stats: TokenizeStats, source: str = "", record_index: int = 0) -> Example | None:
  """Renders and tokenizes one record; None if it cannot fit in seq_len + 1 tokens (counted in stats).

  Args:
    tokenizer: a Hugging Face tokenizer (fast tokenizers cut fields at exact character offsets).
    template: renders the record to (prompt, completion).
    record: the record's fields.
    seq_len: row length; the example may have up to seq_len + 1 tokens.
    chat: wrap the prompt as one user turn with the tokenizer's chat template (generation prompt added).
    stats: per-template counts of examples, truncated and dropped.
    source: source name, for Example.template = "source/template".
    record_index: the record's index, kept in the Example and named in errors.

  Raises:
    UserError: the completion renders empty, the tokenizer has no EOS, or (chat) no chat template.
  """
  return tokenize_all(tokenizer, [(template, record, record_index)], seq_len=seq_len, chat=chat, stats=stats,
                      source=source)[0]


def tokenize_all(tokenizer: Any, pairs: Sequence[tuple[Template, Mapping[str, Any], int]], *, seq_len: int,
                 chat: bool, stats: TokenizeStats, source: str = "") -> list[Example | None]:
  """`tokenize` of each (template, record, record index), in order; each template's records go through the
  tokenizer in batches (`fit_all`)."""
  out: list[Example | None] = [None] * len(pairs)
  by_template: dict[int, list[int]] = {}
  for i, (template, _, _) in enumerate(pairs):
    by_template.setdefault(id(template), []).append(i)
  for positions in by_template.values():
    template = pairs[positions[0]][0]
    name = f"{source}/{template.name}" if source else template.name
    for start in range(0, len(positions), _BATCH):
      chunk = positions[start:start + _BATCH]
      fitted_all = fit_all(tokenizer, template, [pairs[i][1] for i in chunk], seq_len=seq_len, chat=chat,
                           name=name, record_indices=[pairs[i][2] for i in chunk])
      for i, fitted in zip(chunk, fitted_all):
        out[i] = _example(fitted, name, pairs[i][2], stats)
  return out


def _example(fitted: Fitted | None, name: str, record_index: int, stats: TokenizeStats) -> Example | None:
  if fitted is None:
    stats.add(name, dropped=1)
    return None
  stats.add(name, examples=1, truncated=int(fitted.truncated))
  ids = np.asarray(fitted.prompt_ids + fitted.completion_ids, dtype=np.int32)
  weights = np.concatenate([np.zeros(len(fitted.prompt_ids), np.float32),
                            np.ones(len(fitted.completion_ids), np.float32)])
  return Example(ids=ids, weights=weights, template=name, record_index=record_index)


@dataclasses.dataclass(frozen=True)
class Fitted:
  """A record rendered by a template and cut to fit, as text and as token ids.

  Attributes:
    prompt: the prompt text after any cut (before the chat template).
    completion: the completion text (never cut).
    prompt_ids: the prompt's ids (chat-wrapped when chat is on; the tokenizer's default special tokens).
    completion_ids: the completion's ids followed by EOS.
    truncated: whether a field of the prompt was cut.
  """
  prompt: str
  completion: str
  prompt_ids: list[int]
  completion_ids: list[int]
  truncated: bool


def fit(tokenizer: Any, template: Template, record: Mapping[str, Any], *, seq_len: int, chat: bool,
        name: str = "", record_index: int = 0) -> Fitted | None:
  """Renders a record and cuts its prompt so that prompt + completion + EOS fit seq_len + 1 tokens.

  Returns None when it cannot fit (see the module docstring). Training and `ift-jax eval` both use this, so
  an evaluated prompt is exactly the prompt the model was trained on.

  Raises:
    UserError: the completion renders empty, or the tokenizer has no EOS / (chat) no chat template.
  """
  return fit_all(tokenizer, template, [record], seq_len=seq_len, chat=chat, name=name,
                 record_indices=[record_index])[0]


def fit_all(tokenizer: Any, template: Template, records: Sequence[Mapping[str, Any]], *, seq_len: int, chat: bool,
            name: str = "", record_indices: Sequence[int] | None = None) -> list[Fitted | None]:
  """`fit` of each record. Prompts and completions go through the tokenizer in one call each (a batch encodes
  each text as if alone, and lets a fast tokenizer use several cores), and so do the prompts being cut at each
  step of `_truncate_all`."""
  indices = range(len(records)) if record_indices is None else record_indices
  rendered = [template.render(record) for record in records]
  for (_, completion), index in zip(rendered, indices):
    if not completion.strip():
      raise UserError(f"template {name or template.name} ({template.origin}) renders an empty completion for "
                      f"record {index}; fix the record or the template's completion")
  if not records:
    return []
  eos = _eos_id(tokenizer)
  all_completion_ids = [ids + [eos] for ids in _encode_all(tokenizer, [completion for _, completion in rendered])]
  all_prompt_ids = _prompt_ids_all(tokenizer, [prompt for prompt, _ in rendered], chat=chat)
  budgets = [seq_len + 1 - len(ids) for ids in all_completion_ids]  # tokens left for each prompt
  long = [i for i, (ids, budget) in enumerate(zip(all_prompt_ids, budgets)) if len(ids) > budget]
  cuts = dict(zip(long, _truncate_all(tokenizer, template, [records[i] for i in long],
                                      budgets=[budgets[i] for i in long],
                                      excesses=[len(all_prompt_ids[i]) - budgets[i] for i in long], chat=chat)))
  out: list[Fitted | None] = []
  for i, ((prompt, completion), prompt_ids) in enumerate(zip(rendered, all_prompt_ids)):
    if i in cuts and cuts[i] is None:
      out.append(None)
      continue
    prompt, prompt_ids = cuts.get(i, (prompt, prompt_ids))
    out.append(Fitted(prompt, completion, prompt_ids, all_completion_ids[i], i in cuts))
  return out


def tokenize_split(tokenizer: Any, templates: Mapping[str, Template], records: Sequence[Mapping[str, Any]],
                   *, source: str, seq_len: int, chat: bool, stats: TokenizeStats) -> list[Example]:
  """Applies every template to every record: for each record, templates in sorted name order.

  Record-major order keeps one record's examples together, so next-fit packing puts them in nearby rows
  and a split's examples interleave templates evenly.
  """
  pairs = [(templates[name], record, index) for index, record in enumerate(records) for name in sorted(templates)]
  return [e for e in tokenize_all(tokenizer, pairs, seq_len=seq_len, chat=chat, stats=stats, source=source)
          if e is not None]


def _encode_all(tokenizer: Any, texts: Sequence[str], *, special: bool = False) -> list[list[int]]:
  if not texts:  # transformers refuses an empty batch
    return []
  return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=special).input_ids]


def _eos_id(tokenizer: Any) -> int:
  if tokenizer.eos_token_id is None:
    raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos_token; set eos_token "
                    "in its tokenizer_config.json")
  return int(tokenizer.eos_token_id)


def _prompt_ids_all(tokenizer: Any, prompts: Sequence[str], *, chat: bool) -> list[list[int]]:
  """Default special tokens for plain prompts; none for chat, whose template writes them itself."""
  if not chat:
    return _encode_all(tokenizer, prompts, special=True)
  if not getattr(tokenizer, "chat_template", None):
    raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; set "
                    "data.chat=False or use a tokenizer with a chat_template")
  return _encode_all(tokenizer, [tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                               tokenize=False, add_generation_prompt=True)
                                 for prompt in prompts])


@dataclasses.dataclass
class _Cut:
  """One prompt being cut: the field, its text heads, how many of its tokens are kept, tokens still over."""
  field: str
  head: Callable[[int], str]
  keep: int
  excess: int


def _truncate_all(tokenizer: Any, template: Template, records: Sequence[Mapping[str, Any]], *,
                  budgets: Sequence[int], excesses: Sequence[int], chat: bool) -> list[tuple[str, list[int]] | None]:
  """For each record, cuts the prompt's longest string field (by tokens, keeping the head) until the prompt
  fits its budget (`excesses`: tokens over it).

  Re-renders and re-tokenizes after each cut, because tokens can merge across the cut and the prompt's
  own text can tokenize differently in context. Returns (prompt, prompt_ids), or None if the field would
  have to vanish: a review cut to nothing teaches nothing. Records are tokenized together at each step.
  """
  out: list[tuple[str, list[int]] | None] = [None] * len(records)
  fields = [sorted(f for f in template.prompt_fields if isinstance(r.get(f), str)) if b > 0 else []
            for r, b in zip(records, budgets)]
  heads = iter(_heads_all(tokenizer, [records[i][f] for i, names in enumerate(fields) for f in names]))
  cuts: dict[int, _Cut] = {}
  for i, names in enumerate(fields):
    if names:  # the longest field by tokens (ties: first by name), with its text heads
      field, (n_tokens, head) = max(((f, next(heads)) for f in names), key=lambda item: item[1][0])
      cuts[i] = _Cut(field, head, n_tokens, excesses[i])
  while cuts:
    for i, cut in list(cuts.items()):
      cut.keep -= cut.excess
      if cut.keep <= 0:
        del cuts[i]
    order = list(cuts)
    prompts = [template.render(records[i], overrides={cuts[i].field: cuts[i].head(cuts[i].keep)})[0]
               for i in order]
    for i, prompt, prompt_ids in zip(order, prompts, _prompt_ids_all(tokenizer, prompts, chat=chat)):
      cuts[i].excess = len(prompt_ids) - budgets[i]
      if cuts[i].excess <= 0:
        out[i] = (prompt, prompt_ids)
        del cuts[i]
  return out


def _heads_all(tokenizer: Any, texts: Sequence[str]) -> list[tuple[int, Callable[[int], str]]]:
  """For each text: (number of tokens, k -> the text of its first k tokens)."""
  if not texts:
    return []
  if getattr(tokenizer, "is_fast", False):
    # Fast tokenizers give character offsets: cut the original text exactly, no decode round trip.
    out = []
    for text, offsets in zip(texts, tokenizer(list(texts), add_special_tokens=False,
                                              return_offsets_mapping=True).offset_mapping):
      ends = np.maximum.accumulate([0] + [end for _, end in offsets])  # monotone despite odd offsets
      out.append((len(offsets), lambda k, text=text, ends=ends: text[:int(ends[k])]))
    return out
  return [(len(ids), lambda k, ids=ids: tokenizer.decode(ids[:k], skip_special_tokens=True))
          for ids in _encode_all(tokenizer, texts)]

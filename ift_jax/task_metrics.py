"""Task metrics of generated or ranked answers, accumulated as running sums (flat memory, mergeable).

Metric names are those a template declares (ift_jax.data.templates.METRICS):
  exact_match    normalize(generated) == normalize(reference); normalize lowercases, drops punctuation and
                 collapses whitespace, so " Positive." matches "positive".
  rank_accuracy  the highest log-likelihood answer choice is the reference.
  rouge          ROUGE-1/2/L F1 (rouge-score, Porter stemming), reported as rouge1, rouge2, rougeL.
  mae            mean |ranked choice - reference| with the choices read as numbers (ratings).
  confusion      counts[reference][ranked choice] over the template's answer_choices.
"""

from __future__ import annotations

import collections
import re
import unicodedata
from typing import Any, Iterable, Sequence

import numpy as np

_SPACES = re.compile(r"\s+")
_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def normalize(text: str) -> str:
  """Lowercase, Unicode punctuation removed, whitespace collapsed and stripped: " The END!\\n" -> "the end"."""
  text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text.lower())
  return _SPACES.sub(" ", text).strip()


def exact_match(generated: str, reference: str) -> bool:
  return normalize(generated) == normalize(reference)


class _Rouge:
  """One shared rouge-score scorer (building it loads the stemmer)."""

  scorer = None

  @classmethod
  def score(cls, reference: str, generated: str) -> dict[str, float]:
    if cls.scorer is None:
      from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top  # only free-text tasks need it
      cls.scorer = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=True)
    scores = cls.scorer.score(reference, generated)
    return {name: scores[name].fmeasure for name in _ROUGE_TYPES}


class Scores:
  """Running sums of one template's (or a merged group's) metrics.

  `add` takes one example; `merge` adds another Scores (another template of the same task, another process);
  `result` turns sums into means. Each metric keeps its own count, so a task that mixes classification and
  free-text templates averages each metric over the examples that have it.
  """

  def __init__(self, metrics: Sequence[str] = (), choices: Sequence[str] | None = None):
    self.metrics = tuple(metrics)
    self.choices = tuple(choices) if choices else None
    self.sums: collections.Counter = collections.Counter()
    self.counts: collections.Counter = collections.Counter()
    self.confusion = np.zeros((len(self.choices),) * 2, np.int64) if "confusion" in self.metrics else None

  def add(self, *, reference: str, generated: str | None = None, ranked: int | None = None,
          gold: int | None = None, shots: int = 0) -> None:
    """One example: its reference, the generated text and/or the ranked choice against the gold choice."""
    self._add("examples", 1.0)
    self._add("shots", float(shots))
    if generated is not None and "exact_match" in self.metrics:
      self._add("exact_match", float(exact_match(generated, reference)))
    if generated is not None and "rouge" in self.metrics:
      for name, value in _Rouge.score(reference, generated).items():
        self._add(name, value)
    if ranked is not None and gold is not None:
      if "rank_accuracy" in self.metrics:
        self._add("rank_accuracy", float(ranked == gold))
      if "mae" in self.metrics:
        self._add("mae", abs(float(self.choices[ranked]) - float(self.choices[gold])))
      if self.confusion is not None:
        self.confusion[gold, ranked] += 1

  def _add(self, name: str, value: float) -> None:
    self.sums[name] += value
    self.counts[name] += 1

  def merge(self, other: "Scores") -> "Scores":
    """A new Scores with both sums; confusion matrices are kept only where the choices agree."""
    merged = Scores(tuple(dict.fromkeys(self.metrics + other.metrics)), self.choices or other.choices)
    # Counter.update adds and keeps zero sums (Counter's + would drop them, losing a metric that is 0).
    merged.sums, merged.counts = collections.Counter(self.sums), collections.Counter(self.counts)
    merged.sums.update(other.sums)
    merged.counts.update(other.counts)
    same = self.choices == other.choices and self.confusion is not None and other.confusion is not None
    merged.confusion = self.confusion + other.confusion if same else None
    return merged

  def result(self) -> dict[str, Any]:
    """{"examples": n, "shots": mean shots, <metric>: mean, ..., "confusion": {"labels", "counts"}}."""
    out: dict[str, Any] = {"examples": int(self.sums["examples"])}
    for name in self.sums:
      if name != "examples":
        out[name] = self.sums[name] / max(self.counts[name], 1)
    if self.confusion is not None and self.confusion.sum():
      out["confusion"] = {"labels": [c.strip() for c in self.choices], "counts": self.confusion.tolist()}
    return out


def merge_all(scores: Iterable[Scores]) -> Scores:
  total = Scores()
  for s in scores:
    total = total.merge(s) if total.metrics or total.sums else s
  return total


def headline(result: dict[str, Any]) -> tuple[str, float] | None:
  """The metric that best says "does it do the task": rank accuracy, else exact match, else ROUGE-L."""
  for name in ("rank_accuracy", "exact_match", "rougeL"):
    if name in result:
      return name, result[name]
  return None

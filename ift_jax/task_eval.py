"""`ift-jax eval`: did fine-tuning help? Task metrics of the base model and the fine-tuned checkpoint(s).

    ift-jax eval --workdir=DIR [--checkpoint=latest[,best,STEP...]] [--k_shot=3] [--splits=validation,test]

For each eval split, on exactly the (record, template) pairs training evaluated (same caps, same cut prompts),
three kinds of model answer every template's prompt:
  base 0-shot     the pretrained weights, the prompt alone;
  base k-shot     the pretrained weights, k solved examples of the same template from the train split first
                  (whole examples are dropped to fit eval.max_prompt_tokens; the mean shot count is reported);
  fine-tuned      each requested checkpoint, the prompt alone.
Generation is greedy and stops at EOS or the template's stop strings (after any leading whitespace, which a base
model often emits before its answer). Rank classification scores each answer choice by its log-likelihood.
Everything runs in batches on the training mesh; only token ids and per-example scores come back to the host,
and metrics are running sums (ift_jax.task_metrics), so host memory does not grow with the number of examples. Every process computes the same results; process 0 writes DIR/eval/metrics.json,
report.md, predictions.jsonl and the PNG charts (ift_jax.report).

Shape letters: N prompts, C answer choices.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from ift_jax import checkpoint, distributed, report, sharding, task_metrics, train, watchdog
from ift_jax.data import loader, tokenize
from ift_jax.data.templates import Template
from ift_jax.errors import UserError
from ift_jax.generate import Generator, StopTokens, cut_at_stop
from ift_jax.model import load

_log = logging.getLogger(__name__)
_RANK_METRICS = ("rank_accuracy", "mae", "confusion")
_GENERATION_METRICS = ("exact_match", "rouge")
_POOL = 16  # train examples per template that few-shot prompts draw from


@dataclasses.dataclass(frozen=True)
class Options:
  """What `ift-jax eval` runs; defaults come from the run config's `eval` section."""

  checkpoints: tuple[str, ...] = ("latest",)
  splits: tuple[str, ...] = ("validation", "test")
  k_shot: int = 3
  max_prompt_tokens: int = 512  # few-shot prompts are cut to this many tokens by dropping whole examples
  max_new_tokens: int = 48  # for free-text templates; choice templates need only their longest choice
  compute_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class Item:
  """One evaluated (record, template) pair."""

  task: str  # source name
  key: str  # "source/template"
  template: Template
  record_index: int
  prompt: str  # zero-shot prompt text, cut exactly as in training
  prompt_ids: list[int]
  reference: str
  gold: int | None  # index of the reference among the answer choices (None: not a choice, or no choices)


@dataclasses.dataclass(frozen=True)
class Setting:
  name: str  # "base 0-shot", "base 3-shot", "fine-tuned step 60"
  model: str  # "base" or a checkpoint ("latest", "best", a step)
  shots: int


def options_from_config(c: Any, **overrides: Any) -> Options:
  """The run config's eval section (absent in configs saved before it existed), then explicit overrides."""
  section = dict(c.get("eval", {}) or {})
  known = {f.name for f in dataclasses.fields(Options)}
  values = {k: v for k, v in section.items() if k in known}
  values.update({k: v for k, v in overrides.items() if v is not None})
  values["compute_dtype"] = values.get("compute_dtype") or train.compute_dtype_name(c)  # "" = the training's
  for key in ("checkpoints", "splits"):
    if isinstance(values.get(key), str):
      values[key] = tuple(v.strip() for v in values[key].split(",") if v.strip())
  options = Options(**values)
  if options.compute_dtype not in train.DTYPES:
    raise UserError(f"eval.compute_dtype={options.compute_dtype!r}: use one of {', '.join(train.DTYPES)} or ''")
  bad = sorted(set(options.splits) - {"validation", "test"})
  if bad or not options.splits:
    raise UserError(f"--splits={','.join(options.splits)}: use validation and/or test")
  if options.k_shot < 0 or options.max_new_tokens < 1 or options.max_prompt_tokens < 8:
    raise UserError(f"eval options {options}: k_shot must be >= 0, max_new_tokens >= 1, max_prompt_tokens >= 8")
  return options


# ------------------------------------------------------------------------------------------------- items


def select(c: Any, splits: Sequence[str]) -> dict[str, list[loader.EvalSelection]]:
  """The evaluated (record, template) pairs of each split, per source; each source is read once."""
  return loader.select_eval(
      train.source_specs(c), templates_spec=c.data.templates, splits=splits, seed=c.seed,
      validation_fraction=c.data.validation_fraction, test_fraction=c.data.test_fraction,
      skip_malformed=c.data.skip_malformed, cap=c.data.max_eval_examples)


def build_items(c: Any, tokenizer: Any, split: str, selections: Sequence[loader.EvalSelection]
                ) -> tuple[list[Item], list[str]]:
  """The split's evaluated pairs as Items, and notes on what was left out (prompts that cannot fit, references
  that are not among the answer choices), with counts."""
  items, notes = [], []
  for sel in selections:
    dropped, not_a_choice = {}, {}
    for record_index, name in sel.pairs:
      key, template = f"{sel.source.name}/{name}", sel.templates[name]
      fitted = tokenize.fit(tokenizer, template, sel.source.splits[split][record_index], seq_len=c.data.seq_len,
                            chat=c.data.chat, name=key, record_index=record_index)
      if fitted is None:
        dropped[key] = dropped.get(key, 0) + 1
        continue
      gold = _gold(template, fitted.completion)
      if template.answer_choices and gold is None:
        not_a_choice[key] = not_a_choice.get(key, 0) + 1
      items.append(Item(sel.source.name, key, template, record_index, fitted.prompt, fitted.prompt_ids,
                        fitted.completion, gold))
    notes += [f"{split} {k}: {n} examples do not fit data.seq_len, left out (as in training)"
              for k, n in dropped.items()]
    notes += [f"{split} {k}: {n} references are not among the answer_choices; rank metrics skip them"
              for k, n in not_a_choice.items()]
  return items, notes


def _gold(template: Template, completion: str) -> int | None:
  if not template.answer_choices:
    return None
  stripped = [c.strip() for c in template.answer_choices]
  return stripped.index(completion.strip()) if completion.strip() in stripped else None


class FewShot:
  """k-shot prompts: solved examples of the same template from the train split, then the item's prompt.

  Plain text: "{prompt_1}{completion_1}\\n\\n...{prompt_k}{completion_k}\\n\\n{prompt}". With data.chat, the
  examples become user/assistant turns of one conversation. Exemplars come from a seeded pool of _POOL train
  records per template, in a per-item seeded order; an exemplar that would push the prompt past
  `max_prompt_tokens` is skipped, so an item may get fewer than k (the mean is reported as "shots").
  """

  def __init__(self, tokenizer: Any, selections: Sequence[loader.EvalSelection], *, k: int, chat: bool,
               seq_len: int, max_prompt_tokens: int, seed: int):
    self.tokenizer, self.k, self.chat, self.seq_len = tokenizer, k, chat, seq_len
    self.budget, self.seed = max_prompt_tokens, seed
    self._selections = {sel.source.name: sel for sel in selections}
    self._pools: dict[str, list[tokenize.Fitted]] = {}

  def _pool(self, item: Item) -> list[tokenize.Fitted]:
    if item.key not in self._pools:
      sel = self._selections[item.task]
      records = sel.source.splits["train"]
      order = np.random.default_rng([self.seed, len(item.key), *item.key.encode()]).permutation(len(records))
      pool = []
      for i in order[:4 * _POOL]:
        fitted = tokenize.fit(self.tokenizer, item.template, records[i], seq_len=self.seq_len, chat=self.chat)
        if fitted is not None:
          pool.append(fitted)
        if len(pool) == _POOL:
          break
      self._pools[item.key] = pool
    return self._pools[item.key]

  def prompt_ids(self, item: Item) -> tuple[list[int], int]:
    """(ids, number of examples used)."""
    pool = self._pool(item)
    chosen: list[tokenize.Fitted] = []
    for i in np.random.default_rng([self.seed, item.record_index, len(item.key)]).permutation(len(pool)):
      if len(chosen) == self.k:
        break
      if len(self._ids(chosen + [pool[i]], item)) <= self.budget:
        chosen.append(pool[i])
    return self._ids(chosen, item), len(chosen)

  def _ids(self, shots: Sequence[tokenize.Fitted], item: Item) -> list[int]:
    if not shots:
      return item.prompt_ids
    if self.chat:
      turns = [t for s in shots for t in ({"role": "user", "content": s.prompt},
                                           {"role": "assistant", "content": s.completion.strip()})]
      text = self.tokenizer.apply_chat_template(turns + [{"role": "user", "content": item.prompt}],
                                                tokenize=False, add_generation_prompt=True)
      return list(self.tokenizer(text, add_special_tokens=False).input_ids)
    text = "".join(f"{s.prompt}{s.completion}\n\n" for s in shots) + item.prompt
    return list(self.tokenizer(text).input_ids)


# ------------------------------------------------------------------------------------------------- scoring


class Scorer:
  """Generation and rank classification of Items with one model at a time, on the training mesh.

  Two generators share their compiled functions across models and settings: a short one for templates with
  answer choices and a long one (max_new_tokens) for free text. Compiles: one per prompt-length bucket each.
  """

  def __init__(self, pretrained: load.Pretrained, tokenizer: Any, mesh: Any, items: Sequence[Item], *,
               batch_size: int, options: Options):
    self.tokenizer = tokenizer
    eos = sorted({i for i in (pretrained.cfg.eos_token_id, tokenizer.eos_token_id) if i is not None})
    graphdef, _, _ = load.abstract_model(pretrained.cfg)
    templates = {it.key: it.template for it in items if it.template.answer_choices}  # tokenize choices once each
    self.choice_ids = {key: [list(tokenizer(ch, add_special_tokens=False).input_ids) for ch in t.answer_choices]
                       for key, t in templates.items()}
    short = max((len(ids) for choices in self.choice_ids.values() for ids in choices), default=1) + 2
    make = lambda new: Generator(graphdef, None, pretrained.cfg, mesh, eos_ids=eos,
                                 pad_id=tokenizer.pad_token_id or 0, batch_size=batch_size, max_new_tokens=new,
                                 compute_dtype=train.DTYPES[options.compute_dtype])
    self.short, self.long = make(short), make(options.max_new_tokens)
    # Generations end on the device at their template's stop strings (see StopTokens), not only at EOS.
    stop_sets = sorted({it.template.stop for it in items if _needs(it, _GENERATION_METRICS) and it.template.stop})
    self.stop_set = {stops: i for i, stops in enumerate(stop_sets)}
    self.stops = StopTokens.build(tokenizer, stop_sets, pretrained.cfg.vocab_size) if stop_sets else None

  def run(self, params: Any, items: Sequence[Item], prompts: Sequence[list[int]]
          ) -> tuple[dict[int, str], dict[int, int]]:
    """({item index: generated text}, {item index: ranked choice}) for the items whose metrics need them."""
    self.short.params = self.long.params = params
    generated: dict[int, str] = {}
    ranked: dict[int, int] = {}
    # Templates with answer choices: short generations. Choices that differ only in their last token are
    # ranked by the same prefill (plus one cached step over their shared start, if any).
    width = max((len(self.choice_ids[it.key]) for it in items if self._ranked_by_prefill(it)), default=0)
    chosen = self._ordered(items, prompts, lambda it: bool(it.template.answer_choices) and (
        _needs(it, _GENERATION_METRICS) or self._ranked_by_prefill(it)))
    scoring = [self._choice_scoring(items[i], width) for i in chosen]
    ids, scores_NxC = self.short.generate([prompts[i] for i in chosen], candidates=[c for c, _ in scoring],
                                          prefixes=[prefix for _, prefix in scoring], **self._stops(items, chosen))
    self._keep_text(items, chosen, ids, generated)
    for i, row in zip(chosen, scores_NxC):
      if self._ranked_by_prefill(items[i]):
        ranked[i] = int(np.argmax(row[:len(self.choice_ids[items[i].key])]))
    # Free-text templates: long generations.
    chosen = self._ordered(items, prompts, lambda it: not it.template.answer_choices and _needs(
        it, _GENERATION_METRICS))
    ids, _ = self.long.generate([prompts[i] for i in chosen], **self._stops(items, chosen))
    self._keep_text(items, chosen, ids, generated)
    ranked.update(self._rank(items, prompts, done=ranked))
    return generated, ranked

  def _stops(self, items: Sequence[Item], chosen: Sequence[int]) -> dict[str, Any]:
    """Generator.generate's stop arguments: each chosen item's template stop strings, if it is generated for."""
    if self.stops is None:
      return {}
    sets = [self.stop_set.get(items[i].template.stop, -1) if _needs(items[i], _GENERATION_METRICS) else -1
            for i in chosen]
    return {"stops": self.stops, "stop_sets": sets}

  @staticmethod
  def _ordered(items: Sequence[Item], prompts: Sequence[list[int]], wanted) -> list[int]:
    """Indices of the wanted items, shortest prompt first: similar lengths share a bucket (less padding)."""
    return sorted((i for i, it in enumerate(items) if wanted(it)), key=lambda i: len(prompts[i]))

  def _keep_text(self, items: Sequence[Item], chosen: Sequence[int], ids: Sequence[list[int]],
                 generated: dict[int, str]) -> None:
    for i, text in zip(chosen, self.tokenizer.batch_decode(ids, skip_special_tokens=True)):
      if _needs(items[i], _GENERATION_METRICS):
        # Leading blank lines are not an answer's end (cut_at_stop skips them) nor part of it.
        generated[i] = cut_at_stop(text, items[i].template.stop).lstrip()

  def _ranked_by_prefill(self, item: Item) -> bool:
    """Ranked by generation's prefill: needs a rank, and its choices differ only in their last token."""
    if item.gold is None or not _needs(item, _RANK_METRICS):
      return False
    choices = self.choice_ids[item.key]
    shared = len(_common_prefix(choices))
    return all(len(c) == shared + 1 for c in choices)

  def _choice_scoring(self, item: Item, width: int) -> tuple[list[int], list[int]]:
    """(the choices' last tokens padded to width, their shared start) for an item ranked by the prefill."""
    if not self._ranked_by_prefill(item):
      return [0] * width, []
    choices = self.choice_ids[item.key]
    return ([c[-1] for c in choices] + [0] * width)[:width], _common_prefix(choices)

  def _rank(self, items: Sequence[Item], prompts: Sequence[list[int]], done: dict[int, int]) -> dict[int, int]:
    """Ranks the items the generation prefill did not: choices that differ in more than their last token,
    by one forward pass per (prompt, choice)."""
    ranked = {}
    by_template: dict[str, list[int]] = {}
    for i, it in enumerate(items):
      if i not in done and it.gold is not None and _needs(it, _RANK_METRICS):
        by_template.setdefault(it.key, []).append(i)
    for key, indices in by_template.items():
      choices = self.choice_ids[key]
      indices = sorted(indices, key=lambda i: len(prompts[i]))
      flat = self.short.continuation_logprobs([prompts[i] for i in indices for _ in choices],
                                              [c for _ in indices for c in choices])
      ranked.update({i: int(np.argmax(row)) for i, row in zip(indices, flat.reshape(len(indices), len(choices)))})
    return ranked


def _needs(item: Item, metrics: Sequence[str]) -> bool:
  return any(m in item.template.task_metrics for m in metrics)


def _common_prefix(sequences: Sequence[Sequence[int]]) -> list[int]:
  prefix = []
  for column in zip(*sequences):
    if len(set(column)) > 1:
      break
    prefix.append(column[0])
  return prefix


# ------------------------------------------------------------------------------------------------- the run


def settings(options: Options) -> list[Setting]:
  out = [Setting("base 0-shot", "base", 0)]
  if options.k_shot:
    out.append(Setting(f"base {options.k_shot}-shot", "base", options.k_shot))
  return out + [Setting(f"fine-tuned {which}", which, 0) for which in options.checkpoints]


def evaluate_tasks(workdir: str | pathlib.Path, *, hang_timeout_s: float = 0, **overrides: Any) -> dict[str, Any]:
  """Runs every setting on every requested split; writes DIR/eval/ (process 0); returns metrics.json's dict.

  `overrides` replace fields of the run config's eval section (Options), e.g. checkpoints="latest,best". With
  `hang_timeout_s` > 0, an evaluation with no batch done for that long ends (see `watchdog`).
  """
  with watchdog.Watchdog(hang_timeout_s, where=distributed.this_process()) as dog:
    return _evaluate_tasks(pathlib.Path(workdir), dog, **overrides)


def _evaluate_tasks(workdir: pathlib.Path, dog: watchdog.Watchdog, **overrides: Any) -> dict[str, Any]:
  from ml_collections import config_dict
  dog.beat("preparing the evaluation")
  reader = checkpoint.Checkpointer.open_read_only(workdir)
  c = config_dict.ConfigDict(reader.restore_config(step=_first(overrides.get("checkpoints") or "latest")))
  options = options_from_config(c, **overrides)
  mesh = sharding.make_mesh(data=c.mesh.data, fsdp=c.mesh.fsdp, tensor=c.mesh.tensor)
  pretrained = load.open_pretrained(c.model.path)
  tokenizer = pretrained.load_tokenizer()
  heldout = train.holdout_templates(c)
  selections = select(c, options.splits)
  # Exemplars come from the train split, the same for every eval split: one pool per template for all.
  few_shot = FewShot(tokenizer, next(iter(selections.values())), k=options.k_shot, chat=c.data.chat,
                     seq_len=c.data.seq_len, max_prompt_tokens=options.max_prompt_tokens, seed=c.seed)
  splits = {split: build_items(c, tokenizer, split, selections[split]) for split in options.splits}
  all_items = [it for items, _ in splits.values() for it in items]
  scorer = Scorer(pretrained, tokenizer, mesh, all_items, batch_size=c.train.eval_batch_size, options=options)
  out_dir = workdir / "eval"
  writer = _Writer(out_dir)
  results: dict[str, dict[str, dict[str, Any]]] = {split: {} for split in splits}
  steps: dict[str, int] = {}
  try:
    for model, model_settings in _by_model(settings(options)):
      dog.beat(f"loading the {model} weights")
      params, steps[model] = _params(model, reader, pretrained, mesh)
      for split, (items, _) in splits.items():
        for setting in model_settings:
          doing = f"evaluating {setting.name} on the {split} split"
          dog.beat(doing)
          scorer.short.on_batch = scorer.long.on_batch = lambda doing=doing: dog.beat(doing)
          t0 = time.perf_counter()
          prompts, shots = _prompts(items, few_shot, setting.shots)
          generated, ranked = scorer.run(params, items, prompts)
          results[split][setting.name] = _score(items, generated, ranked, shots, writer, split, setting)
          _log.info("eval %s, %s: %d examples in %.0f s", split, setting.name, len(items),
                    time.perf_counter() - t0)
      del params
  finally:
    writer.close()
    reader.close()
  metrics = {
      "workdir": str(workdir), "model": c.model.path, "k_shot": options.k_shot,
      "settings": [s.name for s in settings(options)], "checkpoint_steps": steps, "heldout_templates": heldout,
      "notes": [n for _, notes in splits.values() for n in notes],
      "splits": {split: _tables(by_setting) for split, by_setting in results.items()},
  }
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    report.write_report(out_dir, metrics, workdir / "metrics.jsonl")
  return metrics


def _first(checkpoints: Sequence[str] | str) -> str:
  """The first of the requested checkpoints: its saved config describes the run."""
  return checkpoints.split(",")[0].strip() if isinstance(checkpoints, str) else checkpoints[0]


def _by_model(all_settings: Sequence[Setting]) -> Iterator[tuple[str, list[Setting]]]:
  """Settings grouped by model, so each model's weights are loaded once."""
  models = list(dict.fromkeys(s.model for s in all_settings))
  for model in models:
    yield model, [s for s in all_settings if s.model == model]


def _params(model: str, reader: checkpoint.Checkpointer, pretrained: load.Pretrained, mesh: Any
            ) -> tuple[Any, int]:
  if model == "base":
    return load.load_params(pretrained, mesh), 0
  params, step = reader.restore_params(load.sharded_abstract_params(pretrained.cfg, mesh), step=model)
  return params, int(step)


def _prompts(items: Sequence[Item], few_shot: FewShot, shots: int) -> tuple[list[list[int]], list[int]]:
  if not shots:
    return [it.prompt_ids for it in items], [0] * len(items)
  pairs = [few_shot.prompt_ids(it) for it in items]
  return [p for p, _ in pairs], [n for _, n in pairs]


def _score(items: Sequence[Item], generated: dict[int, str], ranked: dict[int, int], shots: Sequence[int],
           writer: "_Writer", split: str, setting: Setting) -> dict[str, task_metrics.Scores]:
  scores: dict[str, task_metrics.Scores] = {}
  for i, it in enumerate(items):
    s = scores.setdefault(it.key, task_metrics.Scores(it.template.task_metrics, it.template.answer_choices))
    s.add(reference=it.reference, generated=generated.get(i), ranked=ranked.get(i), gold=it.gold, shots=shots[i])
    choice = it.template.answer_choices[ranked[i]] if i in ranked else None
    writer.write({"split": split, "setting": setting.name, "template": it.key, "record": it.record_index,
                  "shots": shots[i], "reference": it.reference, "generated": generated.get(i), "ranked": choice})
  return scores


def _tables(by_setting: dict[str, dict[str, task_metrics.Scores]]) -> dict[str, Any]:
  """{"templates": {key: {setting: result}}, "tasks": {source: {setting: result}}}."""
  templates: dict[str, dict[str, Any]] = {}
  tasks: dict[str, dict[str, Any]] = {}
  for setting, scores in by_setting.items():
    by_task: dict[str, list[task_metrics.Scores]] = {}
    for key, s in sorted(scores.items()):
      templates.setdefault(key, {})[setting] = s.result()
      by_task.setdefault(key.split("/")[0], []).append(s)
    for task, group in by_task.items():
      tasks.setdefault(task, {})[setting] = task_metrics.merge_all(group).result()
  return {"templates": templates, "tasks": tasks}


class _Writer:
  """predictions.jsonl, one line per example and setting, streamed (process 0)."""

  def __init__(self, out_dir: pathlib.Path):
    self._file = None
    if jax.process_index() == 0:
      out_dir.mkdir(parents=True, exist_ok=True)
      self._file = open(out_dir / "predictions.jsonl", "w", encoding="utf-8")

  def write(self, row: dict[str, Any]) -> None:
    if self._file is not None:
      self._file.write(json.dumps(row) + "\n")

  def close(self) -> None:
    if self._file is not None:
      self._file.close()

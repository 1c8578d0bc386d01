"""Task evaluation: metrics against hand-computed values, rank scores against transformers, few-shot prompts,
the evaluated examples are training's own, and host memory stays flat however many examples are scored."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from ift_jax import generate, sharding, task_eval, task_metrics, train
from ift_jax.data import templates
from ift_jax.model import load
from tests import fixtures, hf_models
from tests.test_run_config import _config


def test_normalize_and_exact_match():
  assert task_metrics.normalize("  The END!\n") == "the end"
  assert task_metrics.exact_match(" Positive.", "positive")
  assert task_metrics.exact_match("4", " 4") and not task_metrics.exact_match("4 stars", " 4")
  assert task_metrics.normalize("l'été, déjà…") == "l été déjà"


def test_rouge_and_rating_metrics_by_hand():
  s = task_metrics.Scores(("rouge",))
  s.add(reference="the cat sat on the mat", generated="the cat sat")
  r = s.result()
  # unigrams: precision 3/3, recall 3/6; bigrams: 2/2 and 2/5; longest common subsequence 3.
  assert r["rouge1"] == pytest.approx(2 / 3) and r["rouge2"] == pytest.approx(4 / 7)
  assert r["rougeL"] == pytest.approx(2 / 3)

  choices = (" 1", " 2", " 3", " 4", " 5")
  rating = task_metrics.Scores(("exact_match", "rank_accuracy", "mae", "confusion"), choices)
  for gold, ranked, generated in ((4, 4, "5"), (0, 2, "1"), (1, 1, "two")):
    rating.add(reference=choices[gold], generated=generated, ranked=ranked, gold=gold)
  r = rating.result()
  assert r["examples"] == 3 and r["exact_match"] == pytest.approx(2 / 3)
  assert r["rank_accuracy"] == pytest.approx(2 / 3) and r["mae"] == pytest.approx(2 / 3)
  assert np.array(r["confusion"]["counts"]).sum() == 3 and r["confusion"]["counts"][0][2] == 1
  assert r["confusion"]["labels"] == ["1", "2", "3", "4", "5"]


def test_merged_scores_keep_metrics_that_are_zero():
  a = task_metrics.Scores(("exact_match",))
  a.add(reference="yes", generated="no")
  b = task_metrics.Scores(("exact_match", "rank_accuracy"), (" no", " yes"))
  b.add(reference=" yes", generated="maybe", ranked=0, gold=1)
  merged = task_metrics.merge_all([a, b]).result()
  assert merged == {"examples": 2, "shots": 0.0, "exact_match": 0.0, "rank_accuracy": 0.0}


def _torch_logprob(model, prompt: list[int], continuation: list[int]) -> float:
  import torch
  ids = torch.tensor([prompt + continuation])
  with torch.no_grad():
    logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
  return float(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(continuation)))


def test_rank_scores_equal_transformers_and_the_fast_path_ranks_the_same(tmp_path):
  reference = hf_models.build("llama", tmp_path)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  pretrained = load.open_pretrained(str(tmp_path))
  graphdef, _, _ = load.abstract_model(pretrained.cfg)
  gen = generate.Generator(graphdef, load.load_params(pretrained, mesh), pretrained.cfg, mesh, eos_ids=(2,),
                           batch_size=4, max_new_tokens=2, min_bucket=8)
  prompts = [[1, 5, 9, 14, 20], [1, 7], [1, 60, 3, 8, 12, 40, 41, 42, 43]]
  choices = [[30, 31], [30, 32], [30, 33]]  # a shared first token, then one token each
  flat = gen.continuation_logprobs([p for p in prompts for _ in choices], [c for _ in prompts for c in choices])
  expected = [_torch_logprob(reference, p, c) for p in prompts for c in choices]
  np.testing.assert_allclose(flat, expected, atol=1e-4)
  full = flat.reshape(len(prompts), len(choices))
  # Choices sharing their first token: ranked off generation's prefill plus one cached step over that token.
  # That leaves out log p(shared token), the same for every choice: the differences agree.
  ids, fast = gen.generate(prompts, candidates=[[31, 32, 33]] * len(prompts), prefixes=[[30]] * len(prompts))
  np.testing.assert_allclose(fast - fast[:, :1], full - full[:, :1], atol=1e-4)
  assert ids == gen.generate_ids(prompts)  # generation itself goes on from the prompt, not from the prefix
  # Prefixes of different lengths in one batch (none; one token; three, longer than max_new_tokens=2): each
  # row's scores are exactly log p(candidate | prompt + prefix).
  prefixes = [[], [30], [30, 4, 17]]
  _, mixed = gen.generate(prompts, candidates=[[31, 32, 33]] * len(prompts), prefixes=prefixes)
  exact = gen.continuation_logprobs([p + x for p, x in zip(prompts, prefixes) for _ in range(3)],
                                    [[c] for _ in prompts for c in (31, 32, 33)])
  np.testing.assert_allclose(mixed, exact.reshape(len(prompts), 3), atol=1e-4)


def test_host_memory_stays_flat_with_the_number_of_examples(tmp_path):
  hf_models.build("llama", tmp_path)
  mesh = sharding.make_mesh(data=8, fsdp=1, tensor=1)
  pretrained = load.open_pretrained(str(tmp_path))
  graphdef, _, _ = load.abstract_model(pretrained.cfg)
  gen = generate.Generator(graphdef, load.load_params(pretrained, mesh), pretrained.cfg, mesh, eos_ids=(2,),
                           batch_size=8, max_new_tokens=2, min_bucket=64)
  prompt = list(range(3, 63))

  def peak(n):
    gen.generate([prompt] * n, candidates=[[5, 6]] * n)  # compiled already: measures the loop only
    tracemalloc.start()
    gen.generate([prompt] * n, candidates=[[5, 6]] * n)
    _, top = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return top

  small, large = peak(16), peak(256)
  logits_bytes = 256 * 64 * pretrained.cfg.vocab_size * 4  # what keeping every logit on the host would take
  assert large - small < logits_bytes / 10, (small, large, logits_bytes)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("inputs")
  return fixtures.write_model(root / "model"), fixtures.write_data(root / "data", copies=12)


def test_items_are_the_examples_training_evaluates_with_the_same_prompts(inputs):
  c = _config(inputs)
  tokenizer = load.open_pretrained(c.model.path).load_tokenizer()
  prepared = train.prepare_data(c, tokenizer)
  items, notes = task_eval.build_items(c, tokenizer, "test", task_eval.select(c, ["test"])["test"])
  assert notes == []
  trained = sorted((e.template, e.record_index, tuple(e.ids[e.weights == 0].tolist()))
                   for e in prepared.examples("test"))
  assert sorted((it.key, it.record_index, tuple(it.prompt_ids)) for it in items) == trained
  sentiment = [it for it in items if it.key == "reviews/sentiment"]
  assert all(it.template.answer_choices[it.gold] == it.reference for it in sentiment)


def test_few_shot_prompts_use_train_examples_within_the_budget(inputs):
  c = _config(inputs)
  tokenizer = load.open_pretrained(c.model.path).load_tokenizer()
  selections = task_eval.select(c, ["test"])["test"]
  items, _ = task_eval.build_items(c, tokenizer, "test", selections)
  item = items[0]
  train_texts = {r["text"] for r in selections[0].source.splits["train"]}
  few = task_eval.FewShot(tokenizer, selections, k=3, chat=False, seq_len=c.data.seq_len,
                          max_prompt_tokens=512, seed=0)
  ids, shots = few.prompt_ids(item)
  text = tokenizer.decode(ids, skip_special_tokens=True)
  assert shots == 3 and ids[-len(item.prompt_ids) + 1:] == item.prompt_ids[1:]  # the item's prompt, last
  assert sum(t in text for t in train_texts) >= 1 and ids == few.prompt_ids(item)[0]  # seeded
  tight = task_eval.FewShot(tokenizer, selections, k=3, chat=False, seq_len=c.data.seq_len,
                            max_prompt_tokens=len(item.prompt_ids) + 20, seed=0)
  ids, shots = tight.prompt_ids(item)
  assert shots < 3 and len(ids) <= len(item.prompt_ids) + 20


def test_options_are_checked_by_name(inputs):
  c = _config(inputs)
  assert task_eval.options_from_config(c, k_shot=0, splits="test").splits == ("test",)
  with pytest.raises(templates.UserError, match="--splits=train: use validation and/or test"):
    task_eval.options_from_config(c, splits="train")

"""Golden tests for ift_jax.data.tokenize with the tiny offline tokenizer (ids from tests/tokenizer_util.py)."""

import numpy as np
import pytest

from ift_jax.data import templates
from ift_jax.data.templates import Template
from ift_jax.data import tokenize as tokenize_module
from ift_jax.data.tokenize import TokenizeStats, tokenize, tokenize_split
from ift_jax.errors import UserError
from tests.tokenizer_util import VOCAB, build_tiny_tokenizer

SENTIMENT = Template(name="sentiment", prompt="Review: {{ text }}\nSentiment:", completion=" {{ sentiment }}")
RECORD = {"text": "the movie was great!", "sentiment": "positive"}
V = VOCAB  # token -> id, to spell golden ids readably


@pytest.fixture(scope="module")
def tok():
  return build_tiny_tokenizer()


def _ids(*tokens):
  return [V[t] for t in tokens]


def _run(tok, template=SENTIMENT, record=RECORD, *, seq_len=32, chat=False, stats=None):
  return tokenize(tok, template, record, seq_len=seq_len, chat=chat, stats=stats or TokenizeStats(),
                  source="movies", record_index=7)


def test_plain_golden(tok):
  example = _run(tok)
  prompt = _ids("<s>", "Review", ":", "the", "movie", "was", "great", "!", "Sentiment", ":")
  assert example.ids.tolist() == prompt + _ids("positive", "</s>")
  assert example.ids.tolist() == [2, 46, 14, 6, 7, 8, 9, 11, 47, 14, 22, 3]
  assert example.weights.tolist() == [0] * 10 + [1, 1]
  assert example.ids.dtype == np.int32 and example.weights.dtype == np.float32
  assert (example.template, example.record_index) == ("movies/sentiment", 7)


def test_chat_golden(tok):
  # "<s><|user|> Review: the movie was great!\nSentiment:\n<|assistant|>", tokenized without adding a second BOS.
  example = _run(tok, chat=True)
  assert example.ids.tolist() == [2, 4, 46, 14, 6, 7, 8, 9, 11, 47, 14, 5, 22, 3]
  assert example.weights.tolist() == [0] * 12 + [1, 1]


def test_no_bos_tokenizer_adds_nothing(tok):
  plain = build_tiny_tokenizer(add_bos=False)
  assert _run(plain).ids.tolist() == _run(tok).ids.tolist()[1:]


def test_catalog_template_golden(tok):
  rating = templates.load_templates("catalog")["amazon_reviews"]["rating_from_review"]
  example = _run(tok, rating, {"text": "I love it", "sentiment": 3.1, "rating": 5})
  assert example.ids.tolist() == [2, 29, 6, 30, 20, 31, 6, 32, 19, 14, 55, 56, 51, 33, 16, 24, 17, 28, 15,
                                  V["5"], V["</s>"]]
  assert example.weights.tolist() == [0] * 19 + [1, 1]


def test_exact_fit_is_not_truncated(tok):
  stats = TokenizeStats()
  example = _run(tok, seq_len=11, stats=stats)  # 12 tokens = seq_len + 1
  assert len(example.ids) == 12
  assert (stats.counts["movies/sentiment"].examples, stats.counts["movies/sentiment"].truncated) == (1, 0)


def test_truncation_cuts_the_field_and_keeps_instruction_and_cue(tok):
  stats = TokenizeStats()
  example = _run(tok, seq_len=9, stats=stats)  # room for 10 tokens: the 5-token text keeps 3
  assert example.ids.tolist() == _ids("<s>", "Review", ":", "the", "movie", "was", "Sentiment", ":",
                                      "positive", "</s>")
  assert example.weights.tolist() == [0] * 8 + [1, 1]
  counts = stats.counts["movies/sentiment"]
  assert (counts.examples, counts.truncated, counts.dropped) == (1, 1, 0)


def test_truncation_cuts_the_longest_field_only(tok):
  template = Template(name="two", prompt="{{ title }}: {{ text }}\nSentiment:", completion=" {{ sentiment }}")
  record = {"title": "good movie", "text": "the movie was great, it was good!", "sentiment": "positive"}
  example = _run(tok, template, record, seq_len=10)
  assert example.ids.tolist() == _ids("<s>", "good", "movie", ":", "the", "movie", "was", "Sentiment", ":",
                                      "positive", "</s>")


def test_chat_truncation(tok):
  example = _run(tok, chat=True, seq_len=11)
  assert example.ids.tolist() == _ids("<s>", "<|user|>", "Review", ":", "the", "movie", "was", "Sentiment",
                                      ":", "<|assistant|>", "positive", "</s>")


def test_drop_when_field_would_vanish_or_completion_does_not_fit(tok):
  stats = TokenizeStats()
  # The prompt without its text is 5 tokens + 2 completion tokens = 7: seq_len 6 leaves no room for text.
  assert _run(tok, seq_len=6, stats=stats) is None
  long_answer = {"text": "bad", "sentiment": "the movie was great , it was good"}
  # Completion + EOS = 9 tokens = all of seq_len + 1: no room for a prompt.
  assert _run(tok, record=long_answer, seq_len=8, stats=stats) is None
  assert _run(tok, seq_len=7, stats=stats) is not None  # one token of text survives
  counts = stats.counts["movies/sentiment"]
  assert (counts.examples, counts.truncated, counts.dropped) == (1, 1, 2)
  assert stats.summary() == ("1 examples (1 truncated, 2 dropped); per template examples/truncated/dropped: "
                             "movies/sentiment: 1/1/2")


def test_prompt_without_text_fields_is_dropped_when_too_long(tok):
  template = Template(name="fixed", prompt="the movie was great", completion=" {{ sentiment }}")
  stats = TokenizeStats()
  assert _run(tok, template, seq_len=4, stats=stats) is None
  assert stats.counts["movies/fixed"].dropped == 1


def test_empty_completion_is_an_error(tok):
  with pytest.raises(UserError, match=r"template movies/sentiment .* empty completion for record 7"):
    _run(tok, record={"text": "the movie", "sentiment": ""})


def test_chat_without_template_is_an_error():
  with pytest.raises(UserError, match="no chat template; set data.chat=False"):
    _run(build_tiny_tokenizer(chat_template=None), chat=True)


def test_tokenize_split_order_and_stats(tok):
  loaded = {k: v for k, v in templates.load_templates("catalog")["amazon_reviews"].items()
            if k in ("rating_from_review", "review_from_rating")}
  records = [{"text": "I love it", "sentiment": 3.1, "rating": 5},
             {"text": "it broke after one day", "sentiment": -2.5, "rating": 1}]
  stats = TokenizeStats()
  examples = tokenize_split(tok, loaded, records, source="amazon_reviews", seq_len=20, chat=False, stats=stats)
  # For each record, templates in sorted name order. The second review is cut to fit rating_from_review,
  # and as the completion of review_from_rating it does not fit next to its 17-token prompt: dropped.
  assert [(e.record_index, e.template) for e in examples] == [
      (0, "amazon_reviews/rating_from_review"), (0, "amazon_reviews/review_from_rating"),
      (1, "amazon_reviews/rating_from_review")]
  assert examples[1].ids.tolist()[-4:] == _ids("I", "love", "it", "</s>")
  assert examples[1].weights.tolist() == [0] * 17 + [1] * 4
  assert examples[2].ids.tolist()[10:14] == _ids("it", "broke", "after", "Rating")  # text cut to 3 tokens
  assert len(examples[2].ids) == 21
  assert stats.summary() == (
      "3 examples (1 truncated, 1 dropped); per template examples/truncated/dropped: "
      "amazon_reviews/rating_from_review: 2/1/0, amazon_reviews/review_from_rating: 1/0/1")


@pytest.mark.parametrize("chat", [False, True])
def test_batched_tokenization_equals_one_record_at_a_time(tok, monkeypatch, chat):
  """tokenize_all sends each template's records through the tokenizer in batches (here of 3, so batches end
  mid-template): every example, truncated or dropped, and the counts are those of one record at a time."""
  monkeypatch.setattr(tokenize_module, "_BATCH", 3)
  two = Template(name="two", prompt="{{ title }}: {{ text }}\nSentiment:", completion=" {{ sentiment }}")
  words = "the movie was great , it was good !".split()
  records = [{"title": " ".join(words[:1 + i % 3]), "text": " ".join(words[:i]) or "bad",
              "sentiment": "positive" if i % 2 else "the movie was great"} for i in range(10)]
  records.insert(4, {"title": "good", "text": "bad", "sentiment": " ".join(words + words[:2])})  # cannot fit
  pairs = [(template, record, index) for index, record in enumerate(records) for template in (SENTIMENT, two)]
  batched_stats, single_stats = TokenizeStats(), TokenizeStats()
  batched = tokenize_module.tokenize_all(tok, pairs, seq_len=12, chat=chat, stats=batched_stats, source="m")
  single = [tokenize(tok, t, r, seq_len=12, chat=chat, stats=single_stats, source="m", record_index=i)
            for t, r, i in pairs]
  assert [e is None for e in batched] == [e is None for e in single]
  for a, b in zip(batched, single):
    if a is not None:
      assert (a.ids.tolist(), a.weights.tolist(), a.template, a.record_index) == (
          b.ids.tolist(), b.weights.tolist(), b.template, b.record_index)
  assert batched_stats.counts == single_stats.counts
  counts = batched_stats.total()
  assert counts.truncated > 0 and counts.dropped > 0 and counts.examples > counts.truncated  # all paths taken


class _SlowTokenizer:
  """The tiny tokenizer without offsets, as a slow (Python) tokenizer would be."""
  is_fast = False

  def __init__(self, fast):
    self._fast = fast
    self.eos_token_id, self.chat_template = fast.eos_token_id, fast.chat_template

  def __call__(self, text, **kwargs):
    assert "return_offsets_mapping" not in kwargs
    return self._fast(text, **kwargs)

  def decode(self, ids, **kwargs):
    return self._fast.decode(ids, **kwargs)


def test_truncation_without_offsets_decodes_the_head(tok):
  example = _run(_SlowTokenizer(tok), seq_len=9)
  assert example.ids.tolist() == _run(tok, seq_len=9).ids.tolist()

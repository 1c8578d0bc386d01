"""Tiny, fully offline run inputs for end-to-end tests: a model folder with its tokenizer, data and templates."""

from __future__ import annotations

import json
import pathlib

from tests import hf_models, tokenizer_util

TEMPLATES_YAML = """\
reviews:
  sentiment:
    prompt: "Classify this review as positive or negative . Review : {{ text }} Sentiment :"
    completion: "{{ sentiment }}"
    answer_choices: ["negative", "positive"]
  rating:
    prompt: "Predict the rating from the following review : {{ text }} Rating :"
    completion: "{{ rating }}"
"""

_SENTENCES = [
    ("the movie was great !", "positive", 5), ("the movie was bad .", "negative", 1),
    ("I love the sound , it is good", "positive", 4), ("it broke after a day", "negative", 2),
    ("I hate this product", "negative", 1), ("great product , I love it", "positive", 5),
    ("the sound is bad", "negative", 2), ("good movie", "positive", 4),
]


def write_data(folder: pathlib.Path, copies: int = 6) -> pathlib.Path:
  """A reviews.jsonl of 48 records (8 sentences × 6 numbered copies) and its templates.yaml."""
  folder.mkdir(parents=True, exist_ok=True)
  lines = [json.dumps({"id": f"{i}-{j}", "text": text, "sentiment": s, "rating": r})
           for j in range(copies) for i, (text, s, r) in enumerate(_SENTENCES)]
  (folder / "reviews.jsonl").write_text("\n".join(lines) + "\n")
  (folder / "templates.yaml").write_text(TEMPLATES_YAML)
  return folder


def write_model(folder: pathlib.Path, family: str = "llama", seed: int = 0) -> pathlib.Path:
  tokenizer = tokenizer_util.build_tiny_tokenizer()
  hf_models.build(family, folder, seed=seed, vocab_size=len(tokenizer_util.VOCAB), bos_token_id=2,
                  eos_token_id=3, pad_token_id=0)
  tokenizer.save_pretrained(folder)
  return folder

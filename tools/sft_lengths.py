"""Writes tools/sft_lengths.json: (prompt, completion) token counts of real instruction examples, for bench.py.

    python tools/sft_lengths.py [--out tools/sft_lengths.json] [--per_template 500]

The examples are the train split of the catalog's demo mix (Amazon reviews rating and writing, Rotten Tomatoes,
BoolQ, XSum) under the built-in templates, tokenized by SmolLM2's tokenizer, uncut (seq_len 8192). The JSON is
committed so that the device machine, which has no datasets and no network, benchmarks real length
distributions: short classification answers next to long news articles, the mix where packing matters.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from ift_jax.data import sources, templates, tokenize
from ift_jax.model import load

SOURCES = ("amazon_reviews", "rotten_tomatoes", "boolq", "xsum")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="tools/sft_lengths.json")
  ap.add_argument("--per_template", type=int, default=500)
  args = ap.parse_args()
  tokenizer = load.open_pretrained("smollm2-135m-instruct").load_tokenizer()
  catalog = templates.load_templates("catalog")
  lengths = []
  for name in SOURCES:
    src = sources.load_source(name, seed=0, validation_fraction=0.1, test_fraction=0.1, skip_malformed=False)
    records = src.splits["train"]
    pick = np.random.default_rng(0).permutation(len(records))[:args.per_template]
    for template in templates.templates_for(catalog, name).values():
      for i in pick:
        fitted = tokenize.fit(tokenizer, template, records[i], seq_len=8192, chat=False)
        if fitted is not None:
          lengths.append([len(fitted.prompt_ids), len(fitted.completion_ids)])
  order = np.random.default_rng(1).permutation(len(lengths))
  with open(args.out, "w") as f:
    json.dump({"about": __doc__.splitlines()[0], "sources": SOURCES, "tokenizer": "smollm2-135m-instruct",
               "lengths": [lengths[i] for i in order]}, f, separators=(",", ":"))
  total = np.array(lengths).sum(axis=1)
  print(f"{len(lengths)} examples; tokens mean {total.mean():.0f}, median {np.median(total):.0f}, "
        f"max {total.max()}")


if __name__ == "__main__":
  main()

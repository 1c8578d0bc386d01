"""Prints a run's base → fine-tuned tables (validation and test) as Markdown, for READMEs and reports.

    python tools/report.py runs/demo
"""

import json
import pathlib
import sys

from ift_jax.train import compare_base


def main(workdir: str) -> None:
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
  for split in ("validation", "test"):
    last = max((r for r in rows if f"{split}/loss" in r), key=lambda r: r["step"])
    print(f"\nstep {last['step']}\n" + compare_base(rows, last, split))


if __name__ == "__main__":
  main(sys.argv[1])

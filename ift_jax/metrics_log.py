"""Where metrics go: DIR/metrics.jsonl, TensorBoard event files beside it, and the terminal. Process 0 only."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import tqdm


class _NoProgress:
  n = 0

  def update(self, n: int) -> None:
    self.n += n

  def set_postfix(self, **_) -> None:
    pass

  def close(self) -> None:
    pass


class MetricsLog:
  """One JSON object per logged step in metrics.jsonl (`step` plus keys like `train/loss`, `validation/loss`)."""

  def __init__(self, workdir: str | pathlib.Path):
    self.workdir = pathlib.Path(workdir)
    self.enabled = jax.process_index() == 0
    self._tb = None
    if self.enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      from tensorboardX import SummaryWriter  # event files without TensorFlow
      self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

  @property
  def path(self) -> pathlib.Path:
    return self.workdir / "metrics.jsonl"

  def write(self, step: int, metrics: dict[str, Any], *, echo: str | None = None) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")
    for key, value in metrics.items():
      self._tb.add_scalar(key, value, step)
    if echo:
      self.echo(f"[{echo}] " + format_metrics(metrics))

  def read(self) -> list[dict[str, Any]]:
    if not self.path.exists():
      return []
    return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

  def truncate_after(self, step: int) -> None:
    """On resume, drops lines the interrupted run wrote after its last checkpoint: they will be rewritten."""
    if not self.enabled or not self.path.exists():
      return
    rows = [row for row in self.read() if row["step"] <= step]
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, self.path)

  def write_json(self, name: str, payload: dict[str, Any]) -> None:
    if self.enabled:
      tmp = self.workdir / (name + ".tmp")
      tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
      os.replace(tmp, self.workdir / name)

  def echo(self, line: str) -> None:
    if self.enabled:
      tqdm.tqdm.write(line)

  def progress(self, *, initial: int, total: int):
    if not self.enabled:
      return _NoProgress()
    return tqdm.tqdm(initial=initial, total=total, desc="train", unit="step", dynamic_ncols=True)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def format_metrics(metrics: dict[str, Any]) -> str:
  """Overall metrics first, then per template: `loss 1.23 · token_accuracy 0.612 · exact_match 0.400`."""
  def fmt(keys):
    return " · ".join(f"{k.rsplit('/', 1)[-1]} {metrics[k]:.4g}" for k in keys)
  overall = [k for k in metrics if k.count("/") == 1 and not k.endswith("/examples")]
  lines = [fmt(overall)]
  templates = sorted({k.rsplit("/", 1)[0] for k in metrics if k.count("/") >= 3})
  for t in templates:
    keys = [k for k in metrics if k.rsplit("/", 1)[0] == t and not k.endswith("/examples")]
    n = metrics.get(f"{t}/examples", "?")
    lines.append(f"    {t.split('/', 1)[1]} (n={n}): {fmt(keys)}")
  return "\n".join(lines)

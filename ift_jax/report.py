"""DIR/eval/report.md and its PNG charts, from the metrics.json dict of ift_jax.task_eval and the run's logs.

Charts (matplotlib, headless): loss_curves.png (training and validation loss by step), tasks_<split>.png (each
task's headline metric per model), confusion_<split>_<template>.png (reference × predicted rating, per model).
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

from ift_jax import task_metrics

_ORDER = ("rank_accuracy", "exact_match", "mae", "rouge1", "rouge2", "rougeL")
_LOWER_IS_BETTER = ("mae",)


def write_report(out_dir: pathlib.Path, metrics: dict[str, Any], metrics_log: pathlib.Path) -> pathlib.Path:
  """Writes report.md and the charts into out_dir; returns report.md's path."""
  import matplotlib  # pylint: disable=g-import-not-at-top  # only the report needs it
  matplotlib.use("Agg")  # files only: no display on servers
  log_rows = _read_log(metrics_log)
  lines = [f"# Task evaluation of {metrics['workdir']}", "",
           f"Model `{metrics['model']}`; greedy generation; rank classification by log-likelihood of each answer "
           f"choice. Fine-tuned checkpoints: "
           + ", ".join(f"{k} = step {v}" for k, v in metrics["checkpoint_steps"].items() if k != "base") + "."]
  if metrics["heldout_templates"]:
    lines.append("Held out of training (evaluated only): " + ", ".join(metrics["heldout_templates"]) + ".")
  if _plot_losses(log_rows, out_dir / "loss_curves.png"):
    lines += ["", "![training and validation loss](loss_curves.png)"]
  for split, tables in metrics["splits"].items():
    lines += ["", f"## {split}", ""] + _table(tables, metrics["settings"], metrics["heldout_templates"])
    shots = _mean_shots(tables, metrics["settings"])
    if shots:
      lines += ["", "Mean examples in the few-shot prompts (fewer than k where they would not fit): " + shots]
    teacher = _teacher_forced(log_rows, split)
    if teacher:
      lines += ["", teacher]
    if _plot_tasks(tables, metrics["settings"], out_dir / f"tasks_{split}.png", split):
      lines += ["", f"![{split} accuracy per task](tasks_{split}.png)"]
    for key, by_setting in tables["templates"].items():
      if any("confusion" in r for r in by_setting.values()):
        name = f"confusion_{split}_{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.png"
        _plot_confusion(by_setting, out_dir / name, f"{split} {key}")
        lines += ["", f"{key}: confusion matrices (rows: reference, columns: ranked prediction)", "",
                  f"![{key} confusion]({name})"]
  if metrics["notes"]:
    lines += ["", "## Notes", ""] + [f"- {n}" for n in metrics["notes"]]
  path = out_dir / "report.md"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def _table(tables: dict[str, Any], settings: list[str], heldout: list[str]) -> list[str]:
  """One row per template and metric; a task row (its templates' examples pooled) where a task has several."""
  header = ["task / template", "metric", "n"] + settings
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  templates = tables["templates"]
  by_task: dict[str, list[str]] = {}
  for key in sorted(templates):
    by_task.setdefault(key.split("/")[0], []).append(key)
  rows = [(task, f"**{task}** (all templates)", tables["tasks"][task]) for task, keys in by_task.items()
          if len(keys) > 1]
  rows += [(key, key + (" (held out)" if key in heldout else ""), templates[key]) for key in templates]
  for name, label, by_setting in sorted(rows, key=lambda r: (r[0].split("/")[0], "/" in r[0], r[0])):
    first = next(iter(by_setting.values()))
    keys = [name] if "/" in name else by_task[name]
    for metric in (m for m in _ORDER if m in first):
      n = sum(next(iter(templates[k].values()))["examples"] for k in keys
              if metric in next(iter(templates[k].values())))  # the examples this metric averages over
      cells = [_cell(by_setting.get(s, {}), metric, by_setting) for s in settings]
      lines.append(f"| {label} | {metric} | {n} | " + " | ".join(cells) + " |")
  return lines


def _cell(result: dict[str, Any], metric: str, by_setting: dict[str, Any]) -> str:
  if metric not in result:
    return "–"
  values = [r[metric] for r in by_setting.values() if metric in r]
  best = min(values) if metric in _LOWER_IS_BETTER else max(values)
  text = f"{result[metric]:.3f}"
  return f"**{text}**" if result[metric] == best and len(set(values)) > 1 else text  # bold: the best model


def _mean_shots(tables: dict[str, Any], settings: list[str]) -> str:
  parts = []
  for s in settings:
    values = [(by[s]["shots"], by[s]["examples"]) for by in tables["templates"].values() if by.get(s, {}).get("shots")]
    if values:
      parts.append(f"{s} {sum(v * n for v, n in values) / sum(n for _, n in values):.2f}")
  return ", ".join(parts)


def _read_log(path: pathlib.Path) -> list[dict[str, Any]]:
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _teacher_forced(rows: list[dict[str, Any]], split: str) -> str:
  """The training run's own teacher-forced loss on this split: base (step 0) and last."""
  key = f"{split}/loss"
  points = [(r["step"], r[key]) for r in rows if key in r]
  if len(points) < 2:
    return ""
  (s0, first), (s1, last) = points[0], points[-1]
  return f"Teacher-forced {split} loss during training (target tokens): step {s0} {first:.3f} → step {s1} {last:.3f}."


def _plot_losses(rows: list[dict[str, Any]], path: pathlib.Path) -> bool:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
  validation = [(r["step"], r["validation/loss"]) for r in rows if "validation/loss" in r]
  if not train and not validation:
    return False
  fig, ax = plt.subplots(figsize=(6.5, 3.5))
  if train:
    steps, values = map(np.asarray, zip(*train))
    ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=1, label="train/loss (each step)")
    window = max(1, min(10, len(values) // 5))  # mixed tasks make single steps noisy: show the trend too
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1:], smooth, color="tab:blue", label=f"train/loss ({window}-step mean)")
  if validation:
    ax.plot(*zip(*validation), color="tab:orange", marker="o", markersize=4, label="validation/loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy per target token")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def _plot_tasks(tables: dict[str, Any], settings: list[str], path: pathlib.Path, split: str) -> bool:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rows = []
  for key, by_setting in sorted(tables["templates"].items()):
    found = task_metrics.headline(next(iter(by_setting.values())))
    if found:
      label = key.replace("/", "\n") + f"\n({found[0]})"
      rows.append((label, [by_setting.get(s, {}).get(found[0], 0.0) for s in settings]))
  if not rows:
    return False
  fig, ax = plt.subplots(figsize=(max(6, 1.9 * len(rows)), 4.2))
  width = 0.8 / len(settings)
  for j, setting in enumerate(settings):
    x = np.arange(len(rows)) + (j - (len(settings) - 1) / 2) * width
    bars = ax.bar(x, [values[j] for _, values in rows], width, label=setting)
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
  ax.set_xticks(np.arange(len(rows)), [name for name, _ in rows], fontsize=7)
  ax.set_ylim(0, 1.05)
  ax.set_title(f"{split}: each template's headline metric")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def _plot_confusion(by_setting: dict[str, Any], path: pathlib.Path, title: str) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  shown = [(s, r["confusion"]) for s, r in by_setting.items() if "confusion" in r]
  fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.8), squeeze=False)
  for ax, (setting, confusion) in zip(axes[0], shown):
    counts, labels = confusion["counts"], confusion["labels"]
    ax.imshow(counts, cmap="Blues")
    for i, row in enumerate(counts):
      for j, n in enumerate(row):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(setting, fontsize=9)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)

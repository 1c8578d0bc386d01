"""End to end through the CLI on a tiny model: train, eval, render, and kill -9 → resume = uninterrupted."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import fixtures

ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("inputs")
  return fixtures.write_model(root / "model"), fixtures.write_data(root / "data", copies=12)


def _cmd(command, inputs, workdir, *overrides):
  model, data = inputs
  return [sys.executable, "-c", "from ift_jax.cli import main; main()", command, "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--config.model.path={model}", f"--config.data.source={data / 'reviews.jsonl'}",
          f"--config.data.templates={data / 'templates.yaml'}", *overrides]


def _run(cmd, check=True):
  proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  if check and proc.returncode:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
  return proc


def _metrics(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def _saved_state(workdir, step, folder="checkpoints"):
  """A checkpoint's state as host numpy arrays, whatever mesh or process count wrote it."""
  import jax
  import orbax.checkpoint as ocp
  path = workdir / folder / str(step) / "state"
  with ocp.PyTreeCheckpointer() as ckpt:
    meta = ckpt.metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    return ckpt.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))


def _final_params(workdir, step):
  return _saved_state(workdir, step)["params"]


def test_train_eval_render_on_a_2x2x2_mesh(inputs, tmp_path):
  workdir = tmp_path / "run"
  mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
  _run(_cmd("train", inputs, workdir, *mesh))
  rows = _metrics(workdir)
  assert rows[0]["step"] == 0 and "validation/exact_match" in rows[0]  # the base model, before training
  assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 7))
  assert rows[-1]["train/loss"] < rows[0]["validation/loss"] if "train/loss" in rows[-1] else True
  test = json.loads((workdir / "test_metrics.json").read_text())
  assert test["step"] == 6 and {"test/loss", "test/token_accuracy", "test/exact_match"} <= set(test)
  assert any(k.startswith("test/reviews/sentiment/") for k in test)
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  _run(_cmd("eval", inputs, workdir, "--checkpoint=latest,best", "--k_shot=2"))
  evaluated = json.loads((workdir / "eval" / "metrics.json").read_text())
  assert evaluated["settings"] == ["base 0-shot", "base 2-shot", "fine-tuned latest", "fine-tuned best"]
  assert evaluated["checkpoint_steps"]["latest"] == 6
  sentiment = evaluated["splits"]["test"]["templates"]["reviews/sentiment"]
  n = test["test/reviews/sentiment/examples"]  # the same examples training evaluated
  assert all(r["examples"] == n for r in sentiment.values())
  assert {"exact_match", "rank_accuracy"} <= set(sentiment["base 0-shot"])
  assert sentiment["base 2-shot"]["shots"] == 2 and sentiment["base 0-shot"]["shots"] == 0
  report = (workdir / "eval" / "report.md").read_text()
  assert "| reviews/sentiment | rank_accuracy |" in report and "![training and validation loss]" in report
  for chart in ("loss_curves.png", "tasks_test.png", "tasks_validation.png"):
    assert (workdir / "eval" / chart).read_bytes()[:4] == b"\x89PNG"
  predictions = (workdir / "eval" / "predictions.jsonl").read_text().splitlines()
  examples = sum(by["base 0-shot"]["examples"] for split in evaluated["splits"].values()
                 for by in split["templates"].values())
  assert len(predictions) == 4 * examples > 0  # one line per example and setting

  rendered = _run(_cmd("render", inputs, workdir, "--num_examples=1")).stdout
  lines = [l.split(" | ") for l in rendered.splitlines() if " | " in l]
  weights = [float(l[0]) for l in lines if len(l) >= 3]
  assert weights[0] == 0 and weights[-1] == 1 and "'</s>'" in rendered  # prompt masked, EOS trained


_RESUME = ["--config.train.steps=24", "--config.train.eval_every=8", "--config.checkpoint.every=4",
           "--config.checkpoint.keep=10"]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
  """An uninterrupted run that the interrupted ones must reproduce bit for bit."""
  workdir = tmp_path_factory.mktemp("reference")
  _run(_cmd("train", inputs, workdir, *_RESUME))
  return workdir


def _start_and_wait(inputs, workdir, step, *extra):
  proc = subprocess.Popen(_cmd("train", inputs, workdir, *_RESUME, *extra), cwd=ROOT, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / str(step)).is_dir() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  return proc


def _assert_reproduces(workdir, reference):
  import jax
  jax.tree.map(np.testing.assert_array_equal, _final_params(workdir, 24), _final_params(reference, 24))
  losses = lambda w: {r["step"]: r["train/loss"] for r in _metrics(w) if "train/loss" in r}
  assert losses(workdir) == losses(reference)
  assert json.loads((workdir / "test_metrics.json").read_text()) == json.loads(
      (reference / "test_metrics.json").read_text())


def test_best_checkpoint_holds_the_best_steps_parameters_only(reference):
  import jax
  validation = {r["step"]: r["validation/loss"] for r in _metrics(reference) if "validation/loss" in r and r["step"]}
  best_step = min(validation, key=validation.get)
  assert [p.name for p in (reference / "best").iterdir()] == [str(best_step)]
  saved = _saved_state(reference, best_step, folder="best")
  assert set(saved) == {"step", "params"} and int(saved["step"]) == best_step  # no optimizer moments
  jax.tree.map(np.testing.assert_array_equal, saved["params"], _final_params(reference, best_step))


def test_kill_9_then_rerun_matches_uninterrupted(inputs, reference, tmp_path):
  proc = _start_and_wait(inputs, tmp_path, 8)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed mid-way"
  _run(_cmd("train", inputs, tmp_path, *_RESUME))  # the same command again: resumes
  _assert_reproduces(tmp_path, reference)


def test_sigterm_checkpoints_and_exits_0_then_resumes(inputs, reference, tmp_path):
  proc = _start_and_wait(inputs, tmp_path, 4)
  proc.send_signal(signal.SIGTERM)
  stderr, _ = proc.communicate(timeout=300)  # both streams
  assert proc.returncode == 0, stderr[-2000:]
  assert "stopped by SIGTERM after step" in stderr
  stopped_at = int(stderr.split("stopped by SIGTERM after step ")[1].split(":")[0])
  assert stopped_at < 24 and (tmp_path / "checkpoints" / str(stopped_at)).is_dir()  # saved where it stopped
  _run(_cmd("train", inputs, tmp_path, *_RESUME))
  _assert_reproduces(tmp_path, reference)


def test_damaged_latest_checkpoint_is_skipped_with_a_warning(inputs, reference, tmp_path):
  proc = _start_and_wait(inputs, tmp_path, 12)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  newest = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  for f in (tmp_path / "checkpoints" / str(newest) / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a half-written disk, say
  stderr = _run(_cmd("train", inputs, tmp_path, *_RESUME)).stderr
  assert f"checkpoints/{newest} is unreadable" in stderr
  _assert_reproduces(tmp_path, reference)


def test_rerunning_a_finished_run_only_reports_again(inputs, reference, tmp_path):
  """A run killed after its final checkpoint resumes with no step left: it re-reports, trains nothing."""
  import shutil
  workdir = tmp_path / "done"
  shutil.copytree(reference, workdir)
  _run(_cmd("train", inputs, workdir, *_RESUME))
  _assert_reproduces(workdir, reference)


def test_fault_injection_kill_at_random_moments(inputs, reference, tmp_path):
  """kill -9 at three seeded random moments of one run (start-up, steps, saves); the end state is unchanged."""
  rng = np.random.default_rng(0)
  for delay in rng.uniform(2.0, 14.0, size=3):
    proc = subprocess.Popen(_cmd("train", inputs, tmp_path, *_RESUME), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
  _run(_cmd("train", inputs, tmp_path, *_RESUME))
  _assert_reproduces(tmp_path, reference)

"""2 processes × 4 CPU devices (loopback coordinator, gloo) against 1 process × 8 devices, and elastic resume."""

import json
import os
import shutil
import socket
import subprocess

import jax
import numpy as np
import pytest

from tests.test_train import ROOT, _cmd, _final_params, _metrics, _run, inputs  # noqa: F401 (fixture)

_STEPS = ["--config.train.steps=8", "--config.train.eval_every=4", "--config.checkpoint.every=4",
          "--config.checkpoint.keep=10"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_processes(inputs, workdir, num_processes, devices_each, *extra, command="train"):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}"}
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      _cmd(command, inputs, workdir, *_STEPS, *extra, f"--coordinator_address={address}",
           f"--num_processes={num_processes}", f"--process_id={i}", "--initialization_timeout=60"),
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(num_processes)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in _metrics(workdir) if "train/loss" in r}


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume_elastically(inputs, tmp_path):
  single, multi = tmp_path / "single", tmp_path / "multi"
  _run(_cmd("train", inputs, single, *_STEPS))
  outputs = _run_processes(inputs, multi, 2, 4)
  assert "validation, base model" in outputs[0] and "validation, base model" not in outputs[1]  # only 0 logs

  a, b = _losses(single), _losses(multi)
  assert sorted(a) == sorted(b) == list(range(1, 9))
  np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], atol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-4), _final_params(multi, 8),
               _final_params(single, 8))
  test_single = json.loads((single / "test_metrics.json").read_text())
  test_multi = json.loads((multi / "test_metrics.json").read_text())
  assert test_single.keys() == test_multi.keys()
  np.testing.assert_allclose([test_single[k] for k in sorted(test_single)],
                             [test_multi[k] for k in sorted(test_single)], atol=1e-5)

  # Export on 2 processes: every process joins each gather, process 0 writes; same bytes as one process.
  _run_processes(inputs, multi, 2, 4, f"--out={tmp_path / 'hf2'}", command="export")
  _run(_cmd("export", inputs, multi, f"--out={tmp_path / 'hf1'}"))
  for name in ("model.safetensors", "config.json"):
    assert (tmp_path / "hf2" / name).read_bytes() == (tmp_path / "hf1" / name).read_bytes(), name

  # Task evaluation on 2 processes: identical inputs everywhere, replicated results, process 0 writes; the
  # metrics and every prediction equal a 1-process evaluation of the same checkpoint.
  one = tmp_path / "eval1"
  shutil.copytree(multi, one)
  eval_flags = ["--k_shot=1", "--splits=test", "--max_new_tokens=4"]
  _run_processes(inputs, multi, 2, 4, *eval_flags, command="eval")
  _run(_cmd("eval", inputs, one, *eval_flags))
  eval_multi = json.loads((multi / "eval" / "metrics.json").read_text())["splits"]
  assert eval_multi == json.loads((one / "eval" / "metrics.json").read_text())["splits"]
  assert (multi / "eval" / "predictions.jsonl").read_text() == (one / "eval" / "predictions.jsonl").read_text()

  # Elastic: the 2-process checkpoint of step 4 continues on 1 process with 4 devices, on the same data order.
  elastic = tmp_path / "elastic"
  shutil.copytree(multi, elastic)
  shutil.rmtree(elastic / "checkpoints" / "8")
  shutil.rmtree(elastic / "best", ignore_errors=True)
  _run_processes(inputs, elastic, 1, 4)
  c = _losses(elastic)
  np.testing.assert_allclose([c[k] for k in range(5, 9)], [b[k] for k in range(5, 9)], atol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-4), _final_params(elastic, 8),
               _final_params(multi, 8))


def test_an_unreachable_coordinator_fails_fast_with_a_clear_message(inputs, tmp_path):
  proc = subprocess.run(_cmd("train", inputs, tmp_path, f"--coordinator_address=127.0.0.1:{_free_port()}",
                             "--num_processes=2", "--process_id=1", "--initialization_timeout=5"),
                        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2
  assert "could not join the job via coordinator 127.0.0.1:" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("failing", [0, 1])
def test_a_process_that_fails_alone_ends_the_job(inputs, tmp_path, failing):
  """One process is told to keep the best checkpoint by a metric evaluation does not report, so it fails alone at
  step 4's evaluation, after the processes have run collectives together: it prints the one-line error and exits 2
  at once, and the other, waiting for it in the next collective, is ended by the coordination service — at once
  when process 0 failed (it hosts the service), after the heartbeat timeout (here 5 s) otherwise. A normal exit
  waited at JAX's shutdown barrier for 5 minutes while the other process waited for it."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  address = f"127.0.0.1:{_free_port()}"
  bad = "--config.checkpoint.best_metric=validation/no_such_metric"
  procs = [subprocess.Popen(
      _cmd("train", inputs, tmp_path / "run", *_STEPS, f"--coordinator_address={address}", "--num_processes=2",
           f"--process_id={i}", "--initialization_timeout=60", "--heartbeat_timeout=5",
           *([bad] if i == failing else [])),
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=150) for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert procs[failing].returncode == 2, outputs[failing][1][-2000:]
  assert "checkpoint.best_metric='validation/no_such_metric'" in outputs[failing][1].strip().splitlines()[-1]
  assert procs[1 - failing].returncode != 0
  assert "validation, base model" in outputs[0][0]  # they had evaluated together before


# Fault injection: this process's main thread blocks for good at its second validation (step 4), alive and
# heartbeating, so the coordination service sees nothing wrong: the hang that multi-host users meet.
_STUCK_AT_STEP_4 = """
import time
from ift_jax import train
run_eval, validations = train.run_eval, []
def stuck_at_the_second_validation(s, params, split):
  validations.append(split == "validation")
  if sum(validations) == 2:
    time.sleep(3600)
  return run_eval(s, params, split)
train.run_eval = stuck_at_the_second_validation
from ift_jax.cli import main
main()
"""


@pytest.mark.slow
def test_a_stuck_process_does_not_hang_the_job(inputs, tmp_path, stuck=1):
  """One process stops advancing (its own watchdog off, as if it could not even be interrupted); the other waits
  for it in step 4's evaluation until its watchdog finds no progress for --hang_timeout, prints the stacks and the
  one-line error, and exits 4; the coordination service then ends the stuck one. Without the watchdog both wait
  forever. (How a process's exit ends the other, whichever is process 0, is tested above; one case here keeps the
  suite's time.)"""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  address = f"127.0.0.1:{_free_port()}"
  cmds = [_cmd("train", inputs, tmp_path / "run", *_STEPS, f"--coordinator_address={address}", "--num_processes=2",
               f"--process_id={i}", "--initialization_timeout=60", "--heartbeat_timeout=5",
               f"--hang_timeout={0 if i == stuck else 20}") for i in range(2)]
  cmds[stuck][2] = _STUCK_AT_STEP_4
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for cmd in cmds]
  try:
    outputs = [p.communicate(timeout=240) for p in procs]
  finally:
    for p in procs:
      p.kill()
  waiting = 1 - stuck
  stderr = outputs[waiting][1]
  assert procs[waiting].returncode == 4, stderr[-3000:]
  assert stderr.strip().splitlines()[-1].startswith(
      f"error: no progress for 20 s while evaluating the validation split (process {waiting} of 2)")
  assert "--- stack of thread MainThread" in stderr and "in evaluate" in stderr  # where it waited
  assert procs[stuck].returncode != 0
  assert "validation, step 4" not in outputs[0][0]

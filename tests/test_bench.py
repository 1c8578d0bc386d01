"""tools/bench.py runs the real train step; with real SFT lengths, packing beats padding to the longest."""

import gzip
import json
import shutil
import subprocess
import sys

from tests.test_train import ENV, ROOT


def test_bench_realistic_lengths_reports_useful_tokens():
  out = subprocess.run(
      [sys.executable, "tools/bench.py", "--model", "tiny", "--batch", "8", "--seq", "256", "--steps", "2",
       "--warmup", "0", "--dtype", "float32", "--lengths", "tools/sft_lengths.json", "--loss-chunk", "64"],
      cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300, check=True)
  line = json.loads(out.stdout.strip().splitlines()[-1])
  assert line["mode"] == "sft" and line["useful_tokens_per_s"] > 0 and line["examples_per_step"] > 8
  assert line["target_tokens_per_s"] < line["useful_tokens_per_s"] <= line["tokens_per_s"]
  # Real instruction lengths are skewed (median 48, mean 150 tokens): padding a batch of 8 to its longest wastes
  # most of it, packing wastes little.
  assert line["packing_efficiency"] > 0.7 > 0.5 > line["peer_padding_efficiency"], line


def test_profile_step_sums_the_traced_operations(tmp_path):
  out = subprocess.run(
      [sys.executable, "tools/profile_step.py", "--model", "tiny", "--batch", "8", "--seq", "64", "--steps", "2",
       "--warmup", "0", "--dtype", "float32", "--top", "5", "--hlo", str(tmp_path / "step.hlo.gz")],
      cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300, check=True)
  lines = out.stdout.strip().splitlines()
  assert lines[0].startswith("== ") and "ms of events per step" in lines[0], out.stdout
  assert sum("ms/step" in line for line in lines) >= 5, out.stdout
  hlo = gzip.open(tmp_path / "step.hlo.gz", "rt").read()
  assert hlo.startswith("HloModule") and "ENTRY" in hlo and "fusion" in hlo


def test_device_ab_times_a_prepared_version_of_the_package():
  """tools/device_ab.sh: `prepare` copies the package into .ab/NAME; a run benches it and prints the table."""
  name = "_pytest"
  try:
    subprocess.run(["tools/device_ab.sh", "prepare", name], cwd=ROOT, capture_output=True, text=True, timeout=60,
                   check=True)
    assert (ROOT / ".ab" / name / "ift_jax" / "steps.py").is_file()
    # A flags variant: the same package under other XLA flags (here one the CPU backend parses and ignores).
    subprocess.run(["tools/device_ab.sh", "flags", name + "_flags", name, "--xla_gpu_enable_cublaslt=true"],
                   cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    out = subprocess.run(
        ["tools/device_ab.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
        env={**ENV, "ORDER": f"{name} {name}_flags", "STEPS": "1", "SHAPE": "--model tiny --batch 8 --seq 32",
             "FLAGS": "--dtype float32 --attention einsum", "OUT": str(ROOT / ".ab" / name)})
    table = [line.split() for line in out.stdout.strip().splitlines()[-2:]]
    assert [t[0] for t in table] == [name, name + "_flags"], out.stdout
    assert all(t[1] == "step" and float(t[2]) > 0 for t in table), out.stdout
    rows = [json.loads(line) for line in (ROOT / ".ab" / name / "ab.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == [name, name + "_flags"] and rows[0]["impl"] == "ift-jax"
    assert "xla_gpu_enable_cublaslt=true" in rows[1]["xla_flags"], rows[1]
    assert "cublaslt" not in rows[0]["xla_flags"], rows[0]
  finally:
    shutil.rmtree(ROOT / ".ab" / name, ignore_errors=True)
    shutil.rmtree(ROOT / ".ab" / (name + "_flags"), ignore_errors=True)

"""Where the train step's time goes: a jax.profiler trace of a few steps, summed per device operation.

    python tools/profile_step.py --model llama-1b --batch 8 --seq 2048 --attention cudnn --loss-chunk 256
    python tools/profile_step.py --model tiny --batch 2 --seq 64 --top 10          # CPU smoke run

Takes tools/bench.py's flags (same model shapes, same step), compiles and warms the step outside the trace, then
traces --steps steps and prints, per traced process (on a GPU: the device's kernels; on CPU: the host threads),
the operations with the most time per step, their count per step, and the process's total per step. With --out
DIR the Perfetto trace (perfetto_trace.json.gz, for ui.perfetto.dev) is kept there; with --hlo FILE.gz the
compiled step's optimized HLO, where the profile's kernel `loop_add_fusion_17` is the fusion `%loop_add_fusion.17`
(and every fusion sharing its `deduplicated_name` runs that kernel too): what each kernel computes can then be
read on a machine without the accelerator. A tool for finding what to speed up next, not a benchmark: tracing
adds its own overhead; tools/bench.py times the step.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import pathlib
import shutil
import sys
import tempfile

import jax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import bench  # noqa: E402  (tools/ is not a package)
from ift_jax import hostenv  # noqa: E402


def summarize(trace_path: str, steps: int, top: int) -> list[str]:
  """Per process: total time per step, then its `top` operations by time per step."""
  events = json.load(gzip.open(trace_path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  lines = []
  for pid, process in names.items():
    total, count = collections.Counter(), collections.Counter()
    for e in events:
      if e.get("pid") == pid and e.get("ph") == "X":
        total[e["name"]] += e.get("dur", 0)
        count[e["name"]] += 1
    if not total:
      continue
    lines.append(f"== {process}: {sum(total.values()) / 1e3 / steps:.1f} ms of events per step")
    for name, us in total.most_common(top):
      lines.append(f"  {us / 1e3 / steps:9.2f} ms/step  x{count[name] / steps:6.1f}  {name[:140]}")
  return lines


def main() -> None:
  hostenv.use_huge_pages()  # profile the process `ift-jax` and tools/bench.py run
  ap = bench.parser()
  ap.add_argument("--top", type=int, default=30)
  ap.add_argument("--out", default="", help="keep the Perfetto trace in this folder")
  ap.add_argument("--hlo", default="", help="write the compiled step's optimized HLO text here (gzipped)")
  args = ap.parse_args()
  setup = bench.build(args)
  state, batch = setup.state, setup.batches[0]
  if args.hlo:  # compiled once more ahead of time: the same program (and kernel names) the steps below run
    with gzip.open(args.hlo, "wt") as f:
      f.write(setup.compiled.train.lower(state, batch).compile().as_text())
  for _ in range(1 + args.warmup):  # compile and warm outside the trace
    state, metrics = setup.compiled.train(state, batch)
  jax.block_until_ready(metrics)
  folder = tempfile.mkdtemp()
  jax.profiler.start_trace(folder, create_perfetto_trace=True)
  for _ in range(args.steps):
    state, metrics = setup.compiled.train(state, batch)
  jax.block_until_ready(metrics)
  jax.profiler.stop_trace()
  trace = glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)[0]
  print("\n".join(summarize(trace, args.steps, args.top)), flush=True)
  if args.out:
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    shutil.copy(trace, args.out)
  shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
  main()

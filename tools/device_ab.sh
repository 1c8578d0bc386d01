#!/usr/bin/env bash
# A/B of whole versions of the package on one shape, and the PyTorch peer, in ONE device call.
#
# Prepare here (the device machine has no git history; .ab/ is what travels, named in the call's `carry`):
#   tools/device_ab.sh prepare base HEAD            # .ab/base/ift_jax = the package at a git revision
#   tools/device_ab.sh prepare cand                 # .ab/cand/ift_jax = the working tree's package
#   tools/device_ab.sh flags lt base "--xla_gpu_enable_cublaslt=true"
#                                                   # .ab/lt = .ab/base's package run under these XLA_FLAGS
#   (.gitignore keeps .ab/ out of commits)
# Run there (or here with a tiny SHAPE and FLAGS for a smoke run):
#   ORDER="base cand PEER base cand" tools/device_ab.sh
# Each name in ORDER runs tools/bench.py against .ab/<name>/ift_jax; PEER runs the peer script (copied to
# .ab/peer by `prepare`) with PEER_FLAGS. Alternate the versions and repeat each: the spread between repeats of
# one version is the noise to beat. JSON lines go to $OUT/ab.jsonl (or /tmp); a table of step times, tokens/s,
# ratio to the first peer line, peak memory and final loss (a check that the versions compute the same) is last.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
  name=${2:?usage: tools/device_ab.sh prepare NAME [REV]}
  rm -rf ".ab/$name" && mkdir -p ".ab/$name" ".ab/peer"
  if [ -n "${3:-}" ]; then git archive "$3" ift_jax | tar -x -C ".ab/$name"; else cp -r ift_jax ".ab/$name/"; fi
  find ".ab/$name" -name __pycache__ -prune -exec rm -rf {} +
  peer=${PEER:-../shared/peer/torch_hf_sft.py}
  if [ -f "$peer" ]; then cp "$peer" .ab/peer/torch_hf_sft.py; else echo "no peer script at $peer: PEER runs fail"; fi
  echo ".ab/$name/ift_jax ready"
  exit 0
fi
if [ "${1:-}" = flags ]; then  # a variant that is another version's package under other XLA flags
  name=${2:?usage: tools/device_ab.sh flags NAME PACKAGE XLA_FLAGS}; package=${3:?}; flags=${4:?}
  rm -rf ".ab/$name" && mkdir -p ".ab/$name"
  echo "$package" >".ab/$name/package" && echo "$flags" >".ab/$name/xla_flags"
  echo ".ab/$name: .ab/$package's package with XLA_FLAGS=$flags"
  exit 0
fi
STEPS=${STEPS:-16}
SHAPE=${SHAPE:-"--model llama-1b --batch 8 --seq 2048"}
FLAGS=${FLAGS:-"--dtype bfloat16 --attention cudnn --loss-chunk 256"}
ORDER=${ORDER:?set ORDER, e.g. ORDER=\"base cand PEER base cand\"}
PEER_FLAGS=${PEER_FLAGS-"--compile"}
out=${OUT:-/tmp}/ab.jsonl
: >"$out"
failed=()  # runs that printed no result; the table leaves them out and the script exits 1
say() { echo "[${SECONDS}s] $*" >&2; }
tag() {  # adds {"variant": name} to the JSON line; everything else goes to stderr
  python3 -c "import json, sys
for l in sys.stdin:
  if l.startswith('{'): print(json.dumps({**json.loads(l), 'variant': sys.argv[1]}), flush=True)
  else: print(l, end='', file=sys.stderr)" "$1"
}
for v in $ORDER; do
  say "$v"
  if [ "$v" = PEER ]; then
    # shellcheck disable=SC2086
    timeout 300 python3 .ab/peer/torch_hf_sft.py $SHAPE --steps "$STEPS" $PEER_FLAGS 2>&1 | tag peer | tee -a "$out" \
      || failed+=(PEER)
  else
    package=$v xla_flags=${XLA_FLAGS:-}
    if [ -f ".ab/$v/package" ]; then package=$(cat ".ab/$v/package"); xla_flags="$xla_flags $(cat ".ab/$v/xla_flags")"; fi
    if [ ! -d ".ab/$package/ift_jax" ]; then
      echo "no .ab/$package/ift_jax: run tools/device_ab.sh prepare $package [REV] first" >&2; failed+=("$v"); continue
    fi
    # shellcheck disable=SC2086
    XLA_FLAGS="$xla_flags" PYTHONPATH=".ab/$package" timeout 150 python3 tools/bench.py $SHAPE --steps "$STEPS" \
      --warmup 2 $FLAGS 2>&1 | tag "$v" | tee -a "$out" || failed+=("$v")
  fi
done
say table
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
peer = next((r["tokens_per_s"] for r in rows if r["variant"] == "peer"), None)
for r in rows:
  ratio = f"{r['tokens_per_s'] / peer:.3f}" if peer else "-"
  print(f"{r['variant']:>12}  step {r['step_s']:.4f} s  {r['tokens_per_s']:>9} tokens/s  x peer {ratio}  "
        f"peak {r.get('peak_mem_gib')} GiB  loss {r.get('loss')}")
PY
if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]} (their errors are above)"; exit 1; fi

#!/usr/bin/env bash
# One call, project vs PyTorch peer on the same machine and shapes, then the ratios.
#   tools/device_bench.sh                      # GPU: llama-1b and qwen-0.5b at 8 x 2048 (well under 10 min on an H100/H200)
#   SHAPES="tiny:2:64" STEPS=2 tools/device_bench.sh   # CPU smoke run
#   SHAPES="smollm2-135m:8:128" STEPS=3 JAX_DTYPE=float32 tools/device_bench.sh   # the 2-core CPU comparison
# SHAPES: space-separated model:batch:seq. PEER: path of torch_hf_sft.py. Needs jax/flax/optax and torch/transformers.
# SFT_SHAPES: the same, benchmarked with real SFT lengths (tools/sft_lengths.json): ift-jax packs them, the peer
#   runs at the mean length it would pad each batch to, and its tokens/s are scaled by its padding efficiency.
# JAX_FLAGS: extra tools/bench.py flags; on a GPU "--attention cudnn --loss-chunk 256" unless set.
# VARIANTS: ';'-separated further bench.py flag sets, each run on the first of SHAPES after everything else
#   (e.g. VARIANTS="--remat dots;--loss-chunk 0"), each with its ratios to the same peers.
# PROFILE=1: after the ratios, tools/profile_step.py on the first of SHAPES (where the step's time goes).
# On a GPU, tools/gpu_check.py runs first: the fused attention kernels must keep packed examples apart.
set -euo pipefail
cd "$(dirname "$0")/.."
PEER=${PEER:-../shared/peer/torch_hf_sft.py}
SHAPES=${SHAPES:-"llama-1b:8:2048 qwen-0.5b:8:2048"}
STEPS=${STEPS:-8}
JAX_DTYPE=${JAX_DTYPE:-bfloat16}
SFT_SHAPES=${SFT_SHAPES-"llama-1b:8:2048"}
VARIANTS=${VARIANTS:-}
PEER_COMPILE=${PEER_COMPILE-llama-1b}  # models whose peer is also timed with torch.compile (GPU only)
say() { echo "[${SECONDS}s] $*" >&2; }
gpu=0
if python3 -c "import jax, sys; sys.exit(jax.devices()[0].platform != 'gpu')" 2>/dev/null; then gpu=1; fi
if [ "$gpu" = 1 ]; then
  JAX_FLAGS=${JAX_FLAGS-"--attention cudnn --loss-chunk 256"}
  PYTHONPATH=. python3 tools/gpu_check.py || echo "gpu_check FAILED: the fused attention results above are wrong"
else
  JAX_FLAGS=${JAX_FLAGS:-}
fi
out=$(mktemp)
for spec in $SHAPES; do
  IFS=: read -r model batch seq <<<"$spec"
  say "$spec"
  # shellcheck disable=SC2086
  PYTHONPATH=. python3 tools/bench.py --model "$model" --batch "$batch" --seq "$seq" --steps "$STEPS" \
    --dtype "$JAX_DTYPE" $JAX_FLAGS | tee -a "$out" || echo "ift-jax $spec failed"
  python3 "$PEER" --model "$model" --batch "$batch" --seq "$seq" --steps "$STEPS" | tee -a "$out" \
    || echo "peer $spec failed"
  if [[ " $PEER_COMPILE " == *" $model "* ]] && python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    python3 "$PEER" --model "$model" --batch "$batch" --seq "$seq" --steps "$STEPS" --compile | tee -a "$out" \
      || echo "compiled peer $spec failed"
  fi
done
for spec in $SFT_SHAPES; do
  IFS=: read -r model batch seq <<<"$spec"
  say "SFT $spec"
  # shellcheck disable=SC2086
  line=$(PYTHONPATH=. python3 tools/bench.py --model "$model" --batch "$batch" --seq "$seq" --steps "$STEPS" \
    --dtype "$JAX_DTYPE" --lengths tools/sft_lengths.json $JAX_FLAGS) || { echo "ift-jax SFT $spec failed"; continue; }
  echo "$line" | tee -a "$out"
  padded=$(python3 -c "import json,sys; print(-(-json.loads(sys.argv[1])['peer_padded_seq'] // 8) * 8)" "$line")
  python3 "$PEER" --model "$model" --batch "$batch" --seq "$padded" --steps "$STEPS" \
    | python3 -c "import json,sys; r=json.loads([l for l in sys.stdin if l.startswith('{')][-1]); r['sft_of']=$seq; print(json.dumps(r))" \
    | tee -a "$out" || echo "peer SFT $spec failed"
done
if [ -n "$VARIANTS" ]; then
  IFS=: read -r model batch seq <<<"${SHAPES%% *}"
  IFS=';' read -ra variants <<<"$VARIANTS"
  for variant in "${variants[@]}"; do
    say "variant $variant"
    # shellcheck disable=SC2086
    PYTHONPATH=. python3 tools/bench.py --model "$model" --batch "$batch" --seq "$seq" --steps "$STEPS" \
      --dtype "$JAX_DTYPE" $JAX_FLAGS $variant | tee -a "$out" || echo "variant '$variant' failed"
  done
fi
say "ratios"
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for r in rows:
  if r["impl"] == "ift-jax":  # which configuration of the step the ratio is for
    r["label"] = (f"{r['model']} [{r['attention']} attention, remat {r['remat']}, loss_chunk {r['loss_chunk']}"
                  f"{', scanned' if r['scan_layers'] else ''}, rows {r.get('rows', '?')}]")
for r in rows:
  if r["impl"] == "ift-jax" and r.get("mode") == "sft":
    for peer in rows:
      if peer["impl"] != "ift-jax" and (peer["model"], peer["batch"], peer.get("sft_of")) == (r["model"], r["batch"], r["seq"]):
        peer_useful = peer["tokens_per_s"] * r["peer_padding_efficiency"]
        print(f"{r['label']} SFT lengths, {r['batch']} rows x {r['seq']}: useful tokens/s ift-jax (packed) / "
              f"{peer['impl']} (padded to {peer['seq']}) = {r['useful_tokens_per_s'] / peer_useful:.2f} "
              f"({r['useful_tokens_per_s']} vs {peer_useful:.1f}; packing efficiency "
              f"{r['packing_efficiency']} vs padding efficiency {r['peer_padding_efficiency']})")
    continue
  if r["impl"] != "ift-jax":
    continue
  for peer in rows:
    if peer["impl"] != "ift-jax" and "sft_of" not in peer and (peer["model"], peer["batch"], peer["seq"]) == (
        r["model"], r["batch"], r["seq"]):
      mem = ""
      if r.get("peak_mem_gib") and peer.get("peak_mem_gib"):
        mem = f", peak memory {r['peak_mem_gib']} vs {peer['peak_mem_gib']} GiB"
      print(f"{r['label']} {r['batch']}x{r['seq']}: ift-jax / {peer['impl']} tokens/s = "
            f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f} ({r['tokens_per_s']} vs {peer['tokens_per_s']}){mem}")
PY
rm -f "$out"
if [ "${PROFILE:-0}" = 1 ]; then
  IFS=: read -r model batch seq <<<"${SHAPES%% *}"
  say "profile $model:$batch:$seq"
  # shellcheck disable=SC2086
  PYTHONPATH=. python3 tools/profile_step.py --model "$model" --batch "$batch" --seq "$seq" --steps 3 \
    --dtype "$JAX_DTYPE" $JAX_FLAGS --top 25 || echo "profile failed"
fi

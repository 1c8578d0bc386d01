#!/usr/bin/env bash
# One call, project vs PyTorch peer on the same machine and shapes, then the ratios.
#   tools/device_bench.sh                      # GPU: llama-1b and qwen-0.5b at 8 x 2048 (well under 10 min on an H100/H200)
#   SHAPES="tiny:2:64" STEPS=2 tools/device_bench.sh   # CPU smoke run
#   SHAPES="smollm2-135m:8:128" STEPS=3 JAX_DTYPE=float32 tools/device_bench.sh   # the 2-core CPU comparison
# SHAPES: space-separated model:batch:seq. PEER: path of torch_hf_sft.py. Needs jax/flax/optax and torch/transformers.
# SFT_SHAPES: the same, benchmarked with real SFT lengths (tools/sft_lengths.json): ift-jax packs them, the peer
#   runs at the mean length it would pad each batch to, and its tokens/s are scaled by its padding efficiency.
# JAX_FLAGS: extra tools/bench.py flags (e.g. "--attention cudnn --loss-chunk 256").
set -euo pipefail
cd "$(dirname "$0")/.."
PEER=${PEER:-../shared/peer/torch_hf_sft.py}
SHAPES=${SHAPES:-"llama-1b:8:2048 qwen-0.5b:8:2048"}
STEPS=${STEPS:-8}
JAX_DTYPE=${JAX_DTYPE:-bfloat16}
SFT_SHAPES=${SFT_SHAPES-"llama-1b:8:2048"}
JAX_FLAGS=${JAX_FLAGS:-}
PEER_COMPILE=${PEER_COMPILE:-1}  # also time the peer with torch.compile (GPU only)
out=$(mktemp)
for spec in $SHAPES; do
  IFS=: read -r model batch seq <<<"$spec"
  # shellcheck disable=SC2086
  PYTHONPATH=. python3 tools/bench.py --model "$model" --batch "$batch" --seq "$seq" --steps "$STEPS" \
    --dtype "$JAX_DTYPE" $JAX_FLAGS | tee -a "$out"
  python3 "$PEER" --model "$model" --batch "$batch" --seq "$seq" --steps "$STEPS" | tee -a "$out"
  if [ "$PEER_COMPILE" = 1 ] && python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    python3 "$PEER" --model "$model" --batch "$batch" --seq "$seq" --steps "$STEPS" --compile | tee -a "$out"
  fi
done
for spec in $SFT_SHAPES; do
  IFS=: read -r model batch seq <<<"$spec"
  # shellcheck disable=SC2086
  line=$(PYTHONPATH=. python3 tools/bench.py --model "$model" --batch "$batch" --seq "$seq" --steps "$STEPS" \
    --dtype "$JAX_DTYPE" --lengths tools/sft_lengths.json $JAX_FLAGS)
  echo "$line" | tee -a "$out"
  padded=$(python3 -c "import json,sys; print(-(-json.loads(sys.argv[1])['peer_padded_seq'] // 8) * 8)" "$line")
  python3 "$PEER" --model "$model" --batch "$batch" --seq "$padded" --steps "$STEPS" \
    | python3 -c "import json,sys; r=json.loads([l for l in sys.stdin if l.startswith('{')][-1]); r['sft_of']=$seq; print(json.dumps(r))" \
    | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for r in rows:
  if r["impl"] == "ift-jax" and r.get("mode") == "sft":
    for peer in rows:
      if peer["impl"] != "ift-jax" and (peer["model"], peer["batch"], peer.get("sft_of")) == (r["model"], r["batch"], r["seq"]):
        peer_useful = peer["tokens_per_s"] * r["peer_padding_efficiency"]
        print(f"{r['model']} SFT lengths, {r['batch']} rows x {r['seq']}: useful tokens/s ift-jax (packed) / "
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
      print(f"{r['model']} {r['batch']}x{r['seq']}: ift-jax / {peer['impl']} tokens/s = "
            f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f} ({r['tokens_per_s']} vs {peer['tokens_per_s']}){mem}")
PY
rm -f "$out"

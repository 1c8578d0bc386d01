"""Times the project's real train step on a named model shape with random weights; prints one JSON line.

    python tools/bench.py --model smollm2-135m --batch 8 --seq 128 --steps 4 --dtype float32
    python tools/bench.py --model llama-1b --batch 8 --seq 2048            # on a GPU
    python tools/bench.py --model llama-1b --batch 8 --seq 2048 --lengths tools/sft_lengths.json   # realistic SFT

Same shapes and the same FLOPs formula as the PyTorch peer (../shared/peer/torch_hf_sft.py), so the two JSON
lines of one machine give a ratio. A benchmark, not a test: nothing here asserts a speed.

With --lengths, examples get the (prompt, completion) lengths of real instruction data (tools/sft_lengths.json)
and are packed next-fit into the batch's rows, a new batch every step, as `ift-jax train` does; the line reports
useful (non-padding) tokens/s and, for the peer, the padded sequence length and padding efficiency it would have
padding each batch of `batch` examples to its longest (tools/device_bench.sh runs the peer at that length).
Needs only jax, flax and optax (not datasets or ml_collections), so it runs on the bare device image.
Like `ift-jax`, it restarts itself once under GLIBC_TUNABLES=glibc.malloc.hugetlb=1 unless GLIBC_TUNABLES is set
(`ift_jax.hostenv`); the JSON line reports the value it ran under.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ift_jax import hostenv, optim, sharding, steps
from ift_jax.data import pack, tokenize
from ift_jax.model import load
from ift_jax.model.config import ModelConfig

SHAPES = {  # the peer's shapes (Llama-3.2-1B, Qwen2.5-0.5B without qkv bias, SmolLM2-135M, tiny)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "qwen-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=1e5),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


def train_flops_per_token(shape: dict, seq: int) -> float:
  """6 × matmul parameters + 12·L·H·Dh·T attention (the peer's convention: causal attention not halved)."""
  d, f, n, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
  h, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
  hd = d // h
  per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f
  return 6 * (n * per_layer + d * v) + 12 * n * h * hd * seq


def _batch(vocab: int, batch: int, seq: int) -> dict[str, np.ndarray]:
  """One example per row, the first quarter as an unweighted prompt, as in the peer."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, size=(batch, seq + 1)).astype(np.int32)
  weights = np.ones((batch, seq), np.float32)
  weights[:, : seq // 4] = 0
  return {"inputs": tokens[None, :, :-1], "targets": tokens[None, :, 1:], "weights": weights[None],
          "segment_ids": np.ones((1, batch, seq), np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (1, batch, seq)).copy()}


def _sft_batches(path: str, vocab: int, batch: int, seq: int, count: int) -> tuple[list[dict], dict]:
  """`count` packed batches of real-length examples, and the padding the peer's layout would have."""
  with open(path) as f:
    lengths = [tuple(pc) for pc in json.load(f)["lengths"] if sum(pc) <= seq + 1]
  rng = np.random.default_rng(0)
  examples, batches, cursor = [], [], 0
  while len(batches) < count:
    prompt, completion = lengths[cursor % len(lengths)]
    cursor += 1
    examples.append(tokenize.Example(ids=rng.integers(1, vocab, prompt + completion).astype(np.int32),
                                     weights=np.r_[np.zeros(prompt), np.ones(completion)].astype(np.float32),
                                     template="sft", record_index=cursor))
    rows = pack.pack(examples, seq_len=seq, packed=True)
    if len(rows) > batch:  # the last example opened row batch + 1: the batch is full without it
      rows = pack.pack(examples[:-1], seq_len=seq, packed=True)
      batches.append({k: getattr(rows, k)[None] for k in steps.BATCH_KEYS})
      examples = examples[-1:]
  used = [sum(lengths[i % len(lengths)]) for i in range(cursor - 1)]
  padded = [batch * max(used[i:i + batch]) for i in range(0, len(used), batch)]  # each batch to its longest
  peer = {"peer_padded_seq": int(np.mean([p / batch for p in padded])),
          "peer_padding_efficiency": round(sum(used) / sum(padded), 4)}
  return batches, peer


@dataclasses.dataclass
class Setup:
  """A compiled train step on a model shape with random weights, and its batches already on the devices."""
  shape: dict
  compiled: steps.CompiledSteps
  state: dict
  host: list[dict[str, np.ndarray]]  # 1 (compile) + warmup + steps batches
  batches: list[dict[str, jax.Array]]
  extra: dict  # the SFT mode's peer padding figures


def build(args: argparse.Namespace) -> Setup:
  shape = SHAPES[args.model]
  cfg = ModelConfig.from_hf({"model_type": "llama", **shape, "max_position_embeddings": max(args.seq, 2048)})
  platform = jax.devices()[0].platform  # "auto" resolved as `ift-jax train` does; the JSON line reports the result
  if args.dtype == "auto":
    args.dtype = steps.auto_compute_dtype(platform)
  if args.attention == "auto":
    args.attention = steps.auto_attention(platform, args.dtype, cfg.head_dim)
  mesh = sharding.make_mesh(data=args.data, fsdp=args.fsdp, tensor=args.tensor)
  graphdef, abstract, _ = load.abstract_model(cfg)
  param_sh = load.param_shardings(mesh, cfg)
  schedule = optim.learning_rate_schedule(lr=1e-5, warmup_steps=0, total_steps=1000, end_lr_ratio=1.0)
  optimizer = optim.make_optimizer(lr=1e-5, warmup_steps=0, total_steps=1000, end_lr_ratio=1.0,
                                   weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)
  runner = steps.ModelRunner(graphdef, compute_dtype=jnp.dtype(args.dtype), remat=args.remat,
                             loss_chunk=args.loss_chunk, attention=args.attention,
                             scan_layers=bool(args.scan_layers), one_example_per_row=not args.lengths)
  compiled = steps.jit_steps(runner, optimizer, schedule, mesh=mesh, abstract_params=abstract,
                             param_shardings=param_sh, num_slots=2)
  state = compiled.init(load.init_params(cfg, mesh, seed=0))
  extra = {}
  if args.lengths:
    host, extra = _sft_batches(args.lengths, cfg.vocab_size, args.batch, args.seq, 1 + args.warmup + args.steps)
  else:
    host = [_batch(cfg.vocab_size, args.batch, args.seq)] * (1 + args.warmup + args.steps)
  batches = [jax.device_put(b, steps.train_batch_sharding(mesh)) for b in host]  # placed before timing
  return Setup(shape, compiled, state, host, batches, extra)


def run(args: argparse.Namespace) -> dict:
  setup = build(args)
  shape, compiled, state, host, batches, extra = (setup.shape, setup.compiled, setup.state, setup.host,
                                                  setup.batches, setup.extra)
  t0 = time.perf_counter()
  state, metrics = compiled.train(state, batches[0])
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for b in batches[1:1 + args.warmup]:
    state, metrics = compiled.train(state, b)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for b in batches[1 + args.warmup:]:
    state, metrics = compiled.train(state, b)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / args.steps
  tokens_per_s = args.batch * args.seq / step_s
  if args.lengths:
    timed = host[1 + args.warmup:]
    useful = sum(int((b["segment_ids"] > 0).sum()) for b in timed) / len(timed)
    extra.update(mode="sft", useful_tokens_per_s=round(useful / step_s, 1),
                 target_tokens_per_s=round(sum(float(b["weights"].sum()) for b in timed) / len(timed) / step_s, 1),
                 packing_efficiency=round(useful / (args.batch * args.seq), 4),
                 examples_per_step=round(sum(int(b["segment_ids"].max(axis=-1).sum()) for b in timed) / len(timed), 1))
  stats = jax.devices()[0].memory_stats() or {}
  return dict(impl="ift-jax", model=args.model, batch=args.batch, seq=args.seq, dtype=args.dtype,
              rows="packed" if args.lengths else "one example each",
              remat=args.remat, attention=args.attention, loss_chunk=args.loss_chunk,
              scan_layers=bool(args.scan_layers), **extra,
              step_s=round(step_s, 4), tokens_per_s=round(tokens_per_s, 1),
              mfu=round(tokens_per_s * train_flops_per_token(shape, args.seq) / (args.peak_tflops * 1e12), 4),
              peak_mem_gib=round(stats["peak_bytes_in_use"] / 2**30, 2) if "peak_bytes_in_use" in stats else None,
              compile_s=round(compile_s, 2), loss=round(float(metrics["loss"]), 4),
              jax=jax.__version__, device=jax.devices()[0].device_kind, devices=jax.device_count(),
              glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""), xla_flags=os.environ.get("XLA_FLAGS", "").strip())


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="smollm2-135m", choices=sorted(SHAPES))
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=1)
  # Defaults = the trainer's default config (ift_jax/configs/default.py); auto resolves as `ift-jax train` does.
  ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
  ap.add_argument("--remat", default="none", choices=["none", "full", "dots"])
  ap.add_argument("--attention", default="auto", choices=["auto", "einsum", "jax", "cudnn", "splash"])
  ap.add_argument("--loss-chunk", type=int, default=32,
                  help="positions per fused cross-entropy chunk; 0 = whole-row logits")
  ap.add_argument("--scan-layers", type=int, default=0, help="1: layers under lax.scan; 0: unrolled")
  ap.add_argument("--lengths", default="", help="realistic SFT: a JSON of real (prompt, completion) lengths")
  ap.add_argument("--data", type=int, default=-1)
  ap.add_argument("--fsdp", type=int, default=1)
  ap.add_argument("--tensor", type=int, default=1)
  ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100/H200 SXM: 989)")
  return ap


def main() -> None:
  hostenv.use_huge_pages()  # as `ift-jax` runs: XLA's CPU temporaries in huge pages (see ift_jax.hostenv)
  print(json.dumps(run(parser().parse_args())), flush=True)


if __name__ == "__main__":
  main()

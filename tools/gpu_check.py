"""Checks that need a GPU: the fused attention kernels give the spelled-out attention's results on packed rows.

    python tools/gpu_check.py            # on a GPU: "jax" (XLA) and "cudnn" against "einsum"
    python tools/gpu_check.py --only jax # anywhere (the CPU smoke run of this script)

The pytest suite runs on CPU, where cuDNN does not exist, so tools/device_bench.sh runs this first on the device
machine. Each implementation, in bfloat16, on rows that pack two or three examples and end in padding:
  1. logits equal the "einsum" path's at every real position (bfloat16 tolerance);
  2. isolation: each packed example's logits equal those of the same example run alone in its own row — a
     kernel that let packed examples see each other fails here however close it is to "einsum";
  3. the gradient of the fused-loss train objective equals the "einsum" path's (relative L2 difference).
The same on rows that hold one example each (pack(packed=False)), where the kernels get row lengths instead of
a mask (ModelRunner.one_example_per_row): logits and gradients against "einsum" with the mask — padding
queries' outputs must stay finite, or 0 × NaN would reach the weight gradients.
Prints one JSON line per implementation and layout, and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ift_jax import sharding, steps
from ift_jax.model import load
from ift_jax.model.config import ModelConfig

# Head size 64 and bfloat16: what cuDNN's flash attention takes; two layers so errors pass through a block.
CFG = ModelConfig.from_hf(dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256))
LENGTH = 128
LAYOUT = [(40, 60), (100,), (20, 30, 50)]  # example lengths per packed row; the rest of each row is padding


def _packed(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], list[tuple[int, int, int]]]:
  """Packed rows and, for each example, (row, start, length)."""
  rows = len(LAYOUT)
  batch = {k: np.zeros((rows, LENGTH), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
  batch["weights"] = np.zeros((rows, LENGTH), np.float32)
  spans = []
  for r, lengths in enumerate(LAYOUT):
    start = 0
    for seg, n in enumerate(lengths, 1):
      tokens = rng.integers(1, CFG.vocab_size, n + 1)
      sl = slice(start, start + n)
      batch["inputs"][r, sl], batch["targets"][r, sl] = tokens[:-1], tokens[1:]
      batch["segment_ids"][r, sl], batch["positions"][r, sl] = seg, np.arange(n)
      batch["weights"][r, start + n // 3:start + n] = 1.0  # the first third is an unweighted prompt
      spans.append((r, start, n))
      start += n
  return batch, spans


def _unpacked(batch: dict[str, np.ndarray], spans: list[tuple[int, int, int]]) -> dict[str, np.ndarray]:
  """Each example alone in its own row, then padding (pack(packed=False)'s layout), and one all-padding row as
  loaders add to a short shard."""
  return {k: np.concatenate([_alone(batch, span)[k] for span in spans] + [np.zeros((1, LENGTH), v.dtype)])
          for k, v in batch.items()}


def _alone(batch: dict[str, np.ndarray], span: tuple[int, int, int]) -> dict[str, np.ndarray]:
  """The example at `span` alone at the start of a row of the same length."""
  r, start, n = span
  one = {k: np.zeros((1, LENGTH), v.dtype) for k, v in batch.items()}
  for k in one:
    one[k][0, :n] = batch[k][r, start:start + n]
  one["segment_ids"][0, :n] = 1
  return one


def check(implementation: str, params, graphdef, batch, spans, *, one_example_per_row: bool) -> dict:
  def runner(attention):
    return steps.ModelRunner(graphdef, compute_dtype=jnp.bfloat16, attention=attention, loss_chunk=32,
                             scan_layers=False, one_example_per_row=one_example_per_row)

  logits = jax.jit(lambda p, b, a: runner(a).logits(p, b), static_argnums=2)
  real = batch["segment_ids"] > 0
  ref = np.asarray(logits(params, batch, "einsum"), np.float32)
  got = np.asarray(logits(params, batch, implementation), np.float32)
  scale = float(np.abs(ref[real]).max())
  vs_einsum = float(np.abs(got - ref)[real].max()) / scale
  isolation = 0.0
  for span in ([] if one_example_per_row else spans):
    r, start, n = span
    alone = np.asarray(logits(params, _alone(batch, span), implementation), np.float32)[0, :n]
    isolation = max(isolation, float(np.abs(got[r, start:start + n] - alone).max()) / scale)

  def loss(p, attention):
    sums = runner(attention).loss_sums(p, batch)
    return sums["loss"] / sums["weight"]

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g_ref, g_got = grad(params, "einsum"), grad(params, implementation)
  sq = lambda t: sum(float(jnp.sum(jnp.square(x.astype(jnp.float32)))) for x in jax.tree.leaves(t))
  grad_rel = (sq(jax.tree.map(jnp.subtract, g_got, g_ref)) / sq(g_ref)) ** 0.5
  # bfloat16 has 8 bits of mantissa (~0.4 % a rounding); two layers of differently ordered sums stay within ~2 %.
  # (NaN fails every comparison, so non-finite logits or gradients fail too.)
  ok = vs_einsum < 0.02 and isolation < 0.02 and grad_rel < 0.05
  return dict(check="attention", implementation=implementation, device=jax.devices()[0].device_kind,
              rows="one example each (row lengths)" if one_example_per_row else "packed (mask)",
              logits_vs_einsum=round(vs_einsum, 5), packed_vs_alone=round(isolation, 5),
              grad_rel_l2=round(grad_rel, 5), ok=ok)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--only", choices=["jax", "cudnn"], default=None)
  args = ap.parse_args()
  on_gpu = jax.devices()[0].platform == "gpu"
  implementations = [args.only] if args.only else (["jax", "cudnn"] if on_gpu else ["jax"])
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
  graphdef, _, _ = load.abstract_model(CFG)
  params = load.init_params(CFG, mesh, seed=0)
  batch, spans = _packed(np.random.default_rng(0))
  results = [check(impl, params, graphdef, batch, spans, one_example_per_row=False) for impl in implementations]
  results += [check(impl, params, graphdef, _unpacked(batch, spans), spans, one_example_per_row=True)
              for impl in implementations]
  for r in results:
    print(json.dumps(r), flush=True)
  sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
  main()

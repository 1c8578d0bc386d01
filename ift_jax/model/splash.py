"""Pallas splash attention (TPU): causal flash attention that keeps packed examples apart by segment ids.

The kernel is JAX's own (`jax.experimental.pallas.ops.tpu.splash_attention`). It takes each row's segment ids
instead of a dense B×L×S mask, skips key blocks above the causal diagonal, and handles grouped-query heads
natively. Being a Pallas kernel, XLA cannot partition it: under a mesh it runs inside `shard_map`, each device
on its own rows (and its heads, where the tensor axis divides both query and key/value heads). Sliding-window
layers (Mistral, Qwen2 windows, Gemma 3) get a local-window kernel; a model mixing both picks per layer.

On other backends it runs in Pallas's interpreter: exact, but slow — for tests of this wrapper on CPU only.

Shape letters: B batch, L length, H query heads, K key/value heads, E head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ift_jax import sharding

BLOCK = 128  # the kernel's query/key tile; rows are padded to a multiple of it
_PAD_SEGMENT = -1  # segment of the padding added for the tiles: no real token (segment >= 0) attends to it


def splash_attention(q_BxLxHxE: jax.Array, k_BxLxKxE: jax.Array, v_BxLxKxE: jax.Array,
                     segment_ids_BxL: jax.Array, scale: float, window: int | None = None) -> jax.Array:
  """softmax(q·kᵀ·scale) v over keys at or before each query in the same segment (and, with `window`, fewer than
  `window` positions back); out_BxLxHxE.

  Tokens of segment 0 (padding) attend among themselves causally: finite junk at positions of weight 0.
  """
  local = functools.partial(_splash_local, scale=scale, window=window)
  mesh = sharding.active_mesh()
  if mesh is None:
    return local(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL)
  q_spec = sharding.logical_to_spec(("batch", "length", "heads", "head_dim"), q_BxLxHxE.shape, mesh)
  kv_spec = sharding.logical_to_spec(("batch", "length", "kv_heads", "head_dim"), k_BxLxKxE.shape, mesh)
  if q_spec[2] != kv_spec[2]:  # a shard must hold whole groups: its query heads and their key/value heads
    q_spec, kv_spec = P(*q_spec[:2], None, q_spec[3]), P(*kv_spec[:2], None, kv_spec[3])
  fn = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(*q_spec[:2])), out_specs=q_spec,
                     check_vma=False)
  return fn(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL)


def _splash_local(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL, scale, window):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
  b, l, h, e = q_BxLxHxE.shape
  pad = -l % BLOCK
  padded = l + pad
  # The kernel does not scale the scores: scale the queries (exact where the scale is a power of two, as for
  # heads of 64 or Gemma's 256; one rounding of q otherwise).
  q_BxLxHxE = q_BxLxHxE * jnp.asarray(scale, q_BxLxHxE.dtype)
  to_heads_first = lambda a: jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  segment_ids_BxL = jnp.pad(segment_ids_BxL.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=_PAD_SEGMENT)
  kernel = _kernel(h, padded, window, interpret=jax.devices()[0].platform != "tpu")
  segments = kernel_lib.SegmentIds(q=segment_ids_BxL, kv=segment_ids_BxL)
  out_BxHxLxE = jax.vmap(kernel, in_axes=(0, 0, 0, kernel_lib.SegmentIds(q=0, kv=0)))(
      to_heads_first(q_BxLxHxE), to_heads_first(k_BxLxKxE), to_heads_first(v_BxLxKxE), segments)
  return out_BxHxLxE.transpose(0, 2, 1, 3)[:, :l]


def _kernel(heads: int, length: int, window: int | None, *, interpret: bool):
  """The causal (or causal sliding-window) kernel for `heads` heads of `length` positions. Built anew in each
  trace, not cached: it holds arrays (its block-sparsity tables) that would leak from one trace into the next."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
  if window is None:
    head_mask = mask_lib.CausalMask((length, length))
  else:  # keys at most window - 1 positions back, none ahead: the model's `distance < sliding_window`
    head_mask = mask_lib.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
  mask = mask_lib.MultiHeadMask([head_mask for _ in range(heads)])
  blocks = kernel_lib.BlockSizes(block_q=BLOCK, block_kv=BLOCK, block_kv_compute=BLOCK, block_q_dkv=BLOCK,
                                 block_kv_dkv=BLOCK, block_kv_dkv_compute=BLOCK, block_q_dq=BLOCK,
                                 block_kv_dq=BLOCK)
  return kernel_lib.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)

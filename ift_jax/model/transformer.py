"""A decoder in Flax NNX for the Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM) and Gemma 3.

Layers are stored stacked along a leading `layers` axis and run under `jax.lax.scan`, so a 30-layer model
compiles as fast as a one-layer model. Per-layer differences (Gemma 3's sliding-window vs global layers, each
with its own RoPE base) are a boolean scan input, not separate code paths. Parameters carry logical axis names
only (`logical_axes` metadata); `ift_jax.sharding` maps them onto the mesh. `decode` is the same model over a
K/V cache (stacked on the layers axis too) for generation; the training path `__call__` does not use it.

Shape letters: B batch, L length (queries), S length (keys), D hidden, H query heads, K key/value heads,
G query heads per key/value head, E head dim, F MLP hidden, V vocabulary, N layers.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ift_jax import sharding
from ift_jax.model import splash
from ift_jax.model.config import ModelConfig

# Stacked per-layer parameters: name -> (shape builder, logical axes). The leading axis is always `layers`.
def layer_param_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
  """Shapes (without the layers axis) and logical axes of every per-layer parameter."""
  d, h, k, e, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  specs = {
      "attn_norm": ((d,), ("norm",)),
      "q": ((d, h, e), ("embed", "heads", "head_dim")),
      "k": ((d, k, e), ("embed", "kv_heads", "head_dim")),
      "v": ((d, k, e), ("embed", "kv_heads", "head_dim")),
      "o": ((h, e, d), ("heads", "head_dim", "embed")),
      "mlp_norm": ((d,), ("norm",)),
      "gate": ((d, f), ("embed", "mlp")),
      "up": ((d, f), ("embed", "mlp")),
      "down": ((f, d), ("mlp", "embed")),
  }
  if cfg.qkv_bias:
    specs.update(q_bias=((h, e), ("heads", "head_dim")), k_bias=((k, e), ("kv_heads", "head_dim")),
                 v_bias=((k, e), ("kv_heads", "head_dim")))
  if cfg.o_bias:  # a hidden-size vector, replicated like the norm scales
    specs.update(o_bias=((d,), ("norm",)))
  if cfg.qk_norm:
    specs.update(q_norm=((e,), ("norm",)), k_norm=((e,), ("norm",)))
  if cfg.sandwich_norms:  # Gemma normalizes each sub-layer's output before adding it to the residual
    specs.update(attn_post_norm=((d,), ("norm",)), mlp_post_norm=((d,), ("norm",)))
  return specs


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], name: str, cfg: ModelConfig) -> jax.Array:
  if "norm" in name:  # the identity norm: Gemma stores w in (1 + w)
    return jnp.full(shape, 0.0 if cfg.norm_plus_one else 1.0, jnp.float32)
  if "bias" in name:
    return jnp.zeros(shape, jnp.float32)
  return 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)


class Layers(nnx.Module):
  """All decoder blocks, each parameter stacked over a leading `layers` axis."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    for name, (shape, axes) in layer_param_specs(cfg).items():
      value = _init(rngs, (cfg.num_layers, *shape), name, cfg)
      setattr(self, name, nnx.Param(value, logical_axes=("layers", *axes)))


class Transformer(nnx.Module):
  """Decoder-only transformer: embed → N × (attention, SwiGLU MLP) with pre-RMSNorm → RMSNorm → logits."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, v = cfg.hidden_size, cfg.vocab_size
    self.embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (v, d)), logical_axes=("vocab", "embed"))
    self.layers = Layers(cfg, rngs=rngs)
    self.final_norm = nnx.Param(_init(rngs, (d,), "norm", cfg), logical_axes=("norm",))
    if not cfg.tie_word_embeddings:
      self.lm_head = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d, v)), logical_axes=("embed", "vocab"))

  def hidden(self, tokens_BxL: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array, *,
             compute_dtype: Any = jnp.float32, remat: str = "none", attention: str = "einsum",
             scan_layers: bool = True, one_example_per_row: bool = False) -> jax.Array:
    """The last block's output x_BxLxD (before the final norm); `head` turns any slice of it into logits.

    `scan_layers=False` unrolls the layer loop: longer compiles, but no loop-carried stacked gradient buffers to
    zero-fill and update slice by slice (SmolLM2-135M, 8×128 on 2 CPU cores: 4.27 s a step instead of 5.02 s).
    `one_example_per_row` promises rows as `pack(packed=False)` lays them out — one example from position 0,
    then padding — so the "jax"/"cudnn" kernels get each row's length instead of a dense mask (see attention).
    """
    if remat != "none" and not scan_layers:
      # Unrolled, the recomputation is straight-line code that XLA merges with (or schedules beside) the forward
      # pass it repeats, so every activation is kept anyway: H200, llama-1b, remat "full" ran at the speed and
      # peak memory of "none"; on CPU the compiled step's temporaries shrank by 2 % instead of 57 %.
      raise ValueError(f"model.remat={remat!r} needs model.scan_layers=True: unrolled layers are not "
                       "rematerialized (XLA keeps their activations); use remat='none' or scan the layers")
    cfg = self.cfg
    embed_VxD = self.embed[...]
    x_BxLxD = self._embed(tokens_BxL, embed_VxD, compute_dtype)
    context = attention_context(positions_BxL, segment_ids_BxL, cfg)
    lengths_B = None
    if one_example_per_row and attention in ("jax", "cudnn") and not any(cfg.layer_is_sliding):
      # At least 1: a kernel given an all-padding row (loaders pad batches with them) must not softmax over
      # zero keys, whose 0/0 would put NaN into the weight gradients through the padding rows' activations.
      lengths_B = jnp.maximum(jnp.sum(segment_ids_BxL > 0, axis=1, dtype=jnp.int32), 1)
    stacked = {name: p[...].astype(compute_dtype) for name, p in nnx.state(self.layers).items()}
    sliding_N = jnp.asarray(cfg.layer_is_sliding)

    def body(x, layer_and_sliding):
      layer, sliding = layer_and_sliding
      return block(x, layer, cfg, *context.pick(sliding), implementation=attention, lengths_B=lengths_B,
                   segment_ids_BxL=segment_ids_BxL, sliding=sliding), None

    x_BxLxD, _ = jax.lax.scan(_remat(body, remat), x_BxLxD, (stacked, sliding_N), unroll=not scan_layers)
    return x_BxLxD

  def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array, *,
               compute_dtype: Any = jnp.float32, remat: str = "none", attention: str = "einsum",
               scan_layers: bool = True) -> jax.Array:
    """Returns float32 logits_BxLxV. Tokens attend only to earlier tokens of the same segment (id > 0)."""
    x_BxLxD = self.hidden(tokens_BxL, positions_BxL, segment_ids_BxL, compute_dtype=compute_dtype, remat=remat,
                          attention=attention, scan_layers=scan_layers)
    return self.head(x_BxLxD, compute_dtype)

  def decode(self, tokens_BxL: jax.Array, positions_BxL: jax.Array, cache: dict[str, jax.Array],
             start: jax.Array, *, compute_dtype: Any = jnp.float32, last_only: bool = False
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs L new tokens against a K/V cache and returns (float32 logits, the updated cache).

    The tokens fill cache slots [start, start + L) of every row; a position of -1 marks a padding token, which
    nothing attends to. A query attends to filled slots at positions up to its own (and, on sliding layers,
    within the window), so one call serves both the prompt prefill and each single-token step.
    With `last_only`, logits are computed for the last of the L tokens only (B, 1, V).
    """
    cfg = self.cfg
    embed_VxD = self.embed[...]
    x_BxLxD = self._embed(tokens_BxL, embed_VxD, compute_dtype)
    key_positions_BxS = jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions_BxL, start, axis=1)
    context = cache_attention_context(positions_BxL, key_positions_BxS, cfg)
    stacked = {name: p[...].astype(compute_dtype) for name, p in nnx.state(self.layers).items()}

    def body(carry, xs):
      # The whole cache rides in the carry and each layer writes its slots in place. As scanned inputs and
      # outputs (and laid out slots before heads) it was copied whole at every step: SmolLM2-135M, 16 rows,
      # 560 slots, 2 CPU cores: 0.29 s a step then, 0.14 s now.
      x, k_NxBxKxSxE, v_NxBxKxSxE = carry
      index, layer, sliding = xs
      return cached_block(x, layer, cfg, k_NxBxKxSxE, v_NxBxKxSxE, index, start, *context.pick(sliding)), None

    layers = (jnp.arange(cfg.num_layers), stacked, jnp.asarray(cfg.layer_is_sliding))
    (x_BxLxD, k_NxBxKxSxE, v_NxBxKxSxE), _ = jax.lax.scan(body, (x_BxLxD, cache["k"], cache["v"]), layers)
    if last_only:
      x_BxLxD = x_BxLxD[:, -1:]
    new_cache = {"k": k_NxBxKxSxE, "v": v_NxBxKxSxE, "positions": key_positions_BxS}
    return self.head(x_BxLxD, compute_dtype), new_cache

  def prefill(self, tokens_BxP: jax.Array, positions_BxP: jax.Array, cache_length: int, *,
              compute_dtype: Any = jnp.float32, last_only: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`decode` of P prompt tokens into a new, empty cache of `cache_length` slots: the same results, cheaper.

    The prompt attends within itself as in training (causal query blocks skip the masked triangle) instead of
    over every slot of the cache; its keys and values then fill the cache's first P slots in one write.
    (SmolLM2-135M, 16 prompts of 512 tokens on 2 CPU cores: 10.9 s as a `decode`, 9.9 s here.)
    """
    cfg = self.cfg
    x_BxPxD = self._embed(tokens_BxP, self.embed[...], compute_dtype)
    context = cache_attention_context(positions_BxP, positions_BxP, cfg)  # causal by position; padding: -1
    stacked = {name: p[...].astype(compute_dtype) for name, p in nnx.state(self.layers).items()}
    blocks = causal_query_blocks(tokens_BxP.shape[1])

    def body(x_BxPxD, xs):
      layer, sliding = xs
      cos_BxPxE, sin_BxPxE, mask_Bx1x1xPxP = context.pick(sliding)
      q_BxPxHxE, k_BxPxKxE, v_BxPxKxE = project_qkv(_norm(x_BxPxD, layer["attn_norm"], cfg), layer, cfg,
                                                    cos_BxPxE, sin_BxPxE)
      h_BxPxD = attend(q_BxPxHxE, k_BxPxKxE, v_BxPxKxE, mask_Bx1x1xPxP, layer, cfg, query_blocks=blocks)
      return finish_block(x_BxPxD, h_BxPxD, layer, cfg), (k_BxPxKxE, v_BxPxKxE)

    x_BxPxD, (k_NxBxPxKxE, v_NxBxPxKxE) = jax.lax.scan(body, x_BxPxD, (stacked, jnp.asarray(cfg.layer_is_sliding)))
    if last_only:
      x_BxPxD = x_BxPxD[:, -1:]
    cache = empty_cache(cfg, tokens_BxP.shape[0], cache_length, compute_dtype)
    new_cache = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], new.transpose(0, 1, 3, 2, 4), 0, axis=3)
                 for name, new in (("k", k_NxBxPxKxE), ("v", v_NxBxPxKxE))}
    new_cache["positions"] = jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions_BxP, 0, axis=1)
    return self.head(x_BxPxD, compute_dtype), {name: sharding.constrain(x, CACHE_AXES[name])
                                               for name, x in new_cache.items()}

  def _embed(self, tokens_BxL: jax.Array, embed_VxD: jax.Array, compute_dtype: Any) -> jax.Array:
    x_BxLxD = embed_VxD.astype(compute_dtype)[tokens_BxL]
    if self.cfg.scale_embeddings:  # Gemma: the scale is rounded to the compute dtype first, as in the reference
      x_BxLxD = x_BxLxD * jnp.asarray(math.sqrt(self.cfg.hidden_size), compute_dtype)
    return sharding.constrain(x_BxLxD, ("batch", "length", "embed"))

  def head(self, x_BxLxD: jax.Array, compute_dtype: Any) -> jax.Array:
    """Final norm, unembedding and (Gemma) soft-capping: float32 logits_BxLxV of hidden states."""
    x_BxLxD = self.final_normed(x_BxLxD)
    head_w, vocab_major = self.unembedding(compute_dtype)
    head_DxV = head_w.T if vocab_major else head_w
    logits_BxLxV = dense(x_BxLxD, head_DxV, preferred_element_type=jnp.float32)
    if self.cfg.final_softcap is not None:
      logits_BxLxV = softcap(logits_BxLxV, self.cfg.final_softcap)
    return sharding.constrain(logits_BxLxV, ("batch", "length", "vocab"))

  def final_normed(self, x_BxLxD: jax.Array) -> jax.Array:
    return rms_norm(x_BxLxD, self.final_norm[...], self.cfg.rms_norm_eps, plus_one=self.cfg.norm_plus_one)

  def unembedding(self, compute_dtype: Any) -> tuple[jax.Array, bool]:
    """(the matrix that turns hidden states into logits, True when it is stored (V, D): the tied embedding)."""
    if self.cfg.tie_word_embeddings:
      return self.embed[...].astype(compute_dtype), True
    return self.lm_head[...].astype(compute_dtype), False


CACHE_AXES = {"k": ("layers", "batch", "kv_heads", "length", "head_dim"),
              "v": ("layers", "batch", "kv_heads", "length", "head_dim"),
              "positions": ("batch", "length")}


def empty_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any) -> dict[str, jax.Array]:
  """A K/V cache of `length` slots per row, stacked on the layers axis; every slot empty (position -1).

  Keys and values are laid out (N, B, K, S, E), heads before slots, as attention reads them: no transpose a step.
  """
  shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
  cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
           "positions": jnp.full((batch, length), -1, jnp.int32)}
  return {name: sharding.constrain(x, CACHE_AXES[name]) for name, x in cache.items()}


def cached_block(x_BxLxD: jax.Array, layer: dict[str, jax.Array], cfg: ModelConfig, k_NxBxKxSxE: jax.Array,
                 v_NxBxKxSxE: jax.Array, index: jax.Array, start: jax.Array, cos_BxLxE: jax.Array,
                 sin_BxLxE: jax.Array, mask_Bx1x1xLxS: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`block` for new tokens whose keys and values are written into layer `index` of the cache (slots from
  `start`) before attending; returns (x, the cache's keys, values)."""
  h_BxLxD = _norm(x_BxLxD, layer["attn_norm"], cfg)
  q_BxLxHxE, k_new, v_new = project_qkv(h_BxLxD, layer, cfg, cos_BxLxE, sin_BxLxE)

  def write(cache_NxBxKxSxE, new_BxLxKxE):
    new_1xBxKxLxE = new_BxLxKxE.transpose(0, 2, 1, 3)[None].astype(cache_NxBxKxSxE.dtype)
    cache_NxBxKxSxE = jax.lax.dynamic_update_slice(cache_NxBxKxSxE, new_1xBxKxLxE, (index, 0, 0, start, 0))
    return sharding.constrain(cache_NxBxKxSxE, CACHE_AXES["k"])

  # Write, then read the layer back. Read first (to attend over it with the new slots added), XLA copied both
  # caches whole at every layer to keep the old contents for the read (seen in the optimized HLO on CPU).
  k_NxBxKxSxE, v_NxBxKxSxE = write(k_NxBxKxSxE, k_new), write(v_NxBxKxSxE, v_new)
  h_BxLxD = attend_heads_major(q_BxLxHxE, k_NxBxKxSxE[index].astype(q_BxLxHxE.dtype),
                               v_NxBxKxSxE[index].astype(q_BxLxHxE.dtype), mask_Bx1x1xLxS, layer, cfg)
  return finish_block(x_BxLxD, h_BxLxD, layer, cfg), k_NxBxKxSxE, v_NxBxKxSxE


def cache_attention_context(positions_BxL: jax.Array, key_positions_BxS: jax.Array, cfg: ModelConfig
                            ) -> AttentionContext:
  """`attention_context` for queries at positions_BxL over cache slots at key_positions_BxS (-1 = empty)."""
  cos_BxLxE, sin_BxLxE = rope_tables(positions_BxL, rope_inv_freq(cfg.head_dim, cfg.rope_theta,
                                                                  cfg.rope_scaling_dict))
  # Rows hold one sequence each, so causality is by position; empty slots and padding queries see nothing.
  distance_BxLxS = positions_BxL[:, :, None] - key_positions_BxS[:, None, :]
  full_BxLxS = (key_positions_BxS[:, None, :] >= 0) & (positions_BxL[:, :, None] >= 0) & (distance_BxLxS >= 0)
  full_mask = full_BxLxS[:, None, None]
  if not any(cfg.layer_is_sliding):
    return AttentionContext(cos_BxLxE, sin_BxLxE, full_mask, None)
  local_mask = (full_BxLxS & (distance_BxLxS < cfg.sliding_window))[:, None, None]
  if cfg.local_rope_theta is None:
    local = (cos_BxLxE, sin_BxLxE, local_mask)
  else:
    local = (*rope_tables(positions_BxL, rope_inv_freq(cfg.head_dim, cfg.local_rope_theta, None)), local_mask)
  return AttentionContext(cos_BxLxE, sin_BxLxE, full_mask, local)

class AttentionContext(NamedTuple):
  """RoPE tables and masks of the global layers and, where the model has them, of the sliding-window layers."""

  cos_BxLxE: jax.Array
  sin_BxLxE: jax.Array
  mask_Bx1x1xLxS: jax.Array
  local: tuple[jax.Array, jax.Array, jax.Array] | None

  def pick(self, sliding: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(cos, sin, mask) of a layer, selected by its traced `sliding` flag inside the scan."""
    full = (self.cos_BxLxE, self.sin_BxLxE, self.mask_Bx1x1xLxS)
    if self.local is None:
      return full
    return tuple(jnp.where(sliding, b, a) for a, b in zip(full, self.local))


def attention_context(positions_BxL: jax.Array, segment_ids_BxL: jax.Array, cfg: ModelConfig
                      ) -> AttentionContext:
  cos_BxLxE, sin_BxLxE = rope_tables(positions_BxL, rope_inv_freq(cfg.head_dim, cfg.rope_theta,
                                                                  cfg.rope_scaling_dict))
  full_mask = attention_mask(segment_ids_BxL, positions_BxL, None)
  if not any(cfg.layer_is_sliding):
    return AttentionContext(cos_BxLxE, sin_BxLxE, full_mask, None)
  local_mask = attention_mask(segment_ids_BxL, positions_BxL, cfg.sliding_window)
  if cfg.local_rope_theta is None:  # Mistral, Qwen: one RoPE for every layer
    local = (cos_BxLxE, sin_BxLxE, local_mask)
  else:  # Gemma 3: sliding layers rotate with their own (unscaled) base
    local = (*rope_tables(positions_BxL, rope_inv_freq(cfg.head_dim, cfg.local_rope_theta, None)), local_mask)
  return AttentionContext(cos_BxLxE, sin_BxLxE, full_mask, local)


def _remat(fn, policy: str):
  if policy == "none":
    return fn
  policies = {
      "full": None,  # save only the layer inputs: least memory, one extra forward
      "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
  }
  if policy not in policies:
    raise ValueError(f"model.remat must be one of none/full/dots, got {policy!r}")
  return jax.checkpoint(fn, policy=policies[policy], prevent_cse=False)  # safe: the scan's loop keeps them apart


def block(x_BxLxD: jax.Array, layer: dict[str, jax.Array], cfg: ModelConfig, cos_BxLxE: jax.Array,
          sin_BxLxE: jax.Array, mask_Bx1x1xLxS: jax.Array, *, implementation: str = "einsum",
          lengths_B: jax.Array | None = None, segment_ids_BxL: jax.Array | None = None,
          sliding: jax.Array | bool = False) -> jax.Array:
  """One pre-norm decoder block: x + attention(norm(x)), then + MLP(norm(x)); Gemma also norms each output."""
  h_BxLxD = _norm(x_BxLxD, layer["attn_norm"], cfg)
  h_BxLxD = attention(h_BxLxD, layer, cfg, cos_BxLxE, sin_BxLxE, mask_Bx1x1xLxS, implementation=implementation,
                      lengths_B=lengths_B, segment_ids_BxL=segment_ids_BxL, sliding=sliding)
  return finish_block(x_BxLxD, h_BxLxD, layer, cfg)


def _norm(x: jax.Array, weight: jax.Array, cfg: ModelConfig) -> jax.Array:
  return rms_norm(x, weight, cfg.rms_norm_eps, plus_one=cfg.norm_plus_one)


def finish_block(x_BxLxD: jax.Array, h_BxLxD: jax.Array, layer: dict[str, jax.Array], cfg: ModelConfig
                 ) -> jax.Array:
  """The rest of a block once attention's output h is known: the residual add, then the MLP sub-layer."""
  if cfg.sandwich_norms:
    h_BxLxD = _norm(h_BxLxD, layer["attn_post_norm"], cfg)
  x_BxLxD = x_BxLxD + h_BxLxD
  h_BxLxD = _norm(x_BxLxD, layer["mlp_norm"], cfg)
  gate_BxLxF = dense(h_BxLxD, layer["gate"])
  up_BxLxF = dense(h_BxLxD, layer["up"])
  mlp_BxLxF = sharding.constrain(_ACTIVATIONS[cfg.hidden_act](gate_BxLxF) * up_BxLxF, ("batch", "length", "mlp"))
  h_BxLxD = dense(mlp_BxLxF, layer["down"])
  if cfg.sandwich_norms:
    h_BxLxD = _norm(h_BxLxD, layer["mlp_post_norm"], cfg)
  return sharding.constrain(x_BxLxD + h_BxLxD, ("batch", "length", "embed"))


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


ATTENTION = ("einsum", "jax", "cudnn", "splash")


def attention(x_BxLxD: jax.Array, layer: dict[str, jax.Array], cfg: ModelConfig, cos_BxLxE: jax.Array,
              sin_BxLxE: jax.Array, mask_Bx1x1xLxS: jax.Array, *, implementation: str = "einsum",
              lengths_B: jax.Array | None = None, segment_ids_BxL: jax.Array | None = None,
              sliding: jax.Array | bool = False) -> jax.Array:
  """Grouped-query attention with RoPE; softmax in float32.

  `implementation`: "einsum" spells the attention out (any backend; XLA fuses it); "jax" calls
  `jax.nn.dot_product_attention` and lets JAX pick its kernel; "cudnn" forces cuDNN's fused flash attention
  (NVIDIA GPUs, bfloat16/float16). The packing mask (same segment, causal, window) is passed to all of them, so
  packed examples never see each other whichever runs; "cudnn" also gets is_causal to skip masked-out blocks.
  With `lengths_B` (rows known to hold one example from position 0) the kernels get the row lengths and build
  causal + padding masking themselves: no dense B×L×S mask for cuDNN to read as a bias (H200, llama-1b 8×2048:
  a step 0.235 s instead of 0.249 s). Padding queries' outputs are unused: their positions have weight 0.
  "splash" is Pallas splash attention (TPU; see ift_jax.model.splash): causal by position in the row, each query
  limited to keys of its own segment by `segment_ids_BxL` — packed rows without any dense mask — and, where the
  layer's (traced) `sliding` flag is set, to the model's window.
  """
  q_BxLxHxE, k_BxSxKxE, v_BxSxKxE = project_qkv(x_BxLxD, layer, cfg, cos_BxLxE, sin_BxLxE)
  if implementation == "einsum":
    return attend(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, mask_Bx1x1xLxS, layer, cfg,
                  query_blocks=causal_query_blocks(q_BxLxHxE.shape[1]))
  if implementation not in ATTENTION:
    raise ValueError(f"model.attention must be one of {', '.join(ATTENTION)}, got {implementation!r}")
  b, l, h, e = q_BxLxHxE.shape
  if implementation == "splash":
    if segment_ids_BxL is None:
      raise ValueError("attention 'splash' needs the rows' segment ids")
    run = functools.partial(splash.splash_attention, scale=(cfg.query_pre_attn_scalar or e) ** -0.5)
    args = (q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxL)
    if not any(cfg.layer_is_sliding):
      out_BxLxHxE = run(*args)
    else:  # the window kernel on sliding layers: one of the two runs per layer
      out_BxLxHxE = jax.lax.cond(sliding, functools.partial(run, window=cfg.sliding_window), run, *args)
    return output_projection(out_BxLxHxE, layer)
  if lengths_B is None:
    masking = dict(mask=mask_Bx1x1xLxS[:, 0], is_causal=implementation == "cudnn")
  else:
    masking = dict(is_causal=True, query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B)
  out_BxLxHxE = jax.nn.dot_product_attention(
      q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, scale=(cfg.query_pre_attn_scalar or e) ** -0.5,
      implementation="cudnn" if implementation == "cudnn" else None, **masking)
  return output_projection(out_BxLxHxE, layer)


def output_projection(out_BxLxHxE: jax.Array, layer: dict[str, jax.Array]) -> jax.Array:
  """The attention heads' outputs through o (H·E -> D), plus o's bias where the model has one."""
  h_BxLxD = dense(out_BxLxHxE, layer["o"], contract=2)
  return h_BxLxD + layer["o_bias"] if "o_bias" in layer else h_BxLxD


def project_qkv(x_BxLxD: jax.Array, layer: dict[str, jax.Array], cfg: ModelConfig, cos_BxLxE: jax.Array,
                sin_BxLxE: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Queries, keys and values of x, with biases, per-head norms and RoPE applied."""
  q_BxLxHxE = dense(x_BxLxD, layer["q"])
  k_BxSxKxE = dense(x_BxLxD, layer["k"])
  v_BxSxKxE = dense(x_BxLxD, layer["v"])
  if cfg.qkv_bias:
    q_BxLxHxE, k_BxSxKxE = q_BxLxHxE + layer["q_bias"], k_BxSxKxE + layer["k_bias"]
    v_BxSxKxE = v_BxSxKxE + layer["v_bias"]
  if cfg.qk_norm:  # Qwen3 and Gemma 3 normalize each head before the rotation
    q_BxLxHxE = rms_norm(q_BxLxHxE, layer["q_norm"], cfg.rms_norm_eps, plus_one=cfg.norm_plus_one)
    k_BxSxKxE = rms_norm(k_BxSxKxE, layer["k_norm"], cfg.rms_norm_eps, plus_one=cfg.norm_plus_one)
  q_BxLxHxE = apply_rope(q_BxLxHxE, cos_BxLxE, sin_BxLxE)
  k_BxSxKxE = apply_rope(k_BxSxKxE, cos_BxLxE, sin_BxLxE)
  return q_BxLxHxE, k_BxSxKxE, v_BxSxKxE


def causal_query_blocks(length: int) -> int:
  """How many query blocks `attend` splits a causal row of `length` into: blocks of ~L/8, at least 32 positions.

  Measured on 2 CPU cores, attention core forward + backward per layer (9 heads, 3 K/V heads, head dim 64):
  8×128: 13.4 ms whole, 9.9 / 7.8 / 8.3 ms in 2 / 4 / 8 blocks; 2×512: 40.3 ms whole, 24.2 / 23.1 / 25.1 ms in
  4 / 8 / 16 blocks. Smaller blocks skip more of the masked triangle but run more, smaller products.
  """
  return max(1, min(8, length // 32))


def attend(q_BxLxHxE: jax.Array, k_BxSxKxE: jax.Array, v_BxSxKxE: jax.Array, mask_Bx1x1xLxS: jax.Array,
           layer: dict[str, jax.Array], cfg: ModelConfig, *, query_blocks: int = 1) -> jax.Array:
  """Masked softmax attention of the queries over S keys (a sequence's own, or a cache's), then the output.

  The G query heads sharing a key/value head are laid out as G·L rows of one (B, K) matrix product, the batch
  axes leading: XLA's CPU backend then runs both products and their gradients without the per-head layout
  copies a (B, K, G, L, S) score tensor needs (the SmolLM2-135M attention core: 14 instead of 17 ms a layer,
  forward and backward, 8×128).

  `query_blocks` > 1 needs keys that are the queries' own row with a causal mask (the training path): the
  queries are split into that many blocks along L, and each block is scored only against the keys up to its
  last query — the keys after it are masked out for every query of the block anyway. Exact (the same softmax
  over the same unmasked keys), with ~(n + 1) / 2n of the score work (SmolLM2-135M, 4 blocks at 8×128: 7.8
  instead of 13.4 ms a layer).
  """
  return attend_heads_major(q_BxLxHxE, k_BxSxKxE.transpose(0, 2, 1, 3), v_BxSxKxE.transpose(0, 2, 1, 3),
                            mask_Bx1x1xLxS, layer, cfg, query_blocks=query_blocks)


def attend_heads_major(q_BxLxHxE: jax.Array, k_BxKxSxE: jax.Array, v_BxKxSxE: jax.Array,
                       mask_Bx1x1xLxS: jax.Array, layer: dict[str, jax.Array], cfg: ModelConfig, *,
                       query_blocks: int = 1) -> jax.Array:
  """`attend` with keys and values laid out heads before positions (B, K, S, E), as the K/V cache holds them."""
  b, l, h, e = q_BxLxHxE.shape
  kv, s = cfg.num_kv_heads, k_BxKxSxE.shape[2]
  g = h // kv
  q_BxKxMxE = q_BxLxHxE.reshape(b, l, kv, g, e).transpose(0, 2, 1, 3, 4).reshape(b, kv, l * g, e)  # M = (L, G)
  scale = (cfg.query_pre_attn_scalar or e) ** -0.5
  if query_blocks > 1 and s != l:
    raise ValueError(f"query_blocks={query_blocks} needs the queries' own {l} keys, got {s}")
  bounds = [round(l * i / query_blocks) for i in range(query_blocks + 1)]
  outs = []
  for start, stop in zip(bounds[:-1], bounds[1:]):
    # Block rows are M = (L, G) rows start·G .. stop·G; their keys end at the block's last query (stop), or at S.
    keys = stop if query_blocks > 1 else s
    mask_BxCxS = mask_Bx1x1xLxS[:, 0, 0, start:stop, :keys]
    outs.append(_attend_core(q_BxKxMxE[:, :, start * g:stop * g], k_BxKxSxE[:, :, :keys],
                             v_BxKxSxE[:, :, :keys], mask_BxCxS, g, scale))
  out_BxKxMxE = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  out_BxLxHxE = out_BxKxMxE.reshape(b, kv, l, g, e).transpose(0, 2, 1, 3, 4).reshape(b, l, h, e)
  return output_projection(out_BxLxHxE, layer)


def _attend_core(q_BxKxMxE: jax.Array, k_BxKxSxE: jax.Array, v_BxKxSxE: jax.Array, mask_BxCxS: jax.Array,
                 g: int, scale: float) -> jax.Array:
  """softmax(q·kᵀ·scale, masked)·v for M = C·G query rows (C positions, G heads each) over S keys."""
  b, c, s = mask_BxCxS.shape
  scores_BxKxMxS = jnp.einsum("BKME,BKSE->BKMS", q_BxKxMxE, k_BxKxSxE, preferred_element_type=jnp.float32) * scale
  mask_Bx1xMxS = jnp.broadcast_to(mask_BxCxS[:, None, :, None, :], (b, 1, c, g, s)).reshape(b, 1, c * g, s)
  scores_BxKxMxS = jnp.where(mask_Bx1xMxS, scores_BxKxMxS, jnp.finfo(jnp.float32).min)
  probs_BxKxMxS = jax.nn.softmax(scores_BxKxMxS, axis=-1).astype(v_BxKxSxE.dtype)
  return jnp.einsum("BKMS,BKSE->BKME", probs_BxKxMxS, v_BxKxSxE)


def dense(x: jax.Array, w: jax.Array, *, contract: int = 1, preferred_element_type: Any = None) -> jax.Array:
  """x's last `contract` axes times w's first `contract` axes, as one 2-D matrix product over all tokens.

  (B, L, D) · (D, H, E) -> (B, L, H, E) is computed as (B·L, D) · (D, H·E). The same sums as the einsum, but its
  gradients are plain 2-D products too: XLA's CPU backend runs the weight gradient of a 3-D einsum
  ("BLD,BLF->DF", two contracting axes) ~2× slower than (D, B·L)·(B·L, F) (measured: the SmolLM2-135M MLP's
  backward 101 ms vs 57 ms at 8×128). Reshapes that merge whole leading axes keep their shardings.
  """
  lead, inner, out = x.shape[:-contract], x.shape[-contract:], w.shape[contract:]
  y = jnp.dot(x.reshape(-1, math.prod(inner)), w.reshape(math.prod(inner), -1),
              preferred_element_type=preferred_element_type)
  return y.reshape(*lead, *out)


def softcap(x: jax.Array, cap: float) -> jax.Array:
  """Gemma's tanh soft-capping: smooth, bounded to (-cap, cap), close to the identity near 0."""
  return jnp.tanh(x / cap) * cap


def attention_mask(segment_ids_BxL: jax.Array, positions_BxL: jax.Array, sliding_window: int | None
                   ) -> jax.Array:
  """Causal, same-segment, non-padding mask shaped (B, 1, 1, L, S) to broadcast over K and G.

  Packed rows keep each example's tokens contiguous and in order, so causality is row order; segment equality
  keeps packed examples from seeing each other; segment 0 is padding and is never attended to.
  """
  length = segment_ids_BxL.shape[1]
  causal_LxS = jnp.tril(jnp.ones((length, length), bool))
  same_BxLxS = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  mask_BxLxS = causal_LxS[None] & same_BxLxS & (segment_ids_BxL[:, None, :] > 0)
  if sliding_window is not None:
    distance_BxLxS = positions_BxL[:, :, None] - positions_BxL[:, None, :]
    mask_BxLxS &= distance_BxLxS < sliding_window
  return mask_BxLxS[:, None, None]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, *, plus_one: bool = False) -> jax.Array:
  """RMSNorm computed in float32 and cast back, as the Hugging Face references do.

  Llama scales by w in the input dtype; Gemma (`plus_one`) scales by (1 + w) in float32 before the cast.
  """
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  if plus_one:
    return (x32 * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
  return weight.astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> jax.Array:
  """Inverse frequencies (E/2,), with Llama-3 or linear scaling when the config asks for it."""
  e = head_dim
  inv_freq = 1.0 / (theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
  if not scaling:
    return inv_freq
  factor = scaling["factor"]
  if scaling["rope_type"] == "linear":
    return inv_freq / factor
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_len = scaling["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return jnp.where(medium, smoothed, scaled)


def rope_tables(positions_BxL: jax.Array, inv_freq_E2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables (B, L, E) in float32, halves duplicated (the Hugging Face rotate-half layout)."""
  freqs_BxLxE2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_E2
  emb_BxLxE = jnp.concatenate([freqs_BxLxE2, freqs_BxLxE2], axis=-1)
  return jnp.cos(emb_BxLxE), jnp.sin(emb_BxLxE)


def apply_rope(x_BxLxHxE: jax.Array, cos_BxLxE: jax.Array, sin_BxLxE: jax.Array) -> jax.Array:
  half = x_BxLxHxE.shape[-1] // 2
  x32 = x_BxLxHxE.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos_BxLxE[:, :, None] + rotated * sin_BxLxE[:, :, None]
  return out.astype(x_BxLxHxE.dtype)

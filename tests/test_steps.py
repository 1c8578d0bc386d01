"""Equivalences the train step must keep: sharded = single device, accumulated = one batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ift_jax import optim, sharding, steps
from ift_jax.model import load
from ift_jax.model.config import ModelConfig

CFG = ModelConfig.from_hf(dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def _batch(rows=8, length=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 64, size=(rows, length + 1)).astype(np.int32)
  # two examples per row with different lengths, prompt positions weighted 0
  split = rng.integers(4, length - 4, size=rows)
  seg = np.where(np.arange(length)[None] < split[:, None], 1, 2).astype(np.int32)
  pos = np.where(seg == 1, np.arange(length)[None], np.arange(length)[None] - split[:, None]).astype(np.int32)
  weights = (rng.random((rows, length)) < 0.4).astype(np.float32)
  weights[-1, -5:] = 0.0
  seg[-1, -5:] = 0  # some padding
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights, "segment_ids": seg,
          "positions": pos}


def _compiled(mesh, cfg=CFG, **runner_options):
  """The jitted steps of `cfg` on `mesh`, and the same random parameters on every mesh."""
  optimizer = optim.make_optimizer(lr=1e-2, warmup_steps=1, total_steps=10, end_lr_ratio=0.1, weight_decay=0.1,
                                   b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)
  schedule = optim.learning_rate_schedule(lr=1e-2, warmup_steps=1, total_steps=10, end_lr_ratio=0.1)
  graphdef, abstract, _ = load.abstract_model(cfg)
  param_sh = load.param_shardings(mesh, cfg)
  runner = steps.ModelRunner(graphdef, **runner_options)
  compiled = steps.jit_steps(runner, optimizer, schedule, mesh=mesh, abstract_params=abstract,
                             param_shardings=param_sh, num_slots=4)
  params = lambda: jax.device_put(jax.device_get(load.init_params(cfg, mesh, seed=0)), param_sh)
  return compiled, abstract, params


def _run(mesh, batch, accum, n_steps=2, compute_dtype=jnp.float32, remat="none", loss_chunk=0,
         attention="einsum", scan_layers=True, one_example_per_row=False, evaluate=False, cfg=CFG):
  compiled, _, params = _compiled(mesh, cfg, compute_dtype=compute_dtype, remat=remat, loss_chunk=loss_chunk,
                                  attention=attention, scan_layers=scan_layers,
                                  one_example_per_row=one_example_per_row)
  state = compiled.init(params())
  micro = {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in batch.items()}
  history = []
  for _ in range(n_steps):
    state, metrics = compiled.train(state, micro)
    history.append(jax.device_get(metrics))
  if evaluate:  # the eval step's per-example sums on the trained weights
    history.append({"eval": jax.device_get(compiled.eval(state["params"], batch))})
  return jax.device_get(state["params"]), history


def _single():
  return sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])


_MESHES = {"single": _single, "2x2x2": lambda: sharding.make_mesh(data=2, fsdp=2, tensor=2),
           "2x1x4": lambda: sharding.make_mesh(data=2, fsdp=1, tensor=4)}


@functools.lru_cache(maxsize=None)
def _reference(mesh: str, rows: str = "packed", accum: int = 1, n_steps: int = 2, evaluate: bool = False,
               cfg: str = "qwen2") -> tuple:
  """The plain run (spelled-out attention, whole logits, scanned layers, float32) that several tests compare
  with, computed once per session: `_run` of `_batch()` ("packed") or `_unpacked_batch()` ("unpacked")."""
  batch = _batch() if rows == "packed" else _unpacked_batch()
  return _run(_MESHES[mesh](), batch, accum, n_steps=n_steps, evaluate=evaluate,
              cfg={"qwen2": CFG, "windowed": WINDOWED}[cfg])


def _assert_same(a, b, atol):
  (pa, ha), (pb, hb) = a, b
  assert len(ha) == len(hb)
  for ma, mb in zip(ha, hb):
    for key in ("loss", "token_accuracy", "grad_norm", "target_tokens", "eval"):
      if key in ma:
        close = lambda x, y, key=key: np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=key)
        jax.tree.map(close, ma[key], mb[key])
  # Adam divides by sqrt(v): a gradient that is ~0 turns float32 summation-order noise into a visible update,
  # so weights get a looser bound than the metrics (a normalization bug moves loss and grad_norm by far more).
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=5 * atol, rtol=0), pa, pb)


def test_sharded_2x2x2_matches_single_device():
  batch = _batch()
  _assert_same(_run(sharding.make_mesh(data=2, fsdp=2, tensor=2), batch, 1), _reference("single"), 2e-5)


def test_accumulating_4_micro_batches_matches_one_batch():
  batch = _batch()
  _assert_same(_run(_single(), batch, 4), _reference("single"), 2e-5)


def test_per_segment_sums_match_whole_batch_sums():
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  logits = jax.random.normal(jax.random.key(0), (*batch["targets"].shape, 64))
  from ift_jax import losses
  per = losses.per_segment_sums(logits, batch["targets"], batch["weights"], batch["segment_ids"], num_slots=3)
  total = losses.weighted_sums(logits, batch["targets"], batch["weights"])
  for key in ("loss", "correct", "weight"):
    np.testing.assert_allclose(per[key].sum(), total[key], rtol=1e-6)
  assert float(per["weight"][:, 0].sum()) == 0.0  # padding slot carries no weight


def test_decay_mask_skips_norms_and_biases():
  from ift_jax.optim import decay_mask
  _, abstract, _ = load.abstract_model(CFG)
  mask = decay_mask(abstract)
  assert mask["layers"]["q"] and mask["embed"] and mask["lm_head"]
  assert not mask["layers"]["attn_norm"] and not mask["layers"]["q_bias"] and not mask["final_norm"]


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_rematerialization_changes_memory_not_results(policy):
  batch = _batch()
  _assert_same(_run(_single(), batch, 1, n_steps=1, remat=policy), _reference("single", n_steps=1), 1e-6)


def test_bfloat16_compute_tracks_float32():
  batch = _batch()
  (_, f32), (_, bf16) = _reference("single", n_steps=1), _run(_single(), batch, 1, n_steps=1,
                                                                compute_dtype=jnp.bfloat16)
  assert abs(f32[0]["loss"] - bf16[0]["loss"]) < 0.02 * f32[0]["loss"]
  assert f32[0]["loss"] != bf16[0]["loss"]  # the compute really ran in bfloat16


@pytest.mark.parametrize("mesh,chunk,accum", [("single", 4, 1), ("2x2x2", 4, 1), ("2x2x2", 5, 2)])
def test_fused_chunked_cross_entropy_matches_whole_logits(mesh, chunk, accum):
  """The fused loss (targets moved to the front, empty chunks skipped, gradients made in the forward pass) =
  autodiff through the whole logits: on a vocabulary-sharded mesh, with a chunk that does not divide the rows,
  and with gradient accumulation."""
  batch = _batch()
  _assert_same(_run(_MESHES[mesh](), batch, accum, loss_chunk=chunk), _reference(mesh), 2e-5)


def test_jax_dot_product_attention_keeps_packed_examples_apart():
  """jax.nn.dot_product_attention with the packing mask = the spelled-out attention, on packed rows."""
  batch = _batch()
  _assert_same(_run(_single(), batch, 1, attention="jax"), _reference("single"), 2e-5)


@pytest.mark.parametrize("mesh", ["single", "2x2x2", "2x1x4"])
def test_splash_attention_keeps_packed_examples_apart(mesh):
  """Pallas splash attention (the TPU kernel, interpreted here) with segment ids = the spelled-out masked
  attention on packed rows with padding: losses, gradient norms and weights after 2 steps, then the eval step's
  per-example sums; on a mesh it runs under shard_map, each device on its rows and heads (2×2×2), or on its rows
  with all heads where the 2 key/value heads do not split 4 ways (2×1×4)."""
  batch = _batch()
  _assert_same(_run(_MESHES[mesh](), batch, 1, attention="splash", evaluate=True),
               _reference(mesh, evaluate=True), 2e-5)


def test_unrolled_layers_match_the_scanned_loop():
  batch = _batch()
  _assert_same(_run(_single(), batch, 2, scan_layers=False), _reference("single", accum=2), 2e-5)


def _unpacked_batch(rows=8, length=16, seed=1):
  """One example per row from position 0, then padding (pack(packed=False)'s layout); one row is full and one
  is all padding (as loaders fill a short shard)."""
  batch = _batch(rows, length, seed)
  lengths = np.random.default_rng(seed).integers(3, length, size=rows)
  lengths[0], lengths[-1] = length, 0
  real = np.arange(length)[None] < lengths[:, None]
  batch["segment_ids"] = real.astype(np.int32)
  batch["positions"] = np.where(real, np.arange(length)[None], 0).astype(np.int32)
  batch["weights"] = np.where(real, batch["weights"], 0).astype(np.float32)
  return batch


@pytest.mark.parametrize("scan_layers", [True, False])
def test_row_lengths_instead_of_a_mask_on_unpacked_rows(scan_layers):
  """One example per row: jax.nn.dot_product_attention given row lengths (causal + key padding, no dense mask)
  = the spelled-out masked attention, padding rows' finite junk included (it must not reach the gradients)."""
  batch = _unpacked_batch()
  _assert_same(_run(_single(), batch, 1, attention="jax", one_example_per_row=True, scan_layers=scan_layers),
               _reference("single", "unpacked"), 2e-5)


# Sliding (window 5), full, sliding: the window cuts into every example of _batch's 16-position rows.
WINDOWED = ModelConfig.from_hf(dict(
    model_type="gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=5,
    hidden_activation="gelu_pytorch_tanh", layer_types=["sliding_attention", "full_attention", "sliding_attention"]))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_splash_attention_windows_the_sliding_layers(scan_layers):
  """A model mixing sliding-window and full layers: splash runs the window kernel on the sliding ones (picked
  per layer inside the scan, or unrolled) = the spelled-out attention with the windowed mask."""
  batch = _batch()
  _assert_same(_run(_single(), batch, 1, attention="splash", scan_layers=scan_layers, evaluate=True, cfg=WINDOWED),
               _reference("single", evaluate=True, cfg="windowed"), 2e-5)


def test_splash_attention_on_unpacked_rows_with_an_all_padding_row():
  """One example per row (pack(packed=False)) and an all-padding row: splash's padding queries attend among
  themselves, so nothing non-finite reaches the gradients; = the spelled-out attention."""
  batch = _unpacked_batch()
  _assert_same(_run(_single(), batch, 1, attention="splash", one_example_per_row=True),
               _reference("single", "unpacked"), 2e-5)


def _temp_bytes(remat, scan_layers):
  compiled, abstract, _ = _compiled(_single(), compute_dtype=jnp.float32, remat=remat, scan_layers=scan_layers)
  state = jax.eval_shape(compiled.init, abstract)
  batch = {k: jax.ShapeDtypeStruct((1, 8, 256), v.dtype) for k, v in _batch().items()}
  return compiled.train.lower(state, batch).compile().memory_analysis().temp_size_in_bytes


def test_full_rematerialization_keeps_fewer_activations():
  """remat="full" really recomputes under the scanned layer loop: the compiled step's temporaries shrink."""
  assert _temp_bytes("full", True) < 0.6 * _temp_bytes("none", True)


def test_rematerialization_of_unrolled_layers_is_refused():
  """Unrolled, XLA keeps the activations it was told to recompute (temporaries 2 % smaller, not 57 %): saying
  so beats a remat setting that silently saves no memory."""
  with pytest.raises(ValueError, match="needs model.scan_layers=True"):
    _temp_bytes("full", False)


@pytest.mark.parametrize("mesh,chunk", [("single", 16), ("single", 5), ("2x2x2", 5)])
def test_chunked_evaluation_matches_whole_logits(mesh, chunk):
  """The eval step with loss_chunk (logits made `chunk` positions at a time, padded when the chunk does not
  divide the rows) gives the whole-logits eval step's per-example sums, on one device and on a 2×2×2 mesh."""
  make = _single if mesh == "single" else lambda: sharding.make_mesh(data=2, fsdp=2, tensor=2)
  batch = _batch()
  sums = []
  for loss_chunk in (0, chunk):
    compiled, _, params = _compiled(make(), compute_dtype=jnp.float32, loss_chunk=loss_chunk)
    sums.append(jax.device_get(compiled.eval(params(), batch)))
  whole, chunked = sums
  assert float(whole["weight"].sum()) > 0
  for key in ("loss", "correct", "weight"):
    np.testing.assert_allclose(chunked[key], whole[key], atol=2e-5, rtol=0, err_msg=key)


def test_chunked_evaluation_never_holds_the_whole_logits():
  """XLA's temporaries for the eval step shrink by about the whole logits (8 × 256 × 8192 float32 = 64 MiB)."""
  cfg = ModelConfig.from_hf(dict(model_type="qwen2", vocab_size=8192, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
  graphdef, abstract, _ = load.abstract_model(cfg)
  batch = {k: jax.ShapeDtypeStruct((8, 256), v.dtype) for k, v in _batch().items()}
  temps = {}
  for chunk in (0, 32):
    runner = steps.ModelRunner(graphdef, compute_dtype=jnp.float32, loss_chunk=chunk)
    step = jax.jit(steps.make_eval_step(runner, num_slots=4))
    temps[chunk] = step.lower(abstract, batch).compile().memory_analysis().temp_size_in_bytes
  logits_bytes = 8 * 256 * 8192 * 4
  assert temps[0] > logits_bytes and temps[32] < temps[0] - 0.75 * logits_bytes, temps

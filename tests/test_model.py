"""The NNX model against the transformers PyTorch reference, loaded from the same save_pretrained folder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ift_jax import sharding
from ift_jax.errors import UserError
from ift_jax.model import load, transformer
from ift_jax.model.config import ModelConfig
from tests import hf_models


def _forward(folder, tokens_BxL, mesh, segment_ids_BxL=None, positions_BxL=None):
  pretrained = load.open_pretrained(str(folder))
  params = load.load_params(pretrained, mesh)
  graphdef, _, _ = load.abstract_model(pretrained.cfg)
  b, l = tokens_BxL.shape
  positions_BxL = np.broadcast_to(np.arange(l), (b, l)) if positions_BxL is None else positions_BxL
  segment_ids_BxL = np.ones((b, l), np.int32) if segment_ids_BxL is None else segment_ids_BxL

  @jax.jit
  def fwd(params, tokens, positions, segments):
    from flax import nnx
    return nnx.merge(graphdef, nnx.State(params))(tokens, positions, segments)

  with sharding.use_mesh(mesh):
    return np.asarray(fwd(params, tokens_BxL, positions_BxL, segment_ids_BxL))


@pytest.mark.parametrize("family", sorted(hf_models.FAMILIES))
def test_logits_match_transformers(family, tmp_path):
  reference = hf_models.build(family, tmp_path)
  # 100 positions: the attention runs in 3 uneven causal query blocks (33, 34, 33), as at training lengths.
  tokens_BxL = np.random.default_rng(0).integers(0, 97, size=(2, 100))
  assert transformer.causal_query_blocks(100) == 3
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  ours = _forward(tmp_path, tokens_BxL, mesh)
  theirs = hf_models.torch_logits(reference, tokens_BxL)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_packed_segments_equal_separate_sequences(family, tmp_path):
  """Two examples packed in one row give the logits each gets alone: nothing leaks across segments."""
  reference = hf_models.build(family, tmp_path)
  rng = np.random.default_rng(1)
  # 100 positions, so 3 causal query blocks whose bounds (33, 67) fall inside both examples.
  a, b = rng.integers(0, 97, size=40), rng.integers(0, 97, size=45)
  row = np.concatenate([a, b, np.zeros(15, int)])[None]
  segments = np.array([[1] * 40 + [2] * 45 + [0] * 15])
  positions = np.array([list(range(40)) + list(range(45)) + [0] * 15])
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
  packed = _forward(tmp_path, row, mesh, segments, positions)[0]
  np.testing.assert_allclose(packed[:40], hf_models.torch_logits(reference, a[None])[0], atol=1e-4)
  np.testing.assert_allclose(packed[40:85], hf_models.torch_logits(reference, b[None])[0], atol=1e-4)


@pytest.mark.parametrize("blocks", [2, 3, 8])
def test_causal_query_blocks_equal_whole_attention(blocks):
  """Attention in causal query blocks gives the whole attention's outputs and gradients on packed rows."""
  cfg = ModelConfig(model_type="llama", vocab_size=8, hidden_size=12, intermediate_size=8, num_layers=1,
                    num_heads=6, num_kv_heads=2, head_dim=4, rms_norm_eps=1e-6, rope_theta=1e4)
  b, l = 2, 50
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.standard_normal((b, l, h, 4)), jnp.float32) for h in (6, 2, 2))
  layer = {"o": jnp.asarray(rng.standard_normal((6, 4, 12)), jnp.float32)}
  # Row 0: examples of 17 and 23 tokens, then padding; row 1: one example of 50.
  segments = np.array([[1] * 17 + [2] * 23 + [0] * 10, [1] * 50])
  positions = np.array([list(range(17)) + list(range(23)) + [0] * 10, list(range(50))])
  mask = transformer.attention_mask(jnp.asarray(segments), jnp.asarray(positions), None)
  real_BxLx1 = jnp.asarray(segments > 0)[..., None]
  cotangent = jnp.asarray(rng.standard_normal((b, l, 12)), jnp.float32) * real_BxLx1  # padding unused

  def loss(q, k, v, query_blocks):
    out = transformer.attend(q, k, v, mask, layer, cfg, query_blocks=query_blocks)
    return jnp.sum(out * cotangent), out * real_BxLx1

  grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
  (whole_grads, whole_out), (blocked_grads, blocked_out) = grad(q, k, v, 1), grad(q, k, v, blocks)
  np.testing.assert_allclose(blocked_out, whole_out, atol=1e-5, rtol=0)
  for whole, blocked in zip(whole_grads, blocked_grads):
    np.testing.assert_allclose(blocked, whole, atol=1e-5, rtol=0)


def test_mismatched_checkpoint_is_refused(tmp_path):
  hf_models.build("llama", tmp_path)
  import json
  config = json.loads((tmp_path / "config.json").read_text())
  config["intermediate_size"] = 128
  (tmp_path / "config.json").write_text(json.dumps(config))
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
  with pytest.raises(UserError, match=r"mlp.down_proj.weight has shape \(48, 96\), config.json implies \(48, 128\)"):
    load.load_params(load.open_pretrained(str(tmp_path)), mesh)


def test_unsupported_architecture_is_refused(tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
  with pytest.raises(UserError, match="model_type 'gpt2' is not supported"):
    load.open_pretrained(str(tmp_path))


@pytest.mark.parametrize("family, change, message", [
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping is not implemented"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention=true"),
    ("gemma3", {"layer_types": ["chunked_attention"] * 3}, r"layer_types \['chunked_attention'\] not implemented"),
    ("gemma3", {"hidden_activation": "gelu"}, "activation 'gelu' is not implemented for gemma3_text"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10.0}},
     "rope scaling type 'yarn' is not implemented"),
    ("llama", {"final_logit_softcapping": 30.0}, "final_logit_softcapping is not implemented for llama"),
    ("qwen2", {"hidden_act": "relu"}, "activation 'relu' is not implemented for qwen2"),
    ("mistral", {"attention_dropout": 0.1}, r"attention_dropout=0.1 is not implemented .* set it to 0.0"),
])
def test_math_changing_config_fields_are_refused_by_name(family, change, message, tmp_path):
  import json
  hf_models.build(family, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
  with pytest.raises(UserError, match=message):
    load.open_pretrained(str(tmp_path))


def test_sharded_safetensors_folder_with_index_loads_the_same(tmp_path):
  reference = hf_models.build("qwen2", tmp_path / "one")
  reference.save_pretrained(tmp_path / "many", max_shard_size="20KB")
  assert (tmp_path / "many" / "model.safetensors.index.json").exists()
  assert len(list((tmp_path / "many").glob("*.safetensors"))) > 2
  tokens_BxL = np.random.default_rng(2).integers(0, 97, size=(2, 8))
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  np.testing.assert_array_equal(_forward(tmp_path / "many", tokens_BxL, mesh),
                                _forward(tmp_path / "one", tokens_BxL, mesh))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_checkpoint_loads_exactly_into_float32(dtype, tmp_path):
  import torch
  reference = hf_models.build("llama", tmp_path / "f32")
  reference.to(getattr(torch, dtype)).save_pretrained(tmp_path / dtype)
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
  params = load.load_params(load.open_pretrained(str(tmp_path / dtype)), mesh)
  expected = reference.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(params["layers"]["down"][1]), expected)
  assert params["layers"]["down"].dtype == jnp.float32


@pytest.mark.parametrize("family", sorted(hf_models.FAMILIES))
def test_reported_loss_equals_transformers_cross_entropy(family, tmp_path):
  """Per-example loss of packed rows, as the eval step reports it, equals torch's cross-entropy of the same
  tokens (each example alone, prompt masked) under the transformers model."""
  import torch
  from flax import nnx
  from ift_jax import losses
  reference = hf_models.build(family, tmp_path)
  rng = np.random.default_rng(3)
  lengths = [(11, 7), (9, 12)]  # two rows, two examples each, then padding to 24
  examples = [[rng.integers(3, 97, size=n) for n in row] for row in lengths]
  tokens, segments, positions, weights = (np.zeros((2, 24), np.int32) for _ in range(4))
  for r, row in enumerate(examples):
    start = 0
    for s, ids in enumerate(row, start=1):
      n = len(ids)
      tokens[r, start:start + n], segments[r, start:start + n] = ids, s
      positions[r, start:start + n] = np.arange(n)
      weights[r, start + 3:start + n - 1] = 1  # prompt = first 4 tokens; the last token has no target
      start += n
  targets = np.concatenate([tokens[:, 1:], np.zeros((2, 1), np.int32)], axis=1)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  pretrained = load.open_pretrained(str(tmp_path))
  params = load.load_params(pretrained, mesh)
  graphdef, _, _ = load.abstract_model(pretrained.cfg)

  @jax.jit
  def eval_sums(params, tokens, positions, segments, targets, weights):
    logits = nnx.merge(graphdef, nnx.State(params))(tokens, positions, segments)
    return losses.per_segment_sums(logits, targets, weights.astype(jnp.float32), segments, 3)["loss"]

  with sharding.use_mesh(mesh):
    ours = np.asarray(eval_sums(params, tokens, positions, segments, targets, weights))
  for r, row in enumerate(examples):
    for s, ids in enumerate(row, start=1):
      with torch.no_grad():
        logits = reference(torch.as_tensor(ids[None], dtype=torch.long)).logits[0, :-1]
      labels = torch.as_tensor(ids[1:], dtype=torch.long).clone()
      labels[:3] = -100  # transformers' ignore index: the prompt targets
      theirs = torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
      assert ours[r, s] == pytest.approx(theirs, rel=1e-5, abs=1e-4), (r, s)

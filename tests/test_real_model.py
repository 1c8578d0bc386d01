"""The project's forward pass on the real SmolLM2-135M-Instruct weights against transformers' PyTorch Llama."""

import numpy as np
import pytest

from ift_jax import sharding
from tests.test_model import _forward


@pytest.mark.slow
def test_smollm2_logits_match_transformers_on_a_2x2x2_mesh(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  from ift_jax import assets
  from ift_jax.model import gguf
  from tests.test_gguf import _no_init_weights

  path = assets.asset_path("smollm2-135m-instruct.gguf")
  config = gguf.gguf_hf_config(path)
  with _no_init_weights():
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
  # transformers' own GGUF conversion (its dequantization and un-permutation), not ours
  tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=reference)["tensors"]
  reference.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
  reference.tie_weights()

  tokens_BxL = np.array([[504, 3575, 282, 7158, 314, 7268, 30, 378, 3575, 282, 4649, 314]])  # "The capital of…"
  with torch.no_grad():
    theirs = reference(torch.as_tensor(tokens_BxL)).logits.numpy()
  # data=1: one row cannot split over data-parallel devices; fsdp×tensor still shards every weight 8 ways
  ours = _forward(str(path), tokens_BxL, sharding.make_mesh(data=1, fsdp=4, tensor=2))
  assert np.abs(ours - theirs).max() < 1e-3  # 30 layers of float32 in two libraries
  assert ours[0, 4].argmax() == theirs[0, 4].argmax() == 7268  # " Rome"

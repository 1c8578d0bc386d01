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
  # transformers' own GGUF conversion (its dequantization and un-permutation), not ours; over the same bytes
  # through the faster reader (tests/test_gguf.py checks it reads what gguf's own does)
  with gguf.plain_array_readers():
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


@pytest.mark.slow
def test_gemma3_270m_export_reloads_in_transformers_with_the_projects_logits_and_greedy_text(tmp_path):
  """The catalog's Gemma 3 base model: GGUF → `export --model` → transformers, against the project's forward
  pass on a 2×2×2-device mesh (sliding and global layers, two RoPE bases, (1 + w) norms, scaled embeddings)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from ift_jax import export

  out = export.export(str(tmp_path / "hf"), model="gemma3-270m", dtype="float32")
  reference, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                     output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  prompt = transformers.AutoTokenizer.from_pretrained(out)("One, two, three, four,").input_ids
  assert prompt == [2, 4906, 236764, 1156, 236764, 1806, 236764, 2390, 236764]  # the exported tokenizer
  with torch.no_grad():
    generated = reference.eval().generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  ids = generated[0].tolist()
  ours = _forward("gemma3-270m", np.array([ids]), mesh)
  with torch.no_grad():
    theirs = reference(torch.tensor([ids])).logits.numpy()
  assert np.abs(ours - theirs).max() < 1e-3  # 18 layers of float32 in two libraries
  # teacher-forced on transformers' greedy text, the project picks the same next token at every step
  assert ours[0, len(prompt) - 1:-1].argmax(-1).tolist() == ids[len(prompt):]
  assert ids[len(prompt)] == 3493  # " five"

"""Tiny random Hugging Face models, built with transformers' PyTorch classes and saved with save_pretrained.

These are the reference every user trusts: the project loads the saved folder, and its logits and losses are
compared against the PyTorch implementation of the same weights.
"""

from __future__ import annotations

import pathlib

import numpy as np

# family -> config kwargs on top of the shared tiny shape
FAMILIES = {
    "llama": dict(model_type="llama"),
    "llama3_rope": dict(model_type="llama", rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "llama_tied": dict(model_type="llama", tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", sliding_window=5),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    # attention_bias as transformers reads it: q/k/v/o biases for Llama and Qwen3, ignored by Mistral and Qwen2
    "llama_attention_bias": dict(model_type="llama", attention_bias=True),
    "qwen3_attention_bias": dict(model_type="qwen3", head_dim=16, attention_bias=True),
    "mistral_attention_bias": dict(model_type="mistral", attention_bias=True),
    "qwen2_no_attention_bias": dict(model_type="qwen2", attention_bias=False),
    # Qwen2 with the window on layers from max_window_layers on: a per-layer mix
    "qwen2_window": dict(model_type="qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1),
    # sliding, global, sliding: two RoPE bases and two masks in one scan; query_pre_attn_scalar != head_dim
    "gemma3": dict(model_type="gemma3_text", num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24,
                   sliding_window=5, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}),
    "gemma3_tied_softcap": dict(model_type="gemma3_text", head_dim=16, sliding_window=5, tie_word_embeddings=True,
                                final_logit_softcapping=3.0,
                                layer_types=["full_attention", "sliding_attention"]),
    "gemma3_linear_rope": dict(model_type="gemma3_text", head_dim=16, sliding_window=5,
                               rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                  "rope_theta": 1000.0},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}},
                               layer_types=["sliding_attention", "full_attention"]),
}

_TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500.0,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build(family: str, folder: pathlib.Path, *, seed: int = 0, **overrides) -> "torch.nn.Module":
  """Saves a tiny random `family` model to `folder` and returns the PyTorch model (float32, eval mode)."""
  import torch
  import transformers

  kwargs = {**_TINY, **FAMILIES[family], **overrides}
  model_type = kwargs.pop("model_type")
  config = transformers.AutoConfig.for_model(model_type, **kwargs)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
  with torch.no_grad():  # random norms and biases, so a wrong mapping of any of them shows in the logits
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith(".bias"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(folder)
  return model


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()

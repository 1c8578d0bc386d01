"""Model hyper-parameters, read from a Hugging Face `config.json`.

Only fields that change the math are read; a field that would change the math in a way this project does not
implement is refused by name, never silently approximated.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping

from ift_jax.errors import UserError

# model_type -> (which attention projections have biases, per-head q/k norms). As transformers builds them:
# Llama and Qwen3 give q, k, v and o a bias when `attention_bias` is set; Qwen2 always has q/k/v biases and
# no o bias; Mistral and Gemma 3 have none (Mistral's class ignores `attention_bias`; Gemma 3's is refused).
_FAMILIES = {
    "llama": ("attention_bias", False),
    "mistral": ("none", False),
    "qwen2": ("qkv", False),
    "qwen3": ("attention_bias", True),
    "gemma3_text": ("none", True),
}
_LAYER_TYPES = ("full_attention", "sliding_attention")
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # HF name -> ours


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a decoder of the Llama family or Gemma 3.

  Letters used in tensor names across the model: B batch, L sequence length, D hidden (embed), H query heads,
  K key/value heads, G = H // K query heads per key/value head, E head dim, F MLP hidden, V vocabulary, N layers.
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float
  rope_theta: float
  # Scaling of the full-attention layers' RoPE, as sorted (key, value) pairs with rope_type 'llama3' or 'linear'
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False  # the attention output projection's bias (Llama / Qwen3 `attention_bias`)
  qk_norm: bool = False
  sliding_window: int | None = None
  # Per layer: True where attention is limited to the last `sliding_window` positions. Empty = all full.
  sliding_layers: tuple[bool, ...] = ()
  local_rope_theta: float | None = None  # RoPE base of sliding layers when it differs (Gemma 3: 10,000)
  hidden_act: str = "silu"  # "silu" or "gelu_tanh"
  norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w); the stored w is zero-centred
  sandwich_norms: bool = False  # Gemma: norms after attention and after the MLP too (four per block)
  scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size)
  query_pre_attn_scalar: float | None = None  # attention scores scale by its -1/2 power (default head_dim)
  final_softcap: float | None = None  # tanh soft-capping of the logits
  bos_token_id: int | None = None
  eos_token_id: int | None = None

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return dict(self.rope_scaling) if self.rope_scaling else None

  @property
  def layer_is_sliding(self) -> tuple[bool, ...]:
    """One flag per layer (all False when the model has no sliding-window layers)."""
    return self.sliding_layers or (False,) * self.num_layers

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], *, origin: str = "config.json") -> "ModelConfig":
    """Builds the config from a parsed HF `config.json`, refusing what would change the math unimplemented."""
    model_type = hf.get("model_type")
    if model_type not in _FAMILIES:
      raise UserError(f"{origin}: model_type {model_type!r} is not supported; supported families: "
                      f"{', '.join(sorted(_FAMILIES))}")
    _refuse_unsupported(hf, origin)
    biases, qk_norm = _FAMILIES[model_type]
    attention_bias = biases == "attention_bias" and bool(hf.get("attention_bias", False))
    heads = int(hf["num_attention_heads"])
    gemma = model_type == "gemma3_text"
    sliding = _sliding_layers(hf, model_type, origin)
    return cls(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(_rope_theta(hf, model_type)),
        rope_scaling=_rope_scaling(hf, model_type, origin),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        qkv_bias=attention_bias or biases == "qkv",
        o_bias=attention_bias,
        qk_norm=qk_norm,
        sliding_window=int(hf["sliding_window"]) if any(sliding) else None,
        sliding_layers=sliding if any(sliding) else (),
        local_rope_theta=_local_rope_theta(hf) if gemma else None,
        hidden_act=_ACTIVATIONS[_activation(hf)],
        norm_plus_one=gemma,
        sandwich_norms=gemma,
        scale_embeddings=gemma,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)) if gemma else None,
        final_softcap=_optional_float(hf.get("final_logit_softcapping")) if gemma else None,
        bos_token_id=_first_id(hf.get("bos_token_id")),
        eos_token_id=_first_id(hf.get("eos_token_id")),
    )

  @classmethod
  def from_json_file(cls, path: str | pathlib.Path) -> "ModelConfig":
    path = pathlib.Path(path)
    try:
      hf = json.loads(path.read_text())
    except FileNotFoundError:
      raise UserError(f"{path}: not found; a Hugging Face model folder needs config.json") from None
    except json.JSONDecodeError as e:
      raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix or re-download config.json") from None
    return cls.from_hf(hf, origin=str(path))


def _optional_float(value: Any) -> float | None:
  return None if value is None else float(value)


def _activation(hf: Mapping[str, Any]) -> str:
  # Gemma names it hidden_activation; the Llama family hidden_act.
  return hf.get("hidden_activation") or hf.get("hidden_act") or "silu"


def _rope_params(hf: Mapping[str, Any], model_type: str) -> Mapping[str, Any]:
  """The full-attention layers' RoPE parameters; transformers 5 folds theta and scaling into `rope_parameters`
  (per layer type for Gemma 3), 4.x used top-level fields."""
  params = hf.get("rope_parameters") or {}
  if model_type == "gemma3_text" and "full_attention" in params:
    return params["full_attention"] or {}
  return params


def _rope_theta(hf: Mapping[str, Any], model_type: str) -> float:
  default = 1_000_000.0 if model_type == "gemma3_text" else 10000.0
  return _rope_params(hf, model_type).get("rope_theta", hf.get("rope_theta", default))


def _local_rope_theta(hf: Mapping[str, Any]) -> float:
  local = (hf.get("rope_parameters") or {}).get("sliding_attention") or {}
  return float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)))


def _rope_scaling(hf: Mapping[str, Any], model_type: str, origin: str) -> tuple[tuple[str, Any], ...] | None:
  scaling = dict(hf.get("rope_scaling") or {})
  params = _rope_params(hf, model_type)
  if params.get("rope_type", "default") != "default":
    scaling = dict(params)
  local = ((hf.get("rope_parameters") or {}).get("sliding_attention") or {}) if model_type == "gemma3_text" else {}
  if local.get("rope_type", "default") != "default":
    raise UserError(f"{origin}: RoPE scaling on sliding-window layers ({local['rope_type']!r}) is not "
                    "implemented; use a model without it")
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return None
  keep = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
          "linear": ("factor",)}
  if kind not in keep:
    raise UserError(f"{origin}: rope scaling type {kind!r} is not implemented (only 'llama3' and 'linear'); "
                    "use a model without it")
  return tuple(sorted([("rope_type", kind)] + [(k, float(scaling[k])) for k in keep[kind]]))


def _sliding_layers(hf: Mapping[str, Any], model_type: str, origin: str) -> tuple[bool, ...]:
  """Which layers use the sliding window, from `layer_types` (transformers 5) or the family's older fields."""
  n = int(hf["num_hidden_layers"])
  types = hf.get("layer_types")
  if types is None:
    if model_type == "mistral":
      types = ["sliding_attention" if hf.get("sliding_window") else "full_attention"] * n
    elif model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
      # Qwen applies the window from layer max_window_layers on
      first = int(hf.get("max_window_layers", n))
      types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    elif model_type == "gemma3_text":
      pattern = int(hf.get("sliding_window_pattern", 6))
      types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    else:
      types = ["full_attention"] * n
  unknown = sorted(set(types) - set(_LAYER_TYPES))
  if unknown or len(types) != n:
    raise UserError(f"{origin}: layer_types {unknown or types} not implemented (need {n} entries of "
                    f"{', '.join(_LAYER_TYPES)}); use a model without them")
  sliding = tuple(t == "sliding_attention" for t in types)
  if any(sliding) and not hf.get("sliding_window"):
    raise UserError(f"{origin}: layer_types has sliding_attention layers but sliding_window is not set; "
                    "set sliding_window")
  return sliding


def _refuse_unsupported(hf: Mapping[str, Any], origin: str) -> None:
  act = _activation(hf)
  allowed = "gelu_pytorch_tanh" if hf.get("model_type") == "gemma3_text" else "silu"
  if act != allowed:
    raise UserError(f"{origin}: activation {act!r} is not implemented for {hf.get('model_type')} (only "
                    f"{allowed!r})")
  if hf.get("mlp_bias"):
    raise UserError(f"{origin}: mlp_bias=true is not implemented; use a model without MLP biases")
  if float(hf.get("attention_dropout") or 0.0) != 0.0:  # transformers applies it in training mode
    raise UserError(f"{origin}: attention_dropout={hf['attention_dropout']} is not implemented (ift-jax trains "
                    "without dropout); set it to 0.0")
  if hf.get("pretraining_tp", 1) not in (1, None):
    raise UserError(f"{origin}: pretraining_tp={hf['pretraining_tp']} is not implemented; set it to 1")
  if hf.get("model_type") == "gemma3_text":
    if hf.get("use_bidirectional_attention"):
      raise UserError(f"{origin}: use_bidirectional_attention=true (an encoder-style attention) is not "
                      "implemented; use a causal Gemma 3 model")
    if hf.get("attention_bias"):
      raise UserError(f"{origin}: attention_bias=true is not implemented for gemma3_text")
  elif hf.get("final_logit_softcapping"):
    raise UserError(f"{origin}: final_logit_softcapping is not implemented for {hf.get('model_type')}")
  if hf.get("attn_logit_softcapping"):
    # transformers' Gemma 3 attention never applies it (Gemma 2 did): which math is meant is ambiguous
    raise UserError(f"{origin}: attn_logit_softcapping is not implemented (transformers ignores it for "
                    f"{hf.get('model_type')}); set it to null")


def _first_id(value: Any) -> int | None:
  if isinstance(value, (list, tuple)):
    return int(value[0]) if value else None
  return None if value is None else int(value)

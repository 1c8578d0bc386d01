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

# model_type -> (q/k/v bias by default, q/k RMSNorm over head_dim)
_FAMILIES = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (True, False),
    "qwen3": (False, True),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a Llama-family decoder.

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
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # Llama-3 style, as sorted (key, value) pairs
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  sliding_window: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | None = None

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return dict(self.rope_scaling) if self.rope_scaling else None

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], *, origin: str = "config.json") -> "ModelConfig":
    """Builds the config from a parsed HF `config.json`, refusing what would change the math unimplemented."""
    model_type = hf.get("model_type")
    if model_type not in _FAMILIES:
      raise UserError(f"{origin}: model_type {model_type!r} is not supported; supported families: "
                      f"{', '.join(sorted(_FAMILIES))}")
    _refuse_unsupported(hf, origin)
    default_bias, qk_norm = _FAMILIES[model_type]
    heads = int(hf["num_attention_heads"])
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
        rope_theta=float(_rope_theta(hf)),
        rope_scaling=_rope_scaling(hf, origin),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bool(hf.get("attention_bias", default_bias)),
        qk_norm=qk_norm,
        sliding_window=_sliding_window(hf, model_type),
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


def _rope_params(hf: Mapping[str, Any]) -> Mapping[str, Any]:
  # transformers 5 folds theta and scaling into `rope_parameters`; 4.x used top-level fields.
  return hf.get("rope_parameters") or {}


def _rope_theta(hf: Mapping[str, Any]) -> float:
  return _rope_params(hf).get("rope_theta", hf.get("rope_theta", 10000.0))


def _rope_scaling(hf: Mapping[str, Any], origin: str) -> tuple[tuple[str, Any], ...] | None:
  scaling = dict(hf.get("rope_scaling") or {})
  params = _rope_params(hf)
  if params.get("rope_type", "default") != "default":
    scaling = dict(params)
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return None
  if kind != "llama3":
    raise UserError(f"{origin}: rope scaling type {kind!r} is not implemented (only 'llama3'); "
                    "use a model without it")
  keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  return tuple(sorted((k, float(scaling[k])) for k in keep))


def _sliding_window(hf: Mapping[str, Any], model_type: str) -> int | None:
  window = hf.get("sliding_window")
  if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
    return None
  if model_type in ("qwen2", "qwen3") and window is not None:
    # Qwen applies the window only to layers from max_window_layers on: a per-layer mix we do not implement.
    if int(hf.get("max_window_layers", 0)) < int(hf["num_hidden_layers"]):
      raise UserError(f"config.json: use_sliding_window with max_window_layers < num_hidden_layers is not "
                      "implemented; set use_sliding_window false")
  return int(window) if window else None


def _refuse_unsupported(hf: Mapping[str, Any], origin: str) -> None:
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise UserError(f"{origin}: hidden_act {act!r} is not implemented (only 'silu')")
  if hf.get("mlp_bias"):
    raise UserError(f"{origin}: mlp_bias=true is not implemented; use a model without MLP biases")
  if hf.get("pretraining_tp", 1) not in (1, None):
    raise UserError(f"{origin}: pretraining_tp={hf['pretraining_tp']} is not implemented; set it to 1")
  if hf.get("layer_types") and any(t != "full_attention" for t in hf["layer_types"]):
    if hf.get("model_type") != "mistral":
      raise UserError(f"{origin}: layer_types other than full_attention are not implemented")


def _first_id(value: Any) -> int | None:
  if isinstance(value, (list, tuple)):
    return int(value[0]) if value else None
  return None if value is None else int(value)

"""Pretrained weights in: Hugging Face safetensors folders and GGUF files, placed straight into their shardings.

Every parameter is built with `jax.make_array_from_callback`, so each device receives only its own shard, read
from a memory-mapped file one layer at a time: the whole model is never gathered on one device or held on the
host at once. Safetensors are parsed here (a JSON header and raw little-endian buffers; bfloat16 through
ml_dtypes) rather than through torch: no pickle, no torch at run time, and bfloat16 works with numpy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import struct
from typing import Any, Callable, Iterable, Mapping, Protocol

import jax
import ml_dtypes
import numpy as np

from ift_jax.errors import UserError
from ift_jax.model.config import ModelConfig

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class TensorSource(Protocol):
  """Read-only mapping from Hugging Face tensor names to host arrays in the PyTorch layout."""

  def keys(self) -> Iterable[str]: ...

  def __getitem__(self, name: str) -> np.ndarray: ...


class SafetensorsFolder:
  """All `*.safetensors` files of a folder (sharded through `model.safetensors.index.json` or not), memory-mapped."""

  def __init__(self, folder: str | pathlib.Path):
    folder = pathlib.Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
      raise UserError(f"{folder}: no *.safetensors files; point model.path at a Hugging Face model folder "
                      "saved with safe_serialization (or a .gguf file)")
    self._where: dict[str, tuple[pathlib.Path, dict[str, Any], int]] = {}
    for path in files:
      header, data_start = _read_header(path)
      for name, info in header.items():
        if name != "__metadata__":
          self._where[name] = (path, info, data_start)

  def keys(self) -> Iterable[str]:
    return self._where.keys()

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name][1]["shape"])

  def __getitem__(self, name: str) -> np.ndarray:
    path, info, data_start = self._where[name]
    begin, end = info["data_offsets"]
    dtype = _ST_DTYPES[info["dtype"]]
    count = (end - begin) // np.dtype(dtype).itemsize
    flat = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=(count,))
    return flat.reshape(info["shape"])


def _read_header(path: pathlib.Path) -> tuple[dict[str, Any], int]:
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise UserError(f"{path}: truncated safetensors file; re-download it")
    (size,) = struct.unpack("<Q", raw)
    try:
      header = json.loads(f.read(size))
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise UserError(f"{path}: corrupted safetensors header; re-download it") from None
  for name, info in header.items():
    if name != "__metadata__" and info.get("dtype") not in _ST_DTYPES:
      raise UserError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
  return header, 8 + size


@dataclasses.dataclass(frozen=True)
class HFTensor:
  """One Hugging Face tensor and where it lives among our parameters.

  Our layout = the HF tensor (transposed when `transpose`, as PyTorch Linear stores (out, in)) reshaped to the
  parameter's shape; `to_ours` and `to_hf` are exact inverses (reshapes and transposes only).
  """

  name: str  # HF name, e.g. model.layers.3.self_attn.q_proj.weight
  param: str  # ours: embed, final_norm, lm_head, or a per-layer parameter (q, k, ..., mlp_norm)
  layer: int | None  # index on the stacked `layers` axis; None for embed / final_norm / lm_head
  transpose: bool
  shape: tuple[int, ...]  # HF (PyTorch) layout

  def to_ours(self, w: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
    return (w.T if self.transpose else w).reshape(our_shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    return x.reshape(self.shape[::-1]).T if self.transpose else x.reshape(self.shape)


def _hf_layer_names(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
  """Our per-layer parameter name -> (HF name pattern with `{i}`, transpose)."""
  layer = "model.layers.{i}."
  attn, mlp = layer + "self_attn.", layer + "mlp."
  names = {
      "attn_norm": (layer + "input_layernorm.weight", False),
      # Llama's "post_attention_layernorm" is the norm before the MLP; Gemma's is after attention.
      "mlp_norm": (layer + ("pre_feedforward_layernorm" if cfg.sandwich_norms else "post_attention_layernorm")
                   + ".weight", False),
      "attn_post_norm": (layer + "post_attention_layernorm.weight", False),
      "mlp_post_norm": (layer + "post_feedforward_layernorm.weight", False),
      "q": (attn + "q_proj.weight", True), "k": (attn + "k_proj.weight", True),
      "v": (attn + "v_proj.weight", True), "o": (attn + "o_proj.weight", True),
      "gate": (mlp + "gate_proj.weight", True), "up": (mlp + "up_proj.weight", True),
      "down": (mlp + "down_proj.weight", True),
      "q_bias": (attn + "q_proj.bias", False), "k_bias": (attn + "k_proj.bias", False),
      "v_bias": (attn + "v_proj.bias", False), "o_bias": (attn + "o_proj.bias", False),
      "q_norm": (attn + "q_norm.weight", False), "k_norm": (attn + "k_norm.weight", False),
  }
  return names


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name pattern (layer index as `{i}`) -> shape in the PyTorch layout."""
  d, f, v, e = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
  qd, kd = cfg.num_heads * e, cfg.num_kv_heads * e
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
  by_param = {"q": (qd, d), "k": (kd, d), "v": (kd, d), "o": (d, qd), "gate": (f, d), "up": (f, d),
              "down": (d, f), "q_bias": (qd,), "k_bias": (kd,), "v_bias": (kd,), "q_norm": (e,), "k_norm": (e,)}
  for name, (pattern, _) in _hf_layer_names(cfg).items():
    shapes[pattern] = by_param.get(name, (d,))
  return shapes


def hf_tensors(cfg: ModelConfig, layer_params: Iterable[str]) -> list[HFTensor]:
  """Every HF tensor of a model with this config, in model order (embeddings, layer by layer, norm, head)."""
  table, shapes = _hf_layer_names(cfg), expected_hf_shapes(cfg)
  layer_params = list(layer_params)
  out = [HFTensor("model.embed_tokens.weight", "embed", None, False, shapes["model.embed_tokens.weight"])]
  for i in range(cfg.num_layers):
    for param in layer_params:
      pattern, transpose = table[param]
      out.append(HFTensor(pattern.format(i=i), param, i, transpose, shapes[pattern]))
  out.append(HFTensor("model.norm.weight", "final_norm", None, False, shapes["model.norm.weight"]))
  if not cfg.tie_word_embeddings:
    out.append(HFTensor("lm_head.weight", "lm_head", None, True, shapes["lm_head.weight"]))
  return out


def expected_hf_names(cfg: ModelConfig, layer_params: Iterable[str]) -> set[str]:
  """Every HF tensor name a model with this config must provide."""
  return {t.name for t in hf_tensors(cfg, layer_params)}


def check_names(source: TensorSource, cfg: ModelConfig, layer_params: Iterable[str], origin: str) -> None:
  """Refuses a checkpoint whose tensors do not match the config, naming what is missing or extra."""
  want = {t.name: t for t in hf_tensors(cfg, layer_params)}
  have = set(source.keys())
  if cfg.tie_word_embeddings:
    have.discard("lm_head.weight")  # some tied checkpoints store the copy anyway
  missing = sorted(set(want) - have)
  extra = sorted(n for n in have - set(want) if not n.endswith("rotary_emb.inv_freq"))
  if missing or extra:
    raise UserError(f"{origin}: tensors do not match config.json: missing {_few(missing)}, unexpected "
                    f"{_few(extra)}; use the config.json that came with these weights")
  for name in sorted(want):
    got = tuple(source.shape(name)) if hasattr(source, "shape") else tuple(np.shape(source[name]))
    if got != want[name].shape:
      raise UserError(f"{origin}: tensor {name} has shape {got}, config.json implies {want[name].shape}; "
                      "use the config.json that came with these weights")


def _few(names: list[str]) -> str:
  return f"{len(names)} {names[:3]}{'…' if len(names) > 3 else ''}"


def host_getters(source: TensorSource, cfg: ModelConfig, shapes: Mapping[str, Any]) -> dict[str, Any]:
  """Nested dict matching the model's params: each leaf a function index -> float32 host array for that shard.

  `shapes` is the model's parameter tree (ShapeDtypeStructs). Values are converted to float32 exactly
  (bfloat16 and float16 are subsets of float32), so reduced-precision checkpoints lose nothing.
  """
  specs = {(t.param, t.layer): t for t in hf_tensors(cfg, shapes["layers"].keys())}

  @functools.lru_cache(maxsize=8)
  def layer_tensor(name: str, i: int) -> np.ndarray:
    spec = specs[(name, i)]
    return np.asarray(spec.to_ours(np.asarray(source[spec.name]), shapes["layers"][name].shape[1:]), np.float32)

  def stacked(name: str) -> Callable[[tuple[slice, ...]], np.ndarray]:
    def get(index: tuple[slice, ...]) -> np.ndarray:
      layers = range(cfg.num_layers)[index[0]]
      return np.stack([layer_tensor(name, i)[index[1:]] for i in layers])
    return get

  @functools.lru_cache(maxsize=2)
  def whole_tensor(param: str) -> np.ndarray:
    spec = specs[(param, None)]
    return np.asarray(spec.to_ours(np.asarray(source[spec.name]), shapes[param].shape), np.float32)

  getters: dict[str, Any] = {name: (lambda index, name=name: whole_tensor(name)[index])
                             for name in shapes if name != "layers"}
  getters["layers"] = {name: stacked(name) for name in shapes["layers"]}
  return getters


def place(getters: Mapping[str, Any], shapes: Mapping[str, Any], shardings: Mapping[str, Any]) -> dict[str, Any]:
  """Builds each parameter directly in its sharding from the host getters (only addressable shards are read)."""
  out = {}
  for name, shape in shapes.items():
    if isinstance(shape, Mapping):
      out[name] = place(getters[name], shape, shardings[name])
    else:
      out[name] = jax.make_array_from_callback(shape.shape, shardings[name], getters[name])
  return out

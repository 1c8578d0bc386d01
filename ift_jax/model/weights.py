"""Pretrained weights in: Hugging Face safetensors folders and GGUF files, placed straight into their shardings.

Every parameter is built with `jax.make_array_from_callback`, so each device receives only its own shard, read
from a memory-mapped file one layer at a time: the whole model is never gathered on one device or held on the
host at once. Safetensors are parsed here (a JSON header and raw little-endian buffers; bfloat16 through
ml_dtypes) rather than through torch: no pickle, no torch at run time, and bfloat16 works with numpy.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
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


# Our parameter name -> (HF name pattern, transform from the HF tensor to our per-layer layout).
def _hf_layer_names(cfg: ModelConfig) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
  d, h, k, e = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  attn, mlp = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
  names = {
      "attn_norm": ("model.layers.{i}.input_layernorm.weight", lambda w: w),
      "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", lambda w: w),
      "q": (attn + "q_proj.weight", lambda w: w.T.reshape(d, h, e)),
      "k": (attn + "k_proj.weight", lambda w: w.T.reshape(d, k, e)),
      "v": (attn + "v_proj.weight", lambda w: w.T.reshape(d, k, e)),
      "o": (attn + "o_proj.weight", lambda w: w.T.reshape(h, e, d)),
      "gate": (mlp + "gate_proj.weight", lambda w: w.T),
      "up": (mlp + "up_proj.weight", lambda w: w.T),
      "down": (mlp + "down_proj.weight", lambda w: w.T),
      "q_bias": (attn + "q_proj.bias", lambda b: b.reshape(h, e)),
      "k_bias": (attn + "k_proj.bias", lambda b: b.reshape(k, e)),
      "v_bias": (attn + "v_proj.bias", lambda b: b.reshape(k, e)),
      "q_norm": (attn + "q_norm.weight", lambda w: w),
      "k_norm": (attn + "k_norm.weight", lambda w: w),
  }
  return names


def expected_hf_names(cfg: ModelConfig, layer_params: Iterable[str]) -> set[str]:
  """Every HF tensor name a model with this config must provide."""
  table = _hf_layer_names(cfg)
  names = {"model.embed_tokens.weight", "model.norm.weight"}
  if not cfg.tie_word_embeddings:
    names.add("lm_head.weight")
  for name in layer_params:
    names.update(table[name][0].format(i=i) for i in range(cfg.num_layers))
  return names


def check_names(source: TensorSource, cfg: ModelConfig, layer_params: Iterable[str], origin: str) -> None:
  """Refuses a checkpoint whose tensors do not match the config, naming what is missing or extra."""
  have, want = set(source.keys()), expected_hf_names(cfg, layer_params)
  if cfg.tie_word_embeddings:
    have.discard("lm_head.weight")  # some tied checkpoints store the copy anyway
  missing = sorted(want - have)
  extra = sorted(n for n in have - want if not n.endswith("rotary_emb.inv_freq"))
  if missing or extra:
    raise UserError(f"{origin}: tensors do not match config.json: missing {_few(missing)}, unexpected "
                    f"{_few(extra)}; use the config.json that came with these weights")
  shapes = expected_hf_shapes(cfg)
  for name in sorted(want):
    pattern = re.sub(r"\.\d+\.", ".{i}.", name)
    got = tuple(source.shape(name)) if hasattr(source, "shape") else tuple(np.shape(source[name]))
    if got != shapes[pattern]:
      raise UserError(f"{origin}: tensor {name} has shape {got}, config.json implies {shapes[pattern]}; "
                      "use the config.json that came with these weights")


def _few(names: list[str]) -> str:
  return f"{len(names)} {names[:3]}{'…' if len(names) > 3 else ''}"


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name pattern (layer index as `{i}`) -> shape in the PyTorch layout."""
  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  qd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  attn, mlp = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
  return {
      "model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d),
      "model.layers.{i}.input_layernorm.weight": (d,), "model.layers.{i}.post_attention_layernorm.weight": (d,),
      attn + "q_proj.weight": (qd, d), attn + "k_proj.weight": (kd, d), attn + "v_proj.weight": (kd, d),
      attn + "o_proj.weight": (d, qd), attn + "q_proj.bias": (qd,), attn + "k_proj.bias": (kd,),
      attn + "v_proj.bias": (kd,), attn + "q_norm.weight": (cfg.head_dim,),
      attn + "k_norm.weight": (cfg.head_dim,), mlp + "gate_proj.weight": (f, d), mlp + "up_proj.weight": (f, d),
      mlp + "down_proj.weight": (d, f),
  }


def host_getters(source: TensorSource, cfg: ModelConfig) -> dict[str, Any]:
  """Nested dict matching the model's params: each leaf a function index -> float32 host array for that shard."""
  table = _hf_layer_names(cfg)

  @functools.lru_cache(maxsize=8)
  def layer_tensor(name: str, i: int) -> np.ndarray:
    pattern, transform = table[name]
    return np.asarray(transform(np.asarray(source[pattern.format(i=i)])), np.float32)

  def stacked(name: str) -> Callable[[tuple[slice, ...]], np.ndarray]:
    def get(index: tuple[slice, ...]) -> np.ndarray:
      layers = range(cfg.num_layers)[index[0]]
      return np.stack([layer_tensor(name, i)[index[1:]] for i in layers])
    return get

  @functools.lru_cache(maxsize=2)
  def whole_tensor(hf_name: str, transpose: bool) -> np.ndarray:
    tensor = np.asarray(source[hf_name])
    return np.asarray(tensor.T if transpose else tensor, np.float32)

  def whole(hf_name: str, transpose: bool = False) -> Callable[[tuple[slice, ...]], np.ndarray]:
    return lambda index: whole_tensor(hf_name, transpose)[index]

  getters: dict[str, Any] = {
      "embed": whole("model.embed_tokens.weight"),
      "final_norm": whole("model.norm.weight"),
      "layers": {name: stacked(name) for name in table},
  }
  if not cfg.tie_word_embeddings:
    getters["lm_head"] = whole("lm_head.weight", transpose=True)
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

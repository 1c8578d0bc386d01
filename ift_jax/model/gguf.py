"""Reading Llama and Gemma 3 GGUF files (llama.cpp's format) as Hugging Face config, tensors and tokenizer.

GGUF conventions this module undoes:
  * Names: llama.cpp names (blk.N.attn_q.weight, ...) map to Hugging Face Llama names.
  * Shapes: GGUF lists dimensions fastest-first (ne0 = in_features); `gguf` hands out data rows-major, so a
    dequantized Linear weight already has the PyTorch layout (out_features, in_features).
  * Q/K rows: llama.cpp's converter permutes the rows of the Q and K projections for its RoPE kernel
    (`w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2)`), K with the KV head count; undone here.
  * Norm weights of the llama architecture are stored as they are. llama.cpp's Gemma 3 converter adds 1 to
    every norm weight (it computes x * w where transformers computes x * (1 + w)), q/k norms included, and does
    not permute Q/K rows (Gemma uses the rotate-half layout already): this reader subtracts 1 and leaves the
    rows. Checked against transformers' own GGUF loader (load_gguf_checkpoint, Gemma2TensorProcessor) in
    tests/test_gguf.py, and semantically: the converted model continues "One, two, three, four," with " five, six, seven, eight,".
  * Gemma 3 facts llama.cpp hard-codes instead of storing: every 6th layer is global (the rest use the sliding
    window), sliding layers use RoPE base 10,000, and the attention scale is head_dim^-1/2.
"""

from __future__ import annotations

import collections.abc
import contextlib
import functools
import hashlib
import logging
import os
import pathlib
import re
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ift_jax import assets
from ift_jax.errors import UserError

_log = logging.getLogger(__name__)

if TYPE_CHECKING:
  import transformers

_ARCHES = ("llama", "gemma3")

# llama.cpp per-layer tensor stem -> Hugging Face module path under model.layers.N.
_LLAMA_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA3_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",  # Llama's ffn_norm is HF's post_attention_layernorm instead
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_LAYER_NAMES = {"llama": _LLAMA_LAYER_NAMES, "gemma3": _GEMMA3_LAYER_NAMES}
_GEMMA3_SLIDING_PATTERN, _GEMMA3_LOCAL_ROPE_THETA = 6, 10000.0
_GEMMA3_27B_LAYERS = 62  # llama.cpp recognizes Gemma 3 27B by its layer count (LLM_TYPE_27B)
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


def _import_gguf():
  try:
    import gguf  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError("reading .gguf models needs the gguf package: pip install gguf==0.19.0") from None
  return gguf


def _open(path: os.PathLike[str] | str):
  """A GGUFReader for `path`, with UserErrors for a missing or unreadable file."""
  gguf = _import_gguf()
  if not os.path.isfile(path):
    raise UserError(f"{path}: GGUF file not found; check the model path")
  try:
    return _plain_array_reader(gguf)(path)
  except (ValueError, OSError) as e:
    raise UserError(f"{path}: not a readable GGUF file ({e}); re-download it") from None


@functools.cache
def _plain_array_reader(gguf) -> type:
  """gguf's GGUFReader over a plain ndarray view of its read-only memory map: the same lazily paged bytes.

  The reader parses the metadata value by value, each a slice of the map, and slicing an np.memmap runs Python
  code for every slice it makes (~6 million for Gemma 3's 262,144-token vocabulary); the dequantizers slice the
  tensors row group by row group the same way. Slices of a plain ndarray view skip that.
  """
  class PlainArrayReader(gguf.GGUFReader):
    @property
    def data(self) -> np.ndarray:
      return self._plain_data

    @data.setter
    def data(self, value: np.ndarray) -> None:
      self._plain_data = value.view(np.ndarray)

  return PlainArrayReader


def _field(reader, key: str, default: Any = None) -> Any:
  """A metadata value as a Python scalar, string or list; `default` when absent."""
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _required(reader, path, key: str) -> Any:
  value = _field(reader, key)
  if value is None:
    raise UserError(f"{path}: GGUF metadata key {key} is missing; the file is incomplete or not a Llama model")
  return value


def _int_field(reader, path, key: str, default: int | None = None) -> int:
  value = _field(reader, key, default) if default is not None else _required(reader, path, key)
  if isinstance(value, list):
    raise UserError(f"{path}: GGUF metadata {key} varies per layer ({value[:4]}...); only uniform Llama "
                    "layers are supported")
  return int(value)


def _float32_value(value: float) -> float:
  """The shortest decimal of a float32 metadata value (1e-05 rather than 9.999999747378752e-06)."""
  return float(str(np.float32(value)))


def _check_architecture(reader, path) -> str:
  arch = _field(reader, "general.architecture")
  if arch not in _ARCHES:
    raise UserError(f"{path}: GGUF architecture {arch!r} is not supported; only {', '.join(_ARCHES)} GGUF "
                    "models load")
  if _int_field(reader, path, f"{arch}.expert_count", 0) > 0:
    raise UserError(f"{path}: mixture-of-experts Llama GGUF (Mixtral style) is not supported; use a dense model")
  if any(t.name == "rope_freqs.weight" for t in reader.tensors):
    raise UserError(f"{path}: GGUF has rope_freqs.weight (Llama 3 RoPE frequency scaling), which is not "
                    "supported; use a model without RoPE scaling factors")
  return arch


def _rope_scaling(reader, path, arch: str) -> dict[str, Any] | None:
  """Hugging Face rope_scaling from llama.cpp's rope.scaling.* keys (None without scaling)."""
  prefix = f"{arch}.rope.scaling."
  kind = _field(reader, prefix + "type")
  factor = _field(reader, prefix + "factor")
  if kind is None and _field(reader, f"{arch}.rope.scale_linear") is not None:
    kind, factor = "linear", _field(reader, f"{arch}.rope.scale_linear")  # Older files.
  if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
    return None
  if kind not in ("linear", "yarn") or factor is None:
    raise UserError(f"{path}: GGUF RoPE scaling {kind!r} (factor {factor}) is not supported; use linear or yarn")
  scaling: dict[str, Any] = {"rope_type": kind, "factor": _float32_value(factor)}
  original = _field(reader, prefix + "original_context_length")
  if original is not None:
    scaling["original_max_position_embeddings"] = int(original)
  return scaling


def _config_from_reader(reader, path) -> dict[str, Any]:
  """The Hugging Face config dict of an opened GGUF file (see gguf_hf_config)."""
  arch = _check_architecture(reader, path)
  config = _llama_config(reader, path, arch)
  return _gemma3_config(reader, path, config) if arch == "gemma3" else config


def _gemma3_config(reader, path, llama: dict[str, Any]) -> dict[str, Any]:
  """A Gemma3TextConfig dict: the shared fields, plus what llama.cpp hard-codes for the gemma3 architecture."""
  config = {k: v for k, v in llama.items() if k not in ("rope_theta", "rope_scaling", "hidden_act", "mlp_bias")}
  window = _int_field(reader, path, "gemma3.attention.sliding_window")
  n = config["num_hidden_layers"]
  full = {"rope_type": "default", "rope_theta": llama["rope_theta"], **(llama["rope_scaling"] or {})}
  # GGUF stores no attention scale; llama.cpp hard-codes it by model size: 1/√(hidden / heads) for the 27B (its
  # Hugging Face config: query_pre_attn_scalar 168 = 5376 / 32 with heads of 128), 1/√(head dim) for the others.
  scalar = config["hidden_size"] // config["num_attention_heads"] if n == _GEMMA3_27B_LAYERS else config["head_dim"]
  config.update(
      model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_activation="gelu_pytorch_tanh",
      sliding_window=window, query_pre_attn_scalar=scalar,
      layer_types=["sliding_attention" if (i + 1) % _GEMMA3_SLIDING_PATTERN else "full_attention"
                   for i in range(n)],
      rope_parameters={"full_attention": full,
                       "sliding_attention": {"rope_type": "default", "rope_theta": _GEMMA3_LOCAL_ROPE_THETA}},
      final_logit_softcapping=None, attn_logit_softcapping=None)
  return config


def _llama_config(reader, path, arch: str) -> dict[str, Any]:
  """The fields every supported architecture shares, as a Hugging Face LlamaConfig dict."""
  tensors = {t.name: t for t in reader.tensors}
  a = arch + "."
  heads = _int_field(reader, path, a + "attention.head_count")
  hidden = _int_field(reader, path, a + "embedding_length")
  head_dim = _int_field(reader, path, a + "attention.key_length", hidden // heads)
  rope_dim = _int_field(reader, path, a + "rope.dimension_count", head_dim)
  if rope_dim != head_dim:
    raise UserError(f"{path}: GGUF rope.dimension_count {rope_dim} != head dim {head_dim}; partial RoPE is "
                    "not supported")
  if "token_embd.weight" not in tensors:
    raise UserError(f"{path}: GGUF has no token_embd.weight tensor; the file is incomplete")
  pad = _field(reader, "tokenizer.ggml.padding_token_id")
  qkv_bias, o_bias = "blk.0.attn_q.bias" in tensors, "blk.0.attn_output.bias" in tensors
  if qkv_bias != o_bias:  # a Hugging Face Llama's attention_bias gives all four projections a bias, or none
    raise UserError(f"{path}: GGUF has {'q/k/v' if qkv_bias else 'attention-output'} biases but no "
                    f"{'attention-output' if qkv_bias else 'q/k/v'} bias, which no Llama config can express; "
                    "not supported")
  return {
      "model_type": "llama",
      "architectures": ["LlamaForCausalLM"],
      "hidden_size": hidden,
      "intermediate_size": _int_field(reader, path, a + "feed_forward_length"),
      "num_hidden_layers": _int_field(reader, path, a + "block_count"),
      "num_attention_heads": heads,
      "num_key_value_heads": _int_field(reader, path, a + "attention.head_count_kv", heads),
      "head_dim": head_dim,
      # The embedding's row count is the truth; llama.vocab_size is optional metadata.
      "vocab_size": int(tensors["token_embd.weight"].shape[1]),
      "rms_norm_eps": _float32_value(_required(reader, path, a + "attention.layer_norm_rms_epsilon")),
      "rope_theta": _float32_value(_field(reader, a + "rope.freq_base", 10000.0)),
      "rope_scaling": _rope_scaling(reader, path, arch),
      "max_position_embeddings": _int_field(reader, path, a + "context_length"),
      "tie_word_embeddings": "output.weight" not in tensors,
      "bos_token_id": _optional_int(_field(reader, "tokenizer.ggml.bos_token_id")),
      "eos_token_id": _optional_int(_field(reader, "tokenizer.ggml.eos_token_id")),
      "pad_token_id": _optional_int(pad),
      "attention_bias": qkv_bias,
      "mlp_bias": "blk.0.ffn_up.bias" in tensors,
      "hidden_act": "silu",
  }


def _optional_int(value: Any) -> int | None:
  return None if value is None else int(value)


def gguf_hf_config(path: os.PathLike[str] | str) -> dict[str, Any]:
  """A Hugging Face style config.json dict (LlamaForCausalLM) built from a GGUF file's metadata.

  Raises UserError for architectures other than llama, per-layer head counts, MoE and unsupported RoPE scaling.
  """
  return _config_from_reader(_open(path), path)


def _hf_name(gguf_name: str, path, arch: str) -> str:
  """The Hugging Face name of a llama.cpp tensor name; UserError for tensors this loader does not know."""
  if m := _LAYER_RE.match(gguf_name):
    layer, stem, kind = m.groups()
    if stem in _LAYER_NAMES[arch]:
      return f"model.layers.{layer}.{_LAYER_NAMES[arch][stem]}.{kind}"
  elif (m := _GLOBAL_RE.match(gguf_name)) and m.group(1) in _GLOBAL_NAMES:
    return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
  raise UserError(f"{path}: GGUF tensor {gguf_name!r} is not part of a plain {arch} model; it cannot be loaded")


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's Q/K row permutation (rows grouped per head as (half, 2) back to (2, half))."""
  rows = w.shape[0]
  return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _layer_sort_key(name: str, arch: str) -> tuple[int, int, str]:
  """Model order: embeddings, layers in order (by module order), final norm, lm_head."""
  if m := re.match(r"^model\.layers\.(\d+)\.(.+)$", name):
    modules = list(_LAYER_NAMES[arch].values())
    module = m.group(2).rsplit(".", 1)[0]
    return (1 + int(m.group(1)), modules.index(module), name)
  return ({"model.embed_tokens.weight": 0, "model.norm.weight": 1 << 30}.get(name, 1 << 31), 0, name)


class GGUFTensors(collections.abc.Mapping):
  """Lazy mapping from Hugging Face (Llama or Gemma 3) tensor names to float32 numpy arrays of a GGUF file.

  Arrays are in the PyTorch/HF layout ((out_features, in_features) for Linear weights, (vocab, hidden) for
  the embedding), Q/K rows un-permuted. Each tensor is dequantized on access and not kept, so the whole
  model is never in memory at once. `config` holds gguf_hf_config's dict.
  """

  def __init__(self, path: os.PathLike[str] | str):
    self.path = pathlib.Path(path)
    self._reader = _open(path)
    self.config = _config_from_reader(self._reader, path)
    self.arch = "gemma3" if self.config["model_type"] == "gemma3_text" else "llama"
    by_name = {_hf_name(t.name, path, self.arch): t for t in self._reader.tensors}
    self._tensors = {name: by_name[name]
                     for name in sorted(by_name, key=lambda n: _layer_sort_key(n, self.arch))}
    self._check_complete()

  def _check_complete(self) -> None:
    """Refuses files that lack tensors the config promises (a truncated or partial conversion)."""
    layers = self.config["num_hidden_layers"]
    expected = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{module}.weight" for i in range(layers) for module in _LAYER_NAMES[self.arch].values()]
    missing = [name for name in expected if name not in self._tensors]
    if missing:
      raise UserError(f"{self.path}: GGUF lacks {len(missing)} tensors (first: {missing[0]}); the file is "
                      "incomplete, re-download it")
    extra_layers = {n for n in self._tensors if n.startswith("model.layers.")
                    and int(n.split(".")[2]) >= layers}
    if extra_layers:
      raise UserError(f"{self.path}: GGUF has tensors beyond block_count={layers} (e.g. {min(extra_layers)})")

  def __getitem__(self, name: str) -> np.ndarray:
    tensor = self._tensors.get(name)
    if tensor is None:
      raise KeyError(f"{name!r} is not a tensor of {self.path.name}")
    gguf = _import_gguf()
    weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    if np.may_share_memory(weights, self._reader.data):
      weights = weights.copy()  # F32 tensors come back as views of the read-only memory map.
    weights = weights.astype(np.float32, copy=False).reshape(self.shape(name))
    if self.arch == "gemma3":  # stored as 1 + w; no Q/K row permutation
      return weights - np.float32(1.0) if name.endswith("norm.weight") else weights
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
      weights = _unpermute_rows(weights, self.config["num_attention_heads"])
    elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
      weights = _unpermute_rows(weights, self.config["num_key_value_heads"])
    return weights

  def __contains__(self, name: object) -> bool:
    return name in self._tensors  # Mapping's default would dequantize.

  def __iter__(self) -> Iterator[str]:
    return iter(self._tensors)

  def __len__(self) -> int:
    return len(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    """The HF-layout shape of `name` without dequantizing (GGUF lists dimensions in reverse)."""
    tensor = self._tensors.get(name)
    if tensor is None:
      raise KeyError(f"{name!r} is not a tensor of {self.path.name}")
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))

  def quant_type(self, name: str) -> str:
    """The GGML storage type of `name`, e.g. 'Q4_1', 'Q8_0', 'F32'."""
    return self._tensors[name].tensor_type.name


@contextlib.contextmanager
def plain_array_readers() -> Iterator[None]:
  """Within it, `gguf.GGUFReader` is `_plain_array_reader`'s: transformers' GGUF loading, which imports the
  name from gguf at call time, then parses a file's metadata 1.5-1.9 × faster (a first tokenizer conversion
  in a fresh process: Gemma 3 270M 15.5 -> 8.2 s, SmolLM2 4.9 -> 3.2 s on 2 cores) from the same bytes."""
  gguf = _import_gguf()
  original, plain = gguf.GGUFReader, _plain_array_reader(gguf)
  gguf.GGUFReader = plain
  try:
    yield
  finally:
    gguf.GGUFReader = original


def gguf_tokenizer(path: os.PathLike[str] | str) -> transformers.PreTrainedTokenizerBase:
  """The Hugging Face tokenizer stored in a GGUF file's metadata (chat template included).

  transformers builds it from the metadata (5.9 s for SmolLM2's in a fresh process); the EOS token is set from
  tokenizer.ggml.eos_token_id when transformers leaves it unset. The result is kept in the cache
  (`_tokenizer_cache`) and read back from there later (2.2 s, mostly transformers' imports).
  """
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f"{path}: GGUF file not found; check the model path")
  cached = _tokenizer_cache(path)
  if (cached / "tokenizer_config.json").is_file():
    try:
      return AutoTokenizer.from_pretrained(str(cached))
    except Exception as e:  # damaged by hand or by the disk: convert again and replace it
      _log.warning("cached tokenizer %s is unreadable (%s: %s); converting it again", cached, type(e).__name__, e)
      shutil.rmtree(cached, ignore_errors=True)
  with plain_array_readers():
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  if tokenizer.eos_token is None:
    eos_id = _field(_open(path), "tokenizer.ggml.eos_token_id")
    if eos_id is None:
      raise UserError(f"{path}: GGUF tokenizer has no EOS token (tokenizer.ggml.eos_token_id); add it")
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(eos_id))
  _save_tokenizer(tokenizer, cached)
  return tokenizer


def _tokenizer_cache(path: pathlib.Path) -> pathlib.Path:
  """CACHE/tokenizers/<key>: the key changes with the file (path, size, modification time) and with the
  transformers and tokenizers versions that convert and read it."""
  from tokenizers import __version__ as tokenizers_version  # pylint: disable=import-outside-toplevel
  from transformers import __version__ as transformers_version  # pylint: disable=import-outside-toplevel

  stat = path.stat()
  identity = (f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|transformers {transformers_version}|"
              f"tokenizers {tokenizers_version}|1")
  return assets.cache_dir() / "tokenizers" / hashlib.sha256(identity.encode()).hexdigest()[:32]


def _save_tokenizer(tokenizer: Any, folder: pathlib.Path) -> None:
  """Writes the folder whole or not at all (a rename), so a concurrent or interrupted writer leaves no half
  tokenizer; a cache that cannot be written only costs the conversion next time."""
  try:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.")
    try:
      tokenizer.save_pretrained(tmp)
      os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a shared cache must be readable by others
      os.rename(tmp, folder)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; left when another process won the race
  except OSError as e:
    _log.warning("could not cache the tokenizer in %s (%s); it will be converted again next time", folder, e)

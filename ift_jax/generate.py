"""Batched generation with a K/V cache: greedy by default, or temperature / top-p sampling.

    ift-jax generate --model=PATH --prompt="..." [--prompt="..."] [--max_new_tokens=64]
    ift-jax generate --workdir=DIR [--checkpoint=latest|best|STEP] --prompts_file=FILE [--temperature=0.7]

Shapes are static so that a batch never recompiles: prompts are left-padded to a length bucket (a power of two
or 1.5 × one, at least `min_bucket`), the batch is padded to `batch_size` rows, and the cache holds bucket +
`max_new_tokens` slots. One jitted function per bucket prefills the prompt and then runs a `lax.while_loop` of
single-token steps that ends when every row has produced EOS, a token that ends it at a stop string (StopTokens),
or `max_new_tokens` tokens. Stop strings are then cut from the decoded text on the host (`cut_at_stop`). Activations, cache and logits are laid out by the logical axis rules of
`ift_jax.sharding`, on the same mesh as training.

Shape letters: B batch, P prompt (bucket) length, T new tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ift_jax import sharding
from ift_jax.errors import UserError
from ift_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen: temperature 0 is greedy (argmax); otherwise sample from the top-p nucleus."""

  temperature: float = 0.0
  top_p: float = 1.0

  def validate(self) -> None:
    if self.temperature < 0:
      raise UserError(f"--temperature={self.temperature}: must be >= 0 (0 = greedy)")
    if not 0 < self.top_p <= 1:
      raise UserError(f"--top_p={self.top_p}: must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class StopTokens:
  """Per-token tables that let the decoding loop end a row at a stop string, for S sets of stop strings.

  A row ends on the device once it emits a token whose text holds one of its stop strings after some non-blank
  text of the row's answer (in that token, or in an earlier one): `cut_at_stop` would cut the text there, so
  the tokens after it never reach the answer and need not be generated. Stop strings that span two tokens are
  still cut on the host only; the row then runs on to EOS or max_new_tokens, as without these tables.
  """

  ends_SxV: np.ndarray  # the token's text holds the stop after a non-blank character of its own
  holds_SxV: np.ndarray  # the token's text holds the stop anywhere
  text_V: np.ndarray  # the token's text has a non-blank character

  @classmethod
  def build(cls, tokenizer: Any, stop_sets: Sequence[Sequence[str]], vocab_size: int) -> "StopTokens":
    """Tables for `vocab_size` token ids (ids the tokenizer lacks never stop a row); each token decoded alone."""
    texts = tokenizer.batch_decode([[i] for i in range(min(len(tokenizer), vocab_size))], skip_special_tokens=True)
    # U+FFFD stands for bytes of a character split over tokens: not known to be non-blank text.
    blank = lambda t: not t.replace("\ufffd", "").strip()
    ends = np.zeros((len(stop_sets), vocab_size), bool)
    holds = np.zeros((len(stop_sets), vocab_size), bool)
    for row, stops in enumerate(stop_sets):
      for token, text in enumerate(texts):
        at = [text.find(stop) for stop in stops if stop and stop in text]
        holds[row, token] = bool(at)
        ends[row, token] = bool(at) and not blank(text[:min(at)])
    text = np.zeros(vocab_size, bool)
    text[:len(texts)] = [not blank(t) for t in texts]
    return cls(ends, holds, text)

  @classmethod
  def none(cls, vocab_size: int) -> "StopTokens":
    """One set of stop strings that stops nothing."""
    return cls(np.zeros((1, vocab_size), bool), np.zeros((1, vocab_size), bool), np.zeros(vocab_size, bool))


def bucket_length(n: int, minimum: int = 16) -> int:
  """The padded prompt length: the smallest power of two or 1.5 × a power of two that holds n, at least `minimum`.

  Two buckets an octave, so few compiles, and a batch pads by at most a third, not a half: `ift-jax eval`'s
  3-shot prompts with answer choices (lengths 100-512, batches of 16) pad 18 % instead of 33 % with powers of two
  alone, for one more compile.
  """
  power = 1 << max(n - 1, 0).bit_length()
  return max(minimum, power * 3 // 4 if power >= 4 and n <= power * 3 // 4 else power)


def left_pad(prompts: Sequence[Sequence[int]], rows: int, length: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens_BxP, positions_BxP) with each prompt right-aligned; padding (and missing rows) has position -1.

  Right-aligning puts every row's last prompt token in the same slot, so one slice gives all next-token logits
  and all rows then advance in lockstep. E.g. prompts [5, 6, 7] and [8] at length 4, pad 0:
  tokens [[0, 5, 6, 7], [0, 0, 0, 8]], positions [[-1, 0, 1, 2], [-1, -1, -1, 0]].
  """
  tokens_BxP = np.full((rows, length), pad_id, np.int32)
  positions_BxP = np.full((rows, length), -1, np.int32)
  for r, ids in enumerate(prompts):
    if ids:
      tokens_BxP[r, length - len(ids):] = ids
      positions_BxP[r, length - len(ids):] = np.arange(len(ids))
  return tokens_BxP, positions_BxP


def choose(logits_BxV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """The next token of each row: argmax, or a draw from the temperature-scaled top-p nucleus."""
  if sampling.temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / sampling.temperature
  if sampling.top_p < 1:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is below top_p.
    keep_BxV = (jnp.cumsum(probs_BxV, axis=-1) - probs_BxV) < sampling.top_p
    cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, -jnp.inf)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


class Generator:
  """A model's parameters on a mesh plus one compiled decoding function per prompt-length bucket."""

  def __init__(self, graphdef: nnx.GraphDef, params: Any, cfg: ModelConfig, mesh: Mesh, *, eos_ids: Sequence[int],
               pad_id: int = 0, batch_size: int = 8, max_new_tokens: int = 64, sampling: Sampling = Sampling(),
               compute_dtype: Any = jnp.float32, min_bucket: int = 16):
    if max_new_tokens < 1:
      raise UserError(f"--max_new_tokens={max_new_tokens}: must be at least 1")
    sampling.validate()
    self.graphdef, self.params, self.cfg, self.mesh = graphdef, params, cfg, mesh
    self.eos_ids, self.pad_id, self.batch_size = tuple(eos_ids), pad_id, batch_size
    self.max_new_tokens, self.sampling, self.compute_dtype = max_new_tokens, sampling, compute_dtype
    self.min_bucket = min_bucket
    self.traces = 0  # how many times the decoding function was traced (= compiled): one per bucket
    self.on_batch: Callable[[], None] = lambda: None  # after each batch's results (eval's watchdog: progress)
    # Outputs are small (B×T ids, B×C scores) and replicated, so every process reads whole batches.
    replicated = NamedSharding(mesh, P())
    self._decode = jax.jit(self._decode_batch, out_shardings=replicated)
    self._score_tokens = jax.jit(self._score_tokens_batch, out_shardings=replicated)

  def _decode_batch(self, params: Any, tokens_BxP: jax.Array, positions_BxP: jax.Array, key: jax.Array,
                    candidates_BxC: jax.Array, prefix_BxK: jax.Array, stop_Bx1: jax.Array,
                    stops: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Prefill, then a while loop of single-token steps; returns new_BxT (-1 after a row's end) and the
    log-probabilities of the candidate tokens after the prompt and the row's prefix, (B, C).

    prefix_BxK holds each row's prefix left-padded with -1 (K = 0: no prefixes); stop_Bx1 each row's set of stop
    strings in `stops` (StopTokens' tables; -1: none)."""
    self.traces += 1  # runs at trace time only, so it counts compilations
    model = nnx.merge(self.graphdef, nnx.State(params))
    b, p = tokens_BxP.shape
    t_max, eos_E = self.max_new_tokens, jnp.asarray(self.eos_ids, jnp.int32)
    step = lambda tok_BxL, pos_BxL, cache, start: model.decode(
        tok_BxL, pos_BxL, cache, start, compute_dtype=self.compute_dtype, last_only=True)
    logits_Bx1xV, cache = model.prefill(tokens_BxP, positions_BxP, p + max(t_max, prefix_BxK.shape[1]),
                                        compute_dtype=self.compute_dtype, last_only=True)
    scored_BxV = logits_Bx1xV[:, 0]
    if prefix_BxK.shape[1]:
      # One more cached step reads the prefix; its cache is dropped, so generation goes on from the prompt.
      filled_BxK = prefix_BxK >= 0
      after_BxK = jnp.where(filled_BxK, positions_BxP[:, -1:] + jnp.cumsum(filled_BxK, axis=1), -1)
      prefixed_Bx1xV, _ = step(jnp.where(filled_BxK, prefix_BxK, self.pad_id), after_BxK, cache, p)
      scored_BxV = jnp.where(filled_BxK[:, -1:], prefixed_Bx1xV[:, 0], scored_BxV)
    first_BxC = jnp.take_along_axis(jax.nn.log_softmax(scored_BxV.astype(jnp.float32), axis=-1),
                                    candidates_BxC, axis=-1)
    ends_SxV, holds_SxV, text_V = stops
    stop_B = stop_Bx1[:, 0]
    set_B = jnp.maximum(stop_B, 0)

    def ended(token_B, seen_B):
      """(row ended: EOS, or a stop string after some text; the row has non-blank text now)."""
      stopped_B = (stop_B >= 0) & (ends_SxV[set_B, token_B] | (seen_B & holds_SxV[set_B, token_B]))
      return jnp.isin(token_B, eos_E) | stopped_B, seen_B | text_V[token_B]

    key, draw = jax.random.split(key)
    token_B = choose(logits_Bx1xV[:, 0], draw, self.sampling)
    new_BxT = jnp.full((b, t_max), -1, jnp.int32).at[:, 0].set(token_B)  # -1: after the row's end
    done_B, seen_B = ended(token_B, jnp.zeros((b,), bool))
    done_B |= positions_BxP[:, -1] < 0  # rows added to fill the batch are done

    def body(state):
      t, token_B, position_B, cache, new_BxT, done_B, seen_B, key = state
      logits_Bx1xV, cache = step(token_B[:, None], position_B[:, None], cache, p + t - 1)
      key, draw = jax.random.split(key)
      token_B = jnp.where(done_B, self.pad_id, choose(logits_Bx1xV[:, 0], draw, self.sampling))
      new_BxT = jax.lax.dynamic_update_slice_in_dim(new_BxT, jnp.where(done_B, -1, token_B)[:, None], t, axis=1)
      now_B, seen_B = ended(token_B, seen_B)
      return t + 1, token_B, position_B + 1, cache, new_BxT, done_B | now_B, seen_B, key

    state = (jnp.int32(1), token_B, positions_BxP[:, -1] + 1, cache, new_BxT, done_B, seen_B, key)
    state = jax.lax.while_loop(lambda s: (s[0] < t_max) & ~jnp.all(s[5]), body, state)
    return sharding.constrain(state[4], ("batch", "length")), first_BxC

  def _score_tokens_batch(self, params: Any, tokens_BxP: jax.Array, positions_BxP: jax.Array,
                          targets_BxP: jax.Array, weights_BxP: jax.Array) -> jax.Array:
    """Sum over a row of weights × log p(target | tokens so far): (B,)."""
    model = nnx.merge(self.graphdef, nnx.State(params))
    logits_BxPxV, _ = model.prefill(tokens_BxP, positions_BxP, tokens_BxP.shape[1], compute_dtype=self.compute_dtype)
    logp_BxPxV = jax.nn.log_softmax(logits_BxPxV.astype(jnp.float32), axis=-1)
    logp_BxP = jnp.take_along_axis(logp_BxPxV, targets_BxP[..., None], axis=-1)[..., 0]
    return jnp.sum(logp_BxP * weights_BxP, axis=-1)

  def _batches(self, prompts: Sequence[Sequence[int]]):
    """(first index, placed tokens_BxP, placed positions_BxP, rows used) per batch of prompts."""
    if any(not ids for ids in prompts):
      raise UserError("generate: every prompt must have at least one token; drop the empty prompts")
    for first in range(0, len(prompts), self.batch_size):
      chunk = prompts[first:first + self.batch_size]
      length = bucket_length(max(len(ids) for ids in chunk), self.min_bucket)
      tokens_BxP, positions_BxP = left_pad(chunk, self.batch_size, length, self.pad_id)
      yield first, self._place(tokens_BxP), self._place(positions_BxP), len(chunk)

  def _place(self, x: np.ndarray) -> jax.Array:
    """A global array from a host array that every process holds whole (multi-process safe)."""
    target = sharding.named_sharding(self.mesh, ("batch", "length"), x.shape)
    return jax.make_array_from_callback(x.shape, target, lambda index: x[index])

  def generate_ids(self, prompts: Sequence[Sequence[int]], *, seed: int = 0) -> list[list[int]]:
    """New token ids of each prompt, up to (not including) the first EOS."""
    return self.generate(prompts, seed=seed)[0]

  def generate(self, prompts: Sequence[Sequence[int]], *, seed: int = 0,
               candidates: Sequence[Sequence[int]] | None = None,
               prefixes: Sequence[Sequence[int]] | None = None, stops: StopTokens | None = None,
               stop_sets: Sequence[int] | None = None) -> tuple[list[list[int]], np.ndarray]:
    """(new ids of each prompt up to its first EOS or its end at a stop string, (N, C)
    log p(candidates[i][c] | prompts[i] + prefixes[i])).

    Rank classification over answer choices that differ only in their last token comes almost free this way:
    the candidates are the choices' last tokens, the prefix their shared start (often none), and the scores
    come from the prefill that generation runs anyway plus one cached step over the prefix. The shared
    prefix's own likelihood is the same for every choice, so leaving it out does not change the ranking.
    Generation itself continues from the prompt alone. Without candidates the scores are (N, 0).
    With `stops`, prompt i's row ends early at its stop set `stop_sets[i]` of `stops` (-1: none; default: set 0
    for every prompt); the ids after that token, which `cut_at_stop` would drop, are not generated.
    """
    candidates_NxC = np.asarray(candidates if candidates is not None else [[]] * len(prompts), np.int32)
    candidates_NxC = candidates_NxC.reshape(len(prompts), -1)
    prefixes = prefixes if prefixes is not None else [[]] * len(prompts)
    prefix_NxK = np.full((len(prompts), max((len(x) for x in prefixes), default=0)), -1, np.int32)
    for row, ids in zip(prefix_NxK, prefixes):
      row[len(row) - len(ids):] = ids  # left-padded: every row's last prefix token in the last column
    if stops is None:
      stops, stop_sets = StopTokens.none(self.cfg.vocab_size), None
    if stops.text_V.shape != (self.cfg.vocab_size,):
      raise ValueError(f"StopTokens for {stops.text_V.shape[0]} token ids; the model has {self.cfg.vocab_size}")
    stop_Nx1 = np.asarray(stop_sets if stop_sets is not None else [0] * len(prompts), np.int32).reshape(-1, 1)
    tables = tuple(self._replicated(x) for x in (stops.ends_SxV, stops.holds_SxV, stops.text_V))
    ids: list[list[int]] = []
    scores = []
    key = jax.random.key(seed)
    for first, tokens_BxP, positions_BxP, rows in self._batches(prompts):
      with sharding.use_mesh(self.mesh):
        new_BxT, first_BxC = self._decode(self.params, tokens_BxP, positions_BxP, jax.random.fold_in(key, first),
                                          self._rows(candidates_NxC, first, rows, 0),
                                          self._rows(prefix_NxK, first, rows, -1),
                                          self._rows(stop_Nx1, first, rows, -1), tables)
      ids.extend(_until_eos(row, self.eos_ids) for row in np.asarray(new_BxT.addressable_data(0))[:rows])
      scores.append(np.asarray(first_BxC.addressable_data(0))[:rows])
      self.on_batch()
    return ids, np.concatenate(scores) if scores else candidates_NxC.astype(np.float32)

  def _rows(self, values_NxC: np.ndarray, first: int, rows: int, fill: int) -> jax.Array:
    """A batch's rows of a small per-prompt table, replicated; rows added to fill the batch hold `fill`."""
    values_BxC = np.full((self.batch_size, values_NxC.shape[1]), fill, np.int32)
    values_BxC[:rows] = values_NxC[first:first + rows]
    return self._replicated(values_BxC)

  def _replicated(self, x: np.ndarray) -> jax.Array:
    """A small host array that every process holds whole, replicated on the mesh (multi-process safe)."""
    return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, P()), lambda index: x[index])

  def continuation_logprobs(self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
                            ) -> np.ndarray:
    """(N,) float32: log p(continuations[i] | prompts[i]), summed over the continuation's tokens.

    The general rank-classification score (any answer choices): one forward pass per (prompt, choice).
    """
    rows = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    out = []
    for first, tokens_BxP, positions_BxP, used in self._batches(rows):
      targets_BxP = np.zeros(tokens_BxP.shape, np.int32)
      weights_BxP = np.zeros(tokens_BxP.shape, np.float32)
      length = tokens_BxP.shape[1]
      for r in range(used):
        ids, n_new = rows[first + r], len(continuations[first + r])
        # Right-aligned: token i sits in slot length - len(ids) + i and is predicted by the slot before it.
        slots = np.arange(length - n_new - 1, length - 1)
        targets_BxP[r, slots], weights_BxP[r, slots] = ids[-n_new:], 1.0
      with sharding.use_mesh(self.mesh):
        logp_B = self._score_tokens(self.params, tokens_BxP, positions_BxP, self._place(targets_BxP),
                                    self._place(weights_BxP))
      out.append(np.asarray(logp_B.addressable_data(0))[:used])
      self.on_batch()
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def _until_eos(row: np.ndarray, eos_ids: Sequence[int]) -> list[int]:
  """A row's new ids up to its first EOS, or to where it ended (-1 follows a stop token)."""
  ids = row.tolist()
  stops = [i for i, t in enumerate(ids) if t in eos_ids or t < 0]
  return ids[:stops[0]] if stops else ids


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  """The text before the first occurrence of any stop string that starts after the text's leading whitespace.

  A base model often opens its answer with a newline; with the templates' default stop "\n" that would cut every
  such answer to nothing. `ift-jax eval` and `ift-jax generate` cut the same way, so a template's answers agree.
  """
  lead = len(text) - len(text.lstrip())
  cuts = [at for at in (text.find(s, lead) for s in stop if s) if at >= 0]
  return text[:min(cuts)] if cuts else text


def read_prompts(prompts: Sequence[str], prompts_file: str, template: str = "") -> list[str]:
  """The --prompt flags, then the non-empty lines of --prompts_file.

  With --template (e.g. amazon_reviews/rating_from_review), each line is a JSON record rendered through that
  template's prompt, and each --prompt is taken as the template's single field (e.g. the review text).
  """
  if template:
    return _templated(prompts, prompts_file, template)
  out = list(prompts)
  if prompts_file:
    out += [line for line in _lines(prompts_file, "a text file, one prompt a line")]
  if not out:
    raise UserError("generate: no prompts; pass --prompt=TEXT (repeatable) or --prompts_file=FILE")
  return out


def _lines(path_text: str, expected: str) -> list[str]:
  path = pathlib.Path(path_text)
  if not path.is_file():
    raise UserError(f"--prompts_file={path_text!r}: file not found; give {expected}")
  return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _templated(prompts: Sequence[str], prompts_file: str, spec: str) -> list[str]:
  import json  # pylint: disable=g-import-not-at-top
  from ift_jax.data import templates  # pylint: disable=g-import-not-at-top
  template = templates.find_template(spec)
  records = []
  fields = sorted(template.prompt_fields)
  if prompts:
    if len(fields) != 1:
      raise UserError(f"--template={spec!r} reads fields {fields}: pass records with --prompts_file (JSON lines)")
    records += [{fields[0]: p} for p in prompts]
  for number, line in enumerate(_lines(prompts_file, "a JSON-lines file of records") if prompts_file else [], 1):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{prompts_file}:{number}: not a JSON record ({e.msg}); one JSON object a line") from e
    if not isinstance(record, dict):
      raise UserError(f"{prompts_file}:{number}: expected a JSON object with fields {fields}")
    records.append(record)
  if not records:
    raise UserError("generate: no records; pass --prompt=TEXT or --prompts_file=FILE.jsonl with --template")
  return [template.render_prompt(r) for r in records]


def generate_cli(prompts: Sequence[str], *, model: str = "", workdir: str = "", checkpoint: str = "latest",
                 max_new_tokens: int = 64, sampling: Sampling = Sampling(), seed: int = 0,
                 stop: Sequence[str] = (), progress: Callable[[str], None] = lambda doing: None
                 ) -> list[dict[str, str]]:
  """`ift-jax generate`: completions of the prompts by a model path or a workdir checkpoint.

  `progress(doing)` marks loading and each generated batch (`ift-jax generate`'s watchdog counts it)."""
  from ift_jax import export
  from ift_jax.model import load
  mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)  # weights split on fsdp, prompts over the same devices
  progress("loading the weights")
  if model:
    pretrained = load.open_pretrained(model)
    params = load.load_params(pretrained, mesh)
  else:
    pretrained, params, _ = export._restore_checkpoint_params(workdir, checkpoint, mesh)
  tokenizer = pretrained.load_tokenizer()
  eos_ids = {i for i in (pretrained.cfg.eos_token_id, tokenizer.eos_token_id) if i is not None}
  graphdef, _, _ = load.abstract_model(pretrained.cfg)
  rows = -(-min(len(prompts), 32) // mesh.size) * mesh.size  # a multiple of the devices, so rows shard evenly
  generator = Generator(graphdef, params, pretrained.cfg, mesh, eos_ids=sorted(eos_ids),
                        pad_id=tokenizer.pad_token_id or 0, batch_size=rows, max_new_tokens=max_new_tokens,
                        sampling=sampling)
  stops = StopTokens.build(tokenizer, [stop], pretrained.cfg.vocab_size) if any(stop) else None
  doing = "generating a batch (the first compiles the prefill and decode steps)"
  progress(doing)
  generator.on_batch = lambda: progress(doing)
  ids, _ = generator.generate([tokenizer(p).input_ids for p in prompts], seed=seed, stops=stops)
  texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
  return [{"prompt": p, "completion": cut_at_stop(t, stop)} for p, t in zip(prompts, texts)]

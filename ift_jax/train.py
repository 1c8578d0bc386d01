"""Wiring and the training loop: the only module that reads the whole config.

config → mesh → pretrained model + tokenizer → templated, tokenized splits → loader → sharded state →
jitted steps → loop (train, validate, checkpoint) → test metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ift_jax import checkpoint, distributed, evaluate, optim, sharding, steps, watchdog
from ift_jax.data import loader
from ift_jax.errors import UserError
from ift_jax.metrics_log import MetricsLog
from ift_jax.model import load
from ift_jax.model.transformer import ATTENTION

_log = logging.getLogger(__name__)
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


class NonFiniteLoss(RuntimeError):
  """The loss or gradient went NaN/inf: the run stops and keeps its last good checkpoint."""


@dataclasses.dataclass
class Session:
  """Everything a run needs, built once from the config."""

  config: Any
  workdir: pathlib.Path
  mesh: Any
  tokenizer: Any
  prepared: loader.Prepared
  train_loader: loader.TrainLoader
  total_steps: int
  compiled: steps.CompiledSteps
  abstract_state: Any
  checkpointer: checkpoint.Checkpointer
  pretrained: load.Pretrained
  watchdog: watchdog.Watchdog = dataclasses.field(default_factory=lambda: watchdog.Watchdog(0))  # 0: off


def validate_config(c: Any) -> None:
  """Fails fast, naming the field and the fix."""
  if c.model.compute_dtype not in ("auto", *DTYPES):
    raise UserError(f"model.compute_dtype={c.model.compute_dtype!r}: use auto or one of {', '.join(DTYPES)}")
  if c.model.remat not in ("none", "full", "dots"):
    raise UserError(f"model.remat={c.model.remat!r}: use none, full or dots")
  if c.model.remat != "none" and not model_option(c, "scan_layers"):
    raise UserError(f"model.remat={c.model.remat!r} needs model.scan_layers=True (unrolled layers are not "
                    "rematerialized: XLA keeps their activations); set both, or remat=none")
  if model_option(c, "attention") not in ("auto", *ATTENTION):
    raise UserError(f"model.attention={model_option(c, 'attention')!r}: use auto or one of {', '.join(ATTENTION)}")
  chunk = model_option(c, "loss_chunk")
  if chunk < 0 or chunk > c.data.seq_len:
    raise UserError(f"model.loss_chunk={chunk}: use 0 (whole-row logits) or 1..data.seq_len={c.data.seq_len} "
                    "positions per fused cross-entropy chunk")
  if c.data.seq_len < 8:
    raise UserError(f"data.seq_len={c.data.seq_len}: use at least 8 tokens")
  if c.train.steps <= 0 and c.train.epochs <= 0:
    raise UserError("train.steps and train.epochs are both 0: set one of them")
  for key in ("batch_size", "grad_accum", "eval_every", "eval_batch_size", "log_every"):
    if getattr(c.train, key) <= 0:
      raise UserError(f"train.{key}={getattr(c.train, key)}: must be positive")
  if c.checkpoint.every <= 0 or c.checkpoint.keep <= 0:
    raise UserError("checkpoint.every and checkpoint.keep must be positive")
  if c.checkpoint.best_mode not in ("min", "max"):
    raise UserError(f"checkpoint.best_mode={c.checkpoint.best_mode!r}: use min or max")


# For configs saved before these fields existed.
_MODEL_DEFAULTS = {"attention": "einsum", "loss_chunk": 0, "scan_layers": True}


def compute_dtype_name(c: Any) -> str:
  """model.compute_dtype, with "auto" resolved by `steps.auto_compute_dtype` for this process's devices."""
  option = c.model.compute_dtype
  return steps.auto_compute_dtype(jax.devices()[0].platform) if option == "auto" else option


def attention_implementation(c: Any, cfg: Any) -> str:
  """model.attention, with "auto" resolved by `steps.auto_attention`."""
  option = model_option(c, "attention")
  platform = jax.devices()[0].platform
  if option == "splash" and platform != "tpu":  # elsewhere Pallas would interpret the TPU kernel, very slowly
    raise UserError(f"model.attention='splash' is a TPU kernel and this run is on {platform}; use auto, einsum, "
                    "jax or cudnn")
  if option != "auto":
    return option
  return steps.auto_attention(platform, compute_dtype_name(c), cfg.head_dim)


def model_option(c: Any, key: str) -> Any:
  return c.model.get(key, _MODEL_DEFAULTS[key])


def _check_batch(c: Any, mesh: Any) -> None:
  data_parallel, procs = mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count()
  for key, size, per in (("batch_size", c.train.batch_size, c.train.grad_accum * data_parallel),
                         ("eval_batch_size", c.train.eval_batch_size, data_parallel)):
    need = math.lcm(per, c.data.shards, procs * (c.train.grad_accum if key == "batch_size" else 1))
    if size % need:
      raise UserError(f"train.{key}={size} must divide by {per} (micro-batches × data×fsdp devices), by "
                      f"data.shards={c.data.shards} and by the micro-batches of {procs} process(es); use a "
                      f"multiple of {need}")


def build_session(c: Any, workdir: str | pathlib.Path) -> Session:
  validate_config(c)
  mesh = sharding.make_mesh(data=c.mesh.data, fsdp=c.mesh.fsdp, tensor=c.mesh.tensor)
  _check_batch(c, mesh)
  pretrained = load.open_pretrained(c.model.path)
  tokenizer = pretrained.load_tokenizer()
  prepared = prepare_data(c, tokenizer)
  train_loader = loader.TrainLoader(
      prepared.splits["train"], num_shards=c.data.shards, seq_len=c.data.seq_len,
      batch_size=c.train.batch_size, grad_accum=c.train.grad_accum, packed=c.data.packing, seed=c.seed)
  total = c.train.steps if c.train.steps > 0 else train_loader.steps_for_epochs(c.train.epochs)
  slots = 1 + loader.max_segments(prepared, splits=("validation", "test"), seq_len=c.data.seq_len,
                                  packed=c.data.packing)
  compiled, abstract_state = _compile(c, mesh, pretrained.cfg, total_steps=total, num_slots=-(-slots // 8) * 8)
  return Session(c, pathlib.Path(workdir), mesh, tokenizer, prepared, train_loader, total, compiled,
                 abstract_state, checkpoint.Checkpointer(workdir, keep=c.checkpoint.keep), pretrained)


def _compile(c: Any, mesh: Any, cfg: Any, *, total_steps: int, num_slots: int):
  """The jitted steps and the train state's abstract (shape + sharding) tree."""
  graphdef, abstract_params, _ = load.abstract_model(cfg)
  param_sh = load.param_shardings(mesh, cfg)
  o = c.optim
  schedule = optim.learning_rate_schedule(lr=o.lr, warmup_steps=o.warmup_steps, total_steps=total_steps,
                                          end_lr_ratio=o.end_lr_ratio)
  optimizer = optim.make_optimizer(
      lr=o.lr, warmup_steps=o.warmup_steps, total_steps=total_steps, end_lr_ratio=o.end_lr_ratio,
      weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, clip_norm=o.clip_norm)
  runner = steps.ModelRunner(graphdef, compute_dtype=DTYPES[compute_dtype_name(c)], remat=c.model.remat,
                             loss_chunk=model_option(c, "loss_chunk"), attention=attention_implementation(c, cfg),
                             scan_layers=model_option(c, "scan_layers"), one_example_per_row=not c.data.packing)
  compiled = steps.jit_steps(runner, optimizer, schedule, mesh=mesh, abstract_params=abstract_params,
                             param_shardings=param_sh, num_slots=num_slots,
                             skip_nonfinite=c.train.skip_nonfinite)
  abstract_state = sharding.abstract_like(jax.eval_shape(compiled.init, abstract_params), compiled.state_shardings)
  return compiled, abstract_state


def dry_run(c: Any) -> dict[str, Any]:
  """Compiles the train step for the configured shapes, without weights or data, and reports per-device memory
  (XLA's `memory_analysis`) and, where the device reports its capacity, the largest global batch that fits."""
  validate_config(c)
  mesh = sharding.make_mesh(data=c.mesh.data, fsdp=c.mesh.fsdp, tensor=c.mesh.tensor)
  _check_batch(c, mesh)
  cfg = load.open_pretrained(c.model.path).cfg
  compiled, abstract_state = _compile(c, mesh, cfg, total_steps=max(c.train.steps, 1), num_slots=8)
  need = lambda rows: _step_bytes(compiled, abstract_state, mesh, rows, c)
  limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")  # None on CPU
  report = {"batch_size": c.train.batch_size, "seq_len": c.data.seq_len,
            "bytes_per_device": need(c.train.batch_size), "device_bytes_limit": limit,
            "eval_batch_size": c.train.eval_batch_size,
            "eval_bytes_per_device": _eval_bytes(compiled, abstract_state["params"], mesh, c)}
  if limit:  # the configured batch doubled while it fits (doubling keeps every divisibility rule)
    rows = c.train.batch_size
    while rows < 2**16 and need(rows * 2) <= limit:
      rows *= 2
    report["largest_batch_size"] = rows if report["bytes_per_device"] <= limit else 0
  return report


def _step_bytes(compiled: steps.CompiledSteps, abstract_state: Any, mesh: Any, rows: int, c: Any) -> int:
  batch = _abstract_batch((c.train.grad_accum, rows // c.train.grad_accum, c.data.seq_len),
                          steps.train_batch_sharding(mesh))
  m = compiled.train.lower(abstract_state, batch).compile().memory_analysis()
  # Donated state buffers are reused for the outputs (alias), so they count once.
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def _eval_bytes(compiled: steps.CompiledSteps, abstract_params: Any, mesh: Any, c: Any) -> int:
  """The eval step's per-device memory at train.eval_batch_size (its logits are chunked like training's)."""
  batch = _abstract_batch((c.train.eval_batch_size, c.data.seq_len), sharding.batch_sharding(mesh))
  m = compiled.eval.lower(abstract_params, batch).compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def _abstract_batch(shape: tuple[int, ...], batch_sharding: Any) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "weights" else jnp.int32, sharding=batch_sharding)
          for k in steps.BATCH_KEYS}


def holdout_templates(c: Any) -> list[str]:
  """data.holdout_templates as a list (configs saved before the field existed have none)."""
  return [t.strip() for t in c.data.get("holdout_templates", "").split(",") if t.strip()]


def source_specs(c: Any) -> list[str]:
  return [s.strip() for s in c.data.source.split(",") if s.strip()]


def prepare_data(c: Any, tokenizer: Any) -> loader.Prepared:
  prepared = loader.prepare(
      tokenizer, source_specs=source_specs(c),
      templates_spec=c.data.templates, seq_len=c.data.seq_len, chat=c.data.chat, seed=c.seed,
      validation_fraction=c.data.validation_fraction, test_fraction=c.data.test_fraction,
      skip_malformed=c.data.skip_malformed, max_train_examples=c.data.max_train_examples,
      max_eval_examples=c.data.max_eval_examples, holdout_templates=holdout_templates(c),
      plan=loader.ShardPlan(c.data.shards, jax.process_index(), jax.process_count()))
  for note in prepared.notes if jax.process_index() == 0 else ():  # counts are global; print them once
    _log.info("%s", note)
  return prepared


def _start(s: Session, log: MetricsLog) -> tuple[Any, loader.Position, float | None]:
  """Fresh state from the pretrained weights, or the latest checkpoint when the workdir has one."""
  if s.checkpointer.latest_step() is None:
    s.watchdog.beat("loading the pretrained weights")
    params = load.load_params(s.pretrained, s.mesh)
    return s.compiled.init(params), loader.Position(), None
  s.watchdog.beat("restoring the latest checkpoint")
  state, loader_state, saved_config = s.checkpointer.restore_newest_valid(s.abstract_state)
  _warn_config_changes(saved_config, s.config.to_dict())
  step = int(state["step"])
  log.truncate_after(step)
  log.echo(f"resuming from {s.workdir}/checkpoints/{step} (epoch {loader_state['epoch']}, "
           f"batch {loader_state['batch']})")
  return state, loader.Position(loader_state["epoch"], loader_state["batch"]), loader_state.get("best")


def _warn_config_changes(saved: dict, current: dict, prefix: str = "") -> None:
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key), current.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      _warn_config_changes(a, b, f"{prefix}{key}.")
    elif a != b:
      _log.warning("config %s%s changed since the checkpoint: %r -> %r", prefix, key, a, b)


def run_eval(s: Session, params: Any, split: str) -> dict[str, float]:
  c = s.config
  doing = f"evaluating the {split} split"
  s.watchdog.beat(doing)
  metrics = evaluate.evaluate(s.compiled.eval, params, s.prepared.splits[split], mesh=s.mesh,
                              template_names=s.prepared.template_names, seq_len=c.data.seq_len,
                              batch_size=c.train.eval_batch_size, packed=c.data.packing,
                              on_batch=lambda: s.watchdog.beat(doing))
  return {f"{split}/{k}": v for k, v in metrics.items()}


def _improved(metrics: dict[str, float], best: float | None, c: Any) -> bool:
  value = metrics.get(c.checkpoint.best_metric)
  if value is None:
    raise UserError(f"checkpoint.best_metric={c.checkpoint.best_metric!r} is not a validation metric; use e.g. "
                    "validation/loss or validation/exact_match")
  return best is None or (value < best if c.checkpoint.best_mode == "min" else value > best)


def _check_finite(metrics: dict[str, Any], step: int, position: loader.Position, s: Session) -> None:
  if s.config.train.skip_nonfinite:  # the step already kept the old weights; metrics count it as skipped
    if metrics["skipped"]:
      _log.warning("step %d: non-finite loss or gradient; update skipped (train.skip_nonfinite)", step)
    return
  if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
    last = s.checkpointer.latest_step()
    raise NonFiniteLoss(f"step {step}: loss {metrics['loss']}, grad norm {metrics['grad_norm']} on batch "
                        f"{position.batch} of epoch {position.epoch}; stopped without saving: the last good "
                        f"checkpoint is {last if last is not None else 'none (pretrained weights)'} in "
                        f"{s.workdir}/checkpoints; lower optim.lr or check that batch's data")


def train(c: Any, workdir: str | pathlib.Path, *, hang_timeout_s: float = 0) -> dict[str, float]:
  """Trains (or resumes) to the configured number of steps, then reports test metrics. With `hang_timeout_s` > 0,
  a run that makes no progress for that long (no step, evaluation batch or save) ends (see `watchdog`)."""
  with watchdog.Watchdog(hang_timeout_s, where=distributed.this_process()) as dog:
    dog.beat("preparing the data")
    s = build_session(c, workdir)
    s.watchdog = dog
    return _train(s)


def _train(s: Session) -> dict[str, float]:
  log = MetricsLog(s.workdir)
  try:
    state, position, best = _start(s, log)
    if int(state["step"]) == 0:  # the base model, before any update: the baseline fine-tuning must beat
      for split in ("validation", "test"):
        log.write(0, run_eval(s, state["params"], split), echo=f"{split}, base model")
    state, best, stopped = _loop(s, log, state, position, best)
    if stopped:
      log.echo(f"stopped by SIGTERM after step {int(state['step'])}: checkpoint saved in {s.workdir}/checkpoints;"
               " rerun the same command to resume")
      return {}
    test = run_eval(s, state["params"], "test")
    log.write(s.total_steps, test, echo="test, fine-tuned model")
    log.write_json("test_metrics.json", {"step": s.total_steps, **test})
    log.echo(compare_base(log.read(), test))
    return test
  finally:  # also on errors: let in-flight asynchronous saves finish, so no checkpoint is left half-written
    s.watchdog.beat("finishing the checkpoint writes")
    s.checkpointer.wait()
    s.checkpointer.close()
    log.close()


def compare_base(rows: list[dict[str, Any]], final: dict[str, float], split: str = "test") -> str:
  """A Markdown table of `split` metrics, base model (step 0) against fine-tuned, overall and per template."""
  base = {k: v for row in rows if row["step"] == 0 for k, v in row.items() if k.startswith(f"{split}/")}
  metrics = ("exact_match", "token_accuracy", "loss")
  header = " | ".join(f"{m}: base → tuned" for m in metrics)
  lines = [f"| {split} template | n | {header} |", "|---|---|" + "---|" * len(metrics)]
  for key in sorted((k for k in final if k.endswith("/examples")), key=lambda k: (k.count("/"), k)):  # "all" first
    prefix = key[:-len("examples")]
    cells = [f"{base.get(prefix + m, float('nan')):.3f} → {final[prefix + m]:.3f}" for m in metrics]
    name = prefix[len(split) + 1:-1] or "all"
    lines.append(f"| {name} | {final[key]} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


class _Preemption:
  """SIGTERM (what preemptible VMs and schedulers send) asks the loop to checkpoint after the current step and
  stop. Processes agree on the step, since the signal may reach each host at a slightly different time."""

  def __init__(self):
    self.requested = False
    try:
      self._previous = signal.signal(signal.SIGTERM, self._request)
    except ValueError:  # not the main thread (an embedding application): it keeps its own handling
      self._previous = None

  def _request(self, signum, frame) -> None:
    self.requested = True

  def stop_now(self) -> bool:
    return bool(distributed.global_max(int(self.requested))) if jax.process_count() > 1 else self.requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _loop(s: Session, log: MetricsLog, state: Any, position: loader.Position, best: float | None):
  progress = log.progress(initial=int(state["step"]), total=s.total_steps)
  preemption = _Preemption()
  try:
    return _steps(s, log, progress, preemption, state, position, best)
  finally:
    preemption.close()
    progress.close()


def _steps(s: Session, log: MetricsLog, progress: Any, preemption: _Preemption, state: Any,
           position: loader.Position, best: float | None):
  c = s.config
  batch_sh = steps.train_batch_sharding(s.mesh)
  pending = None  # (step, metrics, position, tokens, t0): fetched after the next step is dispatched
  timer = _StepTimer()
  stop = False
  if int(state["step"]) >= s.total_steps:  # resumed from the final checkpoint (killed before it exited)
    return state, best, stop
  s.watchdog.beat(f"train step {int(state['step']) + 1} (the first compiles the step)")
  local, following = s.train_loader.batch(position)
  batch = evaluate.to_global(local, batch_sh)
  for step in range(int(state["step"]) + 1, s.total_steps + 1):
    t0 = time.perf_counter()
    state, metrics = s.compiled.train(state, batch)  # dispatched asynchronously
    tokens = int((local["segment_ids"] > 0).sum()) * jax.process_count()
    if step < s.total_steps:  # prefetch: build and send the next batch while this step computes
      local, after_next = s.train_loader.batch(following)
      batch = evaluate.to_global(local, batch_sh)
    if pending is not None:
      _log_train(s, log, progress, timer, *pending)
    pending = (step, metrics, position, tokens, t0)
    improved = False
    if step % c.train.eval_every == 0 or step == s.total_steps:
      _log_train(s, log, progress, timer, *pending)
      pending = None
      validation = run_eval(s, state["params"], "validation")
      log.write(step, validation, echo=f"validation, step {step}")
      improved = _improved(validation, best, c)
      best = validation[c.checkpoint.best_metric] if improved else best
    stop = preemption.stop_now()
    if step % c.checkpoint.every == 0 or step == s.total_steps or improved or stop:
      if pending is not None:  # never save an update whose loss we have not seen to be finite
        _log_train(s, log, progress, timer, *pending)
        pending = None
      s.watchdog.beat(f"saving the checkpoint of step {step}")
      s.checkpointer.save(step, state, {**following.to_json(), "best": best}, c.to_dict(), best=improved)
    if stop or step == s.total_steps:
      break
    position, following = following, after_next
  if pending is not None:
    _log_train(s, log, progress, timer, *pending)
  s.checkpointer.wait()
  return state, best, stop


class _StepTimer:
  """How long each step ran: from when it could start (dispatched, and the previous step finished) to when its
  metrics were ready. Dispatch is asynchronous, so dispatch-to-ready alone would include the previous step's tail
  and undercount tokens/s by up to 2×."""

  def __init__(self):
    self._last_ready = 0.0

  def seconds(self, dispatched: float) -> float:
    ready = time.perf_counter()
    start, self._last_ready = max(dispatched, self._last_ready), ready
    return max(ready - start, 1e-9)


def _log_train(s: Session, log: MetricsLog, progress: Any, timer: _StepTimer, step: int, metrics: Any,
               position: loader.Position, tokens: int, t0: float) -> None:
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  s.watchdog.beat(f"train step {step + 1}")
  _check_finite(values, step, position, s)
  tokens_per_s = tokens / timer.seconds(t0)
  progress.update(step - progress.n)
  progress.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{tokens_per_s:.0f}")
  if step % s.config.train.log_every == 0 or step == s.total_steps:
    log.write(step, {**{f"train/{k}": v for k, v in values.items()}, "train/tokens_per_s": tokens_per_s})


def render(c: Any, *, split: str, num_examples: int) -> str:
  """The first examples of a split as tokens with their loss weights, to check masking by eye."""
  validate_config(c)
  tokenizer = load.open_pretrained(c.model.path).load_tokenizer()
  prepared = prepare_data(c, tokenizer)
  blocks = list(prepared.notes)
  for example in prepared.examples(split)[:num_examples]:
    blocks.append(f"\n== {example.template} (record {example.record_index}, {len(example.ids)} tokens; "
                  "weight 1 = trained on)")
    for token_id, weight in zip(example.ids.tolist(), example.weights.tolist()):
      text = tokenizer.convert_ids_to_tokens(token_id)
      blocks.append(f"  {weight:g} | {token_id:>7} | {text!r}")
  return "\n".join(blocks)

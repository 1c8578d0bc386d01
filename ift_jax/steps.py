"""The train step and the eval step, side by side: pure functions, jitted in one place with explicit shardings.

A train batch is a dict of int32/float32 arrays shaped (A, B/A, L): A micro-batches for gradient accumulation
(A = 1 without it), B global rows, L tokens. Keys: inputs, targets, weights, segment_ids, positions.
An eval batch has the same keys shaped (B, L).
The train state is a dict {"step", "params", "opt_state"} of arrays (float32 master weights).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ift_jax import losses, sharding

BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


def auto_compute_dtype(platform: str) -> str:
  """The compute dtype "auto" means: float32 on CPUs, bfloat16 on accelerators.

  XLA's CPU backend has no fast 16-bit matrix products: converting to and from bfloat16 only adds work
  (SmolLM2-135M's step at 8 × 128 on 2 cores: 4.84-4.86 s in bfloat16, 4.06-4.19 s in float32), and float32 is
  exact. GPUs and TPUs multiply bfloat16 at several times their float32 rate.
  """
  return "float32" if platform == "cpu" else "bfloat16"


def auto_attention(platform: str, compute_dtype: str, head_dim: int) -> str:
  """The attention "auto" means: cuDNN's flash attention on NVIDIA GPUs computing in 16 bits with heads of at
  most 128 (what every cuDNN 9 takes); Pallas splash attention on TPUs for heads of a multiple of 128 (older JAX
  releases' kernel refuses other widths, jax-ml/jax#30861; the 0.10 one accepts them); else the spelled-out
  attention (the fastest on CPU)."""
  cudnn_fits = compute_dtype in ("bfloat16", "float16") and head_dim <= 128 and head_dim % 8 == 0
  if platform == "gpu" and cudnn_fits:
    return "cudnn"
  if platform == "tpu" and head_dim % 128 == 0:
    return "splash"
  return "einsum"


@dataclasses.dataclass(frozen=True)
class ModelRunner:
  """How the model runs inside the steps: its graph, compute precision and rematerialization policy."""

  graphdef: nnx.GraphDef
  compute_dtype: Any = jnp.bfloat16
  remat: str = "none"
  loss_chunk: int = 0  # positions per cross-entropy chunk (training and evaluation); 0 = all logits at once
  attention: str = "einsum"  # see ift_jax.model.transformer.attention
  scan_layers: bool = True  # False unrolls the layer loop (see Transformer.hidden)
  one_example_per_row: bool = False  # rows as pack(packed=False) lays them out (see Transformer.hidden)

  def logits(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    model = nnx.merge(self.graphdef, nnx.State(params))
    return model.head(self._hidden(model, batch), self.compute_dtype)

  def loss_sums(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """losses.weighted_sums of the batch: from the whole logits, or (`loss_chunk` > 0) from the fused
    chunked cross-entropy, which skips unweighted positions and never holds the whole logits."""
    if not self.loss_chunk:
      return losses.weighted_sums(self.logits(params, batch), batch["targets"], batch["weights"])
    model = nnx.merge(self.graphdef, nnx.State(params))
    head_w, vocab_major = model.unembedding(self.compute_dtype)
    return losses.fused_head_sums(model.final_normed(self._hidden(model, batch)), head_w, batch["targets"],
                                  batch["weights"], self.loss_chunk, vocab_major=vocab_major,
                                  softcap=model.cfg.final_softcap)

  def token_losses(self, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per-position (cross-entropy, hit) for evaluation: from `loss_chunk`-position chunks of logits when set,
    which skip unweighted positions (then 0 there)."""
    if not self.loss_chunk:
      return losses.cross_entropy_and_hit(self.logits(params, batch), batch["targets"])
    model = nnx.merge(self.graphdef, nnx.State(params))
    return losses.chunked_token_losses(lambda x: model.head(x, self.compute_dtype), self._hidden(model, batch),
                                       batch["targets"], batch["weights"], self.loss_chunk)

  def _hidden(self, model: Any, batch: dict[str, jax.Array]) -> jax.Array:
    return model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"],
                        compute_dtype=self.compute_dtype, remat=self.remat, attention=self.attention,
                        scan_layers=self.scan_layers, one_example_per_row=self.one_example_per_row)


def make_train_step(runner: ModelRunner, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, *, skip_nonfinite: bool = False) -> Callable:
  """Returns train_step(state, batch) -> (state, metrics), pure.

  The loss is the cross-entropy summed over all target tokens of the global batch divided by their count,
  computed before the micro-batch loop: accumulated gradients then equal one big batch's exactly, on any mesh.
  With `skip_nonfinite`, an update whose loss or gradient is NaN/inf is not applied (metrics["skipped"] = 1).
  """

  def loss_fn(params, micro, total_weight):
    sums = runner.loss_sums(params, micro)
    return sums["loss"] / total_weight, sums

  def train_step(state, batch):
    total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)

    def grads_and_sums(micro):
      (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], micro, total_weight)
      return grads, sums

    def accumulate(grads, micro):
      micro_grads, sums = grads_and_sums(micro)
      return jax.tree.map(jnp.add, grads, micro_grads), sums

    # The first micro-batch's gradients start the sum: no zero-filled accumulator to write and add (a full
    # pass over the parameters), and without accumulation no loop at all.
    grads, first_sums = grads_and_sums(jax.tree.map(lambda x: x[0], batch))
    sums_A = jax.tree.map(lambda x: x[None], first_sums)
    if batch["inputs"].shape[0] > 1:
      grads, rest_A = jax.lax.scan(accumulate, grads, jax.tree.map(lambda x: x[1:], batch))
      sums_A = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), sums_A, rest_A)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    skip = jnp.logical_not(jnp.isfinite(grad_norm) & jnp.isfinite(jnp.sum(sums_A["loss"])))
    if skip_nonfinite:  # keep the old weights and moments; the step counter still advances with the data
      keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(skip, o, n), new, old)
      params, opt_state = keep_old(params, state["params"]), keep_old(opt_state, state["opt_state"])
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    metrics = {
        "skipped": skip.astype(jnp.float32),
        "loss": jnp.sum(sums_A["loss"]) / total_weight,
        "token_accuracy": jnp.sum(sums_A["correct"]) / total_weight,
        "target_tokens": jnp.sum(sums_A["weight"]),
        "grad_norm": grad_norm,
        "lr": schedule(state["step"]),
    }
    return new_state, metrics

  return train_step


def make_eval_step(runner: ModelRunner, num_slots: int) -> Callable:
  """Returns eval_step(params, batch) -> per-example sums, each (B, num_slots); see losses.per_segment_sums."""

  def eval_step(params, batch):
    ce_BxL, correct_BxL = runner.token_losses(params, batch)
    return losses.segment_sums(ce_BxL, correct_BxL, batch["weights"], batch["segment_ids"], num_slots)

  return eval_step


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_params: Any,
                        param_shardings: Any, mesh: Mesh) -> Any:
  """Each optimizer leaf shaped like a parameter (Adam's moments) takes that parameter's sharding; the rest
  (step counts) is replicated."""
  by_path = {}
  jax.tree_util.tree_map_with_path(
      lambda path, x, s: by_path.setdefault(jax.tree_util.keystr(path), (x.shape, s)),
      abstract_params, param_shardings)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    key = jax.tree_util.keystr(path)
    for param_key, (shape, s) in by_path.items():
      if key.endswith(param_key) and leaf.shape == shape:
        return s
    return replicated

  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def state_shardings(optimizer: optax.GradientTransformation, abstract_params: Any, param_shardings: Any,
                    mesh: Mesh) -> dict[str, Any]:
  return {"step": NamedSharding(mesh, P()), "params": param_shardings,
          "opt_state": opt_state_shardings(optimizer, abstract_params, param_shardings, mesh)}


def train_batch_sharding(mesh: Mesh) -> NamedSharding:
  # (A, B/A, L): every micro-batch spread over all data-parallel devices; the accumulation axis is looped over.
  return NamedSharding(mesh, sharding.logical_to_spec((None, "batch", "length")))


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
  init: Callable  # params -> state
  train: Callable  # (state, batch) -> (state, metrics); state donated
  eval: Callable  # (params, batch) -> per-example sums
  state_shardings: Any  # of the train state, as init returns it and train takes it


def jit_steps(runner: ModelRunner, optimizer: optax.GradientTransformation, schedule: optax.Schedule, *,
              mesh: Mesh, abstract_params: Any, param_shardings: Any, num_slots: int,
              skip_nonfinite: bool = False) -> CompiledSteps:
  """The one place steps are jitted, with every input and output sharding spelled out."""
  state_sh = state_shardings(optimizer, abstract_params, param_shardings, mesh)
  replicated = NamedSharding(mesh, P())  # scalar metrics: every process can read them
  train_batch_sh = {k: train_batch_sharding(mesh) for k in BATCH_KEYS}
  eval_batch_sh = {k: sharding.batch_sharding(mesh) for k in BATCH_KEYS}
  # Per-example sums are B×S floats: replicated, so every process reads whole batches without a collective.
  eval_out_sh = replicated

  def init(params):
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}

  def traced(fn):  # trace under the mesh so the model's logical activation constraints apply
    def wrapped(*args):
      with sharding.use_mesh(mesh):
        return fn(*args)
    return wrapped

  return CompiledSteps(
      init=jax.jit(init, in_shardings=(param_shardings,), out_shardings=state_sh, donate_argnums=0),
      train=jax.jit(traced(make_train_step(runner, optimizer, schedule, skip_nonfinite=skip_nonfinite)),
                    in_shardings=(state_sh, train_batch_sh), out_shardings=(state_sh, replicated),
                    donate_argnums=0),
      eval=jax.jit(traced(make_eval_step(runner, num_slots)),
                   in_shardings=(param_shardings, eval_batch_sh), out_shardings=eval_out_sh),
      state_shardings=state_sh,
  )

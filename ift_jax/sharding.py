"""The device mesh and the one table that maps logical axis names onto it.

Model code names logical axes only (`embed`, `mlp`, `heads`, `kv_heads`, `vocab`, `batch`, ...). This module is
the only place that knows mesh axes (`data`, `fsdp`, `tensor`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ift_jax.errors import UserError

_log = logging.getLogger(__name__)
MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Parameters are stored sharded over `fsdp` on their embed dimension (ZeRO-3 style:
# gathered just in time by XLA) and over `tensor` on heads / MLP / vocabulary (Megatron-style splits).
# Activations shard their batch over both data-parallel axes.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
)
_RULES = dict(RULES)

_active_mesh: Mesh | None = None


def make_mesh(*, data: int, fsdp: int, tensor: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh; one size may be -1, meaning all remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise UserError(f"mesh: at most one of mesh.data/fsdp/tensor may be -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
    raise UserError(f"mesh: data×fsdp×tensor = {sizes} does not divide the {len(devices)} devices; "
                    "set mesh.data/mesh.fsdp/mesh.tensor to divisors (one may be -1)")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise UserError(f"mesh: data×fsdp×tensor = {sizes} uses {math.prod(sizes)} of {len(devices)} devices; "
                    "make the product equal the device count (or use -1 for one axis)")
  device_grid = np.asarray(devices).reshape(sizes)
  return Mesh(device_grid, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
  """Maps logical axis names to a PartitionSpec through RULES.

  When `shape` and `mesh` are given, a dimension that the mesh axes do not divide evenly is replicated instead
  (for example 3 key/value heads on a tensor axis of 2): correct, only less sharded, and logged once.
  """
  spec = []
  used: set[str] = set()
  for i, name in enumerate(logical_axes):
    target = _RULES.get(name) if name else None
    axes = tuple(a for a in ((target,) if isinstance(target, str) else (target or ())) if a not in used)
    if shape is not None and mesh is not None and axes:
      size = math.prod(mesh.shape[a] for a in axes)
      if shape[i] % size:
        _log.info("replicating dim %d (%s, size %d) not divisible by mesh axes %s", i, name, shape[i], axes)
        axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None
                   ) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def tree_shardings(mesh: Mesh, logical_tree: Any, shape_tree: Any) -> Any:
  """NamedShardings for a tree of logical-axes tuples and a matching tree of shapes (or ShapeDtypeStructs)."""
  return jax.tree.map(lambda axes, x: named_sharding(mesh, axes, getattr(x, "shape", x)),
                      logical_tree, shape_tree, is_leaf=lambda x: isinstance(x, tuple))


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree`'s arrays with target shardings: a compile or checkpoint-restore target."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of every (B, L) batch array: rows split over the data-parallel axes, length whole."""
  return named_sharding(mesh, ("batch", "length"))


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
  """Makes `mesh` the one `constrain` uses while tracing the model."""
  global _active_mesh
  previous, _active_mesh = _active_mesh, mesh
  try:
    yield mesh
  finally:
    _active_mesh = previous


def active_mesh() -> Mesh | None:
  """The mesh of the enclosing `use_mesh` (None outside one): for code that must shard_map a kernel."""
  return _active_mesh


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Pins an activation's layout by logical names; a no-op outside `use_mesh` (e.g. single-device tests)."""
  if _active_mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, named_sharding(_active_mesh, logical_axes, x.shape))

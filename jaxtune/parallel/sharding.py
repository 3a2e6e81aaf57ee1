"""The one table mapping logical axis names to mesh axes (MaxText style).

Models name the axes of their parameters ("embed", "mlp", ...) and activations
("activation_batch", ...); only this file knows the mesh. Changing the parallelism layout
means editing `LOGICAL_AXIS_RULES`, never a model.

The table is ordered: for each dimension the first rule for its name whose mesh axes are
(a) present in the mesh, (b) not already used by an earlier dimension of the same array and
(c) divide the dimension's size, wins. A dimension that no rule fits is replicated, so a tiny
model (2 kv heads on 4 tensor devices) still runs, only less sharded.
"""

import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune.parallel.mesh import BATCH_AXES

MeshAxes = str | tuple[str, ...] | None

LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # Parameters.
    ("layers", None),        # stacked decoder layers: never split (the scan walks them)
    ("vocab", "tensor"),
    ("embed", "fsdp"),       # FSDP: every weight matrix is split along its hidden dim
    ("heads", "tensor"),     # q_proj out / o_proj in: N * H, split by heads
    ("kv_heads", "tensor"),  # k_proj / v_proj out: K * H
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),          # RMSNorm weights are tiny: replicated
    ("experts", "expert"),
    # Activations.
    ("activation_batch", BATCH_AXES),
    ("activation_batch", ("data", "fsdp")),  # fallbacks when B does not divide all of them
    ("activation_batch", "fsdp"),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)

_KNOWN_NAMES = frozenset(name for name, _ in LOGICAL_AXIS_RULES)
# A parameter this large copied whole onto every device is worth a warning (memory).
REPLICATED_WARNING_ELEMENTS = 1_000_000
log = logging.getLogger(__name__)


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None
                    ) -> PartitionSpec:
  """PartitionSpec for one array whose dims carry logical `names`.

  With `shape` and `mesh`, rules whose mesh axes do not divide a dim are skipped (the dim
  may end up replicated). Without them the first rule for each name is taken as is.
  """
  if shape is not None and len(shape) != len(names):
    raise ValueError(f"logical axes {tuple(names)} do not match the array's rank {len(shape)}")
  mesh_sizes = dict(mesh.shape) if mesh is not None else None
  used: set[str] = set()
  spec: list[MeshAxes] = []
  for dim, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    if name not in _KNOWN_NAMES:
      raise ValueError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES; known: "
                       f"{sorted(_KNOWN_NAMES)}")
    chosen: tuple[str, ...] = ()
    for rule_name, mesh_axes in LOGICAL_AXIS_RULES:
      axes = _as_tuple(mesh_axes)
      if rule_name != name or used.intersection(axes):
        continue
      if mesh_sizes is not None:
        if any(axis not in mesh_sizes for axis in axes):
          continue
        if shape is not None and shape[dim] % math.prod(mesh_sizes[a] for a in axes):
          continue
      chosen = axes
      break
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
  return PartitionSpec(*spec)


def _is_names(x: Any) -> bool:
  return isinstance(x, (tuple, PartitionSpec)) and all(
      e is None or isinstance(e, str) for e in x)


def logical_to_mesh(spec_tree: Any) -> Any:
  """Maps a tree of logical-name tuples (or PartitionSpecs of names) to mesh PartitionSpecs."""
  return jax.tree.map(lambda names: logical_to_spec(tuple(names)), spec_tree, is_leaf=_is_names)


def _path_str(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_shardings(abstract_state: Any, mesh: jax.sharding.Mesh) -> Any:
  """NamedSharding for every Variable of a model (a Module or its nnx.State, concrete or
  abstract), from its `out_sharding` logical names; the tree mirrors the state, so it can be
  passed as jit in/out_shardings for `nnx.state(model)`. Variables without names replicate.
  """
  state = nnx.state(abstract_state) if isinstance(abstract_state, nnx.Module) else abstract_state
  replicated = []

  def one(path, variable):
    if not isinstance(variable, nnx.Variable):
      return NamedSharding(mesh, PartitionSpec())
    shape = variable.get_value().shape
    names = variable.get_metadata().get("out_sharding") or (None,) * len(shape)
    try:
      spec = logical_to_spec(tuple(names), shape, mesh)
    except ValueError as e:
      raise ValueError(f"parameter {_path_str(path)}: {e}") from None
    split = math.prod(mesh.shape[a] for axes in spec for a in _as_tuple(axes))
    if mesh.size > 1 and split == 1 and math.prod(shape) > REPLICATED_WARNING_ELEMENTS:
      replicated.append(f"{_path_str(path)} {tuple(shape)}")
    return variable.replace(NamedSharding(mesh, spec))

  out = jax.tree_util.tree_map_with_path(
      one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  if replicated:
    log.warning("%d parameter(s) over %.0e elements are replicated on every device of mesh %s "
                "(no rule for their axes divides them): %s", len(replicated),
                REPLICATED_WARNING_ELEMENTS, dict(mesh.shape), "; ".join(replicated[:8]))
  return out


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """[B, T] token arrays: rows split over the batch axes (data x fsdp x expert), tokens whole."""
  return NamedSharding(mesh, logical_to_spec(("activation_batch", "activation_length")))


def shard_activation(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains an activation to its logical layout under the current `jax.set_mesh`;
  a no-op when no mesh is set (single-device use, tests)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))

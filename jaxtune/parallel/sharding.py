"""The one table mapping logical axis names to mesh axes (MaxText style), and the helpers
that apply it.

Models name the axes of their parameters ("embed", "mlp", ...) and activations
("activation_batch", ...); only this file knows the mesh. Changing the parallelism layout
means changing the rules, never a model: a recipe overrides them with
`mesh.logical_axis_rules` (`merge_rules`), and the trainer makes them the active table for the
run (`axis_rules`), next to `jax.set_mesh`.

The table is ordered: for each dimension the first rule for its name whose mesh axes are
(a) present in the mesh, (b) not already used by an earlier dimension of the same array and
(c) divide the dimension's size, wins. A dimension that no rule fits is replicated, so a tiny
model (2 kv heads on 4 tensor devices) still runs, only less sharded.

The batch: the mesh axes of the first "activation_batch" rule are the data-parallel axes
(`batch_axes`): rows are split over them, the step's loss sums over them, and the config's
data-parallel size is their product. By default they include `expert`: outside the MoE blocks
an expert-parallel group is plain data parallelism (as in MaxText and DeepSpeed-MoE), and
inside them the group exchanges its tokens (ops/moe.py).
"""

import contextlib
import contextvars
import functools
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune.parallel.mesh import AXES

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    # Parameters.
    ("layers", None),        # stacked decoder layers: never split (the scan walks them)
    ("vocab", "tensor"),
    ("embed", ("fsdp", "sequence")),  # FSDP: every weight matrix split along its hidden dim,
    ("embed", "fsdp"),                # over every axis that splits the tokens
    ("heads", "tensor"),     # query heads (q_proj out, o_proj in), whole heads only
    ("kv_heads", "tensor"),  # key / value heads
    ("mlp", "tensor"),
    ("head_dim", None),      # never split: a head's dims stay on one device
    ("norm", None),          # RMSNorm weights are tiny: replicated
    ("experts", "expert"),
    # Activations.
    ("activation_batch", ("data", "fsdp", "expert")),  # the data-parallel axes (batch_axes)
    ("activation_batch", ("data", "fsdp")),  # fallbacks when B does not divide all of them
    ("activation_batch", "fsdp"),
    ("activation_length", "sequence"),  # the tokens of a row (context parallelism)
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)

_KNOWN_NAMES = frozenset(name for name, _ in DEFAULT_RULES)
_ACTIVE_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar(
    "jaxtune_logical_axis_rules", default=DEFAULT_RULES)
# A parameter this large copied whole onto every device is worth a warning (memory).
REPLICATED_WARNING_ELEMENTS = 1_000_000
log = logging.getLogger(__name__)


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def merge_rules(overrides: Iterable[Sequence[Any]] = (), where: str = "mesh.logical_axis_rules"
                ) -> Rules:
  """The default table with every logical name listed in `overrides` given exactly the
  override's rules for it (in their order: later ones are fallbacks), the others unchanged.

  `overrides` holds (name, mesh axes) pairs; mesh axes are one of jaxtune's mesh axes, a
  tuple of them, or None (replicate). E.g. (("embed", None), ("mlp", ("tensor", "fsdp")))
  turns FSDP off and splits the MLP dim over tensor x fsdp. Raises ValueError naming the entry.
  """
  checked: list[tuple[str, MeshAxes]] = []
  for i, entry in enumerate(overrides):
    if not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str):
      raise ValueError(f"{where}[{i}] = {entry!r} is not a (logical name, mesh axes) pair, "
                       "e.g. ('embed', 'fsdp') or ('mlp', ('tensor', 'fsdp'))")
    name, axes = entry
    if name not in _KNOWN_NAMES:
      raise ValueError(f"{where}[{i}]: unknown logical axis {name!r}; known: "
                       f"{sorted(_KNOWN_NAMES)}")
    if axes is not None and not isinstance(axes, (str, tuple, list)):
      raise ValueError(f"{where}[{i}]: mesh axes {axes!r} must be a mesh axis name, a tuple of "
                       f"them or None; mesh axes are {AXES}")
    unknown = [a for a in _as_tuple(axes) if a not in AXES]
    if unknown or len(set(_as_tuple(axes))) != len(_as_tuple(axes)):
      raise ValueError(f"{where}[{i}]: {axes!r} names unknown or repeated mesh axes; mesh axes "
                       f"are {AXES}")
    axes = _as_tuple(axes)
    checked.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
  replaced = {name for name, _ in checked}
  kept = [rule for rule in DEFAULT_RULES if rule[0] not in replaced]
  return tuple(checked) + tuple(kept)


@contextlib.contextmanager
def axis_rules(rules: Rules):
  """Makes `rules` the table every helper here reads, inside the `with` (this thread only:
  compute shardings in the thread that set it)."""
  token = _ACTIVE_RULES.set(tuple(rules))
  try:
    yield
  finally:
    _ACTIVE_RULES.reset(token)


def current_rules() -> Rules:
  return _ACTIVE_RULES.get()


def batch_axes(rules: Rules | None = None) -> tuple[str, ...]:
  """The data-parallel mesh axes: those of the first "activation_batch" rule. Rows are split
  over them, the loss sums over them; their sizes multiply to the data-parallel size."""
  for name, axes in rules if rules is not None else current_rules():
    if name == "activation_batch":
      return _as_tuple(axes)
  return ()


def token_axes(shape_bt: Sequence[int], mesh: jax.sharding.AbstractMesh | jax.sharding.Mesh,
               rules: Rules | None = None) -> tuple[str, ...]:
  """The mesh axes splitting the tokens of a [B, T] array once flattened to [B * T] (rows
  over the batch axes, then each row's tokens over the length axes), in that order."""
  spec = logical_to_spec(("activation_batch", "activation_length"), shape_bt, mesh, rules)
  return tuple(a for entry in spec for a in _as_tuple(entry))


def _choose(name: str, size: int | None, mesh_sizes: dict[str, int] | None, used: set[str],
            rules: Rules) -> tuple[str, ...]:
  """The mesh axes of the first rule for `name` that fits (see the module docstring)."""
  for rule_name, mesh_axes in rules:
    axes = _as_tuple(mesh_axes)
    if rule_name != name or used.intersection(axes):
      continue
    if mesh_sizes is not None:
      if any(axis not in mesh_sizes for axis in axes):
        continue
      if size is not None and size % math.prod(mesh_sizes[a] for a in axes):
        continue
    return axes
  return ()


def _spec_entry(axes: tuple[str, ...]) -> MeshAxes:
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _check_name(name: str, rules: Rules) -> None:
  if name not in _KNOWN_NAMES and all(name != rule for rule, _ in rules):
    raise ValueError(f"logical axis {name!r} has no rule in the logical-axis rules; known: "
                     f"{sorted(_KNOWN_NAMES)}")


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
                    rules: Rules | None = None) -> PartitionSpec:
  """PartitionSpec for one array whose dims carry logical `names`, by `rules` (default: the
  active table).

  With `shape` and `mesh`, rules whose mesh axes do not divide a dim are skipped (the dim
  may end up replicated). Without them the first rule for each name is taken as is.
  """
  if shape is not None and len(shape) != len(names):
    raise ValueError(f"logical axes {tuple(names)} do not match the array's rank {len(shape)}")
  rules = current_rules() if rules is None else rules
  mesh_sizes = dict(mesh.shape) if mesh is not None else None
  used: set[str] = set()
  spec: list[MeshAxes] = []
  for dim, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    _check_name(name, rules)
    chosen = _choose(name, None if shape is None else shape[dim], mesh_sizes, used, rules)
    used.update(chosen)
    spec.append(_spec_entry(chosen))
  return PartitionSpec(*spec)


class ShardAxes(dict):
  """logical name -> the mesh axes it resolved to inside a `logical_shard_map` (() if whole)."""

  def __missing__(self, name: str) -> tuple[str, ...]:
    return ()

  def of(self, *names: str) -> tuple[str, ...]:
    """The mesh axes of several names together, each once, in order."""
    return tuple(dict.fromkeys(a for n in names for a in self[n]))


def logical_shard_map(fn: Callable[..., Any], in_names: Sequence[Sequence[str | None] | None],
                      out_names: Any, *, rules: Rules | None = None,
                      check_vma: bool = True) -> Callable[..., Any]:
  """`jax.shard_map` under the current mesh, its specs given as logical names.

  in_names: for each positional argument, the logical names of its dims (None: replicated).
  out_names: the same for the output (a tree matching fn's output; () for a scalar).
  fn is called as `fn(axes, *local_arrays)`, `axes` a `ShardAxes` of what each name resolved
  to, so it knows what to all-gather or psum. Each name resolves once, by `rules` (default:
  the active table), against the first argument dim that carries it (its size decides which
  rule fits); every other dim with that name, outputs included, gets the same axes (a
  ValueError names the argument they do not divide). Without a mesh, or on one device, fn runs
  on the arrays as they are with every name unsplit.
  """
  def call(*args):
    if len(args) != len(in_names):
      raise ValueError(f"{getattr(fn, '__name__', fn)}: {len(args)} arguments for "
                       f"{len(in_names)} in_names")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
      return fn(ShardAxes(), *args)
    table = current_rules() if rules is None else rules
    sizes = dict(mesh.shape)
    axes = ShardAxes()

    def spec(names, shape, what):
      if names is None:
        return PartitionSpec()
      if shape is not None and len(names) != len(shape):
        raise ValueError(f"{what}: logical axes {tuple(names)} for an array of rank {len(shape)}")
      used: set[str] = set()
      out = []
      for dim, name in enumerate(names):
        if name is None:
          out.append(None)
          continue
        _check_name(name, table)
        if name not in axes:
          axes[name] = _choose(name, None if shape is None else shape[dim], sizes, used, table)
        chosen = axes[name]
        if used.intersection(chosen):
          raise ValueError(f"{what}: mesh axes {chosen} of {name!r} are already used by another "
                           f"dim of the same array")
        if shape is not None and shape[dim] % math.prod(sizes[a] for a in chosen):
          raise ValueError(f"{what}: dim {dim} ({name!r}, size {shape[dim]}) does not split "
                           f"over mesh axes {chosen} ({math.prod(sizes[a] for a in chosen)} "
                           f"devices), which the same name got from an earlier argument")
        used.update(chosen)
        out.append(_spec_entry(chosen))
      return PartitionSpec(*out)

    in_specs = tuple(spec(names, jax.numpy.shape(a), f"argument {i}")
                     for i, (names, a) in enumerate(zip(in_names, args)))
    out_specs = jax.tree.map(lambda names: spec(names, None, "output"), out_names,
                             is_leaf=_is_names_or_none)
    return jax.shard_map(functools.partial(fn, axes), in_specs=in_specs, out_specs=out_specs,
                         axis_names=set(mesh.axis_names), check_vma=check_vma)(*args)
  return call


def _is_names_or_none(x: Any) -> bool:
  return x is None or _is_names(x)


def _is_names(x: Any) -> bool:
  return isinstance(x, (tuple, PartitionSpec)) and all(
      e is None or isinstance(e, str) for e in x)


def _path_str(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _in_units(shape: Sequence[int], units: Sequence[int] | None) -> tuple[int, ...]:
  """`shape` counted in whole units per dim (`shard_units` aligns with the trailing dims:
  stacking adds leading axes), so a rule must split whole units or none."""
  if not units:
    return tuple(shape)
  units = (1,) * (len(shape) - len(units)) + tuple(units)
  return tuple(size // unit if size % unit == 0 else size for size, unit in zip(shape, units))


def param_shardings(abstract_state: Any, mesh: jax.sharding.Mesh) -> Any:
  """NamedSharding for every Variable of a model (a Module or its nnx.State, concrete or
  abstract), from its `out_sharding` logical names; the tree mirrors the state, so it can be
  passed as jit in/out_shardings for `nnx.state(model)`. Variables without names replicate.

  A Variable may carry `shard_units` (one int per trailing dim): a dim flattening whole units,
  e.g. a projection's N * H outputs with unit H, is only split into whole units (heads): the
  rules' divisibility test counts units, not elements.
  """
  state = nnx.state(abstract_state) if isinstance(abstract_state, nnx.Module) else abstract_state
  replicated = []

  def one(path, variable):
    if not isinstance(variable, nnx.Variable):
      return NamedSharding(mesh, PartitionSpec())
    shape = variable.get_value().shape
    metadata = variable.get_metadata()
    names = metadata.get("out_sharding") or (None,) * len(shape)
    try:
      spec = logical_to_spec(tuple(names), _in_units(shape, metadata.get("shard_units")), mesh)
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
  """Every batch array: rows split over the data-parallel axes (`batch_axes`), the rest whole.

  Tokens stay whole even when `sequence` splits a row: each host then feeds whole rows, and
  the model slices them (`shard_activation` of the ids: no data moves)."""
  return NamedSharding(mesh, logical_to_spec(("activation_batch",)))


def shard_activation(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains an activation to its logical layout under the current `jax.set_mesh`;
  a no-op when no mesh is set (single-device use, tests)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def varying_axes(x: jax.Array) -> frozenset:
  """The shard_map axes x varies over (empty outside shard_map)."""
  aval = jax.typeof(x)
  return frozenset(aval.vma if hasattr(aval, "vma") else aval.mat.varying)  # jax 0.11 / 0.12


def varying_zeros(shape, dtype, *like: jax.Array) -> jax.Array:
  """Zeros varying over the axes of `like`, so a loop carry keeps one type inside shard_map."""
  axes = tuple(sorted(frozenset().union(*(varying_axes(a) for a in like))))
  z = jax.numpy.zeros(shape, dtype)
  return jax.lax.pcast(z, axes, to="varying") if axes else z

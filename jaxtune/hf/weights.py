"""HF name tables: the rows a model family declares to map HF tensors to its params.

A family's `hf_weight_map(cfg)` is a tuple of `HFWeight` rows; `jaxtune.hf.load` and
`jaxtune.hf.export` walk the same table, so names, stacking and layout transforms are
stated once and both directions agree. Nothing here knows any family.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

if TYPE_CHECKING:
  from flax import nnx
  from ml_collections import ConfigDict


class Transform(NamedTuple):
  """A two-way layout map between one HF tensor and one or more of our params (per stack
  element), for what a transpose cannot say: a fused tensor split into two params, a reshape,
  a quantised block layout. Both functions take and return host numpy arrays.

  to_ours:  the HF tensor -> a tuple of arrays, one per path of the row, in `paths` order;
  to_hf:    our arrays (one per path) -> the HF tensor; `to_hf(*to_ours(t))` must equal t;
  hf_shape: our element shapes (one per path) -> the HF tensor's shape (checked and planned
            before anything is read or written);
  hf_dtype: the dtype HF stores (a quantised layout's own, e.g. uint8); None: the export's
            dtype. `to_hf` gets our arrays in their param dtype, its result is cast to this.
  """
  to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[..., np.ndarray]
  hf_shape: Callable[..., tuple[int, ...]]
  hf_dtype: str | None = None


class HFWeight(NamedTuple):
  """One row of a family's HF name table.

  hf_name:   the HF tensor name. Named indices ("{layer}", "{expert}") stand for the leading
             stacked axes of our param, in order: `model.layers.{layer}.mlp.experts.{expert}.
             up_proj.weight` is the [L, E, ...] param's element [l, e]. Stack sizes come from
             the param's shape, never from the config.
  path:      our nnx state path, dot-joined ("model.layers.self_attn.q_proj.kernel"); a tuple
             of paths when a `transform` maps one HF tensor to several params (all with the
             same stacked axes); None for a tensor HF files may hold that we neither need nor
             write (a tied head).
  transpose: HF stores Linear weights [out, in], we store kernels [in, out].
  ids:       (index name, HF ids) pairs for a stacked axis whose positions are not HF's
             0..n-1: a stack holding only the MoE layers of a mixed model has ids (1, 3, ...).
  transform: a two-way `Transform` for any other layout (not with `transpose`).
  """
  hf_name: str
  path: str | tuple[str, ...] | None
  transpose: bool = False
  ids: tuple[tuple[str, tuple[int, ...]], ...] = ()
  transform: Transform | None = None

  @property
  def paths(self) -> tuple[str, ...]:
    """Every param path of the row (none for an ignored tensor)."""
    if self.path is None:
      return ()
    return (self.path,) if isinstance(self.path, str) else tuple(self.path)

  @property
  def indices(self) -> tuple[str, ...]:
    """The named indices of `hf_name`, in order: one per leading stacked axis."""
    return tuple(field for _, field, _, _ in string.Formatter().parse(self.hf_name) if field)

  @property
  def stacked(self) -> bool:
    return bool(self.indices)

  def names(self, stack_shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, position in our stack) for every tensor of a param with `stack_shape`
    leading axes, in HF's index order."""
    ids = dict(self.ids)
    axes = [ids.get(name, tuple(range(size))) for name, size in zip(self.indices, stack_shape)]
    for name, hf_ids, size in zip(self.indices, axes, stack_shape):
      if len(hf_ids) != size:
        raise ValueError(f"{self.hf_name}: {len(hf_ids)} HF ids for '{name}' but the param "
                         f"stacks {size}")
    out = []
    for position in _grid(stack_shape):
      values = {n: axes[k][i] for k, (n, i) in enumerate(zip(self.indices, position))}
      out.append((self.hf_name.format(**values), position))
    return out

  def hf_shape(self, our_shapes: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    """The shape of each HF tensor of the row, from its params' whole (stacked) shapes: the
    stacked axes dropped, then transposed or transformed."""
    elements = tuple(tuple(shape[len(self.indices):]) for shape in our_shapes)
    if self.transform is not None:
      return tuple(self.transform.hf_shape(*elements))
    return tuple(reversed(elements[0])) if self.transpose else elements[0]

  def with_prefix(self, hf_prefix: str, path_prefix: str) -> HFWeight:
    """This row inside a sub-model: `model.language_model.` + name, `language_model.` + path."""
    if self.path is None:
      path = None
    elif isinstance(self.path, str):
      path = path_prefix + self.path
    else:
      path = tuple(path_prefix + p for p in self.path)
    return self._replace(hf_name=hf_prefix + self.hf_name, path=path)


def _grid(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
  out = [()]
  for size in shape:
    out = [p + (i,) for p in out for i in range(size)]
  return out


class HFFamily(Protocol):
  """What loading and exporting need of a model family (`jaxtune.models.ModelFamily` has it)."""

  def hf_weight_map(self, cfg: ConfigDict) -> tuple[HFWeight, ...]: ...

  def hf_config(self, cfg: ConfigDict, dtype: str, source: dict | None = None) -> dict: ...


def flat_params(model: nnx.Module) -> dict[str, nnx.Variable]:
  """Dot-joined path -> Param variable, e.g. "model.layers.mlp.up_proj.kernel"."""
  from flax import nnx  # pylint: disable=import-outside-toplevel,redefined-outer-name
  return {".".join(str(k) for k in path): var
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def check_table(params: dict, table: tuple[HFWeight, ...]) -> None:
  """Every param has exactly one HF name and every table row names a param."""
  table_paths = [path for entry in table for path in entry.paths]
  twice = sorted({path for path in table_paths if table_paths.count(path) > 1})
  untabled = sorted(set(params) - set(table_paths))
  unknown = sorted(set(table_paths) - set(params))
  if untabled or unknown or twice:
    raise ValueError(f"the model's params and its HF name table disagree: params without an "
                     f"HF name {untabled}, table paths not in the model {unknown}, paths in "
                     f"more than one row {twice}. Is the model config the one the model was "
                     "built with?")
  for entry in table:
    if entry.transform is not None and entry.transpose:
      raise ValueError(f"{entry.hf_name}: a row has a transform or transpose, not both")


def shapes_of(entry: HFWeight, params: dict) -> tuple[tuple[int, ...], ...]:
  """The whole (stacked) shapes of the row's params."""
  return tuple(tuple(params[path].get_value().shape) for path in entry.paths)


def hf_names(entry: HFWeight, our_shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
  """(HF name, position in our stack) of every tensor of a param of shape `our_shape`."""
  return entry.names(tuple(our_shape[:len(entry.indices)]))


def hf_shape(entry: HFWeight, our_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of each HF tensor of a one-param row whose param has shape `our_shape`."""
  return entry.hf_shape((tuple(our_shape),))

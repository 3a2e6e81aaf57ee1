"""HF safetensors -> a jaxtune model, one tensor at a time, straight into each param's sharding.

The model (concrete from `create_model`, or abstract from `abstract_model`) fixes every
param's shape, dtype and sharding; the caller's family names the HF tensors
(`family.hf_weight_map`, rows of `jaxtune.hf.weights.HFWeight`): this module knows no family.
Before anything is copied, the HF key set and every shape are checked against the model, so a
wrong checkpoint fails with the tensor and file named and nothing half-loaded.

Reading (`jaxtune.hf.files`): each tensor is a read-only `np.memmap` view, so every device
reads only its own slice of the file. Peak host memory is one layer's tensor (one HF tensor) in
param_dtype: each device's slice is read once (identical slices are shared), cast and copied
to its device, then dropped. A row with a `Transform` (a fused tensor split into params, a
reshape) reads its whole HF tensor once and places the transformed arrays. Stacked layer
params are filled layer by layer with a jitted, donated `stack.at[i].set(layer)`, so the
[L, ...] array is never assembled on the host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune.hf.files import SAFETENSORS_DTYPES, SafetensorsFile, open_checkpoint
from jaxtune.hf.weights import (HFFamily, HFWeight, check_table, flat_params, hf_names,
                                hf_shape, shapes_of)

__all__ = ["SAFETENSORS_DTYPES", "SafetensorsFile", "check_checkpoint", "check_table",
           "flat_params", "hf_names", "hf_shape", "load_hf_weights", "open_checkpoint"]


def check_checkpoint(params: dict[str, nnx.Variable], table: tuple[HFWeight, ...],
                     tensors: dict[str, SafetensorsFile], hf_dir: str) -> None:
  """Raises ValueError on a missing, extra or wrongly shaped tensor, before any copy."""
  check_table(params, table)
  expected: dict[str, tuple[int, ...]] = {}
  for entry in table:
    if entry.path is None:
      continue
    shapes = shapes_of(entry, params)
    for path, shape in zip(entry.paths, shapes):
      if len(shape) < len(entry.indices) or shape[:len(entry.indices)] != shapes[0][
          :len(entry.indices)]:
        raise ValueError(f"{entry.hf_name}: the param {path} has shape {shape}, which does not "
                         f"stack as the name's indices {entry.indices} say")
    for name, _ in hf_names(entry, shapes[0]):
      expected[name] = entry.hf_shape(shapes)
  missing = [name for name in expected if name not in tensors]
  if missing:
    raise ValueError(f"tensor {missing[0]} is missing from {hf_dir} (expected shape "
                     f"{expected[missing[0]]}; {len(missing)} missing in all: "
                     f"{missing[:8]}{' ...' if len(missing) > 8 else ''}). Does the checkpoint "
                     "match the model config?")
  ignored = {entry.hf_name for entry in table if entry.path is None}
  extra = sorted(set(tensors) - set(expected) - ignored)
  if extra:
    raise ValueError(f"tensor {extra[0]} in {tensors[extra[0]].path} is not a parameter of this "
                     f"model ({len(extra)} unexpected tensors: {extra[:8]}). Does the checkpoint "
                     "match the model config (e.g. tie_word_embeddings, num_hidden_layers)?")
  for name, shape in expected.items():
    got = tensors[name].shape(name)
    if got != shape:
      raise ValueError(f"tensor {name} in {tensors[name].path} has shape {got}, but the model "
                       f"expects {shape}. Does the checkpoint match the model config?")


def _host_slicer(source: np.ndarray, transpose: bool, dtype: np.dtype
                 ) -> Callable[[tuple[slice, ...]], np.ndarray]:
  """A make_array_from_callback callback: our index -> that slice of the HF tensor, in our
  layout and dtype. Devices holding the same slice (replication) share one host copy."""
  cache: dict[Any, np.ndarray] = {}

  def read(index: tuple[slice, ...]) -> np.ndarray:
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in cache:
      view = source[tuple(reversed(index))].T if transpose else source[index]
      cache[key] = np.ascontiguousarray(view, dtype=dtype)
    return cache[key]
  return read


def _place(source: np.ndarray, shape: tuple[int, ...], sharding: jax.sharding.Sharding,
           transpose: bool, dtype: np.dtype) -> jax.Array:
  return jax.make_array_from_callback(shape, sharding, _host_slicer(source, transpose, dtype))


def _element_sharding(stack_sharding: jax.sharding.Sharding, stacked_axes: int
                      ) -> jax.sharding.Sharding:
  """One stack element's sharding: the stack's without its leading stacked axes."""
  if isinstance(stack_sharding, NamedSharding):
    spec = tuple(stack_sharding.spec) + (None,) * stacked_axes
    return NamedSharding(stack_sharding.mesh, PartitionSpec(*spec[stacked_axes:]))
  return stack_sharding  # single device: the element lives where its stack does


def _stack_setter(sharding: jax.sharding.Sharding) -> Callable:
  # Donating the stack makes each update in place: device memory stays at one stacked param.
  return jax.jit(lambda stack, element, position: stack.at[tuple(position)].set(element),
                 donate_argnums=0, out_shardings=sharding)


def _transformed(entry: HFWeight, source: np.ndarray, element_shapes, name: str
                 ) -> tuple[np.ndarray, ...]:
  """The row's arrays of one HF tensor, through its transform; shapes checked."""
  parts = tuple(entry.transform.to_ours(np.asarray(source)))
  got = tuple(tuple(p.shape) for p in parts)
  if got != tuple(element_shapes):
    raise ValueError(f"{name}: the table's transform gives shapes {got} for "
                     f"{list(entry.paths)}, the params need {tuple(element_shapes)}")
  return parts


def load_hf_weights(model: nnx.Module, hf_dir: str, family: HFFamily) -> nnx.Module:
  """Fills `model`'s params (concrete or abstract) from the HF checkpoint in `hf_dir`, cast to
  each param's dtype and placed in its sharding; returns the model (also updated in place).

  family: the model's family (its `hf_weight_map(model.config)` names the tensors);
  `jaxtune.models.load_hf_weights(model, hf_dir)` passes the registered one."""
  table = family.hf_weight_map(model.config)
  params = flat_params(model)
  tensors = open_checkpoint(hf_dir)
  check_checkpoint(params, table, tensors, hf_dir)

  for entry in table:
    if entry.path is None:
      continue
    variables = [params[path] for path in entry.paths]
    targets = [var.get_value() for var in variables]
    stacked = len(entry.indices)
    stacks = []
    for target in targets:
      shape, dtype, sharding = target.shape, np.dtype(target.dtype), target.sharding
      if not entry.stacked:
        stacks.append(None)
      elif isinstance(target, jax.Array):
        stacks.append(target)  # reuse (donate) the random-init buffer
      else:
        stacks.append(jax.jit(functools.partial(jnp.zeros, shape, dtype),
                              out_shardings=sharding)())
    setters = [_stack_setter(t.sharding) if entry.stacked else None for t in targets]
    for name, position in hf_names(entry, targets[0].shape):
      source = tensors[name].tensor(name)
      if entry.transform is None:
        sources, transpose = (source,), entry.transpose
      else:
        sources = _transformed(entry, source, [t.shape[stacked:] for t in targets], name)
        transpose = False
      for k, (target, part) in enumerate(zip(targets, sources)):
        dtype = np.dtype(target.dtype)
        if not entry.stacked:
          variables[k].set_value(_place(part, target.shape, target.sharding, transpose, dtype))
          continue
        element = _place(part, target.shape[stacked:],
                         _element_sharding(target.sharding, stacked), transpose, dtype)
        stacks[k] = setters[k](stacks[k], element, np.asarray(position, np.int32))
    if entry.stacked:
      for var, stack in zip(variables, stacks):
        var.set_value(stack)
  return model

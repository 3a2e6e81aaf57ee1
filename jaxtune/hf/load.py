"""HF safetensors -> a jaxtune model, one tensor at a time, straight into each param's sharding.

The model (concrete from `create_model`, or abstract from `abstract_model`) fixes every
param's shape, dtype and sharding; its family's `hf_weight_map` names the HF tensors. Before
anything is copied, the HF key set and every shape are checked against the model, so a wrong
checkpoint fails with the tensor and file named and nothing half-loaded.

Reading: the safetensors header (8-byte length + JSON) is parsed here and each tensor is a
read-only `np.memmap` view. safetensors' numpy framework cannot represent bfloat16 and its
flax/jax frameworks place each whole tensor on device 0; a memmap view lets every device read
only its own slice of the file. Peak host memory is one layer's tensor (one HF tensor) in
param_dtype: each device's slice is read once (identical slices are shared), cast and copied
to its device, then dropped. Stacked layer params are filled layer by layer with a jitted,
donated `stack.at[i].set(layer)`, so the [L, ...] array is never assembled on the host.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune.models import HFWeight, family

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}


class SafetensorsFile:
  """Header and zero-copy tensor views of one .safetensors file."""

  def __init__(self, path: str):
    self.path = path
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
      header_len = int.from_bytes(f.read(8), "little")
      try:
        if header_len > file_size - 8:
          raise ValueError(f"header length {header_len} exceeds the file")
        header = json.loads(f.read(header_len))
      except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError included
        raise ValueError(f"{path} is not a valid safetensors file ({e}); re-download or "
                         "re-export it.") from None
    header.pop("__metadata__", None)
    self._data_start = 8 + header_len
    self.entries: dict[str, dict] = header
    self._mmap: np.memmap | None = None
    for name, entry in header.items():
      if entry["data_offsets"][1] > file_size - self._data_start:
        raise ValueError(f"tensor {name} in {path} ends past the end of the file: the file is "
                         "truncated; re-download or re-export it.")
      if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {name} in {path} has dtype {entry['dtype']}, which jaxtune "
                         f"cannot read (supported: {sorted(SAFETENSORS_DTYPES)})")

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.entries[name]["shape"])

  def tensor(self, name: str) -> np.ndarray:
    """A read-only view of the tensor; pages are read from disk only when sliced."""
    entry = self.entries[name]
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    start, end = entry["data_offsets"]
    raw = self._mmap[self._data_start + start:self._data_start + end]
    return raw.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def open_checkpoint(hf_dir: str) -> dict[str, SafetensorsFile]:
  """Tensor name -> its file, from `model.safetensors` or `model.safetensors.index.json`."""
  index_path = os.path.join(hf_dir, "model.safetensors.index.json")
  single_path = os.path.join(hf_dir, "model.safetensors")
  if os.path.isfile(index_path):
    with open(index_path) as f:
      weight_map: dict[str, str] = json.load(f)["weight_map"]
    files = {name: SafetensorsFile(os.path.join(hf_dir, name))
             for name in sorted(set(weight_map.values()))}
    by_tensor = {}
    for tensor_name, file_name in weight_map.items():
      if tensor_name not in files[file_name].entries:
        raise ValueError(f"{index_path} places tensor {tensor_name} in {file_name}, but that "
                         "file does not contain it: the checkpoint is incomplete or corrupt.")
      by_tensor[tensor_name] = files[file_name]
    for file in files.values():
      for tensor_name in file.entries:
        if weight_map.get(tensor_name) != os.path.basename(file.path):
          raise ValueError(f"tensor {tensor_name} in {file.path} is missing from {index_path}")
    return by_tensor
  if os.path.isfile(single_path):
    file = SafetensorsFile(single_path)
    return {name: file for name in file.entries}
  raise FileNotFoundError(f"{hf_dir} has neither model.safetensors nor "
                          "model.safetensors.index.json: point load_from at an HF model directory.")


def hf_shape(entry: HFWeight, our_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of each HF tensor of a param: its stacked axes dropped, transposed if HF's."""
  per_tensor = our_shape[len(entry.indices):]
  return tuple(reversed(per_tensor)) if entry.transpose else tuple(per_tensor)


def hf_names(entry: HFWeight, our_shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
  """(HF name, position in our stack) of every tensor of a param of shape `our_shape`."""
  return entry.names(tuple(our_shape[:len(entry.indices)]))


def flat_params(model: nnx.Module) -> dict[str, nnx.Variable]:
  """Dot-joined path -> Param variable, e.g. "model.layers.mlp.up_proj.kernel"."""
  return {".".join(str(k) for k in path): var
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def check_table(params: dict[str, nnx.Variable], table: tuple[HFWeight, ...]) -> None:
  """Every param has exactly one HF name and every table row names a param."""
  table_paths = {entry.path for entry in table if entry.path is not None}
  untabled = sorted(set(params) - table_paths)
  unknown = sorted(table_paths - set(params))
  if untabled or unknown:
    raise ValueError(f"the model's params and its HF name table disagree: params without an "
                     f"HF name {untabled}, table paths not in the model {unknown}. Is the "
                     "model config the one the model was built with?")


def check_checkpoint(params: dict[str, nnx.Variable], table: tuple[HFWeight, ...],
                     tensors: dict[str, SafetensorsFile], hf_dir: str) -> None:
  """Raises ValueError on a missing, extra or wrongly shaped tensor, before any copy."""
  check_table(params, table)
  expected: dict[str, tuple[int, ...]] = {}
  for entry in table:
    if entry.path is None:
      continue
    shape = params[entry.path].get_value().shape
    if len(shape) < len(entry.indices):
      raise ValueError(f"{entry.hf_name}: the param {entry.path} has shape {shape}, fewer axes "
                       f"than the name's indices {entry.indices}")
    for name, _ in hf_names(entry, shape):
      expected[name] = hf_shape(entry, shape)
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


def load_hf_weights(model: nnx.Module, hf_dir: str) -> nnx.Module:
  """Fills `model`'s params (concrete or abstract) from the HF checkpoint in `hf_dir`, cast to
  each param's dtype and placed in its sharding; returns the model (also updated in place)."""
  cfg = model.config
  table = family(cfg.type).hf_weight_map(cfg)
  params = flat_params(model)
  tensors = open_checkpoint(hf_dir)
  check_checkpoint(params, table, tensors, hf_dir)

  for entry in table:
    if entry.path is None:
      continue
    var = params[entry.path]
    target = var.get_value()
    shape, dtype, sharding = target.shape, np.dtype(target.dtype), target.sharding
    if not entry.stacked:
      var.set_value(_place(tensors[entry.hf_name].tensor(entry.hf_name), shape, sharding,
                           entry.transpose, dtype))
      continue
    if isinstance(target, jax.Array):
      stack = target  # reuse (donate) the random-init buffer
    else:
      stack = jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)()
    stacked = len(entry.indices)
    element_sharding = _element_sharding(sharding, stacked)
    set_element = _stack_setter(sharding)
    for name, position in hf_names(entry, shape):
      element = _place(tensors[name].tensor(name), shape[stacked:], element_sharding,
                       entry.transpose, dtype)
      stack = set_element(stack, element, np.asarray(position, np.int32))
    var.set_value(stack)
  return model

"""A jaxtune model -> an HF directory that `transformers.AutoModelForCausalLM` loads.

Writes `model-0000i-of-0000n.safetensors` shards, `model.safetensors.index.json`,
`config.json` and the tokenizer files. Names come from the caller's family: its
`hf_weight_map` (the same table the loader reads, walked in HF's order; a row's `Transform`
fuses or reshapes params into the HF tensor) and its `hf_config`. This module knows no family:
`jaxtune.models.export_hf` passes the registered one.

Tokenizer: the files of the tokenizer directory's layout (`jaxtune.data.tokenizer_files`:
tokenizer.json; vocab.json + merges.txt; Intern-S1's vocab + merges + SentencePiece models),
the settings files beside them, and the directory's custom code (`*.py`), copied byte for byte,
so an export of an official Intern-S1 checkpoint is laid out as the published one. The custom
code of `source_dir` comes along when the written config.json keeps an `auto_map` pointing at it.

Memory: one tensor at a time is sliced (one layer of a stacked param), cast, transposed on
device, gathered to the host and streamed into its shard file, so host memory peaks at one
tensor. The shard headers are written first from the planned shapes, which is what allows
streaming. With several processes every process joins each gather (a collective) and only
process 0 writes. Everything goes to `<out_dir>.partial` first and is renamed at the end, so
an interrupted export never looks like a complete one.
"""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from jaxtune.data.tokenizer_files import TokenizerFilesError, detect_layout, read_tokenizer_files
from jaxtune.hf.files import SAFETENSORS_DTYPES, read_hf_config, read_hf_dtype
from jaxtune.hf.weights import HFFamily, HFWeight, check_table, flat_params, hf_names, shapes_of

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' classic "5GB" shards
# Besides the files of the tokenizer's layout, these are copied when present: the tokenizer's
# settings and the generation / image-processor settings a checkpoint directory ships.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json", "preprocessor_config.json",
                   "processor_config.json", "video_preprocessor_config.json")
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@functools.partial(jax.jit, static_argnames=("transpose", "dtype"))
def _hf_tensor(value: jax.Array, position: jax.Array, *, transpose: bool,
               dtype: np.dtype) -> jax.Array:
  """One HF tensor on device: an element of a stacked param (position: one index per stacked
  axis, maybe none), cast, in HF's [out, in] layout."""
  value = value[tuple(position)].astype(dtype)
  return value.T if transpose else value


@functools.partial(jax.jit, static_argnames=("scale", "dtype"))
def _merged_tensor(value: jax.Array, lora_a: jax.Array, lora_b: jax.Array, position: jax.Array,
                   *, scale: float, dtype: np.dtype) -> jax.Array:
  """One HF tensor of a LoRA-adapted Linear, W + scale * A @ B merged in float32 on device,
  cast, in HF's [out, in] layout."""
  index = tuple(position)
  f32 = jnp.float32
  delta = lora_a[index].astype(f32) @ lora_b[index].astype(f32)
  merged = value[index].astype(f32) + scale * delta
  return merged.astype(dtype).T


def _to_host(value: jax.Array) -> np.ndarray:
  """Gathers one (sharded) tensor to this host."""
  if value.is_fully_addressable:
    return np.asarray(jax.device_get(value))
  return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def _hf_order(table: tuple[HFWeight, ...], params: dict
              ) -> list[tuple[str, HFWeight, tuple[int, ...]]]:
  """(hf name, table row, stack position) in HF's file order: each run of stacked rows
  (a decoder, a vision tower) is written layer by layer, the rows of one HF layer together,
  between the unstacked rows around it. Rows without a param (a tied head) are not written,
  as transformers does not write them."""
  order, run = [], []

  def hf_layer(entry: HFWeight, position: tuple[int, ...]) -> int:
    ids = dict(entry.ids).get(entry.indices[0])
    return ids[position[0]] if ids else position[0]

  def flush():
    tensors = [((hf_layer(entry, position), k, position), name, entry, position)
               for k, entry in enumerate(run)
               for name, position in hf_names(entry, shapes_of(entry, params)[0])]
    order.extend(t[1:] for t in sorted(tensors, key=lambda t: t[0]))
    run.clear()

  for entry in table:
    if entry.path is None:
      continue
    if entry.stacked:
      run.append(entry)
      continue
    flush()
    order.append((entry.hf_name, entry, ()))
  flush()
  return order


Planned = tuple[str, tuple[int, ...], np.dtype]  # an HF tensor's name, shape and dtype


def _plan_shards(tensors: list[Planned], max_shard_bytes: int) -> list[list[Planned]]:
  shards, current, current_bytes = [], [], 0
  for name, shape, dtype in tensors:
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if current and current_bytes + nbytes > max_shard_bytes:
      shards.append(current)
      current, current_bytes = [], 0
    current.append((name, shape, dtype))
    current_bytes += nbytes
  return shards + ([current] if current else [])


def _write_header(f, shard: list[Planned]) -> None:
  header: dict = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape, dtype in shard:
    nbytes = int(np.prod(shape)) * dtype.itemsize
    header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
  f.write(len(blob).to_bytes(8, "little"))
  f.write(blob)


def _custom_code(path: str) -> list[str]:
  """The `*.py` files of directory `path` (a checkpoint's custom code), sorted."""
  return sorted(os.path.join(path, name) for name in os.listdir(path)
                if name.endswith(".py") and os.path.isfile(os.path.join(path, name)))


def _tokenizer_files(tokenizer_path: str) -> list[str]:
  """The files an export copies from the tokenizer directory: those that make up its tokenizer
  (whatever its layout: `read_tokenizer_files(...).files`), the settings files of
  TOKENIZER_FILES present beside them, and its custom code (Intern-S1's Hub checkpoints load
  their tokenizer and model through `*.py` files in the directory; copied, never run)."""
  try:
    detect_layout(tokenizer_path)
  except TokenizerFilesError as e:
    raise TokenizerFilesError(
        f"export_hf: tokenizer_path '{tokenizer_path}' has no tokenizer.json nor another "
        f"tokenizer to copy into the export. {e}") from None
  found = list(read_tokenizer_files(tokenizer_path).files)
  found += [os.path.join(tokenizer_path, name) for name in TOKENIZER_FILES
            if os.path.isfile(os.path.join(tokenizer_path, name))]
  found += _custom_code(tokenizer_path)
  unique: dict[str, str] = {}
  for path in found:  # one file per name, the first found
    unique.setdefault(os.path.basename(path), path)
  return list(unique.values())


def _replace_dir(tmp_dir: str, out_dir: str) -> None:
  """Moves the finished export into place; an older export there is removed."""
  if not os.path.exists(out_dir):
    os.rename(tmp_dir, out_dir)
    return
  old_dir = out_dir + ".old"
  shutil.rmtree(old_dir, ignore_errors=True)
  os.rename(out_dir, old_dir)
  os.rename(tmp_dir, out_dir)
  shutil.rmtree(old_dir)


def _row_tensor(entry: HFWeight, params: dict, position: tuple[int, ...],
                dtype: np.dtype, lora: tuple[dict, float] | None = None) -> np.ndarray:
  """One HF tensor of a row, on this host: its param's element transposed and cast on device,
  or its params' elements (in their own dtype) through the row's transform, then cast.
  lora: (base path -> (A path, B path), scale): an adapted row's tensor is the merged one."""
  index = np.asarray(position, np.int32)
  if lora is not None and entry.path in lora[0]:
    if not entry.transpose or entry.transform is not None:
      raise ValueError(f"{entry.hf_name}: LoRA merges into plain Linear rows only")
    a_path, b_path = lora[0][entry.path]
    return _to_host(_merged_tensor(params[entry.path].get_value(), params[a_path].get_value(),
                                   params[b_path].get_value(), index, scale=float(lora[1]),
                                   dtype=dtype))
  if entry.transform is None:
    return _to_host(_hf_tensor(params[entry.path].get_value(), index,
                               transpose=entry.transpose, dtype=dtype))
  parts = [_to_host(_hf_tensor(params[path].get_value(), index, transpose=False,
                               dtype=np.dtype(params[path].get_value().dtype)))
           for path in entry.paths]
  return np.asarray(entry.transform.to_hf(*parts)).astype(_row_dtype(entry, dtype))


def _row_dtype(entry: HFWeight, dtype: np.dtype) -> np.dtype:
  """The dtype HF stores a row's tensors in: the export's, or its transform's own."""
  if entry.transform is not None and entry.transform.hf_dtype is not None:
    return np.dtype(jnp.dtype(entry.transform.hf_dtype))
  return dtype


def export_hf(model: nnx.Module, model_cfg: ConfigDict, out_dir: str, family: HFFamily, *,
              dtype: str = "bfloat16", tokenizer_path: str | None = None,
              source_dir: str | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              adapters: dict[str, tuple[str, str]] | None = None, scale: float = 1.0) -> str:
  """Writes `model` as an HF checkpoint in `dtype` to `out_dir`; returns `out_dir`.

  family: the model's family: `hf_weight_map(model_cfg)` names the tensors,
  `hf_config(model_cfg, dtype, source)` is the config.json.
  tokenizer_path: a tokenizer directory in any layout jaxtune reads; its tokenizer files and
  custom code are copied unchanged (TokenizerFilesError when it holds no tokenizer).
  source_dir: the HF directory the weights were loaded from; its config.json is handed to the
  family's `hf_config` (which may keep keys it does not model, e.g. custom-code `auto_map`);
  when the written config.json has an `auto_map`, source_dir's `*.py` files are copied too
  (those of tokenizer_path win on a shared name).
  adapters: a LoRA model's base param path -> (A path, B path); each adapted weight is written
  merged, W + scale * A @ B (the layout of a full fine-tune), every other tensor as without
  adapters (bit for bit), and the adapters themselves are not written."""
  np_dtype = np.dtype(jnp.dtype(dtype))
  dtype = np_dtype.name  # "bfloat16", also when given jnp.bfloat16
  if np_dtype not in _SAFETENSORS_NAMES:
    raise ValueError(f"cannot export dtype {dtype!r}; use float32, bfloat16 or float16")
  table = family.hf_weight_map(model_cfg)
  params = flat_params(model)
  lora = (dict(adapters), scale) if adapters else None
  adapter_paths = {p for pair in (adapters or {}).values() for p in pair}
  params = {path: var for path, var in params.items() if path not in adapter_paths}
  check_table(params, table)
  if lora is not None:  # the adapters are read from the unfiltered params
    params.update({path: var for path, var in flat_params(model).items()
                   if path in adapter_paths})
  tokenizer_files = _tokenizer_files(tokenizer_path) if tokenizer_path is not None else []

  order = _hf_order(table, params)
  planned = {name: (entry.hf_shape(shapes_of(entry, params)), _row_dtype(entry, np_dtype))
             for name, entry, _ in order}
  shards = _plan_shards([(name, *planned[name]) for name, _, _ in order], max_shard_bytes)
  by_name = {name: (entry, position) for name, entry, position in order}

  out_dir = os.path.abspath(out_dir)
  tmp_dir = out_dir + ".partial"
  is_writer = jax.process_index() == 0
  if is_writer:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)

  weight_map, total_bytes = {}, 0
  for k, shard in enumerate(shards):
    file_name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    f = open(os.path.join(tmp_dir, file_name), "wb") if is_writer else None
    try:
      if f:
        _write_header(f, shard)
      for name, shape, tensor_dtype in shard:
        entry, position = by_name[name]
        host = _row_tensor(entry, params, position, np_dtype, lora)
        if host.shape != shape or host.dtype != tensor_dtype:  # the header promised these
          raise RuntimeError(f"{name}: gathered {host.shape} {host.dtype}, planned {shape} "
                             f"{tensor_dtype}")
        if f:
          f.write(np.ascontiguousarray(host).reshape(-1).view(np.uint8).data)
        weight_map[name] = file_name
        total_bytes += host.nbytes
        del host
    finally:
      if f:
        f.close()

  if is_writer:
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    with open(os.path.join(tmp_dir, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
    source = read_hf_config(source_dir) if source_dir else None
    hf_config = family.hf_config(model_cfg, dtype, source)
    with open(os.path.join(tmp_dir, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    copied = {os.path.basename(path): path for path in tokenizer_files}
    if source_dir and hf_config.get("auto_map"):  # the code the auto_map names
      for path in _custom_code(source_dir):
        copied.setdefault(os.path.basename(path), path)
    for name, path in copied.items():
      shutil.copy2(path, os.path.join(tmp_dir, name))
    _replace_dir(tmp_dir, out_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"jaxtune export_hf {out_dir}")
  return out_dir


__all__ = ["DEFAULT_MAX_SHARD_BYTES", "TOKENIZER_FILES", "export_hf", "read_hf_dtype"]

"""Reading HF checkpoint directories: config.json, the safetensors index and headers, tensor
names and the declared dtype. No JAX: config validation and `presets.from_hf` read these
without starting a backend.

Each tensor is a read-only `np.memmap` view: safetensors' numpy framework cannot represent
bfloat16, and a view lets every device read only its own slice of the file.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_hf_config(path: str) -> dict:
  """`path`'s config.json (or the file itself) as a dict; errors name the file."""
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path} has no config.json: point it at an HF model directory "
                            "(config.json + *.safetensors).")
  return read_json(file)


def read_json(file: str) -> dict:
  """A JSON file as a dict; a ValueError naming the file when it does not parse."""
  with open(file, encoding="utf-8") as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise ValueError(f"{file} is not valid JSON: {e}") from None


def read_hf_dtype(hf_dir: str) -> str:
  """The dtype an HF checkpoint declares ("bfloat16", ...), so exports can keep it.

  Reads `dtype` (transformers 5) or `torch_dtype` (4.x) from config.json, also inside
  `text_config`; "float32" when absent, which is what transformers assumes.
  """
  with open(os.path.join(hf_dir, "config.json")) as f:
    config = json.load(f)
  for section in (config, config.get("text_config") or {}):
    for key in ("dtype", "torch_dtype"):
      if isinstance(section.get(key), str):
        return section[key].removeprefix("torch.")
  return "float32"


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
  index_path = os.path.join(hf_dir, INDEX_FILE)
  single_path = os.path.join(hf_dir, SINGLE_FILE)
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


def tensor_names(hf_dir: str) -> list[str]:
  """The tensor names of the checkpoint in `hf_dir`, from its index or its single file's
  header (no tensor data is read); [] when the directory holds neither."""
  index = os.path.join(hf_dir, INDEX_FILE)
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      return list(json.load(f)["weight_map"])
  single = os.path.join(hf_dir, SINGLE_FILE)
  if os.path.isfile(single):
    return list(SafetensorsFile(single).entries)
  return []

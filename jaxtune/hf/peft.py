"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained(base, dir)` loads onto the transformers model, and which
`lora.init_from` reads back.

Names come from the family's HF table (`jaxtune.hf.weights.HFWeight` rows): a row `H` =
`<module>.weight` whose param `P` is adapted has PEFT tensors

  base_model.model.<module>.lora_A.weight  [r, in]   = our A (`[*stack, in, r]`) transposed
  base_model.model.<module>.lora_B.weight  [out, r]  = our B (`[*stack, r, out]`) transposed

one pair per stack element (layer, expert), the indices formatted as the base row's. PEFT's
scale is lora_alpha / r, as ours. This module knows no family and no LoRA layer: the caller
passes the table and `adapters`, base path -> (A path, B path) (`jaxtune.models` binds them).

Adapters are small (rank x (in + out) per layer), so a whole adapter tensor is gathered to the
host; only process 0 writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping

import numpy as np

from jaxtune.hf.weights import HFWeight

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The seven projections of a decoder layer: lora.targets' default, PEFT's usual target_modules.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Adapters = Mapping[str, tuple[str, str]]  # base param path -> (A path, B path)

# PEFT names modules by the transformers model's attribute paths, not by the checkpoint's tensor
# names: llava-style checkpoints (InternVL-hf's `language_model.model.*`, Intern-S1's
# "internvl_legacy" layout) are renamed by transformers on load to these module paths.
_MODULE_PATHS = (("language_model.model.", "model.language_model."),
                 ("language_model.lm_head.", "lm_head."),
                 ("vision_tower.", "model.vision_tower."),
                 ("multi_modal_projector.", "model.multi_modal_projector."))


def module_path(hf_name: str) -> str:
  """The transformers module path (what PEFT's names and target_modules use) of a tensor or
  module name of the checkpoint: llava-style prefixes as transformers renames them."""
  for old, new in _MODULE_PATHS:
    if hf_name.startswith(old):
      return new + hf_name.removeprefix(old)
  return hf_name


class AdapterError(ValueError):
  """An adapter directory that does not fit the model or the recipe; names what and the fix."""


def module_name(entry: HFWeight) -> str:
  """The HF module of a Linear row: its tensor name without `.weight` (indices unformatted), as
  the transformers model names it (`module_path`)."""
  return module_path(entry.hf_name.removesuffix(".weight"))


def adapted_rows(table: tuple[HFWeight, ...], adapters: Adapters) -> list[HFWeight]:
  """The table rows whose param has adapters, in table order; each must be a plain Linear row
  (one param, transposed, `.weight`): PEFT's LoRA adapts `nn.Linear` weights."""
  rows = [entry for entry in table if entry.path is not None and entry.paths[0] in adapters]
  for entry in rows:
    if (len(entry.paths) != 1 or not entry.transpose or entry.transform is not None
        or not entry.hf_name.endswith(".weight")):
      raise AdapterError(f"{entry.hf_name} ({entry.path}): LoRA adapts plain Linear weights "
                         "(one param, HF [out, in]); this row is fused or transformed")
  missing = sorted(set(adapters) - {entry.paths[0] for entry in rows})
  if missing:
    raise AdapterError(f"adapted params without an HF table row: {missing}")
  return rows


def _names(entry: HFWeight, stack_shape: tuple[int, ...]) -> list[tuple[str, str, tuple]]:
  """(PEFT name of A, of B, stack position) of every element of an adapted row."""
  out = []
  for name, position in entry.names(stack_shape):
    module = PEFT_PREFIX + module_path(name.removesuffix(".weight"))
    out.append((module + ".lora_A.weight", module + ".lora_B.weight", position))
  return out


def _host(value) -> np.ndarray:
  """A whole (maybe sharded, maybe multi-host) array on this host."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  if value.is_fully_addressable:
    return np.asarray(jax.device_get(value))
  return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def adapter_tensors(params: Mapping, table: tuple[HFWeight, ...], adapters: Adapters,
                    dtype: str = "float32") -> dict[str, np.ndarray]:
  """PEFT name -> host array of every adapter tensor. params: `flat_params(model)`."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  np_dtype = np.dtype(jnp.dtype(dtype))
  out = {}
  for entry in adapted_rows(table, adapters):
    a_path, b_path = adapters[entry.paths[0]]
    a, b = _host(params[a_path].get_value()), _host(params[b_path].get_value())
    stack = len(entry.indices)
    for a_name, b_name, position in _names(entry, tuple(a.shape[:stack])):
      out[a_name] = np.ascontiguousarray(a[position].T.astype(np_dtype))
      out[b_name] = np.ascontiguousarray(b[position].T.astype(np_dtype))
  return out


def target_modules(table: tuple[HFWeight, ...], adapters: Adapters) -> list[str] | str:
  """PEFT's `target_modules`: the last component of each adapted module name (q_proj, ...),
  sorted, when those select exactly the adapted modules; else (e.g. Intern-S1, whose vision
  tower has q_proj too) a regex PEFT matches in full against module names, each adapted row's
  name with its indices as digit patterns (or its HF ids)."""
  rows = adapted_rows(table, adapters)
  suffixes = sorted({module_name(entry).rsplit(".", 1)[-1] for entry in rows})
  linear = _linear_modules(table)
  if {m for m in linear if _peft_matches(suffixes, m)} == {_example(e) for e in rows}:
    return suffixes
  return "(?:" + "|".join(_module_regex(entry) for entry in rows) + ")"


def _module_regex(entry: HFWeight) -> str:
  r"""A regex of every module name of a row: `model\.layers\.\d+\.self_attn\.q_proj`."""
  ids = dict(entry.ids)
  values = {name: ("(?:" + "|".join(map(str, ids[name])) + ")" if name in ids else r"\d+")
            for name in entry.indices}
  parts = module_name(entry).split("{")
  out = re.escape(parts[0])
  for part in parts[1:]:
    name, _, rest = part.partition("}")
    out += values[name] + re.escape(rest)
  return out


def write_adapter(model, table: tuple[HFWeight, ...], adapters: Adapters, out_dir: str, *,
                  rank: int, alpha: float, dropout: float = 0.0,
                  base_model_name_or_path: str | None = None, dtype: str = "float32") -> str:
  """Writes the model's adapters as a PEFT adapter directory `out_dir`; returns it.

  Written to `<out_dir>.partial` and renamed when complete; every process joins the gathers,
  process 0 writes."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  from jaxtune.hf.export import _replace_dir  # pylint: disable=import-outside-toplevel
  from jaxtune.hf.weights import flat_params  # pylint: disable=import-outside-toplevel

  tensors = adapter_tensors(flat_params(model), table, adapters, dtype)
  config = adapter_config(table, adapters, rank=rank, alpha=alpha, dropout=dropout,
                          base_model_name_or_path=base_model_name_or_path)
  out_dir = os.path.abspath(out_dir)
  if jax.process_index() == 0:
    tmp_dir = out_dir + ".partial"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    save_file(tensors, os.path.join(tmp_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(tmp_dir, ADAPTER_CONFIG), "w") as f:
      json.dump(config, f, indent=2)
    _replace_dir(tmp_dir, out_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"jaxtune write_adapter {out_dir}")
  return out_dir


def adapter_config(table: tuple[HFWeight, ...], adapters: Adapters, *, rank: int, alpha: float,
                   dropout: float = 0.0, base_model_name_or_path: str | None = None) -> dict:
  """The adapter_config.json PEFT writes for a plain LoRA of these modules."""
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank),
      "lora_alpha": float(alpha) if not float(alpha).is_integer() else int(alpha),
      "lora_dropout": float(dropout), "target_modules": target_modules(table, adapters),
      "base_model_name_or_path": base_model_name_or_path, "bias": "none",
      "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
      "use_rslora": False, "use_dora": False, "modules_to_save": None,
      "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
      "alpha_pattern": {}, "exclude_modules": None, "revision": None,
  }


def read_adapter_config(adapter_dir: str) -> dict:
  """`adapter_dir`'s adapter_config.json; errors name the file."""
  path = os.path.join(adapter_dir, ADAPTER_CONFIG)
  if not os.path.isfile(path):
    raise AdapterError(f"lora.init_from: {adapter_dir} has no {ADAPTER_CONFIG}; point it at a "
                       "PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise AdapterError(f"{path} is not valid JSON: {e}") from None


def read_adapter(model, adapter_dir: str, table: tuple[HFWeight, ...],
                 adapters: Adapters) -> None:
  """Fills the model's adapters (concrete or abstract params) from a PEFT adapter directory,
  in each adapter's dtype and sharding. Missing, extra or wrongly shaped tensors are errors
  naming the tensor, before anything is set."""
  import jax  # pylint: disable=import-outside-toplevel

  from jaxtune.hf.files import SafetensorsFile  # pylint: disable=import-outside-toplevel
  from jaxtune.hf.weights import flat_params  # pylint: disable=import-outside-toplevel

  path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
  if not os.path.isfile(path):
    raise AdapterError(f"lora.init_from: {adapter_dir} has no {ADAPTER_WEIGHTS}")
  file = SafetensorsFile(path)
  stored = set(file.entries)
  params = flat_params(model)
  plan, expected = [], set()
  for entry in adapted_rows(table, adapters):
    a_path, b_path = adapters[entry.paths[0]]
    a_var, b_var = params[a_path], params[b_path]
    a_shape, b_shape = tuple(a_var.get_value().shape), tuple(b_var.get_value().shape)
    stack = len(entry.indices)
    names = _names(entry, a_shape[:stack])
    for a_name, b_name, _ in names:
      for name, shape in ((a_name, a_shape), (b_name, b_shape)):
        expected.add(name)
        want = tuple(reversed(shape[stack:]))
        if name not in stored:
          raise AdapterError(f"lora.init_from: tensor {name} (shape {want}) is missing from "
                             f"{path}. Do the adapter's target_modules and r match the recipe?")
        if tuple(file.shape(name)) != want:
          raise AdapterError(f"lora.init_from: tensor {name} in {path} has shape "
                             f"{tuple(file.shape(name))}, the model's adapter needs {want}")
    plan.append((a_var, b_var, a_shape, b_shape, names))
  extra = sorted(stored - expected)
  if extra:
    raise AdapterError(f"lora.init_from: {path} holds {len(extra)} tensors the model's adapters "
                       f"do not have, e.g. {extra[:4]}: does lora.targets select every module "
                       "the adapter adapts?")
  for a_var, b_var, a_shape, b_shape, names in plan:
    for var, shape, which in ((a_var, a_shape, 0), (b_var, b_shape, 1)):
      value = var.get_value()
      host = np.zeros(shape, np.dtype(value.dtype))
      for name_pair in names:
        host[name_pair[2]] = np.asarray(file.tensor(name_pair[which])).T
      var.set_value(jax.device_put(host, value.sharding))


# ---- the adapter config against the recipe ------------------------------------------------

def _example(entry: HFWeight) -> str:
  """A concrete module name of a row (every index its first HF id), as PEFT sees modules."""
  ids = dict(entry.ids)
  values = {name: (ids[name][0] if name in ids else 0) for name in entry.indices}
  return module_name(entry).format(**values)


def _linear_modules(table: tuple[HFWeight, ...]) -> list[str]:
  return [_example(entry) for entry in table
          if entry.path is not None and entry.transpose and entry.transform is None
          and entry.hf_name.endswith(".weight")]


def _peft_matches(targets, module: str) -> bool:
  """PEFT's rule: a string is a regex matched in full, a list names suffixes (the module name
  itself or its ending after a dot)."""
  if isinstance(targets, str):
    return re.fullmatch(targets, module) is not None
  return any(module == t or module.endswith("." + t) for t in targets)


def check_adapter_config(adapter_dir: str, table: tuple[HFWeight, ...], adapted: tuple[str, ...],
                         *, rank: int, alpha: float) -> None:
  """AdapterError unless the PEFT adapter in `adapter_dir` describes the recipe's adapters:
  the same r and lora_alpha, and target_modules selecting the same modules as lora.targets.

  adapted: the base param paths lora.targets selects (`jaxtune.models.lora.lora_targets`).
  Reads the JSON only (no JAX, no tensors)."""
  config = read_adapter_config(adapter_dir)
  where = f"lora.init_from={adapter_dir}"
  if config.get("peft_type", "LORA") != "LORA":
    raise AdapterError(f"{where}: peft_type {config.get('peft_type')!r}; only LORA adapters load")
  for key in ("use_dora", "use_rslora"):
    if config.get(key):
      raise AdapterError(f"{where}: {key} is true; jaxtune's LoRA is plain LoRA (scale "
                         "lora_alpha / r)")
  for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save",
              "target_parameters"):
    if config.get(key):
      raise AdapterError(f"{where}: {key}={config[key]!r} is not supported (every adapted "
                         "module must have the same r and lora_alpha, no extra trained modules)")
  if int(config.get("r", -1)) != int(rank):
    raise AdapterError(f"{where}: the adapter has r={config.get('r')}, the recipe "
                       f"lora.rank={rank}: set --config.lora.rank={config.get('r')}")
  if float(config.get("lora_alpha", -1)) != float(alpha):
    raise AdapterError(f"{where}: the adapter has lora_alpha={config.get('lora_alpha')}, the "
                       f"recipe lora.alpha={alpha}: set "
                       f"--config.lora.alpha={config.get('lora_alpha')}")
  targets = config.get("target_modules")
  if not targets:
    raise AdapterError(f"{where}: adapter_config.json names no target_modules")
  linear = _linear_modules(table)
  excluded = config.get("exclude_modules")
  theirs = {m for m in linear if _peft_matches(targets, m)
            and not (excluded and _peft_matches(excluded, m))}
  ours = {_example(entry) for entry in table
          if entry.path is not None and entry.paths[0] in set(adapted)}
  if theirs != ours:
    only_theirs, only_ours = sorted(theirs - ours), sorted(ours - theirs)
    raise AdapterError(
        f"{where}: its target_modules {targets} adapt other modules than lora.targets: "
        f"{'only the adapter adapts ' + str(only_theirs[:6]) if only_theirs else ''}"
        f"{'; ' if only_theirs and only_ours else ''}"
        f"{'only the recipe adapts ' + str(only_ours[:6]) if only_ours else ''}. Set "
        f"lora.targets to the adapter's modules (a regex over HF module names, e.g. "
        f"'.*\\.({'|'.join(sorted({m.rsplit('.', 1)[-1] for m in theirs}))})$').")

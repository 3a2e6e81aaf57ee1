"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained(base, dir)` loads onto the transformers model, and which
`lora.init_from` reads back.

Names come from the family's HF table (`jaxtune.hf.weights.HFWeight` rows): a row `H` =
`<module>.weight` whose param `P` is adapted has PEFT tensors

  base_model.model.<module>.lora_A.weight  [r, in]   = our A (`[*stack, in, r]`) transposed
  base_model.model.<module>.lora_B.weight  [out, r]  = our B (`[*stack, r, out]`) transposed

one pair per stack element (layer, expert), the indices formatted as the base row's. PEFT's
scale is lora_alpha / r, as ours. MoE experts (`<experts>.{expert}.gate_proj|up_proj|down_proj`
rows) are written as PEFT adapts transformers 5's fused expert parameters
(`target_parameters`; see `FusedExperts`); both layouts are read. This module knows no family
and no LoRA layer: the caller passes the table and `adapters`, base path -> (A path, B path)
(`jaxtune.models` binds them).

Adapters are small (rank x (in + out) per layer), so a whole adapter tensor is gathered to the
host; only process 0 writes.
"""

from __future__ import annotations

import json
import os
import itertools
import re
import shutil
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

from jaxtune.hf.files import read_json
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


def _json_number(x):
  return int(x) if float(x).is_integer() else float(x)


# ---- fused experts: PEFT's LoRA on transformers 5's 3-D expert parameters -----------------
#
# transformers 5 holds a MoE layer's experts as `<experts>.gate_up_proj` [E, 2F, D] (gate rows
# first) and `<experts>.down_proj` [E, D, F], and PEFT adapts them with `target_parameters`
# (`lora.ParamWrapper`): per parameter lora_A.weight [E*R, in] (expert e's A_e [R, in] = rows
# e*R ..(e+1)*R) and lora_B.weight [out, R*E] (expert e's B_e [out, R] = columns k*E + e), the
# delta of expert e being lora_alpha / R * B_e @ A_e. Our per-expert gate and up adapters (A_g,
# B_g), (A_u, B_u) of rank r are exactly gate_up's of rank R = 2r with A_e = [A_g; A_u] and
# B_e = blockdiag(B_g, B_u), alpha 2 alpha (rank_pattern / alpha_pattern), as PEFT itself
# converts a transformers-4 adapter. Two targeted parameters of one module nest their wrappers
# in the module's parameter order, so gate_up's tensors are `<experts>.base_layer.lora_A.weight`
# when down_proj is targeted too, and down_proj's `<experts>.lora_A.weight`.

_FUSED_PARAMS = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
_PARAM_ORDER = ("gate_up_proj", "down_proj")  # transformers' parameter order: PEFT's nesting


class FusedExperts(NamedTuple):
  """The adapted expert rows of one MoE experts module: container = its module path with
  indices unformatted (`model.layers.{layer}.mlp.experts`), rows = projection -> table row."""
  container: str
  rows: dict

  @property
  def params(self) -> tuple[str, ...]:
    """The fused parameters adapted, in PEFT's nesting order."""
    return tuple(p for p in _PARAM_ORDER if any(_FUSED_PARAMS[q] == p for q in self.rows))

  @property
  def entry(self) -> HFWeight:
    return next(iter(self.rows.values()))

  def target(self, param: str) -> str:
    """PEFT's target_parameters entry: the container's path after its last index."""
    return self.container.rsplit("}.", 1)[-1] + "." + param

  def positions(self, lead_shape: tuple[int, ...]):
    """(index values, stack position) of every experts module (the stack before the expert
    axis)."""
    ids = dict(self.entry.ids)
    lead = self.entry.indices[:-1]
    axes = [ids.get(name, tuple(range(size))) for name, size in zip(lead, lead_shape)]
    for position in itertools.product(*(range(size) for size in lead_shape)):
      yield {n: axes[k][i] for k, (n, i) in enumerate(zip(lead, position))}, position

  def name(self, values: dict, param: str, lora: str, targeted: tuple[str, ...]) -> str:
    depth = len(targeted) - 1 - targeted.index(param)
    return (PEFT_PREFIX + self.container.format(**values) + ".base_layer" * depth
            + f".{lora}.weight")

  def tensors(self, host: dict) -> dict[str, np.ndarray]:
    """PEFT name -> tensor; host: projection -> (A [*lead, E, in, r], B [*lead, E, r, out])."""
    out = {}
    lead_shape = next(iter(host.values()))[0].shape[:len(self.entry.indices) - 1]
    for values, position in self.positions(lead_shape):
      for param in self.params:
        if param == "gate_up_proj":
          (ag, bg), (au, bu) = ((a[position], b[position]) for a, b in
                                (host["gate_proj"], host["up_proj"]))
          experts, _, r = ag.shape
          f = bg.shape[-1]
          a = np.concatenate([ag.transpose(0, 2, 1), au.transpose(0, 2, 1)], axis=1)
          b = np.zeros((experts, 2 * f, 2 * r), ag.dtype)
          b[:, :f, :r] = bg.transpose(0, 2, 1)
          b[:, f:, r:] = bu.transpose(0, 2, 1)
        else:
          a, b = (x[position].transpose(0, 2, 1) for x in host["down_proj"])
        experts, rank, _ = a.shape
        out[self.name(values, param, "lora_A", self.params)] = a.reshape(experts * rank, -1)
        out[self.name(values, param, "lora_B", self.params)] = (
            b.transpose(1, 2, 0).reshape(b.shape[1], rank * experts))
    return out

  def per_expert(self, get: Callable, targeted: tuple[str, ...], stack_shape: tuple[int, ...],
                 rank: int, factors: dict) -> tuple[dict[str, np.ndarray], set[str]]:
    """The transformers-4 per-expert PEFT tensors (`_names`) of the fused ones `get` reads,
    rescaled by factors[param] (their alpha / R over ours); and the fused names read."""
    out, read = {}, set()
    names = {proj: {pos: (a, b) for a, b, pos in _names(entry, stack_shape)}
             for proj, entry in self.rows.items()}
    for values, position in self.positions(stack_shape[:-1]):
      for param in self.params:
        a_name, b_name = (self.name(values, param, lora, targeted) for lora in ("lora_A", "lora_B"))
        a, b = np.asarray(get(a_name)), np.asarray(get(b_name))
        read |= {a_name, b_name}
        experts = stack_shape[-1]
        big = a.shape[0] // experts
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != big * experts or b.shape[1] != a.shape[0]:
          raise AdapterError(f"lora.init_from: {a_name} {a.shape} / {b_name} {b.shape} are not "
                             f"PEFT's [E*R, in] / [out, R*E] of {experts} experts")
        a = a.reshape(experts, big, -1)
        b = b.reshape(b.shape[0], big, experts).transpose(2, 0, 1) * factors[param]
        if param == "down_proj":
          parts = {"down_proj": (a, b)}
        else:
          f = b.shape[1] // 2
          if big == rank:
            parts = {"gate_proj": (a, b[:, :f]), "up_proj": (a, b[:, f:])}
          elif big == 2 * rank:
            if np.any(b[:, :f, rank:]) or np.any(b[:, f:, :rank]):
              raise AdapterError(
                  f"lora.init_from: {b_name} (gate_up_proj at rank {big} = 2 x lora.rank) is "
                  "not block-diagonal (gate rows on the first r ranks, up rows on the last r), "
                  "so it is not a pair of rank-r gate_proj / up_proj adapters")
            parts = {"gate_proj": (a[:, :rank], b[:, :f, :rank]),
                     "up_proj": (a[:, rank:], b[:, f:, rank:])}
          else:
            raise AdapterError(f"lora.init_from: {a_name} has rank {big}; with lora.rank={rank} "
                               f"gate_up_proj's must be {rank} or {2 * rank}")
        for proj, (pa, pb) in parts.items():
          if proj not in self.rows:
            continue
          if pa.shape[1] != rank:
            raise AdapterError(f"lora.init_from: {a_name} has rank {pa.shape[1]}, the recipe "
                               f"lora.rank={rank}")
          for e in range(experts):
            pair = names[proj][position + (e,)]
            out[pair[0]], out[pair[1]] = pa[e], pb[e]
    return out, read


def fused_expert_groups(table: tuple[HFWeight, ...], adapters: Adapters) -> list[FusedExperts]:
  """The adapted expert modules that PEFT adapts as fused parameters: rows named
  `<container>.{expert}.(gate_proj|up_proj|down_proj).weight` (the expert index last), gate and
  up adapted together. Other expert rows stay per-expert modules."""
  groups: dict[str, dict] = {}
  for entry in adapted_rows(table, adapters):
    if not entry.indices or entry.indices[-1] != "expert":
      continue
    container, sep, proj = module_name(entry).rpartition(".{expert}.")
    if sep and proj in _FUSED_PARAMS:
      groups.setdefault(container, {})[proj] = entry
  return [FusedExperts(c, rows) for c, rows in groups.items()
          if ("gate_proj" in rows) == ("up_proj" in rows)]


def _pattern_value(patterns: Mapping, key: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup (`peft.utils.other.get_pattern_key`)."""
  for pattern, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({pattern})$", key):
      return value
  return default


def _targets_parameter(targets, key: str) -> bool:
  """PEFT's target_parameters rule: the key itself or a dotted suffix of it."""
  return any(key == t or key.endswith("." + t) for t in (targets or ()))


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
  groups = fused_expert_groups(table, adapters)
  fused_rows = {entry.hf_name for group in groups for entry in group.rows.values()}
  for group in groups:
    host = {proj: tuple(_host(params[path].get_value()) for path in adapters[entry.paths[0]])
            for proj, entry in group.rows.items()}
    for name, value in group.tensors(host).items():
      out[name] = np.ascontiguousarray(value.astype(np_dtype))
  for entry in adapted_rows(table, adapters):
    if entry.hf_name in fused_rows:
      continue
    a_path, b_path = adapters[entry.paths[0]]
    a, b = _host(params[a_path].get_value()), _host(params[b_path].get_value())
    stack = len(entry.indices)
    for a_name, b_name, position in _names(entry, tuple(a.shape[:stack])):
      out[a_name] = np.ascontiguousarray(a[position].T.astype(np_dtype))
      out[b_name] = np.ascontiguousarray(b[position].T.astype(np_dtype))
  return out


def target_modules(table: tuple[HFWeight, ...], adapters: Adapters) -> list[str] | str | None:
  """PEFT's `target_modules`: the last component of each adapted module name (q_proj, ...),
  sorted, when those select exactly the adapted modules; else (e.g. Intern-S1, whose vision
  tower has q_proj too) a regex PEFT matches in full against module names, each adapted row's
  name with its indices as digit patterns (or its HF ids). Fused experts are not modules
  (`target_parameters`); None when nothing else is adapted."""
  fused = {e.hf_name for group in fused_expert_groups(table, adapters) for e in group.rows.values()}
  rows = [entry for entry in adapted_rows(table, adapters) if entry.hf_name not in fused]
  if not rows:
    return None
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
  """The adapter_config.json PEFT writes for a plain LoRA of these modules (and, for fused
  experts, of these parameters: `target_parameters`, gate_up at rank 2r and alpha 2 alpha)."""
  groups = fused_expert_groups(table, adapters)
  parameters = sorted({group.target(param) for group in groups for param in group.params})
  pattern = {}
  if any("gate_up_proj" in group.params for group in groups):
    pattern = {"gate_up_proj": 2}
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank),
      "lora_alpha": _json_number(alpha),
      "lora_dropout": float(dropout), "target_modules": target_modules(table, adapters),
      "base_model_name_or_path": base_model_name_or_path, "bias": "none",
      "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
      "use_rslora": False, "use_dora": False, "modules_to_save": None,
      "layers_to_transform": None, "layers_pattern": None,
      "target_parameters": parameters or None,
      "rank_pattern": {k: v * int(rank) for k, v in pattern.items()},
      "alpha_pattern": {k: _json_number(v * float(alpha)) for k, v in pattern.items()},
      "exclude_modules": None, "revision": None,
  }


def read_adapter_config(adapter_dir: str) -> dict:
  """`adapter_dir`'s adapter_config.json; errors name the file."""
  path = os.path.join(adapter_dir, ADAPTER_CONFIG)
  if not os.path.isfile(path):
    raise AdapterError(f"lora.init_from: {adapter_dir} has no {ADAPTER_CONFIG}; point it at a "
                       "PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
  try:
    return read_json(path)
  except ValueError as e:
    raise AdapterError(str(e)) from None


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
  virtual = _fused_expert_tensors(file, adapter_dir, params, table, adapters)
  stored = (stored - virtual.pop(None)) | set(virtual)

  def shape_of(name):
    return tuple(virtual[name].shape) if name in virtual else tuple(file.shape(name))

  def tensor(name):
    return virtual[name] if name in virtual else np.asarray(file.tensor(name))

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
        if shape_of(name) != want:
          raise AdapterError(f"lora.init_from: tensor {name} in {path} has shape "
                             f"{shape_of(name)}, the model's adapter needs {want}")
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
        host[name_pair[2]] = tensor(name_pair[which]).T
      var.set_value(jax.device_put(host, value.sharding))


def _fused_expert_tensors(file, adapter_dir: str, params: Mapping, table: tuple[HFWeight, ...],
                          adapters: Adapters) -> dict:
  """The per-expert PEFT tensors (transformers-4 names, which the reader expects) of the
  expert groups the adapter stores as fused parameters (its target_parameters), and under None
  the fused names they came from. An adapter in the per-expert format gives {None: set()}."""
  config = read_adapter_config(adapter_dir)
  targets = config.get("target_parameters") or ()
  out, read = {}, set()
  if not targets:
    return {None: read}
  lora_alpha = float(config.get("lora_alpha", 8))
  for group in fused_expert_groups(table, adapters):
    a_var = params[adapters[group.entry.paths[0]][0]]
    shape = tuple(a_var.get_value().shape)
    stack_shape, rank = shape[:len(group.entry.indices)], shape[-1]
    values = next(group.positions(stack_shape[:-1]))[0]
    key = group.container.format(**values)
    targeted = tuple(p for p in _PARAM_ORDER if _targets_parameter(targets, f"{key}.{p}"))
    if not targeted:
      continue
    missing = [p for p in group.params if p not in targeted]
    if missing:
      raise AdapterError(f"lora.init_from: {adapter_dir}'s target_parameters {list(targets)} do "
                         f"not adapt {key}.{missing[0]}, which lora.targets adapts")
    factors = {}
    for param in group.params:
      big = int(_pattern_value(config.get("rank_pattern"), f"{key}.{param}", config.get("r")))
      alpha = float(_pattern_value(config.get("alpha_pattern"), f"{key}.{param}", lora_alpha))
      factors[param] = (alpha / big) / (lora_alpha / int(config.get("r", rank)))

    def get(name):
      if name not in file.entries:
        raise AdapterError(f"lora.init_from: tensor {name} is missing from {adapter_dir}")
      return file.tensor(name)
    tensors, names = group.per_expert(get, targeted, stack_shape, rank, factors)
    out.update(tensors)
    read |= names
  out[None] = read
  return out


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


def _fused_examples(table: tuple[HFWeight, ...]) -> dict[str, set[str]]:
  """Fused expert parameter (an example of each, `model.layers.0.mlp.experts.gate_up_proj`) ->
  the per-expert modules (`_example`s) it holds."""
  rows = [e for e in table if e.path is not None and e.indices and e.indices[-1] == "expert"]
  out: dict[str, set[str]] = {}
  for entry in rows:
    container, sep, proj = module_name(entry).rpartition(".{expert}.")
    if sep and proj in _FUSED_PARAMS:
      ids = dict(entry.ids)
      values = {n: (ids[n][0] if n in ids else 0) for n in entry.indices[:-1]}
      key = container.format(**values) + "." + _FUSED_PARAMS[proj]
      out.setdefault(key, set()).add(_example(entry))
  return out


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
  for key in ("layers_to_transform", "modules_to_save"):
    if config.get(key):
      raise AdapterError(f"{where}: {key}={config[key]!r} is not supported (every adapted "
                         "module must have the same r and lora_alpha, no extra trained modules)")
  linear = _linear_modules(table)
  fused = _fused_examples(table)  # fused parameter key -> the per-expert modules it holds
  for key in ("rank_pattern", "alpha_pattern"):
    for pattern in config.get(key) or {}:
      hit = [m for m in linear if re.match(rf"(.*\.)?({pattern})$", m)]
      if hit or not any(re.match(rf"(.*\.)?({pattern})$", k) and k.endswith(".gate_up_proj")
                        for k in fused):
        raise AdapterError(f"{where}: {key} entry {pattern!r} is not supported: only fused "
                           "experts' gate_up_proj may have its own r and lora_alpha (2 r and "
                           "2 lora_alpha: gate and up of rank r each)")
  parameters = config.get("target_parameters") or ()
  unknown = [t for t in parameters if not any(_targets_parameter([t], k) for k in fused)]
  if unknown:
    raise AdapterError(f"{where}: target_parameters {unknown} name no fused expert parameter "
                       "(gate_up_proj / down_proj of a MoE layer's experts) of this model")
  if int(config.get("r", -1)) != int(rank):
    raise AdapterError(f"{where}: the adapter has r={config.get('r')}, the recipe "
                       f"lora.rank={rank}: set --config.lora.rank={config.get('r')}")
  if float(config.get("lora_alpha", -1)) != float(alpha):
    raise AdapterError(f"{where}: the adapter has lora_alpha={config.get('lora_alpha')}, the "
                       f"recipe lora.alpha={alpha}: set "
                       f"--config.lora.alpha={config.get('lora_alpha')}")
  targets = config.get("target_modules")
  if not targets and not parameters:
    raise AdapterError(f"{where}: adapter_config.json names no target_modules")
  excluded = config.get("exclude_modules")
  theirs = {m for m in linear if targets and _peft_matches(targets, m)
            and not (excluded and _peft_matches(excluded, m))}
  theirs |= {m for k, modules in fused.items() if _targets_parameter(parameters, k)
             for m in modules}
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

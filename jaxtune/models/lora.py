"""LoRA adapters for every family, attached to an already-built model by param path.

The recipe's `lora` section (`jaxtune.config.base_config`: rank, alpha, dropout, targets,
init_from, quantize_base) picks the linear layers by regular expressions over HF module paths
(`model.layers.3.self_attn.q_proj`, `model.layers.1.mlp.experts.7.up_proj`), decided from the
family's HF name table (`lora_targets`). No family code changes for a plain `nnx.Linear`:
`attach` replaces each targeted Linear with a `LoRALinear` whose `kernel` keeps its path.

Param paths (dot-joined nnx state paths, `adapter_paths`):
  - an nnx.Linear at module path M (base `M.kernel` [*stack, in, out]): `M.lora_a`
    [*stack, in, r] and `M.lora_b` [*stack, r, out];
  - a raw kernel param P (Qwen3-MoE's `model.layers.mlp.experts.gate_proj` [L, E, in, out]):
    `P_lora_a` [L, E, in, r] and `P_lora_b` [L, E, r, out], attributes of P's module; the
    experts read them through `expert_kernel` (each expert its own A and B).
PEFT's `lora_A.weight` [r, in] is our `lora_a` transposed per layer/expert, `lora_B.weight`
[out, r] our `lora_b` transposed.

Math: y = x @ W + (dropout(x) @ A) @ B * (alpha / rank), PEFT's init (A kaiming-uniform with
a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)); B zeros), A and B stored in float32, the matmuls
in the compute dtype. A Linear makes one pass over W plus the two thin matmuls; W is frozen, so
no [in, out] weight gradient is formed. Expert adapters are merged per expert in the compute
dtype (W_e + A_e B_e * s, a [E, in, out] temporary per layer) before the grouped matmul, whose
custom VJP then gives the gradient of A and B through the merge: the tiled loop's work is the
same as for full fine-tuning.

Dropout (`lora.dropout` > 0) needs a key per step, layer and module without an RNG state that
a step would have to carry and a checkpoint keep: the mask's key is derived from a per-module
salt (its path) and the bits of the module's input x. So a step's masks are a function of its
data and params (an exact resume gives the same masks), distinct for every layer (different
x) and module (different salt). `set_deterministic(model, True)` turns dropout off (eval).
Expert adapters, being merged, take no dropout (`check_dropout` says so for a recipe).

Training: with rank > 0 only `LoRAParam`s train (`trainable_filter`), and the frozen base is
stored in the compute dtype (no master weights needed): `base_param_dtype`.

QLoRA seam (jaxtune.ops.quant): a LoRALinear reads its base weight only through
`LoRALinear._base_kernel()` and the experts through `base_kernel(module, name)`; a quantised
base replaces `kernel` (or the expert param) by its frozen quantised variable in `attach` and
dequantises in those two functions. Nothing else reads a targeted base weight.
"""

from __future__ import annotations

import contextlib
import math
import re
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.ops import quant

# Every attention and MLP projection of a decoder's layers (Qwen3-MoE's experts included): HF
# names them `...layers.{i}.self_attn.{q,k,v,o}_proj` and `...layers.{i}.mlp[.experts.{e}].
# {gate,up,down}_proj`. Intern-S1's vision tower (`encoder.layer.{i}.attention...`, `mlp.fc1`)
# and projector (`multi_modal_projector.linear_1`) match neither, nor the MoE router `mlp.gate`.
DEFAULT_LORA_TARGETS = (
    r"(^|\.)layers\.\d+\.self_attn\.[qkvo]_proj$",
    r"(^|\.)layers\.\d+\.mlp\.(experts\.\d+\.)?(gate|up|down)_proj$",
)
QUANTIZE_BASE = ("none", "int8", "nf4")
# Linears whose kernel is read directly, not through the module's call: no adapter can apply.
_NOT_CALLED = ("lm_head", "gate")


class LoRAParam(nnx.Param):
  """A LoRA adapter (A or B). With rank > 0 exactly these train."""


def enabled(lora_cfg: Any) -> bool:
  """Whether a `lora` section (or None) adds adapters."""
  return lora_cfg is not None and int(lora_cfg.rank) > 0


def trainable_filter(family: Any, model_cfg: Any, lora_cfg: Any = None):
  """The nnx filter of the params that train: the adapters with LoRA on, else the family's
  `trainable(cfg)` restricted to `nnx.Param`."""
  if enabled(lora_cfg):
    return nnx.OfType(LoRAParam)
  return nnx.All(nnx.Param, family.trainable(model_cfg))


def base_param_dtype(param_dtype: Any, compute_dtype: Any, lora_cfg: Any = None):
  """The dtype the base params are stored in: the compute dtype when LoRA freezes them (a
  frozen weight needs no float32 master copy), else `param_dtype`."""
  return jnp.dtype(compute_dtype if enabled(lora_cfg) else param_dtype)


def adapter_paths(base_path: str) -> tuple[str, str]:
  """(A path, B path) of the adapters of a base param path (dot-joined nnx state paths):
  `M.kernel` -> (`M.lora_a`, `M.lora_b`); a raw kernel `P` -> (`P_lora_a`, `P_lora_b`)."""
  if base_path.endswith(".kernel"):
    module = base_path[:-len(".kernel")]
    return module + ".lora_a", module + ".lora_b"
  return base_path + "_lora_a", base_path + "_lora_b"


# --- which params: the family's HF table -----------------------------------------------------

def _param_shapes(family: Any, model_cfg: Any) -> dict[str, tuple[int, ...]]:
  """Dot-joined param path -> shape of the model `model_cfg` builds (abstract: no memory)."""
  from jaxtune import models  # pylint: disable=import-outside-toplevel  (models imports us)
  del family  # the builder finds it from model_cfg.type
  _, state = models._abstract_split(  # pylint: disable=protected-access
      models._builder(model_cfg, "float32", "float32", "none", "xla", 0))  # pylint: disable=protected-access
  return {".".join(str(k) for k in path): tuple(v.get_value().shape)
          for path, v in nnx.to_flat_state(nnx.filter_state(state, nnx.Param))}


def _adaptable(row: Any) -> bool:
  """A row of one transposed weight read by a call (a Linear) or by the expert matmul."""
  if row.path is None or not isinstance(row.path, str) or not row.transpose or row.transform:
    return False
  parts = row.path.split(".")
  if parts[-1] == "kernel":
    return parts[-2] not in _NOT_CALLED
  return "{expert}" in row.hf_name


def linear_modules(family: Any, model_cfg: Any) -> dict[str, tuple[str, ...]]:
  """Base param path -> the HF module paths it holds (one per layer / expert), for every
  linear that can take adapters, in the table's order."""
  from jaxtune.hf.weights import hf_names  # pylint: disable=import-outside-toplevel
  shapes = _param_shapes(family, model_cfg)
  out = {}
  for row in family.hf_weight_map(model_cfg):
    if _adaptable(row) and row.path in shapes:
      names = [name for name, _ in hf_names(row, shapes[row.path])]
      out[row.path] = tuple(n[:-len(".weight")] if n.endswith(".weight") else n for n in names)
  return out


def compile_targets(targets: Sequence[str]) -> list[re.Pattern]:
  """The target regexes compiled; a ValueError naming a bad one."""
  if isinstance(targets, str) or not targets:
    raise ValueError(f"lora.targets must be a non-empty tuple of regular expressions, got "
                     f"{targets!r}")
  out = []
  for t in targets:
    if not isinstance(t, str) or not t:
      raise ValueError(f"lora.targets entries must be non-empty strings, got {t!r}")
    try:
      out.append(re.compile(t))
    except re.error as e:
      raise ValueError(f"lora.targets entry {t!r} is not a regular expression: {e}") from None
  return out


def lora_targets(family: Any, model_cfg: Any, targets: Sequence[str]) -> tuple[str, ...]:
  """The base param paths that get adapters: those whose HF module paths match a target
  (re.search). A stacked param is adapted whole: a regex matching some of its layers or
  experts but not all is a ValueError naming the regex and the modules."""
  patterns = compile_targets(targets)
  chosen = []
  for path, modules in linear_modules(family, model_cfg).items():
    hit = False
    for pattern in patterns:
      matched = [m for m in modules if pattern.search(m)]
      if matched and len(matched) < len(modules):
        missed = [m for m in modules if not pattern.search(m)]
        raise ValueError(
            f"lora.targets entry {pattern.pattern!r} matches {matched[0]} but not {missed[0]} "
            f"({len(matched)} of the {len(modules)} modules stacked in {path}); adapters are "
            "per stacked param: match all of its layers/experts or none")
      hit = hit or bool(matched)
    if hit:
      chosen.append(path)
  return tuple(chosen)


def check_targets(family: Any, model_cfg: Any, targets: Sequence[str]) -> tuple[str, ...]:
  """`lora_targets`, which must choose at least one linear (else a ValueError listing the
  HF module names there are)."""
  chosen = lora_targets(family, model_cfg, targets)
  if not chosen:
    names = [m for modules in linear_modules(family, model_cfg).values() for m in modules[:1]]
    raise ValueError(f"lora.targets {tuple(targets)} match no linear layer of this "
                     f"{model_cfg.type} model; its linear modules (first layer/expert of each) "
                     f"are: {names}")
  return chosen


# --- the adapters ----------------------------------------------------------------------------

def _salt(path: str) -> int:
  return zlib.crc32(path.encode()) & 0x7FFFFFFF


def adapter_init(path: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], seed: int
                 ) -> tuple[jax.Array, jax.Array]:
  """PEFT's init of the adapters of base `path`: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-
  uniform, a = sqrt(5)), B = 0, float32. Deterministic in (seed, path)."""
  key = jax.random.fold_in(jax.random.key(seed), _salt(path))
  bound = 1.0 / math.sqrt(a_shape[-2])
  a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
  return a, jnp.zeros(b_shape, jnp.float32)


def _adapter_metadata(base: nnx.Variable) -> tuple[dict, dict]:
  """(A's, B's) sharding metadata: A the base's input axis, B its output axis (with its
  `shard_units`), the rank axis None, leading stack axes as the base's."""
  meta = base.get_metadata()
  names = meta.get("out_sharding")
  units = meta.get("shard_units")
  out_a, out_b = {}, {}
  if names:
    names = tuple(names)
    out_a["out_sharding"] = names[:-1] + (None,)
    out_b["out_sharding"] = names[:-2] + (None, names[-1])
  if units:
    units = tuple(units)
    out_a["shard_units"] = units[:-1] + (1,)
    out_b["shard_units"] = units[:-2] + (1, units[-1])
  return out_a, out_b


def _make_adapters(path: str, base: nnx.Variable, rank: int, seed: int
                   ) -> tuple[LoRAParam, LoRAParam]:
  shape = tuple(base.get_value().shape)
  a, b = adapter_init(path, shape[:-1] + (rank,), shape[:-2] + (rank, shape[-1]), seed)
  meta_a, meta_b = _adapter_metadata(base)
  return LoRAParam(a, **meta_a), LoRAParam(b, **meta_b)


def _dropout(x: jax.Array, rate: float, salt: int) -> jax.Array:
  """Inverted dropout whose key comes from `salt` and the bits of x (see the module doc)."""
  bits = jax.lax.bitcast_convert_type(jax.lax.stop_gradient(x).astype(jnp.float32), jnp.uint32)
  key = jax.random.fold_in(jax.random.key(salt), jnp.sum(bits, dtype=jnp.uint32))
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


class LoRALinear(nnx.Module):
  """An nnx.Linear with adapters: `kernel` (and `bias`) are the base Linear's own variables, so
  their paths and HF rows do not change; `lora_a` [*, in, r], `lora_b` [*, r, out]."""

  def __init__(self, base: nnx.Linear, path: str, *, rank: int, alpha: float, dropout: float,
               seed: int):
    self.kernel = base.kernel
    self.bias = base.bias
    self.in_features, self.out_features = base.in_features, base.out_features
    self.dtype, self.precision = base.dtype, base.precision
    self.lora_a, self.lora_b = _make_adapters(path, base.kernel, rank, seed)
    self.scale = float(alpha) / int(rank)
    self.dropout = float(dropout)
    self.deterministic = False
    self.salt = _salt(path)

  def _base_kernel(self) -> jax.Array:
    """The frozen base weight [in, out] (the QLoRA seam: a quantised base is dequantised here,
    in the compute dtype, and XLA fuses that into the matmul's operand)."""
    return base_kernel(self, "kernel", self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self._base_kernel()
    bias = self.bias[...] if self.bias is not None else None
    dtype = self.dtype or jnp.result_type(x, kernel)
    x = x.astype(dtype)
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    # The base path is nnx.Linear's own (bit-identical with B = 0).
    y = jax.lax.dot_general(x, kernel.astype(dtype), dims, precision=self.precision)
    if bias is not None:
      y += jnp.reshape(bias.astype(dtype), (1,) * (y.ndim - 1) + (-1,))
    h = x if self.dropout == 0.0 or self.deterministic else _dropout(x, self.dropout, self.salt)
    h = jax.lax.dot_general(h, self.lora_a[...].astype(dtype), dims, precision=self.precision)
    d = jax.lax.dot_general(h, self.lora_b[...].astype(dtype), dims, precision=self.precision)
    return y + (d * self.scale).astype(y.dtype)


def base_kernel(module: nnx.Module, name: str, dtype: Any = None) -> jax.Array:
  """The frozen base weight `name` of `module` (the QLoRA seam): the param itself, or its
  quantised codes and scales (`quantize_slot`) dequantised to `dtype` (default: the dtype the
  base had before quantisation)."""
  spec = getattr(module, name + _QUANT, None)
  if spec is None:
    return getattr(module, name)[...]
  kind, block_size, base_dtype, _ = spec
  q = quant.QuantizedTensor(getattr(module, name + _CODES)[...],
                            getattr(module, name + _SCALES)[...], kind, block_size)
  return quant.dequantize(q, dtype or base_dtype)


# --- QLoRA: the frozen base stored quantised (jaxtune.ops.quant) -----------------------------

# A quantised base param `name` of a module becomes `name_codes` and `name_scales`
# (`QuantizedBase` variables: in the param state, so they checkpoint and shard like the
# kernel, with its logical axes) and the static `name_quant` = (kind, block size, the base's
# dtype name, the kernel's `shard_units`); `name` itself is gone.
_CODES, _SCALES, _QUANT = "_codes", "_scales", "_quant"


class QuantizedBase(nnx.Param):
  """A frozen base kernel's quantised codes or scales (QLoRA). An `nnx.Param`, so it is in
  the state the train step takes and checkpoints; not a `LoRAParam`, so it never trains."""


def _quantized_variables(base: nnx.Variable, q: quant.QuantizedTensor
                         ) -> tuple[QuantizedBase, QuantizedBase]:
  """Codes and scales as variables with the kernel's axis names (`shard_units` rescaled)."""
  meta = base.get_metadata()
  names, units = meta.get("out_sharding"), meta.get("shard_units")
  code_units, scale_units = quant.shard_units(tuple(units) if units else None, q.kind,
                                              q.block_size)
  out = []
  for value, unit in ((q.codes, code_units), (q.scales, scale_units)):
    extra = {}
    if names:
      extra["out_sharding"] = tuple(names)
    if unit:
      extra["shard_units"] = tuple(unit)
    out.append(QuantizedBase(value, **extra))
  return out[0], out[1]


def quantize_slot(module: nnx.Module, name: str, kind: str) -> None:
  """Replaces the base param `name` of `module` ([*stack, in, out]) by its `kind`
  quantisation (blocks of 64 input rows, fewer for narrower layers: `quant.block_size_for`).
  Runs on real or traced values (inside the jitted or abstract build)."""
  base = getattr(module, name)
  value = base.get_value()
  block_size = quant.block_size_for(value.shape[-2])
  codes, scales = _quantized_variables(base, quant.quantize(value, kind, block_size))
  units = base.get_metadata().get("shard_units")
  delattr(module, name)
  setattr(module, name + _CODES, codes)
  setattr(module, name + _SCALES, scales)
  setattr(module, name + _QUANT, (kind, block_size, jnp.dtype(value.dtype).name,
                                  tuple(units) if units else None))


def _quantized_slots(model: nnx.Module) -> list[tuple[nnx.Module, str]]:
  """(module, base param name) of every quantised base in the model."""
  return [(node, attr[:-len(_QUANT)]) for _, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Module) for attr in list(vars(node))
          if attr.endswith(_QUANT) and isinstance(getattr(node, attr), tuple)]


def _sharding_on(like: Any, variable: nnx.Variable) -> Any:
  """The sharding `variable` (abstract, with axis names) gets on the mesh of `like`'s
  sharding; `like`'s own sharding (one device, or None) where it has no mesh."""
  from jaxtune.parallel.sharding import param_shardings  # pylint: disable=import-outside-toplevel
  sharding = getattr(like, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  return param_shardings(nnx.State({"w": variable}), sharding.mesh)["w"].get_value()


@contextlib.contextmanager
def float_base(model: nnx.Module):
  """Every quantised base as its float kernel for the duration, so HF loading and exports see
  the params the HF name table lists: dequantised where the codes are real, abstract (a
  ShapeDtypeStruct in the kernel's sharding) where they are not. On exit a kernel that was
  replaced (loaded) is quantised again; one left as it was gets its codes back untouched."""
  saved = []
  for module, name in _quantized_slots(model):
    spec = getattr(module, name + _QUANT)
    kind, block_size, dtype, units = spec
    codes_var, scales_var = getattr(module, name + _CODES), getattr(module, name + _SCALES)
    codes, scales = codes_var.get_value(), scales_var.get_value()
    shape = quant.QuantizedTensor(codes, scales, kind, block_size).shape
    meta = {} if units is None else dict(shard_units=units)
    names = codes_var.get_metadata().get("out_sharding")
    if names:
      meta["out_sharding"] = tuple(names)
    with nnx.use_eager_sharding(False):  # axis names only: placed below, on the codes' mesh
      variable = nnx.Param(jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)), **meta)
    sharding = _sharding_on(codes, variable)
    if isinstance(codes, jax.Array):
      value = jax.jit(quant.dequantize, static_argnums=1, out_shardings=sharding)(
          quant.QuantizedTensor(codes, scales, kind, block_size), jnp.dtype(dtype))
    else:
      value = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)
    variable.set_value(value)
    for suffix in (_CODES, _SCALES, _QUANT):
      delattr(module, name + suffix)
    setattr(module, name, variable)
    saved.append((module, name, value, codes_var, scales_var, spec))
  try:
    yield model
  finally:
    for module, name, value, codes_var, scales_var, spec in saved:
      loaded = getattr(module, name).get_value()
      delattr(module, name)
      if loaded is not value and isinstance(loaded, jax.Array):
        kind, block_size = spec[:2]
        out = (getattr(codes_var.get_value(), "sharding", None),
               getattr(scales_var.get_value(), "sharding", None))
        out = None if None in out else quant.QuantizedTensor(*out, kind, block_size)
        q = jax.jit(quant.quantize, static_argnums=(1, 2), out_shardings=out)(
            loaded, kind, block_size)
        codes_var.set_value(q.codes)
        scales_var.set_value(q.scales)
      setattr(module, name + _CODES, codes_var)
      setattr(module, name + _SCALES, scales_var)
      setattr(module, name + _QUANT, spec)


def expert_kernel(module: nnx.Module, name: str, dtype: Any) -> jax.Array:
  """Expert weights `name` [E, in, out] of `module` in `dtype`, with each expert's adapters
  merged (W_e + A_e @ B_e * alpha / r) when it has them; the grouped matmul's VJP then reaches
  A and B through the merge."""
  w = base_kernel(module, name, dtype)
  a = getattr(module, name + "_lora_a", None)
  if a is None:
    return w
  b = getattr(module, name + "_lora_b")
  ab = jnp.einsum("...ir,...ro->...io", a[...].astype(dtype), b[...].astype(dtype),
                  preferred_element_type=jnp.float32)
  return (w.astype(jnp.float32) + ab * module.lora_scale).astype(dtype)


# --- attaching to a model --------------------------------------------------------------------

def _resolve(model: nnx.Module, parts: Sequence[str]) -> Any:
  node = model
  for part in parts:
    node = node[int(part)] if isinstance(node, (list, tuple)) else getattr(node, part)
  return node


def attach(model: nnx.Module, paths: Sequence[str], lora_cfg: Any, seed: int) -> nnx.Module:
  """Adds adapters to the base params `paths` (from `lora_targets`) of a built model, real
  or traced (jaxtune.models builds with it); returns the model, changed in place.

  Records the section as `model.lora_config` (static), which `trainable_filter` reads."""
  from ml_collections import FrozenConfigDict  # pylint: disable=import-outside-toplevel
  rank, alpha = int(lora_cfg.rank), float(lora_cfg.alpha)
  for path in paths:
    parts = path.split(".")
    if parts[-1] == "kernel":
      parent = _resolve(model, parts[:-2])
      linear = getattr(parent, parts[-2])
      if not isinstance(linear, nnx.Linear):
        raise ValueError(f"{path}: LoRA adapts nnx.Linear kernels, this is a "
                         f"{type(linear).__name__}")
      slot = LoRALinear(linear, path, rank=rank, alpha=alpha,
                        dropout=float(lora_cfg.dropout), seed=seed)
      setattr(parent, parts[-2], slot)
      slot_name = "kernel"
    else:
      parent = _resolve(model, parts[:-1])
      a, b = _make_adapters(path, getattr(parent, parts[-1]), rank, seed)
      setattr(parent, parts[-1] + "_lora_a", a)
      setattr(parent, parts[-1] + "_lora_b", b)
      parent.lora_scale = alpha / rank
      slot, slot_name = parent, parts[-1]
    # QLoRA: the frozen base of each adapted linear stored quantised (after the adapters took
    # its shape and axes). A loaded checkpoint is quantised again by `float_base`.
    if lora_cfg.get("quantize_base", "none") != "none":
      quantize_slot(slot, slot_name, lora_cfg.quantize_base)
  model.lora_config = FrozenConfigDict(lora_cfg.to_dict() if hasattr(lora_cfg, "to_dict")
                                       else dict(lora_cfg))
  return model


def _adapter_slots(model: nnx.Module) -> Iterator[tuple[nnx.Module, str]]:
  """(module, attribute) of every LoRAParam in the model."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      for name, value in list(vars(node).items()):
        if isinstance(value, LoRAParam):
          yield node, name


@contextlib.contextmanager
def adapters_detached(model: nnx.Module):
  """The model without its LoRAParams for the duration (the base params alone, as the HF
  name table lists them: loading HF weights, a base export); they come back after. A
  quantised base is its float kernel meanwhile (`float_base`)."""
  slots = [(module, name, getattr(module, name)) for module, name in _adapter_slots(model)]
  for module, name, _ in slots:
    delattr(module, name)
  try:
    with float_base(model):
      yield model
  finally:
    for module, name, value in slots:
      setattr(module, name, value)


def init_abstract_adapters(model: nnx.Module, seed: int) -> nnx.Module:
  """Gives every adapter still abstract (a ShapeDtypeStruct, e.g. after HF weights filled the
  base of an abstract model) its init value, in its sharding; returns the model."""
  flat = {".".join(str(k) for k in path): var
          for path, var in nnx.to_flat_state(nnx.state(model, LoRAParam))}
  for path, var in flat.items():
    value = var.get_value()
    if isinstance(value, jax.Array):
      continue
    base = _base_of_adapter(path)
    if path.endswith("lora_a"):
      make = lambda base=base, shape=value.shape: adapter_init(base, shape, shape, seed)[0]
    else:
      make = lambda shape=value.shape: jnp.zeros(shape, jnp.float32)
    var.set_value(jax.jit(make, out_shardings=value.sharding)())
  return model


def _base_of_adapter(path: str) -> str:
  if path.endswith(".lora_a") or path.endswith(".lora_b"):
    return path[:-len(".lora_a")] + ".kernel"
  return path[:-len("_lora_a")]


def set_deterministic(model: nnx.Module, deterministic: bool = True) -> nnx.Module:
  """Turns LoRA dropout off (True, for evaluation) or back on; returns the model."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, LoRALinear):
      node.deterministic = bool(deterministic)
  return model


def check_config(lora_cfg: Any) -> None:
  """The section's value checks (a ValueError naming the key)."""
  rank = lora_cfg.rank
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
    raise ValueError(f"lora.rank must be an int >= 0 (0 = off), got {rank!r}")
  if not float(lora_cfg.alpha) > 0:
    raise ValueError(f"lora.alpha must be positive, got {lora_cfg.alpha!r}")
  if not 0.0 <= float(lora_cfg.dropout) < 1.0:
    raise ValueError(f"lora.dropout must be in [0, 1), got {lora_cfg.dropout!r}")
  if lora_cfg.quantize_base not in QUANTIZE_BASE:
    raise ValueError(f"lora.quantize_base must be one of {list(QUANTIZE_BASE)}, got "
                     f"{lora_cfg.quantize_base!r}")
  compile_targets(tuple(lora_cfg.targets))


def check_dropout(paths: Sequence[str], lora_cfg: Any) -> None:
  """Expert adapters are merged into the grouped matmul and take no dropout: a recipe asking
  for both is told so."""
  experts = [p for p in paths if not p.endswith(".kernel")]
  if float(lora_cfg.dropout) > 0 and experts:
    raise ValueError(f"lora.dropout > 0 does not apply to expert adapters (merged into the "
                     f"grouped expert matmul): {experts[0]}; set lora.dropout=0 or leave the "
                     "experts out of lora.targets")

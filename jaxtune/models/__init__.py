"""Model families, looked up by `model.type`, and builders that place params where they live.

A family is a module defining:
  MODEL_CLASS                 the NNX causal-LM class, built as `MODEL_CLASS(cfg, ..., rngs=)`;
  hf_weight_map(cfg)          the HF tensor-name table (tuple of `HFWeight`), used by both
                              `jaxtune.hf.load` and `jaxtune.hf.export`;
  hf_config(cfg, dtype)       the HF `config.json` dict for an export.

JAX is imported inside the functions so `import jaxtune.models.presets` (and so
`import jaxtune.config`) stays light.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
  import jax
  from flax import nnx
  from ml_collections import ConfigDict

# model.type -> module; a new family is one line here (qwen3_moe and intern_s1 come next).
_FAMILIES: dict[str, str] = {
    "qwen3": "jaxtune.models.qwen3",
}


class HFWeight(NamedTuple):
  """One row of a family's HF name table.

  hf_name:   the HF tensor name; "{i}" stands for the layer index of a stacked layer param.
  path:      our nnx state path, dot-joined ("model.layers.self_attn.q_proj.kernel"); None
             for a tensor HF files may hold that we neither need nor write (a tied head).
  transpose: HF stores Linear weights [out, in], we store kernels [in, out].
  """
  hf_name: str
  path: str | None
  transpose: bool = False

  @property
  def stacked(self) -> bool:
    """Whether our param has a leading layer axis L that HF spreads over L tensors."""
    return "{i}" in self.hf_name


def family(model_type: str) -> ModuleType:
  """The module implementing `model_type`; a clear error for an unknown type."""
  if model_type not in _FAMILIES:
    raise ValueError(f"unknown model type {model_type!r}; jaxtune implements "
                     f"{sorted(_FAMILIES)}")
  return importlib.import_module(_FAMILIES[model_type])


def _builder(model_cfg: ConfigDict, param_dtype: Any, compute_dtype: Any, remat: str,
             attention: str, seed: int):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  model_class = family(model_cfg.type).MODEL_CLASS

  def build() -> nnx.Module:
    return model_class(model_cfg, param_dtype=jnp.dtype(param_dtype),
                       compute_dtype=jnp.dtype(compute_dtype), remat=remat,
                       attention=attention, rngs=nnx.Rngs(seed))
  return build


def _abstract_split(build) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state of ShapeDtypeStructs) of `build()`, computing nothing.

  `jax.eval_shape` over the state rather than `nnx.eval_shape`: under `jax.set_mesh` the
  latter turns our logical axis names into mesh shardings and fails on "vocab" etc.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  graphdefs = []

  def init_state():
    graphdef, state = nnx.split(build())
    graphdefs.append(graphdef)  # static structure, no tracers: safe to take out of the trace
    return state
  abstract_state = jax.eval_shape(init_state)
  return graphdefs[0], abstract_state


def create_model(model_cfg: ConfigDict, mesh: jax.sharding.Mesh, *, param_dtype: Any = "float32",
                 compute_dtype: Any = "bfloat16", remat: str = "full", attention: str = "xla",
                 seed: int = 0) -> nnx.Module:
  """A randomly initialised model whose params are born in their target sharding.

  The init runs under `jax.jit(out_shardings=...)`, so each device only ever materialises
  its own shard; nothing is built whole on one device first.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from jaxtune.parallel.sharding import param_shardings  # pylint: disable=import-outside-toplevel

  build = _builder(model_cfg, param_dtype, compute_dtype, remat, attention, seed)
  graphdef, abstract_state = _abstract_split(build)
  shardings = param_shardings(abstract_state, mesh)
  state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def abstract_model(model_cfg: ConfigDict, mesh: jax.sharding.Mesh, *,
                   param_dtype: Any = "float32", compute_dtype: Any = "bfloat16",
                   remat: str = "full", attention: str = "xla", seed: int = 0) -> nnx.Module:
  """The model with every param a `jax.ShapeDtypeStruct` carrying its target sharding.

  Nothing is allocated: fill it with `jaxtune.hf.load_hf_weights` or an orbax restore.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from jaxtune.parallel.sharding import param_shardings  # pylint: disable=import-outside-toplevel

  build = _builder(model_cfg, param_dtype, compute_dtype, remat, attention, seed)
  graphdef, abstract_state = _abstract_split(build)
  shardings = param_shardings(abstract_state, mesh)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
  return nnx.merge(graphdef, abstract_state)


def param_count(model_cfg: ConfigDict) -> int:
  """Number of parameters, from shapes alone (eval_shape: no memory, no compute)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  _, abstract_state = _abstract_split(_builder(model_cfg, "float32", "float32", "none", "xla", 0))
  params = nnx.filter_state(abstract_state, nnx.Param)
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


__all__ = ["HFWeight", "abstract_model", "create_model", "family", "param_count"]

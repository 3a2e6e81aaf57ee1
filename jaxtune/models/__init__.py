"""Model families: the one seam between a model and the generic trainer, data, loader and
exporter.

A family (`model.type`) is one package, `jaxtune/models/<family>/` (model, presets, HF name
table and config), registered by one line in `jaxtune.models.presets.FAMILIES`. `train/`,
`data/`, `hf/` and `config` reach a model only through what its package exports: the
`ModelFamily` Protocol (jaxtune/models/family.py), checked for every registered family by
tests/test_model_families.py. Shared layer code (stacking, scan, remat, norm modules) is in
`jaxtune.models.layers`.

Sub-models: a family may wrap another's model (Intern-S1 wraps Qwen3 / Qwen3-MoE as
`language_model`): decoders expose `forward_embeddings(x_btd, batch)` next to `forward`, and
name tables compose with `HFWeight.with_prefix`.

HF in and out: `jaxtune.hf` knows no family; `load_hf_weights` and `export_hf` here pass it
the registered family of the model config.
"""

from __future__ import annotations

import importlib
import math
from typing import TYPE_CHECKING, Any, NamedTuple

from jaxtune.hf.weights import HFWeight, Transform
from jaxtune.models.family import ModelFamily

if TYPE_CHECKING:
  import jax
  from flax import nnx
  from ml_collections import ConfigDict


class ForwardOutput(NamedTuple):
  """What a model's `forward(batch)` gives the loss.

  hidden:     [B, T, D] final hidden states; the LM loss applies `lm_head_kernel()` to them.
  aux_losses: name -> scalar; the objective adds coefficient x value (`aux_loss_coefficients`).
  stats:      name -> array, summed over micro-batches, then `step_metrics` makes scalars.
  """
  hidden: Any
  aux_losses: dict = {}
  stats: dict = {}


def family(model_type: str) -> ModelFamily:
  """The package implementing `model_type`; a clear error for an unknown type."""
  from jaxtune.models.presets import FAMILIES  # pylint: disable=import-outside-toplevel
  if model_type not in FAMILIES:
    raise ValueError(f"unknown model type {model_type!r}; jaxtune implements "
                     f"{sorted(FAMILIES)}")
  return importlib.import_module(FAMILIES[model_type].module)


def text_batch_layout(rows: int, length: int) -> dict[str, tuple[tuple[int, ...], str]]:
  """The packed-text batch every decoder family reads: [rows, length] int32 arrays."""
  return {key: ((rows, length), "int32")
          for key in ("input_ids", "labels", "segment_ids", "positions")}


def trainable_filter(model_cfg: ConfigDict, lora: ConfigDict | None = None):
  """The nnx filter of the params that train: with a `lora` section of rank > 0 the adapters
  (`lora.LoRAParam`) only, else the family's, restricted to `nnx.Param`. A model built with
  adapters carries its section as `model.lora_config`."""
  from jaxtune.models import lora as lora_lib  # pylint: disable=import-outside-toplevel
  return lora_lib.trainable_filter(family(model_cfg.type), model_cfg, lora)


def _builder(model_cfg: ConfigDict, param_dtype: Any, compute_dtype: Any, remat: str,
             attention: str, seed: int, lora: ConfigDict | None = None):
  """A function building the model; with `lora` (rank > 0) the base is stored in the compute
  dtype (frozen: no master weights) and adapters are attached to the targeted linears."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from jaxtune.models import lora as lora_lib  # pylint: disable=import-outside-toplevel

  fam = family(model_cfg.type)
  model_class = fam.MODEL_CLASS
  base_dtype = lora_lib.base_param_dtype(param_dtype, compute_dtype, lora)
  targets = ()
  if lora_lib.enabled(lora):
    targets = lora_lib.check_targets(fam, model_cfg, tuple(lora.targets))
    lora_lib.check_dropout(targets, lora)

  def build() -> nnx.Module:
    model = model_class(model_cfg, param_dtype=base_dtype,
                        compute_dtype=jnp.dtype(compute_dtype), remat=remat,
                        attention=attention, rngs=nnx.Rngs(seed))
    if targets:
      with nnx.use_eager_sharding(False):
        lora_lib.attach(model, targets, lora, seed)
    return model
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
                 seed: int = 0, lora: ConfigDict | None = None) -> nnx.Module:
  """A randomly initialised model whose params are born in their target sharding.

  The init runs under `jax.jit(out_shardings=...)`, so each device only ever materialises
  its own shard; nothing is built whole on one device first. lora: the recipe's `lora`
  section; with rank > 0 the targeted linears get adapters (jaxtune.models.lora).
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from jaxtune.parallel.sharding import param_shardings  # pylint: disable=import-outside-toplevel

  build = _builder(model_cfg, param_dtype, compute_dtype, remat, attention, seed, lora)
  graphdef, abstract_state = _abstract_split(build)
  shardings = param_shardings(abstract_state, mesh)
  state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def abstract_model(model_cfg: ConfigDict, mesh: jax.sharding.Mesh, *,
                   param_dtype: Any = "float32", compute_dtype: Any = "bfloat16",
                   remat: str = "full", attention: str = "xla", seed: int = 0,
                   lora: ConfigDict | None = None) -> nnx.Module:
  """The model with every param a `jax.ShapeDtypeStruct` carrying its target sharding.

  Nothing is allocated: fill it with `load_hf_weights` (which also initialises the LoRA
  adapters, if any) or an orbax restore. lora: as `create_model`'s.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from jaxtune.parallel.sharding import param_shardings  # pylint: disable=import-outside-toplevel

  build = _builder(model_cfg, param_dtype, compute_dtype, remat, attention, seed, lora)
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


def load_hf_weights(model: nnx.Module, hf_dir: str, seed: int = 0) -> nnx.Module:
  """`jaxtune.hf.load_hf_weights` with the model's registered family. A model with LoRA
  adapters: the base is filled from the checkpoint, and adapters still abstract get their
  init (from `seed`: the run's, as `create_model` would give them)."""
  from jaxtune.hf import load  # pylint: disable=import-outside-toplevel
  from jaxtune.models import lora  # pylint: disable=import-outside-toplevel
  with lora.adapters_detached(model):
    load.load_hf_weights(model, hf_dir, family(model.config.type))
  return lora.init_abstract_adapters(model, seed)


def export_hf(model: nnx.Module, model_cfg: ConfigDict, out_dir: str, **kwargs) -> str:
  """`jaxtune.hf.export_hf` (same keywords: dtype, tokenizer_path, source_dir,
  max_shard_bytes) with the config's registered family."""
  from jaxtune.hf import export  # pylint: disable=import-outside-toplevel
  return export.export_hf(model, model_cfg, out_dir, family(model_cfg.type), **kwargs)


__all__ = ["ForwardOutput", "HFWeight", "ModelFamily", "Transform", "abstract_model",
           "create_model", "export_hf", "family", "load_hf_weights", "param_count",
           "text_batch_layout", "trainable_filter"]

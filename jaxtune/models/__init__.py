"""Model families: the one seam between a model and the generic trainer, loader and exporter.

A family (`model.type`) is one module, registered in `jaxtune.models.presets.FAMILIES` beside
its presets. `train/`, `hf/` and `config` reach a model only through what it defines:

  MODEL_CLASS                 the NNX model, built as `MODEL_CLASS(cfg, ..., rngs=)`, with
      forward(batch) -> ForwardOutput    hidden states for the LM loss, auxiliary losses and
                                         per-step statistics;
      lm_head_kernel() -> [D, V]         the output projection the chunked loss applies;
      aux_loss_coefficients() -> dict    name -> coefficient of each auxiliary loss in the
                                         objective;
      step_metrics(stats) -> dict        the statistics, summed over the step's micro-batches,
                                         reduced to the scalars that go in metrics.jsonl.
  data_options(cfg)                the keyword arguments SFTData needs for this model's batches
                                   (an image model: its tile size and image token id);
  batch_layout(cfg, rows, length, max_tiles=0)
                                   name -> (shape, dtype) of every array of a global batch
                                   (max_tiles: the data's tiles-per-pack bound, 0 = no pixels);
  train_flops(cfg, batch)          model FLOPs of a training step on this (host) batch;
  trainable(cfg)                   an nnx filter of the params that train (the rest is frozen:
                                   no gradient, no optimizer state, no weight decay);
  hf_weight_map(cfg)               the HF tensor-name table (`HFWeight` rows), walked by both
                                   `jaxtune.hf.load` and `jaxtune.hf.export`;
  hf_config(cfg, dtype, source=None)
                                   the HF `config.json` dict written with an export (source:
                                   the loaded checkpoint's config.json, when there is one);
  config_from_hf(hf, hf_dir=None)  the recipe's `model` ConfigDict from a `config.json` dict
                                   and its directory (behind `presets.from_hf`).

Sub-models: a family may wrap another's model (Intern-S1 wraps Qwen3 / Qwen3-MoE as
`language_model`): decoders expose `forward_embeddings(x_btd, batch)` next to `forward`, and
name tables compose with `HFWeight.with_prefix`.

JAX is imported inside the functions so `import jaxtune.models.presets` (and so
`import jaxtune.config`) stays light.
"""

from __future__ import annotations

import importlib
import math
import string
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

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


class HFWeight(NamedTuple):
  """One row of a family's HF name table.

  hf_name:   the HF tensor name. Named indices ("{layer}", "{expert}") stand for the leading
             stacked axes of our param, in order: `model.layers.{layer}.mlp.experts.{expert}.
             up_proj.weight` is the [L, E, ...] param's element [l, e]. Stack sizes come from
             the param's shape, never from the config.
  path:      our nnx state path, dot-joined ("model.layers.self_attn.q_proj.kernel"); None
             for a tensor HF files may hold that we neither need nor write (a tied head).
  transpose: HF stores Linear weights [out, in], we store kernels [in, out].
  ids:       (index name, HF ids) pairs for a stacked axis whose positions are not HF's
             0..n-1: a stack holding only the MoE layers of a mixed model has ids (1, 3, ...).
  """
  hf_name: str
  path: str | None
  transpose: bool = False
  ids: tuple[tuple[str, tuple[int, ...]], ...] = ()

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

  def with_prefix(self, hf_prefix: str, path_prefix: str) -> HFWeight:
    """This row inside a sub-model: `model.language_model.` + name, `language_model.` + path."""
    return self._replace(hf_name=hf_prefix + self.hf_name,
                         path=None if self.path is None else path_prefix + self.path)


def _grid(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
  out = [()]
  for size in shape:
    out = [p + (i,) for p in out for i in range(size)]
  return out


def family(model_type: str) -> ModuleType:
  """The module implementing `model_type`; a clear error for an unknown type."""
  from jaxtune.models.presets import FAMILIES  # pylint: disable=import-outside-toplevel
  if model_type not in FAMILIES:
    raise ValueError(f"unknown model type {model_type!r}; jaxtune implements "
                     f"{sorted(FAMILIES)}")
  return importlib.import_module(FAMILIES[model_type].module)


def text_batch_layout(rows: int, length: int) -> dict[str, tuple[tuple[int, ...], str]]:
  """The packed-text batch every decoder family reads: [rows, length] int32 arrays."""
  return {key: ((rows, length), "int32")
          for key in ("input_ids", "labels", "segment_ids", "positions")}


def trainable_filter(model_cfg: ConfigDict):
  """The nnx filter of the params that train: the family's, restricted to `nnx.Param`."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return nnx.All(nnx.Param, family(model_cfg.type).trainable(model_cfg))


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


__all__ = ["ForwardOutput", "HFWeight", "abstract_model", "create_model", "family", "param_count",
           "text_batch_layout", "trainable_filter"]

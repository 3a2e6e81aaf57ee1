"""`ModelFamily`: the interface a model family (`model.type`) gives the generic trainer, data
pipeline, loader and exporter. A family is a package, `jaxtune/models/<family>/`, whose
`__init__.py` exports these names; `presets.FAMILIES` registers it and
tests/test_model_families.py checks every registered one against this Protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
  from ml_collections import ConfigDict

  from jaxtune.data.media import MediaSpec
  from jaxtune.hf.weights import HFWeight


@runtime_checkable
class ModelFamily(Protocol):
  """The names a family package exports.

  MODEL_TYPE                  its `model.type` (the registry key);
  MODEL_CLASS                 the NNX model, built as `MODEL_CLASS(cfg, *, param_dtype,
                              compute_dtype, remat, attention, rngs)`, with
      forward(batch) -> ForwardOutput    hidden states for the LM loss, auxiliary losses and
                                         per-step statistics;
      lm_head_kernel() -> [D, V]         the output projection the chunked loss applies;
      aux_loss_coefficients() -> dict    name -> coefficient of each auxiliary loss;
      step_metrics(stats) -> dict        the statistics, summed over the step's micro-batches,
                                         reduced to the scalars that go in metrics.jsonl;
  HF_MODEL_TYPES              the `model_type` values of the HF config.json files it reads;
  RECIPE_ONLY                 fields that are training choices, not architecture: a recipe may
                              set them whatever `load_from`'s config.json says;
  presets                     its preset functions (a module; `jaxtune.models.presets`
                              re-exports them);
  defaults()                  a preset holding every field: recipes are checked against it;
  media(cfg)                  how images enter its batches (`jaxtune.data.media.MediaSpec`:
                              tile size, tokens per tile, image token), None for a text model;
  batch_layout(cfg, rows, length, max_tiles=0)
                              name -> (shape, dtype) of every array of a global batch
                              (max_tiles: the data's tiles-per-pack bound, 0 = no pixels);
  train_flops(cfg, batch)     model FLOPs of a training step on this (host) batch;
  trainable(cfg)              an nnx filter of the params that train (the rest is frozen: no
                              gradient, no optimizer state, no weight decay);
  hf_weight_map(cfg)          the HF tensor-name table (`jaxtune.hf.HFWeight` rows), walked by
                              both `jaxtune.hf.load` and `jaxtune.hf.export`;
  hf_config(cfg, dtype, source=None)
                              the HF `config.json` dict written with an export (source: the
                              loaded checkpoint's config.json, when there is one);
  config_from_hf(hf, hf_dir=None)
                              the recipe's `model` ConfigDict from a `config.json` dict and its
                              directory (behind `presets.from_hf`).
  """
  MODEL_TYPE: str
  MODEL_CLASS: type
  HF_MODEL_TYPES: tuple[str, ...]
  RECIPE_ONLY: tuple[str, ...]
  presets: ModuleType
  defaults: Callable[[], ConfigDict]

  def media(self, cfg: ConfigDict) -> MediaSpec | None: ...

  def batch_layout(self, cfg: ConfigDict, rows: int, length: int,
                   max_tiles: int = 0) -> dict[str, tuple[tuple[int, ...], str]]: ...

  def train_flops(self, cfg: ConfigDict, batch: dict) -> float: ...

  def trainable(self, cfg: ConfigDict) -> Any: ...

  def hf_weight_map(self, cfg: ConfigDict) -> tuple[HFWeight, ...]: ...

  def hf_config(self, cfg: ConfigDict, dtype: str, source: dict | None = None) -> dict: ...

  def config_from_hf(self, hf: dict, hf_dir: str | None = None) -> ConfigDict: ...


# What the NNX model class of a family defines (checked by tests/test_model_families.py).
MODEL_METHODS = ("forward", "lm_head_kernel", "aux_loss_coefficients", "step_metrics")


def with_fields(family_name: str, base: dict, fields: dict) -> ConfigDict:
  """A preset: `base` (every field of the family) with `fields` over it; an unknown field is
  an error naming the family's fields."""
  # pylint: disable-next=import-outside-toplevel,redefined-outer-name
  from ml_collections import ConfigDict
  unknown = set(fields) - set(base)
  if unknown:
    raise ValueError(f"unknown {family_name} config fields {sorted(unknown)}; known: "
                     f"{sorted(base)}")
  return ConfigDict({**base, **fields})

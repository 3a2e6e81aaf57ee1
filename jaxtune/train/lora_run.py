"""A LoRA run (`lora.rank > 0`) in the trainer: the base from `load_from`, the adapters fresh
or from `lora.init_from`, checkpoints of the adapters alone, the exports' adapter map.

Checkpoints: with LoRA only the adapters train, so a checkpoint's `state` item holds the
adapters alone (the frozen base is never written; its optimizer state does not exist), next to
their optimizer state, the progress and the recipe; the progress records the base
(`base: {load_from, quantize_base}`). A restore rebuilds the base the way the run started it
(`load_from`, quantised if `lora.quantize_base` asks) and puts the restored adapters on it, so
the following steps are those of an uninterrupted run.
"""

from __future__ import annotations

import logging

from flax import nnx
from ml_collections import ConfigDict

from jaxtune import models
from jaxtune.hf import peft
from jaxtune.models import lora
from jaxtune.train.hf_exports import LoRAExport
from jaxtune.train.step import ModelDef, TrainState

log = logging.getLogger(__name__)


def enabled(cfg: ConfigDict) -> bool:
  """Whether the recipe trains LoRA adapters."""
  return lora.enabled(cfg.get("lora"))


def adapter_map(cfg: ConfigDict) -> dict[str, tuple[str, str]]:
  """Base param path -> (A path, B path) of every adapted weight of the recipe's model."""
  family = models.family(cfg.model.type)
  return {path: lora.adapter_paths(path)
          for path in lora.lora_targets(family, cfg.model, tuple(cfg.lora.targets))}


def export_spec(cfg: ConfigDict) -> LoRAExport | None:
  """What the HF exporter needs for the merged model and the PEFT adapter; None without LoRA."""
  if not enabled(cfg):
    return None
  return LoRAExport(adapters=adapter_map(cfg), rank=int(cfg.lora.rank),
                    alpha=float(cfg.lora.alpha), dropout=float(cfg.lora.dropout),
                    base=cfg.load_from)


def base_reference(cfg: ConfigDict) -> dict:
  """What a checkpoint records of the base it does not hold."""
  return dict(load_from=cfg.load_from, quantize_base=cfg.lora.quantize_base,
              model_type=cfg.model.type)


def start_model(cfg: ConfigDict, run, model_kwargs: dict, *, init_adapters: bool = True):
  """The model of a LoRA run before its first step: the base from `load_from` (random from the
  seed without it; quantised as the model builds it), the adapters PEFT-initialised, then
  overwritten from `lora.init_from` when set (init_adapters=False: left as they are, a
  restore fills them)."""
  if cfg.load_from:
    model = run.abstract_model()
    with lora.adapters_detached(model):  # the checkpoint holds the base alone
      models.load_hf_weights(model, cfg.load_from)
    lora.init_abstract_adapters(model, cfg.seed)  # as create_model's, from the run's seed
  else:
    model = models.create_model(cfg.model, run.mesh, **model_kwargs)
  if init_adapters and cfg.lora.init_from:
    table = models.family(cfg.model.type).hf_weight_map(cfg.model)
    peft.read_adapter(model, cfg.lora.init_from, table, adapter_map(cfg))
    log.info("LoRA adapters loaded from %s", cfg.lora.init_from)
  return model


def saved_state(model_def: ModelDef, state: TrainState) -> TrainState:
  """The part of the train state a LoRA checkpoint holds: the adapters (not the base)."""
  adapters, _ = model_def.split_trainable(state.params)
  return state._replace(params=adapters)


def restore_target(model_def: ModelDef, abstract_state: TrainState) -> TrainState:
  """The abstract state a LoRA checkpoint restores into."""
  return saved_state(model_def, abstract_state)


def with_base(model_def: ModelDef, adapters, model) -> nnx.State:
  """Restored adapters on the rebuilt base: the full params of the train state."""
  _, params = nnx.split(model, nnx.Param, ...)[:2]
  _, frozen = model_def.split_trainable(params)
  return nnx.merge_state(adapters, frozen)

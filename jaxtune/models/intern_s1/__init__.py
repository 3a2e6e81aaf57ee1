"""The Intern-S1 / InternVL family (`model.type = "intern_s1"`): the
`jaxtune.models.ModelFamily` interface.

  vision.py   the InternViT tower, pixel shuffle and projector (HF's `modeling_internvl.py`);
  model.py    the whole model: tower -> projector -> image features merged into the text
              family's (Qwen3 / Qwen3-MoE) embeddings; MODEL_CLASS;
  presets.py  Intern-S1, Intern-S1-mini, InternVL3.5 and a miniature;
  hf.py       the HF name table (three layouts), the config.json an export writes and the
              preset read from a checkpoint.
"""

from __future__ import annotations

import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from jaxtune.data.media import MediaSpec
from jaxtune.models import family, text_batch_layout
from jaxtune.models.intern_s1 import presets, vision
from jaxtune.models.intern_s1.hf import config_from_hf, hf_config, hf_weight_map
from jaxtune.models.intern_s1.model import (HF_LAYOUTS, MODEL_CLASS, TEXT_TYPES,
                                            InternS1ForConditionalGeneration, check_config, pair,
                                            projector_in_features, tokens_per_tile)
from jaxtune.models.intern_s1.presets import defaults

MODEL_TYPE = "intern_s1"
HF_MODEL_TYPES = ("interns1", "internvl")
# Freezing and the text model's router loss coefficients are training choices.
RECIPE_ONLY = ("freeze_vision", "freeze_projector", "freeze_language", "router_aux_loss_coef",
               "router_z_loss_coef")


def media(cfg: ConfigDict) -> MediaSpec:
  """How images enter this model's batches: square tiles of the tower's native size, each
  `tokens_per_tile` image-context tokens in the text."""
  return MediaSpec(tile_size=pair(cfg.vision.image_size)[0], tokens_per_tile=tokens_per_tile(cfg),
                   image_token_id=int(cfg.image_token_id), channels=int(cfg.vision.num_channels))


def batch_layout(cfg: ConfigDict, rows: int, length: int, max_tiles: int = 0) -> dict:
  layout = text_batch_layout(rows, length)
  if max_tiles:
    height, width = pair(cfg.vision.image_size)
    layout["pixel_values"] = ((rows, max_tiles, height, width, cfg.vision.num_channels),
                              "uint8")
    layout["tile_segment_ids"] = ((rows, max_tiles), "int32")
  return layout


def vision_flops_per_tile(cfg: ConfigDict) -> float:
  """Forward FLOPs of the tower and projector on one tile (non-causal attention: all pairs)."""
  v = cfg.vision
  height, width = pair(v.image_size)
  patch = pair(v.patch_size)
  tokens = (height // patch[0]) * (width // patch[1]) + 1
  d, f = v.hidden_size, v.intermediate_size
  per_layer = 2 * tokens * (4 * d * d + 2 * d * f) + 4 * tokens * tokens * d
  patch_embed = 2 * (tokens - 1) * d * v.num_channels * patch[0] * patch[1]
  projector = 2 * tokens_per_tile(cfg) * (projector_in_features(cfg) * cfg.text.hidden_size
                                          + cfg.text.hidden_size ** 2)
  return v.num_hidden_layers * per_layer + patch_embed + projector


def train_flops(cfg: ConfigDict, batch: dict) -> float:
  """The text model's FLOPs plus the vision side's on the batch's tiles: forward and backward
  (3x) for what trains, the forward alone for a frozen part."""
  text = family(cfg.text.type).train_flops(cfg.text, batch)
  if "tile_segment_ids" not in batch:
    return text
  tiles = float(np.count_nonzero(np.asarray(batch["tile_segment_ids"])))
  return text + tiles * vision_flops_per_tile(cfg) * (1 if cfg.freeze_vision else 3)


def trainable(cfg: ConfigDict):
  """Everything but the frozen parts (XTuner's freeze_vision / freeze_projector /
  freeze_language)."""
  frozen = [name for name, flag in (("vision_tower", cfg.freeze_vision),
                                    ("multi_modal_projector", cfg.freeze_projector),
                                    ("language_model", cfg.freeze_language)) if flag]
  if not frozen:
    return nnx.Param
  return nnx.All(nnx.Param, nnx.Not(nnx.Any(*(nnx.PathContains(n) for n in frozen))))


__all__ = ["HF_LAYOUTS", "HF_MODEL_TYPES", "MODEL_CLASS", "MODEL_TYPE", "RECIPE_ONLY",
           "TEXT_TYPES", "InternS1ForConditionalGeneration", "batch_layout", "check_config",
           "config_from_hf", "defaults", "hf_config", "hf_weight_map", "media", "presets",
           "projector_in_features", "tokens_per_tile", "train_flops", "trainable", "vision",
           "vision_flops_per_tile"]

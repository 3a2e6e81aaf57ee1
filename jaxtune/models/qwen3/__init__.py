"""The Qwen3 dense family (`model.type = "qwen3"`): the `jaxtune.models.ModelFamily` interface.

  model.py    the NNX decoder (HF's `modeling_qwen3.py`), MODEL_CLASS;
  presets.py  the official configs and a miniature;
  hf.py       the HF name table, the config.json an export writes and the preset read from one.
"""

from __future__ import annotations

from flax import nnx
from ml_collections import ConfigDict

from jaxtune.data.media import MediaSpec
from jaxtune.models import text_batch_layout
from jaxtune.models.flops import decoder_train_flops
# The decoder's remat choices are the shared ones (jaxtune.models.layers).
from jaxtune.models.layers import REMAT, check_remat
from jaxtune.models.qwen3 import presets
from jaxtune.models.qwen3.hf import config_from_hf, hf_config, hf_weight_map
from jaxtune.models.qwen3.model import (MODEL_CLASS, Qwen3Attention, Qwen3DecoderLayer,
                                        Qwen3ForCausalLM, Qwen3MLP, Qwen3Model, Qwen3RMSNorm,
                                        make_embedding)
from jaxtune.models.qwen3.presets import defaults

MODEL_TYPE = "qwen3"
HF_MODEL_TYPES = ("qwen3",)
RECIPE_ONLY = ()


def media(cfg: ConfigDict) -> MediaSpec | None:
  """Text batches: no images."""
  del cfg
  return None


def batch_layout(cfg: ConfigDict, rows: int, length: int, max_tiles: int = 0) -> dict:
  del cfg, max_tiles  # a text model reads no pixels
  return text_batch_layout(rows, length)


def matmul_params_per_token(cfg: ConfigDict) -> int:
  """Parameters in a matmul per token: attention, MLP, LM head (embedding lookup excluded)."""
  d, h = cfg.hidden_size, cfg.head_dim
  attn = d * h * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
  return cfg.num_hidden_layers * (attn + 3 * d * cfg.intermediate_size) + d * cfg.vocab_size


def train_flops(cfg: ConfigDict, batch: dict) -> float:
  return decoder_train_flops(matmul_params_per_token(cfg), cfg, batch["segment_ids"])


def trainable(cfg: ConfigDict):
  """Every param trains (full fine-tuning)."""
  del cfg
  return nnx.Param


__all__ = ["HF_MODEL_TYPES", "MODEL_CLASS", "MODEL_TYPE", "RECIPE_ONLY", "REMAT", "Qwen3Attention",
           "Qwen3DecoderLayer", "Qwen3ForCausalLM", "Qwen3MLP", "Qwen3Model", "Qwen3RMSNorm",
           "batch_layout", "check_remat", "config_from_hf", "defaults", "hf_config",
           "hf_weight_map", "make_embedding", "matmul_params_per_token", "media", "presets",
           "train_flops", "trainable"]

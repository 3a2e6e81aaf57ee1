"""The Qwen3-MoE family (`model.type = "qwen3_moe"`): the `jaxtune.models.ModelFamily`
interface.

  model.py    the NNX decoder (HF's `modeling_qwen3_moe.py`): Qwen3's attention, sparse
              SwiGLU experts through jaxtune.ops.moe, the router losses; MODEL_CLASS;
  presets.py  the official configs and a miniature;
  hf.py       the HF name table, the config.json an export writes and the preset read from one.
"""

from __future__ import annotations

from flax import nnx
from ml_collections import ConfigDict

from jaxtune.models.flops import decoder_train_flops
from jaxtune.models.qwen3 import batch_layout, media  # text batches, as Qwen3's
from jaxtune.models.qwen3_moe import presets
from jaxtune.models.qwen3_moe.hf import config_from_hf, hf_config, hf_weight_map
from jaxtune.models.qwen3_moe.model import (MODEL_CLASS, Qwen3MoeDecoderLayer, Qwen3MoeExperts,
                                            Qwen3MoeForCausalLM, Qwen3MoeModel,
                                            Qwen3MoeSparseMoeBlock, dense_layer_ids,
                                            sparse_layer_ids)
from jaxtune.models.qwen3_moe.presets import defaults

MODEL_TYPE = "qwen3_moe"
HF_MODEL_TYPES = ("qwen3_moe",)
# The router loss coefficients are training choices (XTuner's), whatever config.json says.
RECIPE_ONLY = ("router_aux_loss_coef", "router_z_loss_coef")


def matmul_params_per_token(cfg: ConfigDict) -> int:
  """Parameters one token meets in matmuls: attention in every layer, the dense MLPs, and in
  sparse layers the router plus its top-k experts; the LM head."""
  d, h = cfg.hidden_size, cfg.head_dim
  attn = d * h * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
  sparse = len(sparse_layer_ids(cfg))
  dense = cfg.num_hidden_layers - sparse
  experts = d * cfg.num_experts + cfg.num_experts_per_tok * 3 * d * cfg.moe_intermediate_size
  return (cfg.num_hidden_layers * attn + dense * 3 * d * cfg.intermediate_size
          + sparse * experts + d * cfg.vocab_size)


def train_flops(cfg: ConfigDict, batch: dict) -> float:
  return decoder_train_flops(matmul_params_per_token(cfg), cfg, batch["segment_ids"])


def trainable(cfg: ConfigDict):
  """Every param trains (full fine-tuning)."""
  del cfg
  return nnx.Param


__all__ = ["HF_MODEL_TYPES", "MODEL_CLASS", "MODEL_TYPE", "RECIPE_ONLY", "Qwen3MoeDecoderLayer",
           "Qwen3MoeExperts", "Qwen3MoeForCausalLM", "Qwen3MoeModel", "Qwen3MoeSparseMoeBlock",
           "batch_layout", "config_from_hf", "defaults", "dense_layer_ids", "hf_config",
           "hf_weight_map", "matmul_params_per_token", "media", "presets", "sparse_layer_ids",
           "train_flops", "trainable"]

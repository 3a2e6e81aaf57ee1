"""Qwen3-MoE presets: the official HF `config.json` values as ConfigDicts (HF's
`Qwen3MoeConfig` field names), plus a miniature for the CPU demo and tests.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from jaxtune.models.family import with_fields


def _qwen3_moe(**fields) -> ConfigDict:
  """Qwen3-MoE: Qwen3's attention, sparse SwiGLU experts (HF `Qwen3MoeConfig` field names)."""
  base = dict(
      type="qwen3_moe",
      vocab_size=151936,
      hidden_size=2048,
      intermediate_size=6144,        # the dense MLP of layers in mlp_only_layers
      moe_intermediate_size=768,
      num_hidden_layers=48,
      num_attention_heads=32,
      num_key_value_heads=4,
      head_dim=128,
      num_experts=128,
      num_experts_per_tok=8,
      norm_topk_prob=True,
      decoder_sparse_step=1,
      mlp_only_layers=(),
      router_aux_loss_coef=0.001,
      router_z_loss_coef=0.0,        # jaxtune's (XTuner's z_loss_cfg); not in HF's config
      max_position_embeddings=40960,
      rope_theta=1_000_000.0,
      # None: plain RoPE; dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=
      # 32768) is YaRN, Qwen3's way to 131,072 tokens (jaxtune.ops.rope)
      rope_scaling=None,
      rms_norm_eps=1e-6,
      tie_word_embeddings=False,
  )
  return with_fields("Qwen3-MoE", base, fields)


def qwen3_moe_tiny(**overrides) -> ConfigDict:
  """A miniature Qwen3-MoE (8 experts, top-2, one dense layer) for the CPU demo and tests."""
  return _qwen3_moe(**{**dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, num_experts=8, num_experts_per_tok=2,
                              mlp_only_layers=(1,)), **overrides})


def qwen3_30b_a3b(**overrides) -> ConfigDict:
  """Qwen/Qwen3-30B-A3B."""
  return _qwen3_moe(**overrides)


def qwen3_235b_a22b(**overrides) -> ConfigDict:
  """Qwen/Qwen3-235B-A22B."""
  return _qwen3_moe(**{**dict(hidden_size=4096, intermediate_size=12288,
                              moe_intermediate_size=1536, num_hidden_layers=94,
                              num_attention_heads=64), **overrides})


# Every field of the family, at the official values: recipes are checked against it.
defaults = qwen3_30b_a3b

"""Qwen3 presets: the official HF `config.json` values as ConfigDicts (HF's field names), plus
a miniature for the CPU demo and tests. Any field can be overridden:
`qwen3_8b(num_hidden_layers=16)`.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from jaxtune.models.family import with_fields


def _qwen3(**fields) -> ConfigDict:
  base = dict(
      type="qwen3",
      vocab_size=151936,
      hidden_size=1024,
      intermediate_size=3072,
      num_hidden_layers=28,
      num_attention_heads=16,
      num_key_value_heads=8,
      head_dim=128,
      max_position_embeddings=40960,
      rope_theta=1_000_000.0,
      # None: plain RoPE; dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=
      # 32768) is YaRN, Qwen3's way to 131,072 tokens (jaxtune.ops.rope)
      rope_scaling=None,
      rms_norm_eps=1e-6,
      tie_word_embeddings=False,
  )
  return with_fields("Qwen3", base, fields)


def qwen3_tiny(**overrides) -> ConfigDict:
  """A miniature Qwen3 (same code, tiny dims) for the CPU demo and tests; the real vocab."""
  return _qwen3(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          tie_word_embeddings=True), **overrides})


def qwen3_0_6b(**overrides) -> ConfigDict:
  """Qwen/Qwen3-0.6B."""
  return _qwen3(**{**dict(tie_word_embeddings=True), **overrides})


def qwen3_1_7b(**overrides) -> ConfigDict:
  """Qwen/Qwen3-1.7B."""
  return _qwen3(**{**dict(hidden_size=2048, intermediate_size=6144, tie_word_embeddings=True),
                   **overrides})


def qwen3_4b(**overrides) -> ConfigDict:
  """Qwen/Qwen3-4B."""
  return _qwen3(**{**dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                          num_attention_heads=32, tie_word_embeddings=True), **overrides})


def qwen3_4b_2507(**overrides) -> ConfigDict:
  """Qwen/Qwen3-4B-Instruct-2507 / -Thinking-2507: the 4B refresh, rope_theta 5e6 and 262,144
  positions. XTuner's `Qwen3Dense4BConfig` is this one."""
  return qwen3_4b(**{**dict(rope_theta=5_000_000.0, max_position_embeddings=262144),
                     **overrides})


def qwen3_8b(**overrides) -> ConfigDict:
  """Qwen/Qwen3-8B."""
  return _qwen3(**{**dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                          num_attention_heads=32), **overrides})


def qwen3_14b(**overrides) -> ConfigDict:
  """Qwen/Qwen3-14B."""
  return _qwen3(**{**dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                          num_attention_heads=40), **overrides})


def qwen3_32b(**overrides) -> ConfigDict:
  """Qwen/Qwen3-32B."""
  return _qwen3(**{**dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                          num_attention_heads=64), **overrides})


# Every field of the family, at the official values: recipes are checked against it.
defaults = qwen3_0_6b

"""Each Qwen3 preset builds a model with exactly the published number of parameters."""

import pytest
import torch
import transformers

from jaxtune.models import param_count, presets

# Model cards (huggingface.co/Qwen/<name>): total and non-embedding parameters, billions.
PUBLISHED = {
    "qwen3_0_6b": (0.6, 0.44),
    "qwen3_1_7b": (1.7, 1.4),
    "qwen3_4b": (4.0, 3.6),
    "qwen3_4b_2507": (4.0, 3.6),
    "qwen3_8b": (8.2, 6.95),
    "qwen3_14b": (14.8, 13.2),
    "qwen3_32b": (32.8, 31.2),
}


def _formula(c) -> int:
  """Qwen3 parameters from the architecture: embedding (+ untied head), per layer q/k/v/o,
  q/k norms, 2 layer norms, SwiGLU MLP; final norm."""
  d, f, h = c.hidden_size, c.intermediate_size, c.head_dim
  q_out, kv_out = c.num_attention_heads * h, c.num_key_value_heads * h
  per_layer = d * q_out + 2 * d * kv_out + q_out * d + 2 * h + 2 * d + 3 * d * f
  embeddings = c.vocab_size * d * (1 if c.tie_word_embeddings else 2)
  return embeddings + c.num_hidden_layers * per_layer + d


def _rounds_to(value: float, published: float) -> bool:
  """Whether `value` rounds to the card's figure at the card's precision (13.21 -> 13.2)."""
  decimals = len(repr(published).split(".")[1])
  return abs(value - published) <= 0.5 * 10**-decimals


def test_qwen3_0_6b_has_its_published_size():
  assert param_count(presets.qwen3_0_6b()) == 596_049_920


@pytest.mark.parametrize("name", sorted(PUBLISHED) + ["qwen3_tiny"])
def test_param_count_matches_formula_and_transformers(name):
  cfg = getattr(presets, name)()
  count = param_count(cfg)
  assert count == _formula(cfg)
  fields = {k: v for k, v in cfg.items() if k != "type"}
  with torch.device("meta"):  # shapes only: no memory even for 32B
    reference = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**fields))
  assert count == sum(p.numel() for p in reference.parameters())
  if name in PUBLISHED:
    total, non_embedding = PUBLISHED[name]
    embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    assert _rounds_to(count / 1e9, total)
    assert _rounds_to((count - embeddings) / 1e9, non_embedding)


def test_tied_and_untied_presets():
  for name in ("qwen3_0_6b", "qwen3_1_7b", "qwen3_4b"):
    assert getattr(presets, name)().tie_word_embeddings
  for name in ("qwen3_8b", "qwen3_14b", "qwen3_32b"):
    assert not getattr(presets, name)().tie_word_embeddings


def test_the_2507_refresh_differs_from_the_original_4b_only_in_rope_and_context():
  """XTuner's Qwen3Dense4BConfig (xtuner/v1/model/dense/qwen3.py): rope 5e6, 262,144 positions."""
  old, new = presets.qwen3_4b().to_dict(), presets.qwen3_4b_2507().to_dict()
  assert {k for k in old if old[k] != new[k]} == {"rope_theta", "max_position_embeddings"}
  assert new["rope_theta"] == 5e6 and new["max_position_embeddings"] == 262144

"""Intern-S1 / InternVL presets: the official checkpoints' `config.json` values as ConfigDicts
(nested `vision`, `projector`, `text`), plus a miniature for the CPU demo and tests. The text
models are the Qwen3 / Qwen3-MoE presets.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from jaxtune.models.family import with_fields
from jaxtune.models.qwen3.presets import qwen3_0_6b, qwen3_8b, qwen3_tiny
from jaxtune.models.qwen3_moe.presets import qwen3_235b_a22b, qwen3_30b_a3b


def _intern_vit(**fields) -> ConfigDict:
  """InternViT-300M, Intern-S1-mini's vision tower (HF `InternVLVisionConfig` field names)."""
  base = dict(
      hidden_size=1024,
      intermediate_size=4096,
      num_hidden_layers=24,
      num_attention_heads=16,
      attention_bias=True,
      use_qk_norm=False,
      norm_type="layer_norm",
      layer_norm_eps=1e-6,
      layer_scale_init_value=0.1,
      image_size=448,
      patch_size=14,
      num_channels=3,
      use_mean_pooling=True,     # True: no final LayerNorm (HF's naming)
      hidden_act="gelu",
  )
  return with_fields("InternViT", base, fields)


def _intern_s1(default_text: ConfigDict, default_vision: ConfigDict, **fields) -> ConfigDict:
  """Intern-S1 / InternVL: vision tower -> pixel shuffle -> projector -> Qwen3 (or -MoE)."""
  base = dict(
      type="intern_s1",
      text=default_text,
      vision=default_vision,
      projector=ConfigDict(dict(downsample_ratio=0.5, hidden_act="gelu")),
      image_token_id=152957,
      vision_feature_layer=-1,
      tie_word_embeddings=False,
      # How exports name tensors and config.json: internvl (transformers' own class, loadable
      # without custom code), internvl_legacy (its llava-style names) or interns1 (the official
      # checkpoints' custom-code config); from_hf keeps the checkpoint's.
      hf_layout="internvl",
      freeze_vision=False,       # training choices (not in config.json)
      freeze_projector=False,
      freeze_language=False,
  )
  cfg = with_fields("Intern-S1", base, fields)
  cfg.text.tie_word_embeddings = cfg.tie_word_embeddings  # one switch, HF's top-level one
  return cfg


def intern_s1_mini(**overrides) -> ConfigDict:
  """internlm/Intern-S1-mini: InternViT-300M + Qwen3-8B (vocab 153,216)."""
  return _intern_s1(qwen3_8b(vocab_size=153216), _intern_vit(), **overrides)


def intern_s1(**overrides) -> ConfigDict:
  """internlm/Intern-S1: InternViT-6B (RMSNorm, qk-norm, no q/k/v bias) + Qwen3-235B-A22B."""
  vision = _intern_vit(hidden_size=3200, intermediate_size=12800, num_hidden_layers=45,
                       num_attention_heads=25, attention_bias=False, use_qk_norm=True,
                       norm_type="rms_norm")
  return _intern_s1(qwen3_235b_a22b(vocab_size=153216), vision, **overrides)


def intern_s1_tiny(**overrides) -> ConfigDict:
  """A miniature Intern-S1-mini (the real architecture and 448-pixel tiles, tiny widths) for the
  CPU demo and tests. image_token_id is the bundled tokenizer's <IMG_CONTEXT>."""
  vision = _intern_vit(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2)
  return _intern_s1(qwen3_tiny(tie_word_embeddings=False), vision,
                    **{**dict(image_token_id=151671), **overrides})


def _internvl3_5(default_text: ConfigDict, **overrides) -> ConfigDict:
  """InternVL3.5 in transformers' format (OpenGVLab/InternVL3_5-*-HF: model_type "internvl",
  model.language_model.* tensor names, hf_layout "internvl"): Intern-S1-mini's InternViT-300M
  (1024 wide, 24 layers, LayerNorm, q/k/v bias, layer scale 0.1, no qk-norm; XTuner's
  `InternVLVisionConfig` defaults, 304,012,288 parameters in the -1B-HF checkpoint), 448-pixel
  tiles of 14-pixel patches, pixel shuffle 0.5 and a GELU projector (the original checkpoints'
  config.json: force_image_size 448, downsample_ratio 0.5), the last layer's features (XTuner's
  vision_feature_layer -1), untied embeddings, and <IMG_CONTEXT> = 151671 in Qwen3's 151,936
  vocabulary (<img> 151669, </img> 151670; XTuner's `InternVLBaseConfig.image_token_id`, and
  the ids of jaxtune's bundled tokenizer). XTuner: xtuner/v1/model/compose/internvl/
  internvl_config.py. The text models are the original checkpoints' `llm_config`s."""
  return _intern_s1(default_text, _intern_vit(),
                    **{**dict(image_token_id=151671), **overrides})


def internvl3_5_1b(**overrides) -> ConfigDict:
  """OpenGVLab/InternVL3_5-1B-HF: InternViT-300M + Qwen3-0.6B's dimensions with an untied
  lm_head (unlike Qwen3-0.6B: the checkpoint stores one, 751,632,384 language parameters, and
  XTuner's `Qwen3Dense0P6BConfig`, written for this checkpoint, says tie_word_embeddings=False,
  "the official one is False")."""
  return _internvl3_5(qwen3_0_6b(tie_word_embeddings=False), **overrides)


def internvl3_5_8b(**overrides) -> ConfigDict:
  """OpenGVLab/InternVL3_5-8B-HF: InternViT-300M + Qwen3-8B (XTuner's
  `InternVL3P5Dense8BConfig`)."""
  return _internvl3_5(qwen3_8b(), **overrides)


def internvl3_5_30b_a3b(**overrides) -> ConfigDict:
  """OpenGVLab/InternVL3_5-30B-A3B-HF: InternViT-300M + Qwen3-30B-A3B (XTuner's
  `InternVL3P5MoE30BA3Config`). XTuner builds that config's projector 2049 wide; the projector
  writes into the 2048-wide embeddings (transformers sizes it by text_config.hidden_size), so
  here it is 2048."""
  return _internvl3_5(qwen3_30b_a3b(), **overrides)


# Every field of the family, at the official values: recipes are checked against it.
defaults = intern_s1_mini

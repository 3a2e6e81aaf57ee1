"""Model presets: the official HF `config.json` values, as ml_collections ConfigDicts; the
registry of model families; and `from_hf`, the preset of any supported HF directory.

Field names are HF's, so a preset reads like the checkpoint's own config. Any field can be
overridden: `qwen3_8b(num_hidden_layers=16)`. `type` selects the model family.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from typing import NamedTuple

from ml_collections import ConfigDict


def _with_fields(family: str, base: dict, fields: dict) -> ConfigDict:
  unknown = set(fields) - set(base)
  if unknown:
    raise ValueError(f"unknown {family} config fields {sorted(unknown)}; known: {sorted(base)}")
  return ConfigDict({**base, **fields})


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
      rms_norm_eps=1e-6,
      tie_word_embeddings=False,
  )
  return _with_fields("Qwen3", base, fields)


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
      rms_norm_eps=1e-6,
      tie_word_embeddings=False,
  )
  return _with_fields("Qwen3-MoE", base, fields)


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
  return _with_fields("InternViT", base, fields)


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
  cfg = _with_fields("Intern-S1", base, fields)
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


class Family(NamedTuple):
  """A registered model family.

  module:          the module implementing it (see `jaxtune.models`);
  defaults:        a preset holding every field of the family: recipes are checked against it;
  hf_model_types:  the `model_type` values of the HF config.json files it reads;
  recipe_only:     fields that are training choices, not architecture: a recipe may set them
                   to anything whatever `load_from`'s config.json says.
  """
  module: str
  defaults: Callable[[], ConfigDict]
  hf_model_types: tuple[str, ...]
  recipe_only: tuple[str, ...] = ()


# model.type -> family. A new family is one entry here and one module.
FAMILIES: dict[str, Family] = {
    "qwen3": Family("jaxtune.models.qwen3", qwen3_0_6b, ("qwen3",)),
    "qwen3_moe": Family("jaxtune.models.qwen3_moe", qwen3_30b_a3b, ("qwen3_moe",),
                        recipe_only=("router_aux_loss_coef", "router_z_loss_coef")),
    "intern_s1": Family("jaxtune.models.intern_s1", intern_s1_mini, ("interns1", "internvl"),
                        recipe_only=("freeze_vision", "freeze_projector", "freeze_language",
                                     "router_aux_loss_coef", "router_z_loss_coef")),
}


def read_hf_config(path: str) -> dict:
  """`path`'s config.json (or the file itself) as a dict; errors name the file."""
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path} has no config.json: point it at an HF model directory "
                            "(config.json + *.safetensors).")
  with open(file, encoding="utf-8") as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise ValueError(f"{file} is not valid JSON: {e}") from None


def from_hf(path: str) -> ConfigDict:
  """The recipe's `model` ConfigDict for the HF model directory `path`, every field read from
  its config.json (nested configs included): `c.model = presets.from_hf(c.load_from)`."""
  hf = read_hf_config(path)
  model_type = hf.get("model_type")
  for name, fam in FAMILIES.items():
    if model_type in fam.hf_model_types:
      cfg = importlib.import_module(fam.module).config_from_hf(
          hf, path if os.path.isdir(path) else os.path.dirname(path))
      assert cfg.type == name, (cfg.type, name)
      return cfg
  known = sorted(t for fam in FAMILIES.values() for t in fam.hf_model_types)
  raise ValueError(f"{path}/config.json has model_type {model_type!r}; jaxtune reads {known}")

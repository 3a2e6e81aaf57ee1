"""Intern-S1's HF side: the name table (the text family's rows under the layout's prefixes, the
tower's and the projector's), the `config.json` an export writes, and the preset read from a
checkpoint, whose tensor names (`jaxtune.hf.files.tensor_names`) tell its layout.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from jaxtune.hf.files import tensor_names
from jaxtune.hf.weights import HFWeight
from jaxtune.models import family
from jaxtune.models.intern_s1 import presets
from jaxtune.models.intern_s1 import vision as intern_vit
from jaxtune.models.intern_s1.model import TEXT_TYPES, pair, tokens_per_tile
from jaxtune.models.qwen3.hf import check_rope_type


def _text_rows(cfg: ConfigDict) -> list[HFWeight]:
  rows = family(cfg.text.type).hf_weight_map(cfg.text)
  if cfg.hf_layout == "internvl_legacy":  # language_model.model.*, language_model.lm_head
    return [r.with_prefix("language_model.", "language_model.") for r in rows]
  out = []
  for r in rows:  # model.language_model.* (the decoder), lm_head.* at the top
    name = ("model.language_model." + r.hf_name.removeprefix("model.")
            if r.hf_name.startswith("model.") else r.hf_name)
    out.append(r._replace(hf_name=name).with_prefix("", "language_model."))
  return out


def hf_weight_map(cfg: ConfigDict) -> tuple[HFWeight, ...]:
  top = "" if cfg.hf_layout == "internvl_legacy" else "model."
  vision = [r.with_prefix(top + "vision_tower.", "vision_tower.")
            for r in intern_vit.vision_weight_map(cfg.vision)]
  projector = [r.with_prefix(top + "multi_modal_projector.", "multi_modal_projector.")
               for r in intern_vit.projector_weight_map()]
  return tuple(_text_rows(cfg) + vision + projector)


def _vision_hf_config(cfg: ConfigDict, model_type: str) -> dict:
  v = cfg.vision
  return {
      "model_type": model_type,
      "hidden_size": v.hidden_size,
      "intermediate_size": v.intermediate_size,
      "num_hidden_layers": v.num_hidden_layers,
      "num_attention_heads": v.num_attention_heads,
      "attention_bias": bool(v.attention_bias),
      "use_qk_norm": bool(v.use_qk_norm),
      "norm_type": v.norm_type,
      "layer_norm_eps": v.layer_norm_eps,
      "layer_scale_init_value": v.layer_scale_init_value,
      "image_size": list(pair(v.image_size)),
      "patch_size": list(pair(v.patch_size)),
      "num_channels": v.num_channels,
      "use_mean_pooling": bool(v.use_mean_pooling),
      "use_absolute_position_embeddings": True,
      "use_mask_token": False,
      "hidden_act": v.hidden_act,
      "hidden_dropout_prob": 0.0,
      "attention_dropout": 0.0,
      "projection_dropout": 0.0,
      "initializer_range": 0.02,
  }


def hf_config(cfg: ConfigDict, dtype: str, source: dict | None = None) -> dict:
  """config.json of the export. "interns1" keeps the source checkpoint's own config.json
  (custom-code keys such as auto_map included) with the architecture fields written over."""
  official = cfg.hf_layout == "interns1"
  text = family(cfg.text.type).hf_config(cfg.text, dtype)
  ours = {
      "architectures": ["InternS1ForConditionalGeneration" if official
                        else "InternVLForConditionalGeneration"],
      "model_type": "interns1" if official else "internvl",
      "text_config": text,
      "vision_config": _vision_hf_config(cfg, "interns1_vision" if official
                                         else "internvl_vision"),
      "downsample_ratio": cfg.projector.downsample_ratio,
      "projector_hidden_act": cfg.projector.hidden_act,
      "image_token_id": int(cfg.image_token_id),
      "image_seq_length": tokens_per_tile(cfg),
      "vision_feature_layer": cfg.vision_feature_layer,
      "vision_feature_select_strategy": "default",
      "tie_word_embeddings": bool(cfg.tie_word_embeddings),
      "dtype": dtype,
  }
  if not official or not source:
    return ours
  merged = {**source, **ours}
  for key in ("text_config", "vision_config"):  # keep their extra keys too
    merged[key] = {**(source.get(key) or {}), **ours[key]}
  return merged


def _layout_of(hf_dir: str | None, model_type: str) -> str:
  """Which tensor names the checkpoint in `hf_dir` uses (config.json does not say)."""
  if model_type == "interns1":
    return "interns1"
  names = tensor_names(hf_dir) if hf_dir else []
  if any(n.startswith("language_model.") or n.startswith("vision_tower.") for n in names):
    return "internvl_legacy"
  return "internvl"


_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "attention_bias", "use_qk_norm", "norm_type", "layer_norm_eps",
                  "layer_scale_init_value", "image_size", "patch_size", "num_channels",
                  "use_mean_pooling", "hidden_act")


def config_from_hf(hf: dict, hf_dir: str | None = None) -> ConfigDict:
  """Every field from the checkpoint's config.json, with transformers' InternVL defaults for
  what it omits (Intern-S1's custom config has the same fields; transformers has no
  `interns1` type). Fields whose InternVL default differs from Intern-S1's (attention_bias,
  tie_word_embeddings, image_token_id) are read, never assumed."""
  import transformers  # pylint: disable=import-outside-toplevel
  text_hf = dict(hf.get("text_config") or {})
  text_type = text_hf.get("model_type", "qwen3")
  if text_type not in TEXT_TYPES:
    raise ValueError(f"text_config.model_type is {text_type!r}; jaxtune's Intern-S1 reads a "
                     f"text model of type {TEXT_TYPES}")
  # Before InternVLConfig reads it: transformers raises a bare KeyError for some types.
  check_rope_type(text_hf, "config.json text_config")
  vision_hf = {k: v for k, v in (hf.get("vision_config") or {}).items() if k != "model_type"}
  top = {k: v for k, v in hf.items()
         if k not in ("model_type", "text_config", "vision_config", "auto_map")}
  full = transformers.InternVLConfig(vision_config=vision_hf, text_config=text_hf, **top)
  vision = full.vision_config
  vision_fields = {}
  for name in _VISION_FIELDS:
    value = getattr(vision, name)
    if isinstance(value, (list, tuple)):
      value = int(value[0]) if len(set(value)) == 1 else tuple(value)
    vision_fields[name] = value
  text = family(text_type).config_from_hf(text_hf)
  tie = bool(full.tie_word_embeddings)
  text.tie_word_embeddings = tie
  base = presets.defaults()
  return ConfigDict({
      **base.to_dict(),
      "text": text,
      "vision": ConfigDict({**base.vision.to_dict(), **vision_fields}),
      "projector": ConfigDict(dict(downsample_ratio=float(full.downsample_ratio),
                                   hidden_act=full.projector_hidden_act)),
      "image_token_id": int(full.image_token_id),
      "vision_feature_layer": full.vision_feature_layer,
      "tie_word_embeddings": tie,
      "hf_layout": _layout_of(hf_dir, hf.get("model_type")),
  })

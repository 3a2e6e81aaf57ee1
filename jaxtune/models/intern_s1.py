"""Intern-S1 / Intern-S1-mini (and transformers' InternVL) in Flax NNX, plus its family interface.

    pixel tiles -> InternViT (jaxtune.models.intern_vit) -> drop CLS -> pixel shuffle
                -> projector -> image features, one per <IMG_CONTEXT> token
    token ids   -> embeddings, image features put at the image-token positions -> Qwen3 / -MoE

The text model is the `qwen3` or `qwen3_moe` family's own model (`model.text.type`), fed input
embeddings through its `forward_embeddings`; its auxiliary losses and metrics pass through.

Batches (`batch_layout`) add, per packed row, `pixel_values` [rows, M, S, S, C] (channels-last
uint8 tiles, normalised here; float tiles are taken as already normalised) and `tile_segment_ids` [rows, M] (the row's segment owning each tile, 0 = an empty
slot), M being the data's static tiles-per-pack bound. Tile k of a row covers the row's image
tokens [k*P, (k+1)*P) (P tokens per tile, 256 for 448-pixel tiles), the order the data pipeline
writes them in. A micro-batch without any tile skips the vision tower (`lax.cond`); data
without images has no pixel arrays at all.

Freezing (`model.freeze_vision`, `freeze_projector`, `freeze_language`) is the family's
trainable filter: frozen params get no gradient and no optimizer state; the step differentiates
only the rest, so a frozen tower's activations are not kept for the backward pass.

HF layouts (`model.hf_layout`, set by `config_from_hf` from the checkpoint's tensor names, used
again on export): "interns1" (the official Intern-S1 checkpoints: custom code, config.json
model_type "interns1") and "internvl" (transformers' InternVLForConditionalGeneration) both
name tensors `model.language_model.*`, `model.vision_tower.*`, `model.multi_modal_projector.*`,
`lm_head.*`; "internvl_legacy" is the llava-style `language_model.model.*`, `vision_tower.*`,
`multi_modal_projector.*`, `language_model.lm_head.*` that transformers' save_pretrained writes.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict, FrozenConfigDict

from jaxtune.models import ForwardOutput, HFWeight, family, intern_vit, text_batch_layout

TEXT_TYPES = ("qwen3", "qwen3_moe")
HF_LAYOUTS = ("interns1", "internvl", "internvl_legacy")


class InternS1ForConditionalGeneration(nnx.Module):
  """`vision_tower`, `multi_modal_projector` and `language_model` (a Qwen3 / -MoE causal LM)."""

  def __init__(self, cfg: ConfigDict, *, param_dtype=jnp.float32, compute_dtype=jnp.bfloat16,
               remat: str = "full", attention: str = "xla", rngs: nnx.Rngs):
    check_config(cfg)
    self.config = FrozenConfigDict(cfg)
    dims = dict(param_dtype=jnp.dtype(param_dtype), compute_dtype=jnp.dtype(compute_dtype))
    self.language_model = family(cfg.text.type).MODEL_CLASS(
        cfg.text, **dims, remat=remat, attention=attention, rngs=rngs)
    with nnx.use_eager_sharding(False):  # placing params is create_model's job
      self.vision_tower = intern_vit.InternVisionModel(cfg.vision, **dims, remat=remat,
                                                       rngs=rngs)
      self.multi_modal_projector = intern_vit.InternVLProjector(
          projector_in_features(cfg), cfg.text.hidden_size, **dims, rngs=rngs)

  def image_features(self, pixel_values_nhwc: jax.Array) -> jax.Array:
    """[n, S, S, C] tiles -> [n, P, D] features in the text model's embedding space."""
    return intern_vit.image_features(
        self.vision_tower, self.multi_modal_projector, pixel_values_nhwc,
        downsample_ratio=self.config.projector.downsample_ratio,
        feature_layer=self.config.vision_feature_layer)

  def merge_images(self, x_btd: jax.Array, batch: dict) -> jax.Array:
    """The row's k-th image token takes the k-th feature of the row's tiles, in order."""
    pixels = batch["pixel_values"]
    rows, tiles = pixels.shape[:2]
    per_tile = tokens_per_tile(self.config)
    hidden = x_btd.shape[-1]

    def run_tower():
      tiles_nhwc = pixels.reshape(rows * tiles, *pixels.shape[2:])
      if tiles_nhwc.dtype == jnp.uint8:  # the data pipeline's tiles: normalised here
        tiles_nhwc = intern_vit.normalize_pixels(tiles_nhwc)
      features = self.image_features(tiles_nhwc)
      return features.reshape(rows, tiles * per_tile, hidden).astype(x_btd.dtype)

    def no_images():
      return jnp.zeros((rows, tiles * per_tile, hidden), x_btd.dtype)

    features = jax.lax.cond(jnp.any(batch["tile_segment_ids"] > 0), run_tower, no_images)
    is_image_bt = batch["input_ids"] == self.config.image_token_id
    index_bt = jnp.clip(jnp.cumsum(is_image_bt, axis=1) - 1, 0, tiles * per_tile - 1)
    gathered_btd = jnp.take_along_axis(features, index_bt[..., None], axis=1)
    return jnp.where(is_image_bt[..., None], gathered_btd, x_btd)

  def forward(self, batch: dict) -> ForwardOutput:
    """The family interface: text embeddings with the image features merged in, through the
    text model (its auxiliary losses and statistics come back unchanged)."""
    lm = self.language_model
    x_btd = lm.model.embed_tokens(batch["input_ids"])
    if "pixel_values" in batch:  # static: the layout of this run's data
      x_btd = self.merge_images(x_btd, batch)
    return lm.forward_embeddings(x_btd, batch)

  def __call__(self, batch: dict) -> jax.Array:
    return self.forward(batch).hidden

  def lm_head_kernel(self) -> jax.Array:
    return self.language_model.lm_head_kernel()

  def logits(self, hidden_btd: jax.Array) -> jax.Array:
    return self.language_model.logits(hidden_btd)

  def aux_loss_coefficients(self) -> dict[str, float]:
    return self.language_model.aux_loss_coefficients()

  def step_metrics(self, stats: dict) -> dict:
    return self.language_model.step_metrics(stats)


MODEL_CLASS = InternS1ForConditionalGeneration


def check_config(cfg: ConfigDict) -> None:
  if cfg.text.type not in TEXT_TYPES:
    raise ValueError(f"model.text.type must be one of {TEXT_TYPES}, got {cfg.text.type!r}")
  if cfg.hf_layout not in HF_LAYOUTS:
    raise ValueError(f"model.hf_layout must be one of {HF_LAYOUTS}, got {cfg.hf_layout!r}")
  if bool(cfg.text.tie_word_embeddings) != bool(cfg.tie_word_embeddings):
    raise ValueError(f"model.tie_word_embeddings ({cfg.tie_word_embeddings}) and "
                     f"model.text.tie_word_embeddings ({cfg.text.tie_word_embeddings}) differ; "
                     "the top-level switch is the one HF reads: set both alike")
  if not isinstance(cfg.vision_feature_layer, int):
    raise ValueError("model.vision_feature_layer must be one layer index (lists of layers, "
                     f"which transformers also accepts, are not supported), got "
                     f"{cfg.vision_feature_layer!r}")
  ratio = float(cfg.projector.downsample_ratio)
  if abs(1 / ratio - round(1 / ratio)) > 1e-9:
    raise ValueError(f"model.projector.downsample_ratio must be 1/k, got {ratio}")


def _pair(value) -> tuple[int, int]:
  return (int(value), int(value)) if isinstance(value, (int, float)) else tuple(map(int, value))


def projector_in_features(cfg: ConfigDict) -> int:
  return intern_vit.projector_in_features(cfg.vision, cfg.projector.downsample_ratio)


def tokens_per_tile(cfg: ConfigDict) -> int:
  return intern_vit.tokens_per_tile(cfg.vision, cfg.projector.downsample_ratio)


# ---- the family interface (see jaxtune.models) ---------------------------------------------

def data_options(cfg: ConfigDict) -> dict:
  """What SFTData needs to make this model's batches: the tile size and the image token."""
  return dict(image_size=_pair(cfg.vision.image_size)[0], image_token_id=int(cfg.image_token_id))


def batch_layout(cfg: ConfigDict, rows: int, length: int, max_tiles: int = 0) -> dict:
  layout = text_batch_layout(rows, length)
  if max_tiles:
    height, width = _pair(cfg.vision.image_size)
    layout["pixel_values"] = ((rows, max_tiles, height, width, cfg.vision.num_channels),
                              "uint8")
    layout["tile_segment_ids"] = ((rows, max_tiles), "int32")
  return layout


def vision_flops_per_tile(cfg: ConfigDict) -> float:
  """Forward FLOPs of the tower and projector on one tile (non-causal attention: all pairs)."""
  v = cfg.vision
  height, width = _pair(v.image_size)
  patch = _pair(v.patch_size)
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
      "image_size": list(_pair(v.image_size)),
      "patch_size": list(_pair(v.patch_size)),
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
  names = _tensor_names(hf_dir) if hf_dir else []
  if any(n.startswith("language_model.") or n.startswith("vision_tower.") for n in names):
    return "internvl_legacy"
  return "internvl"


def _tensor_names(hf_dir: str) -> list[str]:
  import json  # pylint: disable=import-outside-toplevel
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      return list(json.load(f)["weight_map"])
  single = os.path.join(hf_dir, "model.safetensors")
  if os.path.isfile(single):
    from jaxtune.hf.load import SafetensorsFile  # pylint: disable=import-outside-toplevel
    return list(SafetensorsFile(single).entries)
  return []


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

  from jaxtune.models import presets  # pylint: disable=import-outside-toplevel
  text_hf = dict(hf.get("text_config") or {})
  text_type = text_hf.get("model_type", "qwen3")
  if text_type not in TEXT_TYPES:
    raise ValueError(f"text_config.model_type is {text_type!r}; jaxtune's Intern-S1 reads a "
                     f"text model of type {TEXT_TYPES}")
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
  base = presets.intern_s1_mini()
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

"""Intern-S1 / Intern-S1-mini (and transformers' InternVL) in Flax NNX.

    pixel tiles -> InternViT (intern_s1/vision.py) -> drop CLS -> pixel shuffle
                -> projector -> image features, one per <IMG_CONTEXT> token
    token ids   -> embeddings, image features put at the image-token positions -> Qwen3 / -MoE

The text model is the `qwen3` or `qwen3_moe` family's own model (`model.text.type`), fed input
embeddings through its `forward_embeddings`; its auxiliary losses and metrics pass through.

Batches (`batch_layout`) add, per packed row, `pixel_values` [rows, M, S, S, C] (channels-last
uint8 tiles, normalised here; float tiles are taken as already normalised) and
`tile_segment_ids` [rows, M] (the row's segment owning each tile, 0 = an empty slot), M being
the data's static tiles-per-pack bound. Tile k of a row covers the row's image tokens
[k*P, (k+1)*P) (P tokens per tile, 256 for 448-pixel tiles), the order the data pipeline
writes them in. A micro-batch without any tile skips the vision tower (`lax.cond`); data
without images has no pixel arrays at all.

Freezing (`model.freeze_vision`, `freeze_projector`, `freeze_language`) is the family's
trainable filter: frozen params get no gradient and no optimizer state; the step differentiates
only the rest, so a frozen tower's activations are not kept for the backward pass.

HF layouts (`model.hf_layout`, set by `config_from_hf` from the checkpoint's tensor names, used
again on export; intern_s1/hf.py): "interns1" (the official Intern-S1 checkpoints: custom code,
config.json model_type "interns1") and "internvl" (transformers'
InternVLForConditionalGeneration) both name tensors `model.language_model.*`,
`model.vision_tower.*`, `model.multi_modal_projector.*`, `lm_head.*`; "internvl_legacy" is the
llava-style `language_model.model.*`, `vision_tower.*`, `multi_modal_projector.*`,
`language_model.lm_head.*` that transformers' save_pretrained writes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict, FrozenConfigDict

from jaxtune.models import ForwardOutput, family
from jaxtune.models.intern_s1 import vision as intern_vit
from jaxtune.models.layers import BT
from jaxtune.parallel.sharding import shard_activation

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
                                                       attention=attention, rngs=rngs)
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
    x_btd = lm.model.embed_tokens(shard_activation(batch["input_ids"], BT))
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


def pair(value) -> tuple[int, int]:
  """HF's image_size / patch_size: an int or an [h, w] pair."""
  return (int(value), int(value)) if isinstance(value, (int, float)) else tuple(map(int, value))


def projector_in_features(cfg: ConfigDict) -> int:
  return intern_vit.projector_in_features(cfg.vision, cfg.projector.downsample_ratio)


def tokens_per_tile(cfg: ConfigDict) -> int:
  return intern_vit.tokens_per_tile(cfg.vision, cfg.projector.downsample_ratio)

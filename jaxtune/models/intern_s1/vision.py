"""The Intern-S1 / InternVL vision side in Flax NNX: the InternViT tower, pixel shuffle and the
multimodal projector, read like transformers' `modeling_internvl.py`, plus their HF name tables
(relative to the tower and the projector; the family's `hf.py` adds the prefixes).

Attribute names are HF's, so `encoder.layer.{i}.attention.q_proj.weight` is
`encoder.layer.attention.q_proj.kernel[i]` here (see `vision_weight_map`). Differences from HF:
  - Pixels are channels-last [B, H, W, C] (JAX's layout). The patch conv keeps HF's
    [D, C, p, p] weight and runs as one einsum over non-overlapping patches.
  - Linear kernels are [in, out] (Flax); the transpose happens only at the HF boundary.
  - The encoder layers are one stacked module with a leading L axis run by `jax.lax.scan`;
    `feature_layer` runs only the layers it needs.
  - Position embeddings are resized with a hand-written copy of torch's bicubic kernel
    (jaxtune.ops.resize): `jax.image.resize`'s cubic is a different filter.
  - A non-square input grid works end to end (HF's `get_image_features` assumes a square one).
Params are stored in `param_dtype` and cast to `compute_dtype` at use; norms and softmax run
in float32. HF quirks kept on purpose: q_norm/k_norm always use eps 1e-6 (not
`layer_norm_eps`), the final `layernorm` is a LayerNorm even when `norm_type` is "rms_norm",
and the projector's LayerNorm uses PyTorch's default eps 1e-5. Profiles and HLO read by scope:
`vision_tower/layer/attention`, `.../mlp`, `projector`.

Shape letters: B tiles, T tokens per tile (1 CLS + P patches), D hidden, N heads, H head dim,
F MLP hidden, C channels, E text hidden, L layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from ml_collections import ConfigDict

from jaxtune.hf.weights import HFWeight
from jaxtune.models.layers import (ATTENTION_OUT, BTD, INIT_STD, LayerNorm, RMSNorm, check_remat,
                                   scan_layers, stack_layers)
from jaxtune.ops.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from jaxtune.ops.attention import attention as attention_op
from jaxtune.ops.resize import bicubic_resize
from jaxtune.parallel.sharding import shard_activation

# HF builds q_norm / k_norm as `InternVLVisionRMSNorm(embed_dim)`: its default eps, whatever
# `layer_norm_eps` says.
_QK_NORM_EPS = 1e-6
# The projector's `nn.LayerNorm(...)` takes PyTorch's default eps, not the tower's 1e-6.
_PROJECTOR_LN_EPS = 1e-5
_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF's "gelu" is the exact erf form
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def _pair(value) -> tuple[int, int]:
  """HF accepts an int or an [h, w] pair for image_size and patch_size."""
  if isinstance(value, int):
    return value, value
  h, w = value
  return int(h), int(w)


def _grid(vcfg: ConfigDict) -> tuple[int, int]:
  """Patch rows and columns of a native-resolution tile."""
  (ih, iw), (ph, pw) = _pair(vcfg.image_size), _pair(vcfg.patch_size)
  return ih // ph, iw // pw


def _normal(shape, dtype, rngs: nnx.Rngs) -> jax.Array:
  return nnx.initializers.normal(INIT_STD)(rngs.params(), shape, dtype)


def _linear(in_features: int, out_features: int, kernel_axes: tuple[str, str],
            bias_axes: tuple[str, ...] | None, *, param_dtype, compute_dtype,
            rngs: nnx.Rngs) -> nnx.Linear:
  """Normal(0.02) kernel, zero bias (None: no bias), both named for `parallel.sharding`."""
  return nnx.Linear(
      in_features, out_features, use_bias=bias_axes is not None, param_dtype=param_dtype,
      dtype=compute_dtype,
      kernel_init=nnx.with_partitioning(nnx.initializers.normal(INIT_STD), kernel_axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), bias_axes or ("norm",)),
      rngs=rngs)


# HF's `InternVLVisionRMSNorm` is Qwen3's and its LayerNorm is torch's: both in
# jaxtune.models.layers, with HF's param names.
_NORMS = {"layer_norm": LayerNorm, "rms_norm": RMSNorm}


def _norm(vcfg: ConfigDict, **dims) -> nnx.Module:
  if vcfg.norm_type not in _NORMS:
    raise ValueError(f"norm_type must be one of {sorted(_NORMS)}, got {vcfg.norm_type!r}")
  return _NORMS[vcfg.norm_type](vcfg.hidden_size, vcfg.layer_norm_eps, **dims)


# ---- position embeddings at another resolution ----------------------------------------------

def resize_position_embeddings(pos_1td: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """HF's `interpolate_pos_encoding`: the CLS row as is, the patch rows (a square grid) resized
  bicubically to `grid` = (rows, cols). [1, 1 + P, D] -> [1, 1 + rows * cols, D]."""
  _, tokens, dim = pos_1td.shape
  side = math.isqrt(tokens - 1)
  if side * side != tokens - 1:
    raise ValueError(f"resizing position embeddings needs a square patch grid, got {tokens - 1} "
                     "positions")
  rows, cols = grid
  resized_rcd = bicubic_resize(pos_1td[0, 1:].reshape(side, side, dim), rows, cols)
  resized = resized_rcd.reshape(1, rows * cols, dim).astype(pos_1td.dtype)
  return jnp.concatenate([pos_1td[:, :1], resized], axis=1)


# ---- the tower -------------------------------------------------------------------------------

# The "blockwise" attention's query and key blocks in the tower. Its rows are many short
# tiles (64 x 1,025 tokens), not one long row, so each block's [tiles, N, Q, S] float32 scores
# are tiles times the text path's: 128 keeps them ~16 MiB per tile batch of 16 (300M: 16
# heads), and pads a 1,025-token tile to 1,152 (as the Pallas kernels do), where the
# dispatcher's 512 would pad it to 1,536 (2.25x the attention FLOPs).
BLOCKWISE_BLOCK = 128


class _Conv(nnx.Module):
  """Holds the patch conv's `weight` [D, C, ph, pw] and `bias` [D] under HF's names."""

  def __init__(self, hidden: int, channels: int, patch: tuple[int, int], *, param_dtype,
               rngs: nnx.Rngs):
    self.weight = nnx.Param(_normal((hidden, channels, *patch), param_dtype, rngs),
                            out_sharding=("embed", None, None, None))
    self.bias = nnx.Param(jnp.zeros((hidden,), param_dtype), out_sharding=("norm",))


class InternVisionPatchEmbeddings(nnx.Module):
  """A stride-p conv over [B, H, W, C] pixels, as an einsum over patches; HF's conv weight
  layout [D, C, ph, pw] is kept so loading needs no transpose."""

  def __init__(self, vcfg: ConfigDict, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
    self.patch_size = _pair(vcfg.patch_size)
    self.num_channels = vcfg.num_channels
    self.compute_dtype = compute_dtype
    self.projection = _Conv(vcfg.hidden_size, vcfg.num_channels, self.patch_size,
                            param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixels_bhwc: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, rows * cols, D]; trailing pixels that fill no patch are ignored."""
    batch, height, width, channels = pixels_bhwc.shape
    if channels != self.num_channels:
      raise ValueError(f"pixel values have {channels} channels (last axis), the config says "
                       f"{self.num_channels}; pixels must be channels-last [B, H, W, C]")
    ph, pw = self.patch_size
    rows, cols = height // ph, width // pw
    x = pixels_bhwc[:, :rows * ph, :cols * pw].astype(self.compute_dtype)
    # r/w: patch row/column, p/q: pixel inside the patch, c: channel.
    patches_brpwqc = x.reshape(batch, rows, ph, cols, pw, channels)
    weight_dcpq = self.projection.weight[...].astype(self.compute_dtype)
    out_brwd = jnp.einsum("brpwqc,dcpq->brwd", patches_brpwqc, weight_dcpq)
    out_brwd = out_brwd + self.projection.bias[...].astype(self.compute_dtype)
    return out_brwd.reshape(batch, rows * cols, -1)


class InternVisionEmbeddings(nnx.Module):
  """CLS token + patch embeddings + absolute position embeddings (resized off-resolution)."""

  def __init__(self, vcfg: ConfigDict, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
    hidden = vcfg.hidden_size
    self.grid = _grid(vcfg)
    self.compute_dtype = compute_dtype
    # XTuner and HF start both at zero.
    self.cls_token = nnx.Param(jnp.zeros((1, 1, hidden), param_dtype),
                               out_sharding=(None, None, "norm"))
    self.position_embeddings = nnx.Param(
        jnp.zeros((1, 1 + self.grid[0] * self.grid[1], hidden), param_dtype),
        out_sharding=(None, None, "norm"))
    self.patch_embeddings = InternVisionPatchEmbeddings(
        vcfg, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)

  def __call__(self, pixels_bhwc: jax.Array) -> jax.Array:
    batch, height, width, _ = pixels_bhwc.shape
    ph, pw = self.patch_embeddings.patch_size
    grid = (height // ph, width // pw)
    patches_bpd = self.patch_embeddings(pixels_bhwc)
    cls_b1d = jnp.broadcast_to(self.cls_token[...].astype(self.compute_dtype),
                               (batch, 1, patches_bpd.shape[-1]))
    x_btd = jnp.concatenate([cls_b1d, patches_bpd], axis=1)
    pos_1td = self.position_embeddings[...]
    if grid != self.grid:
      pos_1td = resize_position_embeddings(pos_1td, grid)
    return x_btd + pos_1td.astype(self.compute_dtype)


class InternVisionAttention(nnx.Module):
  """Full (non-causal) multi-head attention within a tile; optional RMSNorm on q and k over the
  whole hidden dim (before the head split, as HF). The attention itself is the dispatcher's
  (jaxtune.ops.attention, `causal=False`, each tile one sample) with the model's `attention`
  impl: "blockwise" / "pallas" keep no [T, T] scores."""

  def __init__(self, vcfg: ConfigDict, *, param_dtype, compute_dtype, attention: str = "xla",
               rngs: nnx.Rngs):
    dims = dict(param_dtype=param_dtype, compute_dtype=compute_dtype)
    hidden, heads = vcfg.hidden_size, vcfg.num_attention_heads
    if hidden % heads:
      raise ValueError(f"hidden_size ({hidden}) must be a multiple of num_attention_heads "
                       f"({heads})")
    self.num_heads, self.head_dim = heads, hidden // heads
    if attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {attention!r}")
    self.attention = attention
    qkv_bias = ("heads",) if vcfg.attention_bias else None
    self.q_proj = _linear(hidden, hidden, ("embed", "heads"), qkv_bias, **dims, rngs=rngs)
    self.k_proj = _linear(hidden, hidden, ("embed", "heads"), qkv_bias, **dims, rngs=rngs)
    self.v_proj = _linear(hidden, hidden, ("embed", "heads"), qkv_bias, **dims, rngs=rngs)
    self.projection_layer = _linear(hidden, hidden, ("heads", "embed"), ("norm",), **dims,
                                    rngs=rngs)
    if vcfg.use_qk_norm:
      self.q_norm = RMSNorm(hidden, _QK_NORM_EPS, **dims)
      self.k_norm = RMSNorm(hidden, _QK_NORM_EPS, **dims)
    else:
      self.q_norm = self.k_norm = None

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    with jax.named_scope("attention"):
      return self._attend(x_btd)

  def _attend(self, x_btd: jax.Array) -> jax.Array:
    batch, tokens, _ = x_btd.shape
    heads = ("activation_batch", "activation_length", "activation_heads", None)
    q_btd, k_btd, v_btd = self.q_proj(x_btd), self.k_proj(x_btd), self.v_proj(x_btd)
    if self.q_norm is not None:
      q_btd, k_btd = self.q_norm(q_btd), self.k_norm(k_btd)
    q_btnh, k_btnh, v_btnh = (
        shard_activation(a.reshape(batch, tokens, self.num_heads, self.head_dim), heads)
        for a in (q_btd, k_btd, v_btd))
    # Every tile is one whole sample: no segment ids (None), nothing causal.
    o_btnh = attention_op(q_btnh, k_btnh, v_btnh, None, impl=self.attention, causal=False,
                          block_q=BLOCKWISE_BLOCK, block_kv=BLOCKWISE_BLOCK)
    o_btnh = checkpoint_name(o_btnh, ATTENTION_OUT)  # what remat='save_attention' keeps
    return self.projection_layer(o_btnh.reshape(batch, tokens, -1))


class InternVisionMLP(nnx.Module):
  """fc2(act(fc1(x))), both with bias."""

  def __init__(self, vcfg: ConfigDict, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
    dims = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
    if vcfg.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"hidden_act must be one of {sorted(_ACTIVATIONS)}, got "
                       f"{vcfg.hidden_act!r}")
    self.hidden_act = vcfg.hidden_act
    self.fc1 = _linear(vcfg.hidden_size, vcfg.intermediate_size, ("embed", "mlp"), ("mlp",),
                       **dims)
    self.fc2 = _linear(vcfg.intermediate_size, vcfg.hidden_size, ("mlp", "embed"), ("norm",),
                       **dims)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    with jax.named_scope("mlp"):
      h_btf = _ACTIVATIONS[self.hidden_act](self.fc1(x_btd))
      h_btf = shard_activation(h_btf, ("activation_batch", "activation_length", "activation_mlp"))
      return self.fc2(h_btf)


class InternVisionLayer(nnx.Module):
  """Pre-norm block with layer scale: x + lambda_1 * attn(norm(x)), then
  x + lambda_2 * mlp(norm(x))."""

  def __init__(self, vcfg: ConfigDict, *, param_dtype, compute_dtype, attention: str = "xla",
               rngs: nnx.Rngs):
    dims = dict(param_dtype=param_dtype, compute_dtype=compute_dtype)
    hidden = vcfg.hidden_size
    self.attention = InternVisionAttention(vcfg, **dims, attention=attention, rngs=rngs)
    self.mlp = InternVisionMLP(vcfg, **dims, rngs=rngs)
    self.layernorm_before = _norm(vcfg, **dims)
    self.layernorm_after = _norm(vcfg, **dims)
    scale = float(vcfg.layer_scale_init_value)
    self.lambda_1 = nnx.Param(jnp.full((hidden,), scale, param_dtype), out_sharding=("norm",))
    self.lambda_2 = nnx.Param(jnp.full((hidden,), scale, param_dtype), out_sharding=("norm",))
    self.compute_dtype = compute_dtype

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    lambda_1 = self.lambda_1[...].astype(self.compute_dtype)
    lambda_2 = self.lambda_2[...].astype(self.compute_dtype)
    x_btd = x_btd + lambda_1 * self.attention(self.layernorm_before(x_btd))
    x_btd = x_btd + lambda_2 * self.mlp(self.layernorm_after(x_btd))
    return shard_activation(x_btd, BTD)


class InternVisionEncoder(nnx.Module):
  """The stacked layers: `layer` holds every layer's params with a leading L axis."""

  def __init__(self, vcfg: ConfigDict, *, param_dtype, compute_dtype, attention: str = "xla",
               rngs: nnx.Rngs):
    self.layer = stack_layers(
        lambda r: InternVisionLayer(vcfg, param_dtype=param_dtype, compute_dtype=compute_dtype,
                                    attention=attention, rngs=r),
        vcfg.num_hidden_layers, rngs)


class InternVisionModel(nnx.Module):
  """HF's `InternVLVisionModel`: embeddings, the encoder, and a final LayerNorm only when
  the config does not use mean pooling. `attention`: the impl of jaxtune.ops.attention its
  layers run (the text model's, in Intern-S1)."""

  def __init__(self, vcfg: ConfigDict, *, param_dtype=jnp.float32, compute_dtype=jnp.bfloat16,
               remat: str = "full", attention: str = "xla", rngs: nnx.Rngs):
    check_remat(remat)
    if vcfg.get("use_mask_token", False):
      raise ValueError("use_mask_token (masked-image pretraining) is not supported")
    if not vcfg.get("use_absolute_position_embeddings", True):
      raise ValueError("only absolute position embeddings are supported")
    dims = dict(param_dtype=jnp.dtype(param_dtype), compute_dtype=jnp.dtype(compute_dtype))
    self.num_layers, self.remat = vcfg.num_hidden_layers, remat
    # Params carry logical axis names; placing them is the caller's job (create_model).
    with nnx.use_eager_sharding(False):
      self.embeddings = InternVisionEmbeddings(vcfg, **dims, rngs=rngs)
      self.encoder = InternVisionEncoder(vcfg, **dims, attention=attention, rngs=rngs)
      # Always a LayerNorm, even for norm_type "rms_norm" (HF's and XTuner's choice).
      self.layernorm = (None if vcfg.use_mean_pooling
                        else LayerNorm(vcfg.hidden_size, vcfg.layer_norm_eps, **dims))

  def __call__(self, pixel_values_nhwc: jax.Array, *, feature_layer: int = -1) -> jax.Array:
    """[B, H, W, C] pixels -> [B, 1 + P, D] hidden states.

    feature_layer -1: the last layer's output after the final layernorm (HF's
    `last_hidden_state`); otherwise HF's `hidden_states[feature_layer]` (0 = the embeddings,
    L = the last layer before the final layernorm, negatives count from L + 1). Only the
    layers needed run.
    """
    with jax.named_scope("vision_tower"):
      return self._encode(pixel_values_nhwc, feature_layer)

  def _encode(self, pixel_values_nhwc: jax.Array, feature_layer: int) -> jax.Array:
    x_btd = shard_activation(self.embeddings(pixel_values_nhwc), BTD)
    if feature_layer == -1:
      stop, final_norm = self.num_layers, True
    else:
      states = self.num_layers + 1
      if not -states <= feature_layer < states:
        raise ValueError(f"feature_layer {feature_layer} is out of range for "
                         f"{self.num_layers} layers (hidden states 0..{self.num_layers})")
      stop, final_norm = feature_layer % states, False
    if stop:
      x_btd, _ = scan_layers(self.encoder.layer, x_btd, remat=self.remat, stop=stop)
    if final_norm and self.layernorm is not None:
      x_btd = self.layernorm(x_btd)
    return x_btd


# ---- pixel shuffle, projector, image features ------------------------------------------------

def pixel_shuffle(x_nhwc: jax.Array, scale_factor: float = 0.5) -> jax.Array:
  """HF's / XTuner's `pixel_shuffle`, step for step: [n, h, w, c] -> [n, h * s, w * s, c / s^2].

  HF's names call axis 1 "width" and axis 2 "height", and it transposes twice; the net effect
  is a plain space-to-depth: output (i, j) holds input rows s^-1 i.., cols s^-1 j.. with
  channels ordered (row offset, column offset, channel).
  """
  n, h, w, c = x_nhwc.shape
  h_out, w_out = int(h * scale_factor), int(w * scale_factor)
  c_mid, c_out = int(c / scale_factor), int(c / (scale_factor * scale_factor))
  if w_out * c_mid != w * c or h_out * c_out != h * c_mid:
    raise ValueError(f"pixel_shuffle({scale_factor}) needs h and w divisible by "
                     f"{1 / scale_factor:g}, got a {h}x{w} grid")
  x = x_nhwc.reshape(n, h, w_out, c_mid)   # HF's view(n, "w", "h" * s, c / s) on axes 1, 2
  x = x.transpose(0, 2, 1, 3)              # [n, w * s, h, c / s]
  x = x.reshape(n, w_out, h_out, c_out)
  return x.transpose(0, 2, 1, 3)           # [n, h * s, w * s, c / s^2]


class InternVLProjector(nnx.Module):
  """HF's `InternVLMultiModalProjector`: LayerNorm (eps 1e-5) -> Linear -> exact GELU ->
  Linear, all with bias."""

  def __init__(self, in_features: int, text_hidden: int, *, param_dtype=jnp.float32,
               compute_dtype=jnp.bfloat16, rngs: nnx.Rngs):
    dims = dict(param_dtype=jnp.dtype(param_dtype), compute_dtype=jnp.dtype(compute_dtype))
    with nnx.use_eager_sharding(False):
      self.layer_norm = LayerNorm(in_features, _PROJECTOR_LN_EPS, **dims)
      # Megatron-style pair: linear_1 splits its outputs, linear_2 its inputs.
      self.linear_1 = _linear(in_features, text_hidden, ("embed", "mlp"), ("mlp",), **dims,
                              rngs=rngs)
      self.linear_2 = _linear(text_hidden, text_hidden, ("mlp", "embed"), ("norm",), **dims,
                              rngs=rngs)

  def __call__(self, x_btk: jax.Array) -> jax.Array:
    """[..., in_features] -> [..., text_hidden]."""
    with jax.named_scope("projector"):
      h = self.linear_1(self.layer_norm(x_btk))
      return self.linear_2(jax.nn.gelu(h, approximate=False))


# InternVL's image preprocessing: ImageNet mean and std (the data pipeline sends uint8 tiles).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_pixels(tiles_nhwc: jax.Array) -> jax.Array:
  """uint8 tiles -> float32 (x / 255 - mean) / std, channels-last: torchvision's ToTensor then
  Normalize, each step in float32 as XTuner's loader does them on the host."""
  x = tiles_nhwc.astype(jnp.float32) / jnp.float32(255)
  return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def image_features(vision: InternVisionModel, projector: InternVLProjector,
                   pixel_values_nhwc: jax.Array, *, downsample_ratio: float,
                   feature_layer: int = -1) -> jax.Array:
  """HF's `InternVLModel.get_image_features` (select strategy "default"): tower, drop CLS,
  [B, rows, cols, D], pixel shuffle, flatten, projector -> [B, tokens_per_tile, E]."""
  hidden_btd = vision(pixel_values_nhwc, feature_layer=feature_layer)
  batch, height, width, _ = pixel_values_nhwc.shape
  ph, pw = vision.embeddings.patch_embeddings.patch_size
  patches_bhwd = hidden_btd[:, 1:].reshape(batch, height // ph, width // pw, -1)
  shuffled = pixel_shuffle(patches_bhwd, scale_factor=downsample_ratio)
  return projector(shuffled.reshape(batch, -1, shuffled.shape[-1]))


def tokens_per_tile(vcfg: ConfigDict, downsample_ratio: float) -> int:
  """Image tokens per native-resolution tile: (448 / 14)^2 * 0.5^2 = 256."""
  rows, cols = _grid(vcfg)
  return int(rows * downsample_ratio) * int(cols * downsample_ratio)


def projector_in_features(vcfg: ConfigDict, downsample_ratio: float) -> int:
  """The projector's input width, D * int(1 / ratio)^2 as HF computes it."""
  return vcfg.hidden_size * int(1 / downsample_ratio) ** 2


# ---- HF name tables --------------------------------------------------------------------------

def _linear_rows(hf: str, ours: str, bias: bool) -> list[HFWeight]:
  rows = [HFWeight(hf + ".weight", ours + ".kernel", True)]
  return rows + [HFWeight(hf + ".bias", ours + ".bias")] if bias else rows


def _norm_rows(hf: str, ours: str, bias: bool) -> list[HFWeight]:
  rows = [HFWeight(hf + ".weight", ours + ".weight")]
  return rows + [HFWeight(hf + ".bias", ours + ".bias")] if bias else rows


def vision_weight_map(vcfg: ConfigDict) -> list[HFWeight]:
  """The tower's HF tensors, named relative to it (`model.vision_tower.` is the caller's
  prefix), in HF's state-dict order; only the tensors this config has."""
  rows = [
      HFWeight("embeddings.cls_token", "embeddings.cls_token"),
      HFWeight("embeddings.position_embeddings", "embeddings.position_embeddings"),
      HFWeight("embeddings.patch_embeddings.projection.weight",
               "embeddings.patch_embeddings.projection.weight"),
      HFWeight("embeddings.patch_embeddings.projection.bias",
               "embeddings.patch_embeddings.projection.bias"),
  ]
  hf, ours = "encoder.layer.{layer}.", "encoder.layer."
  rows += [HFWeight(hf + "lambda_1", ours + "lambda_1"),
           HFWeight(hf + "lambda_2", ours + "lambda_2")]
  for name in ("q_proj", "k_proj", "v_proj"):
    rows += _linear_rows(hf + "attention." + name, ours + "attention." + name,
                         bool(vcfg.attention_bias))
  rows += _linear_rows(hf + "attention.projection_layer", ours + "attention.projection_layer",
                       True)
  if vcfg.use_qk_norm:
    rows += [HFWeight(hf + "attention.q_norm.weight", ours + "attention.q_norm.weight"),
             HFWeight(hf + "attention.k_norm.weight", ours + "attention.k_norm.weight")]
  rows += _linear_rows(hf + "mlp.fc1", ours + "mlp.fc1", True)
  rows += _linear_rows(hf + "mlp.fc2", ours + "mlp.fc2", True)
  with_bias = vcfg.norm_type == "layer_norm"
  rows += _norm_rows(hf + "layernorm_before", ours + "layernorm_before", with_bias)
  rows += _norm_rows(hf + "layernorm_after", ours + "layernorm_after", with_bias)
  if not vcfg.use_mean_pooling:
    rows += _norm_rows("layernorm", "layernorm", True)
  return rows


def projector_weight_map() -> list[HFWeight]:
  """The projector's HF tensors relative to it (`model.multi_modal_projector.` is the
  caller's prefix), in HF's order."""
  return (_norm_rows("layer_norm", "layer_norm", True)
          + _linear_rows("linear_1", "linear_1", True)
          + _linear_rows("linear_2", "linear_2", True))

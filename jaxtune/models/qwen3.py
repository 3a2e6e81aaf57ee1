"""Qwen3 dense decoder in Flax NNX, read like HF's `modeling_qwen3.py`, plus its HF name table.

Classes and attribute names are HF's, so `model.layers.{i}.self_attn.q_proj.weight` is
`model.layers.self_attn.q_proj.kernel[i]` here (see `hf_weight_map`). Differences from HF:
  - Linear kernels are [in, out] (Flax); the transpose happens only at the HF boundary.
  - The decoder layers are one stacked module with a leading L axis, run by `jax.lax.scan`,
    so compile time does not grow with depth.
  - Packed rows: `segment_ids` (1-based per sample, 0 = padding) keep samples apart and
    `positions` restart at 0 per sample.
  - `__call__` returns the final-norm hidden states; `logits()` applies the LM head (the
    training loss applies it chunk by chunk instead). `forward(batch)` is the family
    interface (`jaxtune.models`) the trainer calls.
Params are stored in `param_dtype` and cast to `compute_dtype` at use; norms, softmax and
RoPE run in float32.

Shape letters: B batch, T tokens, D hidden, N q heads, K kv heads, H head dim, F MLP hidden,
V vocab, L layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from ml_collections import ConfigDict, FrozenConfigDict

from jaxtune.models import ForwardOutput, HFWeight, text_batch_layout
from jaxtune.models.flops import decoder_train_flops
from jaxtune.ops.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from jaxtune.ops.attention import attention as attention_op
from jaxtune.ops import flash_attention
from jaxtune.ops.norms import rms_norm
from jaxtune.ops.rope import apply_rope, rope_cos_sin
from jaxtune.parallel.sharding import shard_activation

# HF's Qwen3 `initializer_range`: random init draws every weight from N(0, 0.02).
_INIT_STD = 0.02
_BTD = ("activation_batch", "activation_length", "activation_embed")
# The name every attention block gives its kernel's output (see `remat_policy`).
ATTENTION_OUT = "attention_out"


def _weight_init(logical_axes: tuple[str, ...], units: tuple[int, ...] | None = None):
  """Normal(0.02) init whose param carries its logical axis names for `parallel.sharding`
  (and, for a dim of whole heads, the head size as its `shard_units`)."""
  metadata = {} if units is None else dict(shard_units=units)
  return nnx.with_partitioning(nnx.initializers.normal(_INIT_STD), logical_axes, **metadata)


def _linear(in_features: int, out_features: int, logical_axes: tuple[str, str], *,
            param_dtype, compute_dtype, rngs: nnx.Rngs, units: tuple[int, int] | None = None
            ) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, use_bias=False, param_dtype=param_dtype,
                    dtype=compute_dtype, kernel_init=_weight_init(logical_axes, units),
                    rngs=rngs)


class Qwen3RMSNorm(nnx.Module):
  """`weight * x / rms(x)` over the last axis; statistics in float32."""

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32,
               compute_dtype=jnp.bfloat16):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
    self.eps = eps
    self.compute_dtype = compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.weight[...], self.eps, out_dtype=self.compute_dtype)


class Qwen3Attention(nnx.Module):
  """GQA self-attention with per-head RMSNorm on q and k (before RoPE) and no biases."""

  def __init__(self, cfg: ConfigDict, *, param_dtype, compute_dtype, attention: str,
               rngs: nnx.Rngs):
    dims = dict(param_dtype=param_dtype, compute_dtype=compute_dtype)
    hidden, head_dim = cfg.hidden_size, cfg.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = (
        cfg.num_attention_heads, cfg.num_key_value_heads, head_dim)
    self.attention = attention
    # The head dims are flattened (N * H, HF's layout) but split only into whole heads
    # (shard_units): a tensor axis that does not divide the head count leaves them whole.
    out_heads, in_heads = (1, head_dim), (head_dim, 1)
    self.q_proj = _linear(hidden, self.num_heads * head_dim, ("embed", "heads"), **dims,
                          rngs=rngs, units=out_heads)
    self.k_proj = _linear(hidden, self.num_kv_heads * head_dim, ("embed", "kv_heads"), **dims,
                          rngs=rngs, units=out_heads)
    self.v_proj = _linear(hidden, self.num_kv_heads * head_dim, ("embed", "kv_heads"), **dims,
                          rngs=rngs, units=out_heads)
    self.o_proj = _linear(self.num_heads * head_dim, hidden, ("heads", "embed"), **dims,
                          rngs=rngs, units=in_heads)
    self.q_norm = Qwen3RMSNorm(head_dim, cfg.rms_norm_eps, **dims)
    self.k_norm = Qwen3RMSNorm(head_dim, cfg.rms_norm_eps, **dims)

  def __call__(self, x_btd: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array,
               segment_ids_bt: jax.Array) -> jax.Array:
    batch, seq_len, _ = x_btd.shape
    heads = ("activation_batch", "activation_length", "activation_heads", None)
    kv_heads = ("activation_batch", "activation_length", "activation_kv_heads", None)
    q_btnh = self.q_norm(self.q_proj(x_btd).reshape(batch, seq_len, self.num_heads, -1))
    k_btkh = self.k_norm(self.k_proj(x_btd).reshape(batch, seq_len, self.num_kv_heads, -1))
    v_btkh = self.v_proj(x_btd).reshape(batch, seq_len, self.num_kv_heads, -1)
    q_btnh = shard_activation(apply_rope(q_btnh, cos_bth, sin_bth), heads)
    k_btkh = shard_activation(apply_rope(k_btkh, cos_bth, sin_bth), kv_heads)
    v_btkh = shard_activation(v_btkh, kv_heads)
    o_btnh = attention_op(q_btnh, k_btkh, v_btkh, segment_ids_bt, impl=self.attention)
    o_btnh = checkpoint_name(o_btnh, ATTENTION_OUT)  # what remat='save_attention' keeps
    return self.o_proj(o_btnh.reshape(batch, seq_len, -1))


class Qwen3MLP(nnx.Module):
  """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

  def __init__(self, cfg: ConfigDict, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
    dims = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
    hidden, inner = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = _linear(hidden, inner, ("embed", "mlp"), **dims)
    self.up_proj = _linear(hidden, inner, ("embed", "mlp"), **dims)
    self.down_proj = _linear(inner, hidden, ("mlp", "embed"), **dims)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    h_btf = jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd)
    h_btf = shard_activation(h_btf, ("activation_batch", "activation_length", "activation_mlp"))
    return self.down_proj(h_btf)


class Qwen3DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ConfigDict, *, param_dtype, compute_dtype, attention: str,
               rngs: nnx.Rngs):
    dims = dict(param_dtype=param_dtype, compute_dtype=compute_dtype)
    self.input_layernorm = Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **dims)
    self.self_attn = Qwen3Attention(cfg, **dims, attention=attention, rngs=rngs)
    self.post_attention_layernorm = Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **dims)
    self.mlp = Qwen3MLP(cfg, **dims, rngs=rngs)

  def __call__(self, x_btd: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array,
               segment_ids_bt: jax.Array) -> jax.Array:
    x_btd = x_btd + self.self_attn(self.input_layernorm(x_btd), cos_bth, sin_bth, segment_ids_bt)
    x_btd = x_btd + self.mlp(self.post_attention_layernorm(x_btd))
    return shard_activation(x_btd, _BTD)


def stack_layers(make_layer, num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
  """`num_layers` layers as one module whose params gain a leading "layers" axis.

  One layer's params are created L times under vmap (the axis is named so sharding rules can
  map it) and each layer draws its own random init.
  """
  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(layer_rngs: nnx.Rngs) -> nnx.Module:
    return make_layer(layer_rngs)
  return make(rngs)


def scan_layers(stack: nnx.Module, x_btd: jax.Array, *args, remat: str,
                start: int = 0, stop: int | None = None):
  """Runs layers [start, stop) of a stacked module over `x_btd`: a `jax.lax.scan`, so one
  layer is traced and compiled once. A layer returns x or (x, per-layer outputs); the
  per-layer outputs come back stacked along a leading axis (None when there are none).
  `remat` names what each layer keeps for its backward pass (`remat_policy`).
  """
  graphdef, state = nnx.split(stack)
  if start or stop is not None:
    state = jax.tree.map(lambda a: a[start:stop], state)

  def layer_step(carry_btd, layer_state):
    out = nnx.merge(graphdef, layer_state)(carry_btd, *args)
    return out if isinstance(out, tuple) else (out, None)

  if remat != "none":
    layer_step = jax.checkpoint(layer_step, prevent_cse=False, policy=remat_policy(remat))
  return jax.lax.scan(layer_step, x_btd, state)


# `remat` (config key): what each scanned layer keeps for the backward pass; the rest of the
# layer is recomputed there. Every family runs its layers through `scan_layers`, so this is
# the one place that maps the names to policies.
REMAT = ("none", "full", "dots", "save_attention", "offload")


def remat_policy(remat: str):
  """The `jax.checkpoint` policy of a `remat` name (None: "full", keep nothing).

    full            the layer's input only (the scan's carry): least memory, one extra forward.
    dots            `dots_with_no_batch_dims_saveable`: the outputs of the weight matmuls
                    (q/k/v/o projections, gate/up/down), not the batched einsums inside
                    attention, which for attention='xla' are [B, N, T, T] score tensors
                    (`dots_saveable` would keep those and lose most of what remat saves).
                    Norms, RoPE, SwiGLU and the attention kernel are recomputed.
    save_attention  the attention output (`ATTENTION_OUT`) and, for the blockwise kernel, its
                    own residuals (output and logsumexp): no attention forward is recomputed.
    offload         what "dots" keeps, moved to pinned host memory in the forward pass and
                    back in the backward pass: device memory near "full", compute near "dots".
  The other kernels' custom backward passes (cuDNN) need residuals that carry no name, so
  every policy but "none" recomputes their forward.
  """
  policies = jax.checkpoint_policies
  if remat == "full":
    return None
  if remat == "dots":
    return policies.dots_with_no_batch_dims_saveable
  if remat == "save_attention":
    return policies.save_only_these_names(ATTENTION_OUT, *flash_attention.RESIDUAL_NAMES)
  if remat == "offload":
    return policies.offload_dot_with_no_batch_dims("device", "pinned_host")
  raise ValueError(f"remat {remat!r} has no checkpoint policy; choose from {REMAT}")


def check_remat(remat: str) -> None:
  """A clear error for an unknown name, or for "offload" where there is no host memory space
  to offload to (then "full" uses as little device memory, recomputing instead)."""
  if remat not in REMAT:
    raise ValueError(f"remat must be one of {list(REMAT)}, got {remat!r}")
  if remat == "offload" and not _has_pinned_host():
    raise ValueError(f"remat='offload' needs a 'pinned_host' memory space, which the "
                     f"{jax.default_backend()} backend does not have; use remat='full' (as "
                     "little device memory, recomputing instead) or 'dots'")


@functools.cache
def _has_pinned_host() -> bool:
  try:
    jax.local_devices()[0].memory("pinned_host")
  except Exception:  # pylint: disable=broad-except  (backends differ in what they raise)
    return False
  return True


class Qwen3Model(nnx.Module):
  """Embedding, the stacked decoder layers, final norm."""

  def __init__(self, cfg: ConfigDict, *, param_dtype, compute_dtype, remat: str, attention: str,
               rngs: nnx.Rngs):
    check_remat(remat)
    dims = dict(param_dtype=param_dtype, compute_dtype=compute_dtype)
    self.head_dim, self.rope_theta, self.remat = cfg.head_dim, float(cfg.rope_theta), remat
    self.embed_tokens = make_embedding(cfg, **dims, rngs=rngs)
    self.layers = stack_layers(
        lambda r: Qwen3DecoderLayer(cfg, **dims, attention=attention, rngs=r),
        cfg.num_hidden_layers, rngs)
    self.norm = Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **dims)

  def __call__(self, input_ids_bt: jax.Array, positions_bt: jax.Array,
               segment_ids_bt: jax.Array) -> jax.Array:
    return self.decode(self.embed_tokens(input_ids_bt), positions_bt, segment_ids_bt)

  def decode(self, x_btd: jax.Array, positions_bt: jax.Array,
             segment_ids_bt: jax.Array) -> jax.Array:
    """Input embeddings [B, T, D] (a VLM merges image features into them) -> hidden states."""
    x_btd = shard_activation(x_btd, _BTD)
    cos_bth, sin_bth = rope_cos_sin(positions_bt, self.head_dim, self.rope_theta)
    x_btd, _ = scan_layers(self.layers, x_btd, cos_bth, sin_bth, segment_ids_bt,
                           remat=self.remat)
    return self.norm(x_btd)


def make_embedding(cfg: ConfigDict, *, param_dtype, compute_dtype, rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype,
                   dtype=compute_dtype,  # looked-up rows come out in compute_dtype
                   embedding_init=_weight_init(("vocab", "embed")), rngs=rngs)


class Qwen3ForCausalLM(nnx.Module):
  """`model` plus `lm_head` (absent when `tie_word_embeddings`: the embedding is reused).

  Subclasses (Qwen3-MoE) swap the decoder through `MODEL`; everything else is shared.
  """
  MODEL = Qwen3Model

  def __init__(self, cfg: ConfigDict, *, param_dtype=jnp.float32, compute_dtype=jnp.bfloat16,
               remat: str = "full", attention: str = "xla", rngs: nnx.Rngs):
    if cfg.num_attention_heads % cfg.num_key_value_heads:
      raise ValueError(f"num_attention_heads ({cfg.num_attention_heads}) must be a multiple "
                       f"of num_key_value_heads ({cfg.num_key_value_heads})")
    if attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {attention!r}")
    self.config = FrozenConfigDict(cfg)  # hashable: part of the static graph definition
    self.compute_dtype = jnp.dtype(compute_dtype)
    dims = dict(param_dtype=jnp.dtype(param_dtype), compute_dtype=self.compute_dtype)
    # Params carry logical axis names, not mesh axes: placing them is the caller's job
    # (`jaxtune.models.create_model`), so building must not try to shard eagerly.
    with nnx.use_eager_sharding(False):
      self.model = self.MODEL(cfg, **dims, remat=remat, attention=attention, rngs=rngs)
      if not cfg.tie_word_embeddings:
        self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), **dims,
                               rngs=rngs)

  def __call__(self, input_ids: jax.Array, positions: jax.Array,
               segment_ids: jax.Array) -> jax.Array:
    """[B, T] int32 ids, positions, segment ids -> final hidden states [B, T, D]."""
    return self.forward(dict(input_ids=input_ids, positions=positions,
                             segment_ids=segment_ids)).hidden

  def forward(self, batch: dict) -> ForwardOutput:
    """The family interface: the batch's token ids through the decoder."""
    return self.forward_embeddings(self.model.embed_tokens(batch["input_ids"]), batch)

  def forward_embeddings(self, x_btd: jax.Array, batch: dict) -> ForwardOutput:
    """`forward` from input embeddings (a VLM's merged text and image features). A dense
    decoder has no auxiliary losses or statistics."""
    return ForwardOutput(self.model.decode(x_btd, batch["positions"], batch["segment_ids"]))

  def aux_loss_coefficients(self) -> dict[str, float]:
    return {}

  def step_metrics(self, stats: dict) -> dict:
    del stats
    return {}

  def lm_head_kernel(self) -> jax.Array:
    """[D, V] output projection (the embedding transposed when tied), in param_dtype."""
    if self.config.tie_word_embeddings:
      return self.model.embed_tokens.embedding[...].T
    return self.lm_head.kernel[...]

  def logits(self, hidden_btd: jax.Array) -> jax.Array:
    """[B, T, V] float32 logits; operands in compute_dtype, accumulation in float32."""
    kernel_dv = self.lm_head_kernel().astype(self.compute_dtype)
    return jnp.einsum("btd,dv->btv", hidden_btd.astype(self.compute_dtype), kernel_dv,
                      preferred_element_type=jnp.float32)


MODEL_CLASS = Qwen3ForCausalLM


# ---- the family interface (see jaxtune.models) ---------------------------------------------

def data_options(cfg: ConfigDict) -> dict:
  """Text batches: SFTData needs nothing more."""
  del cfg
  return {}


def batch_layout(cfg: ConfigDict, rows: int, length: int, max_tiles: int = 0) -> dict:
  del cfg, max_tiles  # a text model reads no pixels
  return text_batch_layout(rows, length)


def matmul_params_per_token(cfg: ConfigDict) -> int:
  """Parameters in a matmul per token: attention, MLP, LM head (embedding lookup excluded)."""
  d, h = cfg.hidden_size, cfg.head_dim
  attn = d * h * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
  return cfg.num_hidden_layers * (attn + 3 * d * cfg.intermediate_size) + d * cfg.vocab_size


def train_flops(cfg: ConfigDict, batch: dict) -> float:
  return decoder_train_flops(matmul_params_per_token(cfg), cfg, batch["segment_ids"])


def trainable(cfg: ConfigDict):
  """Every param trains (full fine-tuning)."""
  del cfg
  return nnx.Param


def attention_table(layer: str, ours: str) -> list[HFWeight]:
  """The per-layer attention and norm rows, shared with Qwen3-MoE."""
  return [
      HFWeight(layer + "input_layernorm.weight", ours + "input_layernorm.weight"),
      HFWeight(layer + "self_attn.q_proj.weight", ours + "self_attn.q_proj.kernel", True),
      HFWeight(layer + "self_attn.k_proj.weight", ours + "self_attn.k_proj.kernel", True),
      HFWeight(layer + "self_attn.v_proj.weight", ours + "self_attn.v_proj.kernel", True),
      HFWeight(layer + "self_attn.o_proj.weight", ours + "self_attn.o_proj.kernel", True),
      HFWeight(layer + "self_attn.q_norm.weight", ours + "self_attn.q_norm.weight"),
      HFWeight(layer + "self_attn.k_norm.weight", ours + "self_attn.k_norm.weight"),
      HFWeight(layer + "post_attention_layernorm.weight", ours + "post_attention_layernorm.weight"),
  ]


def dense_mlp_table(layer: str, ours: str) -> list[HFWeight]:
  return [HFWeight(layer + f"mlp.{name}.weight", ours + f"mlp.{name}.kernel", True)
          for name in ("gate_proj", "up_proj", "down_proj")]


def embedding_rows() -> list[HFWeight]:
  return [HFWeight("model.embed_tokens.weight", "model.embed_tokens.embedding")]


def head_rows(cfg: ConfigDict) -> list[HFWeight]:
  rows = [HFWeight("model.norm.weight", "model.norm.weight")]
  if cfg.tie_word_embeddings:
    # Official tied checkpoints (Qwen3-0.6B/1.7B/4B) still store a copy of the embedding as
    # lm_head.weight; like transformers we accept it and use the embedding.
    return rows + [HFWeight("lm_head.weight", None)]
  return rows + [HFWeight("lm_head.weight", "lm_head.kernel", True)]


def hf_weight_map(cfg: ConfigDict) -> tuple[HFWeight, ...]:
  """HF tensor names <-> our param paths, in HF's file order. Used by load and export."""
  layer, ours = "model.layers.{layer}.", "model.layers."
  return tuple(embedding_rows() + attention_table(layer, ours) + dense_mlp_table(layer, ours)
               + head_rows(cfg))


# Token ids of Qwen3's tokenizer: <|endoftext|> and <|im_end|>, as in the official configs.
_BOS_TOKEN_ID, _EOS_TOKEN_ID = 151643, 151645


def _special_id(cfg: ConfigDict, token_id: int) -> int | None:
  # Tiny test vocabularies cannot hold Qwen's special ids; transformers rejects those.
  return token_id if token_id < cfg.vocab_size else None


def hf_config(cfg: ConfigDict, dtype: str, source: dict | None = None) -> dict:
  """The HF `config.json` of a Qwen3ForCausalLM with this architecture.

  `rope_parameters` is transformers 5's form; the flat `rope_theta` keeps older readers
  (transformers 4, vLLM) working. `source` (the loaded checkpoint's config.json) adds nothing:
  every field is written from the architecture.
  """
  del source
  num_layers = cfg.num_hidden_layers
  special_id = lambda token_id: _special_id(cfg, token_id)
  return {
      "architectures": ["Qwen3ForCausalLM"],
      "model_type": "qwen3",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": num_layers,
      "num_attention_heads": cfg.num_attention_heads,
      "num_key_value_heads": cfg.num_key_value_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "initializer_range": _INIT_STD,
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
      "rope_theta": float(cfg.rope_theta),
      "attention_bias": False,
      "attention_dropout": 0.0,
      "use_sliding_window": False,
      "sliding_window": None,
      "max_window_layers": num_layers,
      "layer_types": ["full_attention"] * num_layers,
      "tie_word_embeddings": bool(cfg.tie_word_embeddings),
      "use_cache": True,
      "bos_token_id": special_id(_BOS_TOKEN_ID),
      "eos_token_id": special_id(_EOS_TOKEN_ID),
      "dtype": dtype,
  }


def rope_theta_of(hf: dict) -> float:
  """rope_theta from transformers 5's `rope_parameters` or the older flat field."""
  params = hf.get("rope_parameters")
  if isinstance(params, dict) and "rope_theta" in params:
    return float(params["rope_theta"])
  return float(hf["rope_theta"])


def fields_from_hf(hf: dict, model_type: str, fields) -> dict:
  """`fields` of an HF config, with transformers' own defaults for those config.json omits
  (its config class fills them, as `from_pretrained` would)."""
  import transformers  # pylint: disable=import-outside-toplevel
  full = transformers.AutoConfig.for_model(
      model_type, **{k: v for k, v in hf.items() if k != "model_type"})
  out = {}
  for name in fields:
    if name == "rope_theta":
      out[name] = rope_theta_of(full.to_dict())
    else:
      value = getattr(full, name)
      out[name] = tuple(value) if isinstance(value, list) else value
  return out


def config_from_hf(hf: dict, hf_dir: str | None = None) -> ConfigDict:
  del hf_dir  # the names of a text model's tensors do not vary
  from jaxtune.models import presets  # pylint: disable=import-outside-toplevel
  names = [k for k in presets.qwen3_0_6b().keys() if k != "type"]
  return presets.qwen3_0_6b(**fields_from_hf(hf, "qwen3", names))

"""Qwen3 dense decoder in Flax NNX, read like HF's `modeling_qwen3.py`.

Classes and attribute names are HF's, so `model.layers.{i}.self_attn.q_proj.weight` is
`model.layers.self_attn.q_proj.kernel[i]` here (see `qwen3.hf.hf_weight_map`). Differences from HF:
  - Linear kernels are [in, out] (Flax); the transpose happens only at the HF boundary.
  - The decoder layers are one stacked module with a leading L axis, run by `jax.lax.scan`,
    so compile time does not grow with depth.
  - Packed rows: `segment_ids` (1-based per sample, 0 = padding) keep samples apart and
    `positions` restart at 0 per sample.
  - `__call__` returns the final-norm hidden states; `logits()` applies the LM head (the
    training loss applies it chunk by chunk instead). `forward(batch)` is the family
    interface (`jaxtune.models.ModelFamily`) the trainer calls.
Params are stored in `param_dtype` and cast to `compute_dtype` at use; norms, softmax and
RoPE run in float32. Profiles and HLO read by scope: `decoder/layer/attention`, `.../mlp`.

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

from jaxtune.models import ForwardOutput
from jaxtune.models.layers import (ATTENTION_OUT, BT, BTD, RMSNorm, check_remat, scan_layers,
                                   stack_layers, weight_init)
from jaxtune.ops.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from jaxtune.ops.attention import attention as attention_op
from jaxtune.ops.attention import sequence_devices
from jaxtune.ops.rope import apply_rope, normalize_rope_scaling, rope_cos_sin
from jaxtune.parallel.sharding import shard_activation


def _linear(in_features: int, out_features: int, logical_axes: tuple[str, str], *,
            param_dtype, compute_dtype, rngs: nnx.Rngs, units: tuple[int, int] | None = None
            ) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, use_bias=False, param_dtype=param_dtype,
                    dtype=compute_dtype, kernel_init=weight_init(logical_axes, units),
                    rngs=rngs)


# HF's Qwen3RMSNorm: `weight * x / rms(x)` over the last axis, statistics in float32.
Qwen3RMSNorm = RMSNorm


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
    with jax.named_scope("attention"):
      return self._attend(x_btd, cos_bth, sin_bth, segment_ids_bt)

  def _attend(self, x_btd: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array,
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


# Under remat='full', rows longer than this run the MLP in chunks of this many tokens (when T
# is a multiple of it), each chunk rematerialised on its own: the backward then holds one
# chunk's [chunk, F] intermediates instead of the whole row's (at 16k tokens and F = 12,288,
# 384 MiB each). The idea of ALST's TiledMLP. Per-token results are unchanged and no FLOPs
# are added: the chunk's recomputation replaces the layer's, whose MLP output is dead there.
MLP_TOKEN_CHUNK = 4096


class Qwen3MLP(nnx.Module):
  """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)); `token_chunk`: see MLP_TOKEN_CHUNK."""

  def __init__(self, cfg: ConfigDict, *, param_dtype, compute_dtype, rngs: nnx.Rngs,
               token_chunk: int | None = None):
    dims = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
    hidden, inner = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = _linear(hidden, inner, ("embed", "mlp"), **dims)
    self.up_proj = _linear(hidden, inner, ("embed", "mlp"), **dims)
    self.down_proj = _linear(inner, hidden, ("mlp", "embed"), **dims)
    self.token_chunk = token_chunk

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    with jax.named_scope("mlp"):
      b, t, d = x_btd.shape
      chunk = self.token_chunk
      if not chunk or t <= chunk or t % chunk:
        return self._swiglu(x_btd)
      graphdef, state = nnx.split(self)

      @functools.partial(jax.checkpoint, prevent_cse=False)
      def one_chunk(x_bcd):
        return nnx.merge(graphdef, state)._swiglu(x_bcd)

      split = sequence_devices(x_btd)
      if split > 1 and chunk % split == 0:
        # A row split over devices (mesh.sequence): chunk i takes tokens i, i + n, i + 2n, ...
        # (n chunks), so each device walks its own slice; contiguous chunks would make XLA
        # reshard the whole row for the loop. The MLP is per token: any grouping is exact.
        x_nbcd = x_btd.reshape(b, chunk, t // chunk, d).transpose(2, 0, 1, 3)
        return jax.lax.map(one_chunk, x_nbcd).transpose(1, 2, 0, 3).reshape(b, t, -1)

      y_nbcd = jax.lax.map(one_chunk, x_btd.reshape(b, t // chunk, chunk, d).swapaxes(0, 1))
      return y_nbcd.swapaxes(0, 1).reshape(b, t, -1)

  def _swiglu(self, x_btd: jax.Array) -> jax.Array:
    h_btf = jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd)
    h_btf = shard_activation(h_btf, ("activation_batch", "activation_length", "activation_mlp"))
    return self.down_proj(h_btf)


class Qwen3DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ConfigDict, *, param_dtype, compute_dtype, attention: str,
               rngs: nnx.Rngs, mlp_token_chunk: int | None = None):
    dims = dict(param_dtype=param_dtype, compute_dtype=compute_dtype)
    self.input_layernorm = Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **dims)
    self.self_attn = Qwen3Attention(cfg, **dims, attention=attention, rngs=rngs)
    self.post_attention_layernorm = Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **dims)
    self.mlp = Qwen3MLP(cfg, **dims, rngs=rngs, token_chunk=mlp_token_chunk)

  def __call__(self, x_btd: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array,
               segment_ids_bt: jax.Array) -> jax.Array:
    x_btd = x_btd + self.self_attn(self.input_layernorm(x_btd), cos_bth, sin_bth, segment_ids_bt)
    x_btd = x_btd + self.mlp(self.post_attention_layernorm(x_btd))
    return shard_activation(x_btd, BTD)


def frozen_rope_scaling(cfg: ConfigDict) -> FrozenConfigDict | None:
  """`cfg.rope_scaling` checked when the model is built (not when traced) and frozen: hashable,
  as a module's static attributes must be."""
  scaling = normalize_rope_scaling(cfg.get("rope_scaling"))
  return None if scaling is None else FrozenConfigDict(scaling)


class Qwen3Model(nnx.Module):
  """Embedding, the stacked decoder layers, final norm."""

  def __init__(self, cfg: ConfigDict, *, param_dtype, compute_dtype, remat: str, attention: str,
               rngs: nnx.Rngs):
    check_remat(remat)
    dims = dict(param_dtype=param_dtype, compute_dtype=compute_dtype)
    self.head_dim, self.rope_theta, self.remat = cfg.head_dim, float(cfg.rope_theta), remat
    self.rope_scaling = frozen_rope_scaling(cfg)
    self.max_position_embeddings = cfg.max_position_embeddings
    self.embed_tokens = make_embedding(cfg, **dims, rngs=rngs)
    self.layers = stack_layers(
        lambda r: Qwen3DecoderLayer(
            cfg, **dims, attention=attention, rngs=r,
            mlp_token_chunk=MLP_TOKEN_CHUNK if remat == "full" else None),
        cfg.num_hidden_layers, rngs)
    self.norm = Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **dims)

  def __call__(self, input_ids_bt: jax.Array, positions_bt: jax.Array,
               segment_ids_bt: jax.Array) -> jax.Array:
    return self.decode(self.embed_tokens(input_ids_bt), positions_bt, segment_ids_bt)

  def decode(self, x_btd: jax.Array, positions_bt: jax.Array,
             segment_ids_bt: jax.Array) -> jax.Array:
    """Input embeddings [B, T, D] (a VLM merges image features into them) -> hidden states."""
    x_btd = shard_activation(x_btd, BTD)
    positions_bt, segment_ids_bt = (shard_activation(a, BT) for a in (positions_bt,
                                                                       segment_ids_bt))
    cos_bth, sin_bth = rope_cos_sin(positions_bt, self.head_dim, self.rope_theta,
                                    self.rope_scaling, self.max_position_embeddings)
    with jax.named_scope("decoder"):
      x_btd, _ = scan_layers(self.layers, x_btd, cos_bth, sin_bth, segment_ids_bt,
                             remat=self.remat)
      return self.norm(x_btd)


def make_embedding(cfg: ConfigDict, *, param_dtype, compute_dtype, rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype,
                   dtype=compute_dtype,  # looked-up rows come out in compute_dtype
                   embedding_init=weight_init(("vocab", "embed")), rngs=rngs)


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
    # Split like the hidden states first (a row's tokens over `sequence`), so the lookup
    # writes each device's slice only, never a whole row of embeddings.
    input_ids_bt = shard_activation(batch["input_ids"], BT)
    return self.forward_embeddings(self.model.embed_tokens(input_ids_bt), batch)

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

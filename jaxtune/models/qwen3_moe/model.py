"""Qwen3-MoE decoder in Flax NNX, read like HF's `modeling_qwen3_moe.py`.

Attention, norms, embedding, LM head and the dense MLP are Qwen3's (jaxtune.models.qwen3).
What differs is the MLP of the sparse layers, HF's `Qwen3MoeSparseMoeBlock`: a float32 softmax
router picks `num_experts_per_tok` of `num_experts` SwiGLU experts per token (weights
renormalised when `norm_topk_prob`), dropless, through a grouped matmul (jaxtune.ops.moe).
Layer i is sparse unless it is in `mlp_only_layers` or (i + 1) % `decoder_sparse_step` != 0.

Layout: the sparse layers are one stacked module `model.layers` ([L_moe, ...] params) and the
dense ones, if any, another, `model.dense_layers`. The forward runs consecutive layers of one
kind as one scan, so the official models (every layer sparse) are a single scan. Expert
weights are stacked [E, ...] inside each layer: `mlp.experts.gate_proj` [L_moe, E, D, F] is HF's
`model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight` transposed.

Auxiliary losses, XTuner's (added to the objective by the trainer with their coefficients and
averaged over micro-batches, logged apart from the LM loss): `aux_loss`, the load-balancing
loss summed over the sparse layers (coefficient `router_aux_loss_coef`, 0.001 as XTuner's
`balancing_loss_alpha`), and `z_loss`, the router z-loss (`router_z_loss_coef`, 0 by default:
XTuner's Qwen3-MoE has none); see jaxtune.ops.moe for the formulas.
Padding tokens of packed rows (segment 0) count in neither, nor in the expert-load metrics.

Profiles and HLO read by scope: `decoder/layer/attention`, `decoder/layer/moe` (router and
experts), `decoder/dense_layer/mlp`.

Shape letters: B batch, T tokens, D hidden, E experts, F expert MLP hidden, N = B * T.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from jaxtune.models import ForwardOutput, lora
from jaxtune.models.layers import BT, BTD, INIT_STD, check_remat, scan_layers, stack_layers
from jaxtune.models.qwen3 import model as qwen3
from jaxtune.ops import moe
from jaxtune.ops.rope import rope_cos_sin
from jaxtune.parallel.sharding import logical_to_spec, shard_activation, token_axes


def sparse_layer_ids(cfg: ConfigDict) -> tuple[int, ...]:
  """HF's rule (Qwen3MoeDecoderLayer): which layers have a sparse MoE block."""
  dense = set(cfg.mlp_only_layers)
  return tuple(i for i in range(cfg.num_hidden_layers)
               if i not in dense and cfg.num_experts > 0
               and (i + 1) % cfg.decoder_sparse_step == 0)


def dense_layer_ids(cfg: ConfigDict) -> tuple[int, ...]:
  sparse = set(sparse_layer_ids(cfg))
  return tuple(i for i in range(cfg.num_hidden_layers) if i not in sparse)


class Qwen3MoeExperts(nnx.Module):
  """`num_experts` SwiGLU MLPs as stacked [E, ...] kernels ([in, out] per expert)."""

  def __init__(self, cfg: ConfigDict, *, param_dtype, rngs: nnx.Rngs):
    e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    init = nnx.initializers.normal(INIT_STD)

    def param(shape, names):
      return nnx.Param(init(rngs.params(), shape, param_dtype), out_sharding=names)
    self.gate_proj = param((e, d, f), ("experts", "embed", "mlp"))
    self.up_proj = param((e, d, f), ("experts", "embed", "mlp"))
    self.down_proj = param((e, f, d), ("experts", "mlp", "embed"))


class Qwen3MoeSparseMoeBlock(nnx.Module):
  """Router (`gate`, no bias) + experts; returns the output and this layer's router outputs."""

  def __init__(self, cfg: ConfigDict, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
    self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
    self.norm_topk_prob = bool(cfg.norm_topk_prob)
    # The router's output axis is small: replicated; its input axis follows the hidden dim.
    self.gate = nnx.Linear(cfg.hidden_size, cfg.num_experts, use_bias=False,
                           param_dtype=param_dtype, dtype=jnp.float32,
                           kernel_init=nnx.with_partitioning(
                               nnx.initializers.normal(INIT_STD),
                               ("embed", None)), rngs=rngs)
    self.experts = Qwen3MoeExperts(cfg, param_dtype=param_dtype, rngs=rngs)
    self.compute_dtype = compute_dtype

  def __call__(self, x_btd: jax.Array, valid_bt: jax.Array) -> tuple[jax.Array, dict]:
    with jax.named_scope("moe"):
      return self._route_and_run(x_btd, valid_bt)

  def _route_and_run(self, x_btd: jax.Array, valid_bt: jax.Array) -> tuple[jax.Array, dict]:
    batch, seq_len, hidden = x_btd.shape
    x_nd = x_btd.reshape(-1, hidden).astype(self.compute_dtype)
    valid_n = valid_bt.reshape(-1)
    # Each expert's LoRA adapters, if any, merged into its weights (jaxtune.models.lora).
    gate_edf, up_edf, down_efd = (lora.expert_kernel(self.experts, name, self.compute_dtype)
                                  for name in ("gate_proj", "up_proj", "down_proj"))
    # The mesh axes that split tokens, experts and the expert MLP, resolved here by the
    # logical-axis rules (the op takes mesh axes, not logical names); none without a mesh.
    mesh = jax.sharding.get_abstract_mesh()
    axes = {}
    if not mesh.empty:
      w_spec = logical_to_spec(("experts", "embed", "mlp"), gate_edf.shape, mesh)
      axes = dict(token_axes=token_axes((batch, seq_len), mesh), expert_axes=w_spec[0],
                  mlp_axes=w_spec[2])
    with jax.named_scope("router"):
      routing = moe.route(x_nd, self.gate.kernel[...], top_k=self.top_k,
                          norm_topk_prob=self.norm_topk_prob,
                          token_axes=axes.get("token_axes"))
    with jax.named_scope("experts"):
      y_nd = moe.moe_experts(x_nd, routing, gate_edf, up_edf, down_efd, **axes)
    router = dict(
        aux_loss=moe.load_balancing_loss(routing, valid_n, num_experts=self.num_experts,
                                         top_k=self.top_k),
        z_loss=moe.router_z_loss(routing, valid_n),
        expert_counts=moe.expert_counts(routing, valid_n, self.num_experts))
    return y_nd.reshape(batch, seq_len, hidden), router


class Qwen3MoeDecoderLayer(nnx.Module):
  """Qwen3's pre-norm block with the sparse MoE block as its MLP."""

  def __init__(self, cfg: ConfigDict, *, param_dtype, compute_dtype, attention: str,
               rngs: nnx.Rngs):
    dims = dict(param_dtype=param_dtype, compute_dtype=compute_dtype)
    self.input_layernorm = qwen3.Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **dims)
    self.self_attn = qwen3.Qwen3Attention(cfg, **dims, attention=attention, rngs=rngs)
    self.post_attention_layernorm = qwen3.Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **dims)
    self.mlp = Qwen3MoeSparseMoeBlock(cfg, **dims, rngs=rngs)

  def __call__(self, x_btd: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array,
               segment_ids_bt: jax.Array) -> tuple[jax.Array, dict]:
    x_btd = x_btd + self.self_attn(self.input_layernorm(x_btd), cos_bth, sin_bth, segment_ids_bt)
    y_btd, router = self.mlp(self.post_attention_layernorm(x_btd), segment_ids_bt > 0)
    return shard_activation(x_btd + y_btd, BTD), router


class Qwen3MoeModel(nnx.Module):
  """Embedding, the sparse (and dense) decoder layers in HF's order, final norm."""

  def __init__(self, cfg: ConfigDict, *, param_dtype, compute_dtype, remat: str, attention: str,
               rngs: nnx.Rngs):
    check_remat(remat)
    dims = dict(param_dtype=param_dtype, compute_dtype=compute_dtype)
    self.head_dim, self.rope_theta, self.remat = cfg.head_dim, float(cfg.rope_theta), remat
    self.rope_scaling = qwen3.frozen_rope_scaling(cfg)
    self.max_position_embeddings = cfg.max_position_embeddings
    sparse, dense = sparse_layer_ids(cfg), dense_layer_ids(cfg)
    if not sparse:
      raise ValueError("this Qwen3-MoE config has no sparse layer (num_experts, "
                       "decoder_sparse_step, mlp_only_layers); use model.type 'qwen3'")
    self.embed_tokens = qwen3.make_embedding(cfg, **dims, rngs=rngs)
    self.layers = stack_layers(
        lambda r: Qwen3MoeDecoderLayer(cfg, **dims, attention=attention, rngs=r),
        len(sparse), rngs)
    if dense:
      self.dense_layers = stack_layers(
          lambda r: qwen3.Qwen3DecoderLayer(cfg, **dims, attention=attention, rngs=r),
          len(dense), rngs)
    self.norm = qwen3.Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **dims)
    # Consecutive layers of one kind: (sparse?, first and last+1 index in that kind's stack).
    kinds = [i in set(sparse) for i in range(cfg.num_hidden_layers)]
    runs, seen = [], {True: 0, False: 0}
    for is_sparse, group in itertools.groupby(kinds):
      n = len(list(group))
      runs.append((is_sparse, seen[is_sparse], seen[is_sparse] + n))
      seen[is_sparse] += n
    self.runs = tuple(runs)

  def __call__(self, input_ids_bt: jax.Array, positions_bt: jax.Array,
               segment_ids_bt: jax.Array) -> tuple[jax.Array, dict]:
    """-> (final hidden states [B, T, D], router outputs stacked over the sparse layers)."""
    return self.decode(self.embed_tokens(input_ids_bt), positions_bt, segment_ids_bt)

  def decode(self, x_btd: jax.Array, positions_bt: jax.Array,
             segment_ids_bt: jax.Array) -> tuple[jax.Array, dict]:
    """`__call__` from input embeddings [B, T, D]."""
    x_btd = shard_activation(x_btd, BTD)
    positions_bt, segment_ids_bt = (shard_activation(a, BT) for a in (positions_bt,
                                                                       segment_ids_bt))
    cos_bth, sin_bth = rope_cos_sin(positions_bt, self.head_dim, self.rope_theta,
                                    self.rope_scaling, self.max_position_embeddings)
    args = (cos_bth, sin_bth, segment_ids_bt)
    with jax.named_scope("decoder"):
      x_btd, routers = self._run_layers(x_btd, args)
      router = jax.tree.map(lambda *per_run: jnp.concatenate(per_run), *routers)
      return self.norm(x_btd), router

  def _run_layers(self, x_btd: jax.Array, args: tuple) -> tuple[jax.Array, list]:
    """Each run of consecutive layers of one kind as one scan; the sparse runs' router
    outputs, in order."""
    routers = []
    for is_sparse, start, stop in self.runs:
      stack = self.layers if is_sparse else self.dense_layers
      whole = start == 0 and stop == _stack_size(stack)
      x_btd, router = scan_layers(stack, x_btd, *args, remat=self.remat,
                                  start=0 if whole else start, stop=None if whole else stop,
                                  name="layer" if is_sparse else "dense_layer")
      if is_sparse:
        routers.append(router)
    return x_btd, routers


def _stack_size(stack: nnx.Module) -> int:
  return jax.tree.leaves(nnx.state(stack, nnx.Param))[0].shape[0]


class Qwen3MoeForCausalLM(qwen3.Qwen3ForCausalLM):
  """Qwen3's causal LM with the MoE decoder; the family interface adds the router losses."""
  MODEL = Qwen3MoeModel

  def forward_embeddings(self, x_btd: jax.Array, batch: dict) -> ForwardOutput:
    hidden, router = self.model.decode(x_btd, batch["positions"], batch["segment_ids"])
    # XTuner sums the per-layer losses over the sparse layers (see jaxtune.ops.moe).
    return ForwardOutput(hidden,
                         aux_losses=dict(aux_loss=router["aux_loss"].sum(),
                                         z_loss=router["z_loss"].sum()),
                         stats=dict(expert_counts=router["expert_counts"]))

  def aux_loss_coefficients(self) -> dict[str, float]:
    return dict(aux_loss=float(self.config.router_aux_loss_coef),
                z_loss=float(self.config.router_z_loss_coef))

  def step_metrics(self, stats: dict) -> dict:
    """Tokens routed to the busiest and the idlest expert of any sparse layer in the step."""
    counts = stats["expert_counts"]
    return dict(expert_load_max=counts.max(), expert_load_min=counts.min())


MODEL_CLASS = Qwen3MoeForCausalLM

"""Qwen3-MoE decoder in Flax NNX, read like HF's `modeling_qwen3_moe.py`, plus its family
interface (batch layout, FLOPs, HF name table and config).

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

Shape letters: B batch, T tokens, D hidden, E experts, F expert MLP hidden, N = B * T.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from jaxtune.models import ForwardOutput, HFWeight, text_batch_layout
from jaxtune.models import qwen3
from jaxtune.models.flops import decoder_train_flops
from jaxtune.ops import moe
from jaxtune.ops.rope import rope_cos_sin
from jaxtune.parallel.sharding import logical_to_spec, shard_activation

_BTD = ("activation_batch", "activation_length", "activation_embed")


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
    init = nnx.initializers.normal(qwen3._INIT_STD)  # pylint: disable=protected-access

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
                               nnx.initializers.normal(qwen3._INIT_STD),  # pylint: disable=protected-access
                               ("embed", None)), rngs=rngs)
    self.experts = Qwen3MoeExperts(cfg, param_dtype=param_dtype, rngs=rngs)
    self.compute_dtype = compute_dtype

  def __call__(self, x_btd: jax.Array, valid_bt: jax.Array) -> tuple[jax.Array, dict]:
    batch, seq_len, hidden = x_btd.shape
    x_nd = x_btd.reshape(-1, hidden).astype(self.compute_dtype)
    valid_n = valid_bt.reshape(-1)
    gate_edf = self.experts.gate_proj[...]
    # The mesh axes that split tokens, experts and the expert MLP, by the logical-axis rules
    # (the op imports none of jaxtune); none without a mesh.
    mesh = jax.sharding.get_abstract_mesh()
    axes = {}
    if not mesh.empty:
      tok_spec = logical_to_spec(("activation_batch", None), x_nd.shape, mesh)
      w_spec = logical_to_spec(("experts", "embed", "mlp"), gate_edf.shape, mesh)
      axes = dict(token_axes=tok_spec[0], expert_axes=w_spec[0], mlp_axes=w_spec[2])
    routing = moe.route(x_nd, self.gate.kernel[...], top_k=self.top_k,
                        norm_topk_prob=self.norm_topk_prob,
                        token_axes=axes.get("token_axes"))
    y_nd = moe.moe_experts(x_nd, routing, gate_edf, self.experts.up_proj[...],
                           self.experts.down_proj[...], **axes)
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
    return shard_activation(x_btd + y_btd, _BTD), router


class Qwen3MoeModel(nnx.Module):
  """Embedding, the sparse (and dense) decoder layers in HF's order, final norm."""

  def __init__(self, cfg: ConfigDict, *, param_dtype, compute_dtype, remat: str, attention: str,
               rngs: nnx.Rngs):
    qwen3.check_remat(remat)
    dims = dict(param_dtype=param_dtype, compute_dtype=compute_dtype)
    self.head_dim, self.rope_theta, self.remat = cfg.head_dim, float(cfg.rope_theta), remat
    sparse, dense = sparse_layer_ids(cfg), dense_layer_ids(cfg)
    if not sparse:
      raise ValueError("this Qwen3-MoE config has no sparse layer (num_experts, "
                       "decoder_sparse_step, mlp_only_layers); use model.type 'qwen3'")
    self.embed_tokens = qwen3.make_embedding(cfg, **dims, rngs=rngs)
    self.layers = qwen3.stack_layers(
        lambda r: Qwen3MoeDecoderLayer(cfg, **dims, attention=attention, rngs=r),
        len(sparse), rngs)
    if dense:
      self.dense_layers = qwen3.stack_layers(
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
    x_btd = shard_activation(x_btd, _BTD)
    cos_bth, sin_bth = rope_cos_sin(positions_bt, self.head_dim, self.rope_theta)
    args = (cos_bth, sin_bth, segment_ids_bt)
    routers = []
    for is_sparse, start, stop in self.runs:
      stack = self.layers if is_sparse else self.dense_layers
      whole = start == 0 and stop == _stack_size(stack)
      x_btd, router = qwen3.scan_layers(stack, x_btd, *args, remat=self.remat,
                                        start=0 if whole else start,
                                        stop=None if whole else stop)
      if is_sparse:
        routers.append(router)
    router = jax.tree.map(lambda *per_run: jnp.concatenate(per_run), *routers)
    return self.norm(x_btd), router


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


# ---- the family interface (see jaxtune.models) ---------------------------------------------

def data_options(cfg: ConfigDict) -> dict:
  """Text batches: SFTData needs nothing more."""
  del cfg
  return {}


def batch_layout(cfg: ConfigDict, rows: int, length: int, max_tiles: int = 0) -> dict:
  del cfg, max_tiles  # a text model reads no pixels
  return text_batch_layout(rows, length)


def matmul_params_per_token(cfg: ConfigDict) -> int:
  """Parameters one token meets in matmuls: attention in every layer, the dense MLPs, and in
  sparse layers the router plus its top-k experts; the LM head."""
  d, h = cfg.hidden_size, cfg.head_dim
  attn = d * h * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
  sparse = len(sparse_layer_ids(cfg))
  dense = cfg.num_hidden_layers - sparse
  experts = d * cfg.num_experts + cfg.num_experts_per_tok * 3 * d * cfg.moe_intermediate_size
  return (cfg.num_hidden_layers * attn + dense * 3 * d * cfg.intermediate_size
          + sparse * experts + d * cfg.vocab_size)


def train_flops(cfg: ConfigDict, batch: dict) -> float:
  return decoder_train_flops(matmul_params_per_token(cfg), cfg, batch["segment_ids"])


def trainable(cfg: ConfigDict):
  """Every param trains (full fine-tuning)."""
  del cfg
  return nnx.Param


def hf_weight_map(cfg: ConfigDict) -> tuple[HFWeight, ...]:
  """HF tensor names <-> our param paths, in HF's file order. Used by load and export."""
  layer = "model.layers.{layer}."
  sparse = (("layer", sparse_layer_ids(cfg)),)
  rows = qwen3.attention_table(layer, "model.layers.") + [
      HFWeight(layer + "mlp.gate.weight", "model.layers.mlp.gate.kernel", True)] + [
          HFWeight(layer + "mlp.experts.{expert}." + f"{name}.weight",
                   f"model.layers.mlp.experts.{name}", True)
          for name in ("gate_proj", "up_proj", "down_proj")]
  table = [row._replace(ids=sparse) for row in rows]
  dense = dense_layer_ids(cfg)
  if dense:
    rows = (qwen3.attention_table(layer, "model.dense_layers.")
            + qwen3.dense_mlp_table(layer, "model.dense_layers."))
    table += [row._replace(ids=(("layer", dense),)) for row in rows]
  return tuple(qwen3.embedding_rows() + table + qwen3.head_rows(cfg))


def hf_config(cfg: ConfigDict, dtype: str, source: dict | None = None) -> dict:
  """The HF `config.json` of a Qwen3MoeForCausalLM with this architecture."""
  out = qwen3.hf_config(cfg, dtype, source)
  out.update(
      architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
      moe_intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.num_experts,
      num_experts_per_tok=cfg.num_experts_per_tok, norm_topk_prob=bool(cfg.norm_topk_prob),
      decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers),
      router_aux_loss_coef=float(cfg.router_aux_loss_coef), output_router_logits=False)
  out.pop("layer_types", None)  # Qwen3MoeConfig has no per-layer attention types
  return out


def config_from_hf(hf: dict, hf_dir: str | None = None) -> ConfigDict:
  del hf_dir  # the names of a text model's tensors do not vary
  from jaxtune.models import presets  # pylint: disable=import-outside-toplevel
  names = [k for k in presets.qwen3_30b_a3b().keys() if k not in ("type", "router_z_loss_coef")]
  return presets.qwen3_30b_a3b(**qwen3.fields_from_hf(hf, "qwen3_moe", names))

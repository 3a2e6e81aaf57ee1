"""The Qwen3-MoE sparse block as pure functions: router, dropless grouped experts, MoE losses.

Reproduces transformers' `Qwen3MoeSparseMoeBlock` (`Qwen3MoeTopKRouter` + `Qwen3MoeExperts`)
and the auxiliary losses of XTuner v1. Facts taken from XTuner (InternLM/xtuner, `xtuner/v1`):

- Router (`module/decoder_layer/moe_decoder_layer.py` `MoEGate.forward` with the default
  `router_compute_dtype="float32"`, and `module/router/greedy.py` `GreedyRouter.forward`):
  logits = x.float() @ W.float()^T, probabilities = softmax(logits) in float32 over all
  experts, top-k of the probabilities, then divided by their sum when `norm_topk_prob`.
  transformers does the same except that its router matmul runs in the model dtype.
- Balancing loss (`loss/moe_loss.py` `BalancingLossConfig` / `BalancingLossContext`, counts
  from `loss/aux_loss.py` `AuxLossContext.accumulate`, fed by `model/moe/moe.py` `MoE` with the
  non-padding tokens of `seq_ctx.mask` only). Per layer, over the n valid tokens:
      c_e = number of top-k selections of expert e (a histogram, no gradient),
      P_e = sum_n softmax(logits_n)_e / n            (the full softmax, not the top-k weights),
      loss_layer = E / (n * k) * sum_e c_e * P_e      (= 1 for a perfectly balanced router).
  The layers are SUMMED (`loss.sum()` over the stacked layers), then times
  `balancing_loss_alpha` (default 0.001) and divided by the number of gradient-accumulation
  micro-batches (`_batch_size`). `balancing_loss_global_average=True` (the default) all-reduces
  c_e, sum_n p_ne and n over all ranks before the formula, i.e. it is the loss of the whole
  global micro-batch; a jit over global arrays computes exactly that. Qwen3-MoE's preset
  (`model/moe/qwen3.py`) enables it; `router_scoring_func` defaults to softmax.
- Router z-loss (`ZLossConfig` / `ZLossContext.accumulate`): per layer
  sum_n logsumexp(logits_n)^2 / n over valid tokens, summed over layers, times `z_loss_alpha`
  (default 0.001), divided by the micro-batch count; global average on by default. Off for
  Qwen3-MoE (`z_loss_cfg=None`).

transformers' `load_balancing_loss_func` differs: it averages c_e / n and P_e over the layers
first and returns E * sum_e mean_l(c_le / n) * mean_l(P_le) (one product of layer means, not a
sum of per-layer products), so a balanced router gives k, not 1 per layer. For one layer it is
exactly k times `load_balancing_loss`; for L layers routing alike it is k / L times XTuner's
layer sum. It counts padding unless given an attention mask, and is only added when
`output_router_logits=True` (coefficient `router_aux_loss_coef`, 0.001).

The functions return per-layer values without alpha: the model sums them over layers.

Cost of `jax.lax.ragged_dot`: jax lowers it to XLA's ragged dot only on TPU and GPU; on the
CPU it expands the rows to a masked [G, M, D] array and runs a dense dot (G times the work
and memory: ~481 GiB of temporaries for one Qwen3-30B-A3B block at 16k tokens, see
scripts/bench_moe.py), and XLA's GPU `RaggedDotRewriter` expands it the same way unless its
cuDNN ragged-dot fusion applies. Expert parallelism divides G by the 'expert' size.

Shape letters: N tokens, D hidden, E experts, K top-k, F expert hidden, M = N * K
assignments, G local experts (groups).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxtune.parallel.sharding import logical_to_spec


class Routing(NamedTuple):
  """Router output for N tokens."""
  weights_nk: jax.Array  # float32 combine weights of the chosen experts
  experts_nk: jax.Array  # int32 expert ids, in descending probability (HF's top-k order)
  logits_ne: jax.Array   # float32 router logits, for the losses


def _constrain_tokens(x: jax.Array) -> jax.Array:
  """Keeps an [N, ...] activation split along N only (a no-op without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  names = ("activation_batch",) + (None,) * (x.ndim - 1)
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def route(x_nd: jax.Array, router_kernel_de: jax.Array, *, top_k: int,
          norm_topk_prob: bool) -> Routing:
  """Softmax top-k router in float32 (XTuner's `MoEGate` + `GreedyRouter`).

  Args:
    x_nd: hidden states [N, D], any float dtype.
    router_kernel_de: [D, E] kernel (HF's `mlp.gate.weight` transposed).
    top_k: experts per token (K).
    norm_topk_prob: renormalise the K chosen probabilities to sum 1.
  """
  if x_nd.ndim != 2 or router_kernel_de.ndim != 2 or x_nd.shape[1] != router_kernel_de.shape[0]:
    raise ValueError(f"expected x [N, D] and router kernel [D, E], got {x_nd.shape} and "
                     f"{router_kernel_de.shape}")
  if not 0 < top_k <= router_kernel_de.shape[1]:
    raise ValueError(f"top_k={top_k} must be in [1, {router_kernel_de.shape[1]}]")
  # HIGHEST: a TF32 matmul on GPU would flip near-tied top-k choices against the fp32 reference.
  logits_ne = jnp.dot(x_nd.astype(jnp.float32), router_kernel_de.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  # Split by tokens only, so top_k never reaches across devices for an expert-sharded kernel.
  logits_ne = _constrain_tokens(logits_ne)
  probs_ne = jax.nn.softmax(logits_ne, axis=-1)
  weights_nk, experts_nk = jax.lax.top_k(probs_ne, top_k)
  if norm_topk_prob:
    weights_nk = weights_nk / jnp.sum(weights_nk, axis=-1, keepdims=True)
  return Routing(weights_nk, experts_nk.astype(jnp.int32), logits_ne)


def _check_expert_shapes(x_nd, routing, gate_edf, up_edf, down_efd) -> None:
  e, d, f = gate_edf.shape
  if x_nd.ndim != 2 or x_nd.shape[1] != d or up_edf.shape != (e, d, f) or \
      down_efd.shape != (e, f, d):
    raise ValueError(f"expected x [N, D], gate/up [E, D, F], down [E, F, D]; got x {x_nd.shape}, "
                     f"gate {gate_edf.shape}, up {up_edf.shape}, down {down_efd.shape}")
  n = x_nd.shape[0]
  if routing.weights_nk.shape != routing.experts_nk.shape or routing.experts_nk.shape[0] != n:
    raise ValueError(f"routing weights {routing.weights_nk.shape} and experts "
                     f"{routing.experts_nk.shape} must both be [N={n}, K]")


def _grouped_experts(x_nd: jax.Array, weights_nk: jax.Array, experts_nk: jax.Array,
                     gate_gdf: jax.Array, up_gdf: jax.Array, down_gfd: jax.Array,
                     first_expert: jax.Array | int) -> jax.Array:
  """The contribution of experts [first_expert, first_expert + G) to every token, [N, D].

  Assignments to other experts sort after the G groups and are masked out, so the
  buffers are static at the worst case (all M assignments local). Weights arrive in x's
  dtype; matmuls accumulate in float32; each weighted expert output is rounded to x's
  dtype and the K of a token are summed in float32. The result is in x's dtype.
  """
  n, k = experts_nk.shape
  m, g, dtype = n * k, gate_gdf.shape[0], x_nd.dtype
  local_m = experts_nk.reshape(m) - first_expert
  is_local_m = (local_m >= 0) & (local_m < g)
  key_m = jnp.where(is_local_m, local_m, g)  # group g = "not mine", after every real group
  order_m = jnp.argsort(key_m, stable=True)
  sizes_g = jnp.bincount(key_m, length=g + 1)[:g].astype(jnp.int32)
  # Repeat, then permute: the backward of a permutation gather has no colliding indices, and
  # the K copies of a token are summed by the reshape, not by a scatter-add.
  x_md = jnp.broadcast_to(x_nd[:, None], (n, k, x_nd.shape[1])).reshape(m, -1)
  xs_md = jnp.take(x_md, order_m, axis=0, unique_indices=True)
  gate_mf = jax.lax.ragged_dot(xs_md, gate_gdf, sizes_g, preferred_element_type=jnp.float32)
  up_mf = jax.lax.ragged_dot(xs_md, up_gdf, sizes_g, preferred_element_type=jnp.float32)
  h_mf = (jax.nn.silu(gate_mf) * up_mf).astype(dtype)
  ys_md = jax.lax.ragged_dot(h_mf, down_gfd, sizes_g, preferred_element_type=jnp.float32)
  ws_m = jnp.take(weights_nk.reshape(m).astype(jnp.float32), order_m, unique_indices=True)
  keep_m = jnp.take(is_local_m, order_m, unique_indices=True)
  # `where`, not a product: rows past the groups are undefined on some backends.
  ys_md = jnp.where(keep_m[:, None], ws_m[:, None] * ys_md, 0.0).astype(dtype)
  inverse_m = jnp.zeros((m,), jnp.int32).at[order_m].set(
      jnp.arange(m, dtype=jnp.int32), unique_indices=True)
  y_nkd = jnp.take(ys_md, inverse_m, axis=0, unique_indices=True).reshape(n, k, -1)
  return jnp.sum(y_nkd.astype(jnp.float32), axis=1).astype(dtype)


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _vary(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """Marks x device-varying over `axes` (inside shard_map); the transpose sums gradients."""
  aval = jax.typeof(x)
  varying = aval.vma if hasattr(aval, "vma") else aval.mat.varying  # jax <= 0.11 / 0.12
  missing = tuple(a for a in axes if a not in varying)
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _expert_parallel(x_nd, weights_nk, experts_nk, gate_edf, up_edf, down_efd, mesh):
  """`_grouped_experts` under a mesh: experts split over their mesh axes (a shard_map).

  Tokens arrive split along N over some batch axes. Over the expert axes that also split
  the tokens, each device all-gathers the tokens of its expert group, computes the
  contribution of its own experts to all of them, and a reduce-scatter returns each device
  the sums for its own tokens. Expert axes that do not split the tokens (N did not divide)
  just psum, and so do the 'mlp' axes (F split over 'tensor': partial down_proj sums).
  Weights enter whole along D: the FSDP all-gather happens at the shard_map boundary.
  """
  e = gate_edf.shape[0]
  w_spec = logical_to_spec(("experts", "embed", "mlp"), gate_edf.shape, mesh)
  expert_axes, mlp_axes = _axes(w_spec[0]), _axes(w_spec[2])
  token_axes = _axes(logical_to_spec(("activation_batch", None), x_nd.shape, mesh)[0])
  if set(mlp_axes) & set(token_axes):
    raise ValueError(f"mesh axes {mlp_axes} cannot split both the tokens and the MLP dim")
  gather_axes = tuple(a for a in expert_axes if a in token_axes)
  sum_axes = tuple(a for a in expert_axes if a not in token_axes) + mlp_axes
  shards = 1
  for a in expert_axes:
    shards *= mesh.shape[a]
  g = e // shards
  spec_tok = P(token_axes or None, None)
  spec_in = P(expert_axes or None, None, mlp_axes or None)   # gate / up [E, D, F]
  spec_out = P(expert_axes or None, mlp_axes or None, None)  # down [E, F, D]
  all_axes = tuple(dict.fromkeys(token_axes + expert_axes + mlp_axes))

  def local(x, w, ids, gate, up, down):
    if gather_axes:
      x, w, ids = (jax.lax.all_gather(a, gather_axes, axis=0, tiled=True) for a in (x, w, ids))
    x, w, ids, gate, up, down = (_vary(a, all_axes) for a in (x, w, ids, gate, up, down))
    first = jax.lax.axis_index(expert_axes) * g if expert_axes else 0
    y = _grouped_experts(x, w, ids, gate, up, down, first)
    if gather_axes:
      y = jax.lax.psum_scatter(y, gather_axes, scatter_dimension=0, tiled=True)
    return jax.lax.psum(y, sum_axes) if sum_axes else y

  fn = jax.shard_map(local, in_specs=(spec_tok, spec_tok, spec_tok, spec_in, spec_in, spec_out),
                     out_specs=spec_tok, axis_names=set(mesh.axis_names))
  return fn(x_nd, weights_nk, experts_nk, gate_edf, up_edf, down_efd)


def moe_experts(x_nd: jax.Array, routing: Routing, gate_edf: jax.Array, up_edf: jax.Array,
                down_efd: jax.Array) -> jax.Array:
  """Dropless SwiGLU experts: y_n = sum_k w_nk * down_e(silu(gate_e(x_n)) * up_e(x_n)).

  A grouped matmul (`jax.lax.ragged_dot`) over the N * K assignments sorted by expert; no
  capacity, every token reaches all K experts. Weights are cast to x's dtype (the compute
  dtype); matmuls accumulate in float32; the result is in x's dtype. Under `jax.set_mesh`
  with more than one device the experts run expert-parallel (see `_expert_parallel`): the
  'expert' axis splits E, 'tensor' splits F, and tokens may be split over the batch axes.

  Args:
    x_nd: [N, D] tokens.
    routing: `route`'s output; `weights_nk` is differentiated, `experts_nk` is not.
    gate_edf, up_edf: [E, D, F]; down_efd: [E, F, D].
  """
  _check_expert_shapes(x_nd, routing, gate_edf, up_edf, down_efd)
  dtype = x_nd.dtype
  # Cast before the shard_map: the FSDP all-gather then moves compute-dtype weights.
  weights = [w.astype(dtype) for w in (gate_edf, up_edf, down_efd)]
  experts_nk = routing.experts_nk.astype(jnp.int32)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _grouped_experts(x_nd, routing.weights_nk, experts_nk, *weights, 0)
  return _expert_parallel(x_nd, routing.weights_nk, experts_nk, *weights, mesh)


def moe_experts_dense_loop(x_nd: jax.Array, routing: Routing, gate_edf: jax.Array,
                           up_edf: jax.Array, down_efd: jax.Array) -> jax.Array:
  """The naive reference: every token through every expert (a scan over E), masked by its
  combine weight (0 for experts it did not choose). Same dtype rules as `moe_experts`."""
  _check_expert_shapes(x_nd, routing, gate_edf, up_edf, down_efd)
  dtype, e = x_nd.dtype, gate_edf.shape[0]
  chosen_nke = routing.experts_nk[:, :, None] == jnp.arange(e)
  combine_en = jnp.sum(jnp.where(chosen_nke, routing.weights_nk[:, :, None].astype(jnp.float32),
                                 0.0), axis=1).T

  def body(acc_nd, xs):
    gate_df, up_df, down_fd, c_n = xs
    h_nf = (jax.nn.silu(jnp.dot(x_nd, gate_df, preferred_element_type=jnp.float32))
            * jnp.dot(x_nd, up_df, preferred_element_type=jnp.float32)).astype(dtype)
    y_nd = jnp.dot(h_nf, down_fd, preferred_element_type=jnp.float32)
    # Rounded like `moe_experts` rounds each weighted expert output.
    return acc_nd + (c_n[:, None] * y_nd).astype(dtype).astype(jnp.float32), None

  acc0 = jnp.zeros(x_nd.shape, jnp.float32)
  acc_nd, _ = jax.lax.scan(body, acc0, (gate_edf.astype(dtype), up_edf.astype(dtype),
                                        down_efd.astype(dtype), combine_en))
  return acc_nd.astype(dtype)


def expert_counts(routing: Routing, valid_n: jax.Array, num_experts: int) -> jax.Array:
  """[E] int32: top-k selections per expert over valid tokens (XTuner's `tokens_per_expert`;
  sums to K * number of valid tokens)."""
  hit_nke = (routing.experts_nk[:, :, None] == jnp.arange(num_experts)) & valid_n[:, None, None]
  return jnp.sum(hit_nke, axis=(0, 1), dtype=jnp.int32)


def load_balancing_loss(routing: Routing, valid_n: jax.Array, *, num_experts: int,
                        top_k: int) -> jax.Array:
  """XTuner's per-layer balancing loss, without alpha: E / (n K) * sum_e c_e * P_e.

  c_e: top-k selections of expert e, P_e: mean softmax probability of e, both over the n
  valid tokens (all of N as given: pass the global batch for XTuner's global average).
  Gradient flows through P only. 1.0 for a perfectly balanced router; sum over layers.
  """
  v_n = valid_n.astype(bool)
  n_valid = jnp.maximum(jnp.sum(v_n, dtype=jnp.float32), 1.0)
  probs_ne = jax.nn.softmax(routing.logits_ne.astype(jnp.float32), axis=-1)
  prob_mean_e = jnp.sum(jnp.where(v_n[:, None], probs_ne, 0.0), axis=0) / n_valid
  counts_e = jax.lax.stop_gradient(expert_counts(routing, v_n, num_experts)).astype(jnp.float32)
  return num_experts / (n_valid * top_k) * jnp.sum(counts_e * prob_mean_e)


def router_z_loss(routing: Routing, valid_n: jax.Array) -> jax.Array:
  """XTuner's per-layer router z-loss, without alpha: mean over valid tokens of
  logsumexp(logits)^2. Sum over layers."""
  v_n = valid_n.astype(bool)
  n_valid = jnp.maximum(jnp.sum(v_n, dtype=jnp.float32), 1.0)
  lse_n = jax.nn.logsumexp(routing.logits_ne.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.where(v_n, jnp.square(lse_n), 0.0)) / n_valid

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

Grouped matmul, two implementations (`moe_experts(..., impl=...)`):

- "tiled" (the default, every backend): the N * K assignments are sorted by expert and each
  expert's group is padded up to a multiple of `tile` rows, so every tile of rows belongs to
  one expert. A loop over the tiles gathers a tile's tokens [T, D], slices its expert's
  weights and runs the SwiGLU with float32 accumulation, then scatter-adds the weighted rows
  into the [N, D] float32 output. The loop runs only over the tiles in use (a dynamic trip
  count, at most M / T + G of them), so padding costs at most G * T rows in all. A custom
  VJP keeps the backward to one more loop: residuals are the float32 gate and up
  projections [tiles, T, F] (no [M, D] buffer, no per-tile copy of the weights), and weight
  gradients accumulate in float32 per expert. Work is 18 (M + padding) D F FLOPs for forward
  and backward; XLA's cost analysis counts a loop body once, so it shows a single tile. At
  the full Qwen3-30B-A3B block (16k tokens, T = 128): 1.07x the needed FLOPs for the tiles
  a random router uses (1.13x at the static bound) and 2.8 GiB of temporaries, against 51
  GiB for the dense loop (scripts/bench_moe.py). Reverse mode only (a custom VJP: no jvp).
  Every tile is a few small kernels, so on a GPU the loop may be bound by launches rather
  than FLOPs: time it there (a larger `tile` means fewer steps, more padding).
- "ragged_dot": `jax.lax.ragged_dot` on the sorted rows. jax lowers it to XLA's ragged dot
  only on TPU and GPU; on the CPU it expands the rows to a masked [G, M, D] array and runs a
  dense dot (G times the work and memory: ~481 GiB of temporaries for one Qwen3-30B-A3B
  block at 16k tokens, see scripts/bench_moe.py), and XLA's GPU `RaggedDotRewriter` expands
  it the same way unless its cuDNN ragged-dot fusion applies.

Expert parallelism (`token_axes` / `expert_axes` / `mlp_axes`, the mesh axes that split N,
E and F, under `jax.set_mesh`) runs either implementation per device inside a
`jax.shard_map` (built by `parallel.sharding.logical_shard_map`, the one helper the loss and
attention kernels use too); it divides G by the expert-axis size. The caller maps its logical
axes to mesh axes: this op takes mesh axes.

Shape letters: N tokens, D hidden, E experts, K top-k, F expert hidden, M = N * K
assignments, G local experts (groups), L tiles, T rows per tile.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxtune.parallel.sharding import logical_shard_map, varying_axes, varying_zeros

MeshAxes = str | Sequence[str] | None
IMPLS = ("tiled", "ragged_dot")
# Rows per tile. Padding adds at most G * T rows to M (12.5% at 30B-A3B's M = 131,072 and
# G = 128, ~6% on average) and the loop runs ~M / T + G / 2 steps; see scripts/bench_moe.py.
DEFAULT_TILE = 128


class Routing(NamedTuple):
  """Router output for N tokens."""
  weights_nk: jax.Array  # float32 combine weights of the chosen experts
  experts_nk: jax.Array  # int32 expert ids, in descending probability (HF's top-k order)
  logits_ne: jax.Array   # float32 router logits, for the losses


def _axes(entry: MeshAxes) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _splitting(axes: MeshAxes, what: str) -> tuple[str, ...]:
  """`axes` as a tuple without the size-1 ones (they split nothing); checks the mesh."""
  axes = _axes(axes)
  if not axes:
    return ()
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(axes) <= set(mesh.axis_names):
    raise ValueError(f"{what}={axes} needs a mesh with those axes set by jax.set_mesh; the "
                     f"current mesh has axes {mesh.axis_names}")
  return tuple(a for a in axes if mesh.shape[a] > 1)


def _shards(axes: tuple[str, ...]) -> int:
  mesh = jax.sharding.get_abstract_mesh()
  out = 1
  for a in axes:
    out *= mesh.shape[a]
  return out


def route(x_nd: jax.Array, router_kernel_de: jax.Array, *, top_k: int,
          norm_topk_prob: bool, token_axes: MeshAxes = ()) -> Routing:
  """Softmax top-k router in float32 (XTuner's `MoEGate` + `GreedyRouter`).

  Args:
    x_nd: hidden states [N, D], any float dtype.
    router_kernel_de: [D, E] kernel (HF's `mlp.gate.weight` transposed).
    top_k: experts per token (K).
    norm_topk_prob: renormalise the K chosen probabilities to sum 1.
    token_axes: mesh axes that split N (under `jax.set_mesh`); the logits are kept split
      along N only, so top_k never reaches across devices for an expert-sharded kernel.
  """
  if x_nd.ndim != 2 or router_kernel_de.ndim != 2 or x_nd.shape[1] != router_kernel_de.shape[0]:
    raise ValueError(f"expected x [N, D] and router kernel [D, E], got {x_nd.shape} and "
                     f"{router_kernel_de.shape}")
  if not 0 < top_k <= router_kernel_de.shape[1]:
    raise ValueError(f"top_k={top_k} must be in [1, {router_kernel_de.shape[1]}]")
  token_axes = _splitting(token_axes, "token_axes")
  # HIGHEST: a TF32 matmul on GPU would flip near-tied top-k choices against the fp32 reference.
  logits_ne = jnp.dot(x_nd.astype(jnp.float32), router_kernel_de.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  if token_axes:
    logits_ne = jax.lax.with_sharding_constraint(logits_ne, P(token_axes, None))
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


def _sort_by_expert(experts_nk: jax.Array, first_expert: jax.Array | int, g: int):
  """(order_m, sizes_g, is_local_m): assignments sorted by local expert, stable, with the
  ones of other devices' experts (group g, "not mine") after every real group."""
  m = experts_nk.size
  local_m = experts_nk.reshape(m) - first_expert
  is_local_m = (local_m >= 0) & (local_m < g)
  key_m = jnp.where(is_local_m, local_m, g)
  order_m = jnp.argsort(key_m, stable=True).astype(jnp.int32)
  sizes_g = jnp.bincount(key_m, length=g + 1)[:g].astype(jnp.int32)
  return order_m, sizes_g, is_local_m


# --- "ragged_dot" -------------------------------------------------------------------------

def _ragged_dot_experts(x_nd: jax.Array, weights_nk: jax.Array, experts_nk: jax.Array,
                        gate_gdf: jax.Array, up_gdf: jax.Array, down_gfd: jax.Array,
                        first_expert: jax.Array | int) -> jax.Array:
  """The contribution of experts [first_expert, first_expert + G) to every token, [N, D],
  through `jax.lax.ragged_dot`.

  Assignments to other experts sort after the G groups and are masked out, so the
  buffers are static at the worst case (all M assignments local). Weights arrive in x's
  dtype; matmuls accumulate in float32; each weighted expert output is rounded to x's
  dtype and the K of a token are summed in float32. The result is in x's dtype.
  """
  n, k = experts_nk.shape
  m, g, dtype = n * k, gate_gdf.shape[0], x_nd.dtype
  order_m, sizes_g, is_local_m = _sort_by_expert(experts_nk, first_expert, g)
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


# --- "tiled" ------------------------------------------------------------------------------

def num_tiles(m: int, g: int, tile: int) -> int:
  """Static bound on the tiles of M assignments over G groups padded to multiples of T:
  sum_g ceil(s_g / T) <= (M + G (T - 1)) / T, and no more tiles than assignments."""
  return max(1, min(m, (m + g * (tile - 1)) // tile))


class _Tiles(NamedTuple):
  """The padded, expert-sorted layout: which assignment each row of each tile holds."""
  src_lt: jax.Array     # int32 assignment n * K + k of each row, M for a padding row
  expert_l: jax.Array   # int32 local expert of each tile (G - 1 past the used tiles)
  used: jax.Array       # int32 scalar: tiles holding any row; the loops stop there


def _tile_layout(experts_nk: jax.Array, first_expert: jax.Array | int, g: int,
                 tile: int) -> _Tiles:
  """Sort by expert, pad each group to a multiple of `tile`; static shapes only."""
  m = experts_nk.size
  order_m, sizes_g, _ = _sort_by_expert(experts_nk, first_expert, g)
  start_g = jnp.cumsum(sizes_g) - sizes_g            # first sorted position of each group
  tiles_g = (sizes_g + tile - 1) // tile
  tile_end_g = jnp.cumsum(tiles_g).astype(jnp.int32)
  l = jnp.arange(num_tiles(m, g, tile), dtype=jnp.int32)
  # Tile l belongs to the first group whose tiles end after it (idle groups own none).
  expert_l = jnp.minimum(jnp.searchsorted(tile_end_g, l, side="right"), g - 1).astype(jnp.int32)
  rank_lt = ((l - (tile_end_g - tiles_g)[expert_l]) * tile)[:, None] + jnp.arange(tile)
  real_lt = (l < tile_end_g[-1])[:, None] & (rank_lt < sizes_g[expert_l][:, None])
  pos_lt = jnp.minimum(start_g[expert_l][:, None] + rank_lt, m - 1)
  src_lt = jnp.where(real_lt, order_m[pos_lt], m).astype(jnp.int32)
  return _Tiles(src_lt, expert_l, tile_end_g[-1])


def _row(a: jax.Array, i: jax.Array) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(a, i, axis=0, keepdims=False)


def _set_row(a: jax.Array, v: jax.Array, i: jax.Array) -> jax.Array:
  return jax.lax.dynamic_update_index_in_dim(a, v.astype(a.dtype), i, axis=0)


def _gather_rows(a_nd: jax.Array, tok_t: jax.Array) -> jax.Array:
  """a's rows `tok_t`; padding rows (tok = N) read zeros."""
  return a_nd.at[tok_t].get(mode="fill", fill_value=0)


def _scatter_add_rows(acc_nd: jax.Array, tok_t: jax.Array, v_td: jax.Array) -> jax.Array:
  """acc[tok_t] += v; padding rows (tok = N) are dropped. The real rows of a tile are
  distinct tokens (a token picks an expert at most once)."""
  return acc_nd.at[tok_t].add(v_td, mode="drop")


def _dot(a, b, spec: str) -> jax.Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _tiled_swiglu(x_nd: jax.Array, w_lt: jax.Array, tok_lt: jax.Array, expert_l: jax.Array,
                  used: jax.Array, gate_gdf: jax.Array, up_gdf: jax.Array,
                  down_gfd: jax.Array) -> jax.Array:
  """y[tok] += w * down_e(silu(gate_e(x[tok])) * up_e(x[tok])) for every row of the first
  `used` tiles (e = the tile's expert), as float32 [N, D].

  x and the weights share the compute dtype; matmuls accumulate in float32, h and each
  weighted row are rounded to that dtype (as the "ragged_dot" path rounds).
  """
  return _tiled_fwd(x_nd, w_lt, tok_lt, expert_l, used, gate_gdf, up_gdf, down_gfd)[0]


def _tiled_fwd(x_nd, w_lt, tok_lt, expert_l, used, gate_gdf, up_gdf, down_gfd):
  dtype = x_nd.dtype
  tiles, tile = tok_lt.shape
  f = gate_gdf.shape[2]
  like = (x_nd, w_lt, tok_lt, gate_gdf)

  def step(l, carry):
    y_nd, a_ltf, b_ltf = carry
    e, tok_t = expert_l[l], _row(tok_lt, l)
    x_td = _gather_rows(x_nd, tok_t)
    a_tf = _dot(x_td, _row(gate_gdf, e), "td,df->tf")
    b_tf = _dot(x_td, _row(up_gdf, e), "td,df->tf")
    h_tf = (jax.nn.silu(a_tf) * b_tf).astype(dtype)
    y_td = _dot(h_tf, _row(down_gfd, e), "tf,fd->td")
    y_td = (_row(w_lt, l)[:, None] * y_td).astype(dtype).astype(jnp.float32)
    return _scatter_add_rows(y_nd, tok_t, y_td), _set_row(a_ltf, a_tf, l), _set_row(b_ltf, b_tf, l)

  init = (varying_zeros(x_nd.shape, jnp.float32, *like),
          varying_zeros((tiles, tile, f), jnp.float32, *like),
          varying_zeros((tiles, tile, f), jnp.float32, *like))
  # A dynamic trip count: tiles past `used` (all padding) cost nothing.
  y_nd, a_ltf, b_ltf = jax.lax.fori_loop(0, used, step, init)
  return y_nd, (x_nd, w_lt, tok_lt, expert_l, used, gate_gdf, up_gdf, down_gfd, a_ltf, b_ltf)


def _tiled_bwd(res, dy_nd):
  x_nd, w_lt, tok_lt, expert_l, used, gate_gdf, up_gdf, down_gfd, a_ltf, b_ltf = res
  dtype = x_nd.dtype

  def step(l, carry):
    dx_nd, dw_lt, dgate_gdf, dup_gdf, ddown_gfd = carry
    e, tok_t, w_t = expert_l[l], _row(tok_lt, l), _row(w_lt, l)
    gate_df, up_df, down_fd = _row(gate_gdf, e), _row(up_gdf, e), _row(down_gfd, e)
    x_td = _gather_rows(x_nd, tok_t)
    dy_td = _gather_rows(dy_nd, tok_t)
    a_tf, b_tf = _row(a_ltf, l), _row(b_ltf, l)
    sig_tf = jax.nn.sigmoid(a_tf)
    silu_tf = a_tf * sig_tf
    h_tf = (silu_tf * b_tf).astype(dtype)
    # The row is w * (h @ down): <dy, h @ down> = <dy @ down^T, h>, so no y is kept for dw.
    g_tf = _dot(dy_td.astype(dtype), down_fd, "td,fd->tf")
    dw_t = jnp.sum(g_tf * h_tf.astype(jnp.float32), axis=1)
    dh_tf = w_t[:, None] * g_tf
    da_tf = (dh_tf * b_tf * sig_tf * (1.0 + a_tf * (1.0 - sig_tf))).astype(dtype)
    db_tf = (dh_tf * silu_tf).astype(dtype)
    dx_td = _dot(da_tf, gate_df, "tf,df->td") + _dot(db_tf, up_df, "tf,df->td")
    wdy_td = (w_t[:, None] * dy_td).astype(dtype)
    add = lambda acc, v: _set_row(acc, _row(acc, e) + v, e)  # noqa: E731
    return (_scatter_add_rows(dx_nd, tok_t, dx_td), _set_row(dw_lt, dw_t, l),
            add(dgate_gdf, _dot(x_td, da_tf, "td,tf->df")),
            add(dup_gdf, _dot(x_td, db_tf, "td,tf->df")),
            add(ddown_gfd, _dot(h_tf, wdy_td, "tf,td->fd")))

  like = (x_nd, w_lt, tok_lt, gate_gdf, dy_nd)
  init = (varying_zeros(x_nd.shape, jnp.float32, *like), varying_zeros(w_lt.shape, jnp.float32, *like),
          *(varying_zeros(a.shape, jnp.float32, *like) for a in (gate_gdf, up_gdf, down_gfd)))
  dx_nd, dw_lt, dgate, dup, ddown = jax.lax.fori_loop(0, used, step, init)
  # K rows of a token were summed in float32 (the carry); weight grads too, over the tiles.
  return (dx_nd.astype(x_nd.dtype), dw_lt.astype(w_lt.dtype), None, None, None,
          dgate.astype(gate_gdf.dtype), dup.astype(up_gdf.dtype), ddown.astype(down_gfd.dtype))


_tiled_swiglu.defvjp(_tiled_fwd, _tiled_bwd)


def _tiled_experts(x_nd: jax.Array, weights_nk: jax.Array, experts_nk: jax.Array,
                   gate_gdf: jax.Array, up_gdf: jax.Array, down_gfd: jax.Array,
                   first_expert: jax.Array | int, *, tile: int) -> jax.Array:
  """`_ragged_dot_experts` through the tiled loop (`_tiled_swiglu`): same contract."""
  n, k = experts_nk.shape
  tiles = _tile_layout(experts_nk, first_expert, gate_gdf.shape[0], tile)
  # Padding rows (src = M) get weight 0 and token N: they read zeros and write nowhere.
  w_lt = jnp.take(weights_nk.reshape(n * k).astype(jnp.float32), tiles.src_lt, mode="fill",
                  fill_value=0)
  tok_lt = tiles.src_lt // k
  y_nd = _tiled_swiglu(x_nd, w_lt, tok_lt, tiles.expert_l, tiles.used, gate_gdf, up_gdf,
                       down_gfd)
  return y_nd.astype(x_nd.dtype)


# --- expert parallelism and the entry point -----------------------------------------------

def _vary(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """Marks x device-varying over `axes` (inside shard_map); the transpose sums gradients."""
  missing = tuple(a for a in axes if a not in varying_axes(x))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _expert_parallel(experts_fn, x_nd, weights_nk, experts_nk, gate_edf, up_edf, down_efd, *,
                     token_axes, expert_axes, mlp_axes):
  """`experts_fn` under a mesh: experts split over `expert_axes` (a shard_map).

  Tokens arrive split along N over `token_axes`. Over the expert axes that also split the
  tokens, each device all-gathers the tokens of its expert group, computes the contribution
  of its own experts to all of them, and a reduce-scatter returns each device the sums for
  its own tokens. Expert axes that do not split the tokens just psum, and so do the
  `mlp_axes` (F split over 'tensor': partial down_proj sums). Weights enter whole along D:
  the FSDP all-gather happens at the shard_map boundary.
  """
  if set(mlp_axes) & set(token_axes):
    raise ValueError(f"mesh axes {mlp_axes} cannot split both the tokens and the MLP dim")
  if set(mlp_axes) & set(expert_axes):
    raise ValueError(f"mesh axes {mlp_axes} cannot split both the experts and the MLP dim")
  e, _, f = gate_edf.shape
  for axes, size, what in ((token_axes, x_nd.shape[0], "N"), (expert_axes, e, "E"),
                           (mlp_axes, f, "F")):
    if size % _shards(axes):
      raise ValueError(f"{what} = {size} does not split evenly over mesh axes {axes}")
  gather_axes = tuple(a for a in expert_axes if a in token_axes)
  sum_axes = tuple(a for a in expert_axes if a not in token_axes) + mlp_axes
  g = e // _shards(expert_axes)
  all_axes = tuple(dict.fromkeys(token_axes + expert_axes + mlp_axes))

  def local(_, x, w, ids, gate, up, down):
    if gather_axes:
      x, w, ids = (jax.lax.all_gather(a, gather_axes, axis=0, tiled=True) for a in (x, w, ids))
    x, w, ids, gate, up, down = (_vary(a, all_axes) for a in (x, w, ids, gate, up, down))
    first = jax.lax.axis_index(expert_axes) * g if expert_axes else 0
    y = experts_fn(x, w, ids, gate, up, down, first)
    if gather_axes:
      y = jax.lax.psum_scatter(y, gather_axes, scatter_dimension=0, tiled=True)
    return jax.lax.psum(y, sum_axes) if sum_axes else y

  # The op's own names for the three splits; the caller chose their mesh axes.
  rules = (("moe_tokens", token_axes), ("moe_experts", expert_axes), ("moe_mlp", mlp_axes))
  tok = ("moe_tokens", None)
  weight_in = ("moe_experts", None, "moe_mlp")    # gate / up [E, D, F]: whole along D
  weight_out = ("moe_experts", "moe_mlp", None)   # down [E, F, D]
  fn = logical_shard_map(local, in_names=(tok, tok, tok, weight_in, weight_in, weight_out),
                         out_names=tok, rules=rules)
  return fn(x_nd, weights_nk, experts_nk, gate_edf, up_edf, down_efd)


def moe_experts(x_nd: jax.Array, routing: Routing, gate_edf: jax.Array, up_edf: jax.Array,
                down_efd: jax.Array, *, token_axes: MeshAxes = (), expert_axes: MeshAxes = (),
                mlp_axes: MeshAxes = (), impl: str = "tiled",
                tile: int = DEFAULT_TILE) -> jax.Array:
  """Dropless SwiGLU experts: y_n = sum_k w_nk * down_e(silu(gate_e(x_n)) * up_e(x_n)).

  A grouped matmul over the N * K assignments sorted by expert; no capacity, every token
  reaches all K experts. Weights are cast to x's dtype (the compute dtype); matmuls
  accumulate in float32; each weighted expert output is rounded to x's dtype and the K of a
  token are summed in float32; the result is in x's dtype.

  With any of the mesh axes given (under `jax.set_mesh`; axes of size 1 are ignored) the
  experts run expert-parallel (see `_expert_parallel`), else on the arrays as they are.

  Args:
    x_nd: [N, D] tokens.
    routing: `route`'s output; `weights_nk` is differentiated, `experts_nk` is not.
    gate_edf, up_edf: [E, D, F]; down_efd: [E, F, D].
    token_axes: mesh axes that split N (e.g. ('data', 'fsdp', 'expert')).
    expert_axes: mesh axes that split E (e.g. 'expert'); E must divide over them.
    mlp_axes: mesh axes that split F (e.g. 'tensor').
    impl: "tiled" (default) or "ragged_dot"; see the module docstring.
    tile: rows per tile of "tiled" (T).
  """
  _check_expert_shapes(x_nd, routing, gate_edf, up_edf, down_efd)
  if impl == "tiled":
    if tile < 1:
      raise ValueError(f"tile must be positive, got {tile}")
    experts_fn = functools.partial(_tiled_experts, tile=int(tile))
  elif impl == "ragged_dot":
    experts_fn = _ragged_dot_experts
  else:
    raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
  axes = dict(token_axes=_splitting(token_axes, "token_axes"),
              expert_axes=_splitting(expert_axes, "expert_axes"),
              mlp_axes=_splitting(mlp_axes, "mlp_axes"))
  dtype = x_nd.dtype
  # Cast before the shard_map: the FSDP all-gather then moves compute-dtype weights.
  weights = [w.astype(dtype) for w in (gate_edf, up_edf, down_efd)]
  experts_nk = routing.experts_nk.astype(jnp.int32)
  if not any(axes.values()):
    return experts_fn(x_nd, routing.weights_nk, experts_nk, *weights, 0)
  return _expert_parallel(experts_fn, x_nd, routing.weights_nk, experts_nk, *weights, **axes)


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

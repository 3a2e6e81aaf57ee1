"""Fused LM-head + cross-entropy with Pallas kernels (Triton-style, for NVIDIA GPUs).

The same weighted sum as `loss.chunked_cross_entropy`, laid out so that the Pallas kernels do
only what XLA cannot fuse (the head matmul with the softmax in its epilogue) and the matmuls of
the backward pass stay XLA's (cuBLAS on a GPU). The vocab is walked in slabs of
`Tiles.vocab_slab` columns by a `fori_loop`; each slab's [D, slab] head columns are sliced (and
cast to the compute dtype) by XLA, and the slab's place in the vocab reaches the kernels as an
operand, a [slab] int32 array of global column indices (-1 for a column to skip), so each
kernel is traced and compiled once whatever the number of slabs. Two kernels:

  stats     grid (vocab tiles of the slab, token tiles): each program computes its [BT, BV]
            logits tile (bf16 inputs, float32 accumulation, contracted over D in chunks of BD)
            and writes that tile's (max, sum of exp, target logit) per token; the [N, slab]
            logits are never written. XLA folds the [slab / BV, N] partials into a running
            per-token max / sum of exp / target logit, hence each token's logsumexp.
  dlogits   same grid: recomputes the tile and writes G = coef * (softmax - onehot) in the
            compute dtype (bf16 in training), coef = g * weight, zero on ignored tokens. Only
            that: no accumulation anywhere inside a kernel. Then, per slab, dh += G @ W_slab^T
            (float32 [N, D] carry) and dW_slab = h^T @ G are plain XLA matmuls.

Every block lies inside its array (Triton on jax 0.11 does not mask a partial block, and
interpret mode would hide one): the tokens are zero-padded to whole token tiles (added tokens
have label -1 and coef 0), a slab is a whole number of vocab tiles, and no slab runs past V:
the last one starts at V - slab and the columns an earlier slab covered get index -1, which
the kernels mask (G is zero there, and the kernel gradient keeps what the earlier slab wrote).
So the head is never padded or copied whole.

At 16,384 tokens x 4,096 x 151,936 in bf16 with the default slab of 4,096 (38 slabs) the
backward's temporaries are G (128 MiB bf16), the slab of the head (32 MiB), dW_slab (64 MiB
float32) and the float32 dh (256 MiB), plus the result of the dh matmul where XLA does not add
it in place: loss + gradients compile to 0.66 GiB of temporaries on the CPU backend (interpret
mode; scripts/bench_loss.py), against 0.49 GiB for the pure-JAX path. The matmuls per slab are
[N, S] x [S, D] and [D, N] x [N, S], large enough for cuBLAS.

No atomics, every output block belongs to one program: deterministic, and the kernels run
unchanged in `interpret=True` mode on the CPU (that is how they are tested).

Shape letters: N tokens, D hidden, V vocab, S slab; BT, BV, BD the token, vocab, hidden tiles.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes (powers of two for Triton; the defaults are a guess shaped for Hopper's matrix
  instructions, not tuned on a GPU). `vocab_slab` is the vocab width of one step of the slab
  loop (rounded down to a multiple of `vocab`, and to at most V): it sets the size of G and of
  the XLA matmuls, and so the temporaries."""
  tokens: int = 128
  vocab: int = 128
  hidden: int = 64
  vocab_slab: int = 4096
  num_warps: int | None = 8
  num_stages: int | None = 3


def supported(n: int, d: int, v: int, tiles: Tiles = Tiles()) -> bool:
  """Whether the kernels take this shape (else the caller uses the pure-JAX path)."""
  return d % tiles.hidden == 0 and v >= tiles.vocab and n >= tiles.tokens


def slab_width(v: int, tiles: Tiles) -> int:
  """Columns per slab: a multiple of the vocab tile, at most V (so no slab runs past it)."""
  bv = tiles.vocab
  return max(bv, min(tiles.vocab_slab // bv * bv, v // bv * bv))


def _compiler_params(tiles: Tiles, interpret: bool):
  if interpret:
    return None
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=import-outside-toplevel
  return pltriton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def varying_out_struct(shape: tuple[int, ...], dtype, like: jax.Array
                       ) -> jax.ShapeDtypeStruct:
  """An output type varying over the same shard_map axes as `like`: shard_map's type check
  needs it spelled out for a pallas_call (`manual_axis_type` in jax 0.12, `vma` before)."""
  aval = jax.typeof(like)
  params = inspect.signature(jax.ShapeDtypeStruct).parameters
  for name in ("manual_axis_type", "vma"):
    if name in params and getattr(aval, name, None) is not None:
      return jax.ShapeDtypeStruct(shape, dtype, **{name: getattr(aval, name)})
  return jax.ShapeDtypeStruct(shape, dtype)


# --- kernels -------------------------------------------------------------------------------

def _logits(h_ref, w_ref, bd: int) -> jax.Array:
  """[BT, BV] float32 = h_block @ w_block, contracted over D in chunks of BD (both operands in
  the compute dtype already)."""
  (bt, d), bv = h_ref.shape, w_ref.shape[1]

  def step(c, acc):
    dd = pl.ds(pl.multiple_of(c * bd, bd), bd)
    return acc + jnp.dot(h_ref[:, dd], w_ref[dd, :], preferred_element_type=jnp.float32)
  return jax.lax.fori_loop(0, d // bd, step, jnp.zeros((bt, bv), jnp.float32))


def _stats_kernel(h_ref, w_ref, y_ref, col_ref, m_ref, s_ref, t_ref, *, bd: int):
  cols = col_ref[...]
  ok = (cols >= 0)[None, :]  # -1: a column an earlier slab covered
  logits = jnp.where(ok, _logits(h_ref, w_ref, bd), -jnp.inf)
  m = jnp.max(logits, axis=1)
  # A tile whose columns are all masked has m = -inf: its sum of exp is 0, not exp(nan).
  m_safe = jnp.where(m > -jnp.inf, m, 0.0)
  m_ref[...] = m
  s_ref[...] = jnp.sum(jnp.exp(logits - m_safe[:, None]), axis=1)
  hit = ok & (cols[None, :] == y_ref[...][:, None])
  t_ref[...] = jnp.sum(jnp.where(hit, logits, 0.0), axis=1)


def _dlogits_kernel(h_ref, w_ref, y_ref, coef_ref, lse_ref, col_ref, g_ref, *, bd: int):
  cols = col_ref[...]
  logits = _logits(h_ref, w_ref, bd)
  p = jnp.exp(logits - lse_ref[...][:, None])
  onehot = jnp.where(cols[None, :] == y_ref[...][:, None], 1.0, 0.0)
  g = coef_ref[...][:, None] * (p - onehot)
  # The `where` also drops whatever a skipped column computed, NaN included.
  g_ref[...] = jnp.where((cols >= 0)[None, :], g, 0.0).astype(g_ref.dtype)


def _grid(n: int, width: int, tiles: Tiles) -> tuple[int, int]:
  """(vocab tiles of the slab, token tiles): the vocab tile is the grid's first (fastest,
  CUDA's x) axis, so the programs running at once share one [BT, D] token block and walk the
  whole [D, S] slab, which stays in L2 (32 MiB at D = 4,096 and S = 4,096 in bf16, H100's L2
  50 MiB): the hidden states are read from memory about once per slab, not once per vocab
  tile."""
  return width // tiles.vocab, n // tiles.tokens


def _row_specs(d: int, bt: int, bv: int, n_rows: int):
  """BlockSpecs of (h, w_slab, then `n_rows` per-token arrays, then the column indices), for
  the grid (vocab tile j, token tile i)."""
  row = pl.BlockSpec((bt,), lambda j, i: (i,))
  return ([pl.BlockSpec((bt, d), lambda j, i: (i, 0)),
           pl.BlockSpec((d, bv), lambda j, i: (0, j))]
          + [row] * n_rows + [pl.BlockSpec((bv,), lambda j, i: (j,))])


def _slab_stats(h, w_slab, y, cols, tiles: Tiles, interpret: bool):
  """Per (vocab tile of the slab, token): (max, sum of exp, target logit), float32 [S/BV, N]."""
  (n, d), width = h.shape, w_slab.shape[1]
  bt, bv = tiles.tokens, tiles.vocab
  part = varying_out_struct((width // bv, n), jnp.float32, h)
  part_spec = pl.BlockSpec((None, bt), lambda j, i: (j, i))
  return pl.pallas_call(
      functools.partial(_stats_kernel, bd=tiles.hidden),
      out_shape=(part, part, part),
      grid=_grid(n, width, tiles),
      in_specs=_row_specs(d, bt, bv, 1),
      out_specs=(part_spec, part_spec, part_spec),
      interpret=interpret, compiler_params=_compiler_params(tiles, interpret),
      name="fused_ce_stats")(h, w_slab, y, cols)


def _slab_dlogits(h, w_slab, y, coef, lse, cols, tiles: Tiles, interpret: bool):
  """G = coef * (softmax - onehot), [N, S] in the compute dtype."""
  (n, d), width = h.shape, w_slab.shape[1]
  bt, bv = tiles.tokens, tiles.vocab
  return pl.pallas_call(
      functools.partial(_dlogits_kernel, bd=tiles.hidden),
      out_shape=varying_out_struct((n, width), h.dtype, h),
      grid=_grid(n, width, tiles),
      in_specs=_row_specs(d, bt, bv, 3),
      out_specs=pl.BlockSpec((bt, bv), lambda j, i: (i, j)),
      interpret=interpret, compiler_params=_compiler_params(tiles, interpret),
      name="fused_ce_dlogits")(h, w_slab, y, coef, lse, cols)


# --- the slab loop -------------------------------------------------------------------------

def _slab_loop(w, dtype, tiles: Tiles, body, carry):
  """carry = body(carry, start, w_slab, cols) over ceil(V / S) slabs of one width S.

  w_slab is the kernel's [D, S] columns from `start`, in the compute dtype; cols [S] int32 the
  global index of each column, -1 where an earlier slab covered it (the last slab starts at
  V - S and overlaps the one before instead of running past V). Traced once: one compile of
  each kernel inside, the offset an operand."""
  v = w.shape[1]
  width = slab_width(v, tiles)

  def step(j, c):
    start = jnp.minimum(j * width, v - width)
    cols = start + jnp.arange(width, dtype=jnp.int32)
    cols = jnp.where(cols >= j * width, cols, -1)
    w_slab = jax.lax.dynamic_slice_in_dim(w, start, width, axis=1).astype(dtype)
    return body(c, start, w_slab, cols)

  trips = -(-v // width)
  if trips == 1:  # one plain call: small problems compile faster without the while loop
    return step(0, carry)
  return jax.lax.fori_loop(0, trips, step, carry)


def _pad_tokens(h, y, per_token: tuple, tiles: Tiles):
  """h, y and per-token arrays padded to whole token tiles: zero rows with label -1 (and zero
  in `per_token`). The head is not padded: no slab runs past V."""
  pad_n = -h.shape[0] % tiles.tokens
  if pad_n:
    h = jnp.pad(h, [(0, pad_n), (0, 0)])
    y = jnp.pad(y, [(0, pad_n)], constant_values=-1)
    per_token = tuple(jnp.pad(x, [(0, pad_n)]) for x in per_token)
  return h, y, per_token


def _check(hidden_nd, kernel_dv, tiles: Tiles) -> None:
  (n, d), v = hidden_nd.shape, kernel_dv.shape[1]
  if d % tiles.hidden or v < tiles.vocab:
    raise ValueError(f"the fused loss needs D % {tiles.hidden} == 0 and V >= {tiles.vocab}; "
                     f"got N={n}, D={d}, V={v}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fused_cross_entropy(hidden_nd: jax.Array, kernel_dv: jax.Array, labels_n: jax.Array,
                        weights_n: jax.Array, tiles: Tiles = Tiles(),
                        interpret: bool = False) -> jax.Array:
  """sum_n weights_n * CE_n over labels_n >= 0 (float32), like `chunked_cross_entropy`.

  Operates on one device's tokens: call it inside a shard_map (as `chunked_cross_entropy`
  does with `token_axes`), not on globally sharded arrays. `interpret=True` runs the
  kernels on any backend (CPU tests).
  """
  return _fused_fwd(hidden_nd, kernel_dv, labels_n, weights_n, tiles, interpret)[0]


def _fused_fwd(hidden_nd, kernel_dv, labels_n, weights_n, tiles, interpret):
  _check(hidden_nd, kernel_dv, tiles)
  labels_n = labels_n.astype(jnp.int32)
  n = hidden_nd.shape[0]
  h, y, _ = _pad_tokens(hidden_nd, labels_n, (), tiles)

  def fold(carry, _, w_slab, cols):
    m_run, s_run, t_run = carry
    m_k, s_k, t_k = _slab_stats(h, w_slab, y, cols, tiles, interpret)
    m_new = jnp.maximum(m_run, m_k.max(axis=0))  # finite: every slab has a real column
    s_new = s_run * jnp.exp(m_run - m_new) + jnp.sum(s_k * jnp.exp(m_k - m_new), axis=0)
    return m_new, s_new, t_run + t_k.sum(axis=0)

  zeros = jnp.zeros_like(y, jnp.float32)  # *_like: device-varying inside a shard_map
  m, s, t = _slab_loop(kernel_dv, h.dtype, tiles, fold,
                       (jnp.full_like(zeros, -jnp.inf), zeros, zeros))
  lse_n, target_n = (m + jnp.log(s))[:n], t[:n]
  wt_n = weights_n.astype(jnp.float32)
  loss = jnp.sum(jnp.where(labels_n >= 0, wt_n * (lse_n - target_n), 0.0))
  return loss, (hidden_nd, kernel_dv, labels_n, weights_n, lse_n)


def _fused_bwd(tiles, interpret, res, g):
  hidden_nd, kernel_dv, labels_n, weights_n, lse_n = res
  n, dtype = hidden_nd.shape[0], hidden_nd.dtype
  coef_n = jnp.where(labels_n >= 0, g * weights_n.astype(jnp.float32), 0.0)
  h, y, (coef, lse) = _pad_tokens(hidden_nd, labels_n, (coef_n, lse_n), tiles)

  def step(carry, start, w_slab, cols):
    dh, dw = carry
    g_ns = _slab_dlogits(h, w_slab, y, coef, lse, cols, tiles, interpret)
    # XLA's matmuls (cuBLAS): dh += G @ W_slab^T, dW_slab = h^T @ G, float32 accumulation.
    dh = dh + jax.lax.dot_general(g_ns, w_slab, (((1,), (1,)), ((), ())),
                                  preferred_element_type=jnp.float32)
    dw_slab = jax.lax.dot_general(h, g_ns, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32).astype(dw.dtype)
    # Columns an earlier slab covered (the overlapping last slab) keep what it wrote.
    width = cols.shape[0]
    old = jax.lax.dynamic_slice_in_dim(dw, start, width, axis=1)
    dw_slab = jnp.where((cols >= 0)[None, :], dw_slab, old)
    return dh, jax.lax.dynamic_update_slice_in_dim(dw, dw_slab, start, axis=1)

  # zeros_like: the inputs' sharding and, in a shard_map, their varying type.
  dh, dw = _slab_loop(kernel_dv, dtype, tiles, step,
                      (jnp.zeros_like(h, jnp.float32), jnp.zeros_like(kernel_dv)))
  return dh[:n].astype(dtype), dw, None, None


fused_cross_entropy.defvjp(_fused_fwd, _fused_bwd)

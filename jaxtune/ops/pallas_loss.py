"""Fused LM-head + cross-entropy as Pallas kernels (Triton-style, for NVIDIA GPUs).

The same weighted sum as `loss.chunked_cross_entropy`, with the head matmul, the softmax and
their gradients fused so that the only logits ever held are one [BT, BV] float32 tile per
program, in registers. Three kernels behind one custom VJP:

  forward   grid (token tiles, vocab tiles), all independent: each program writes its tile's
            (max, sum of exp, target logit) per token; a tiny [V / BV, N] combine in JAX
            gives each token's logsumexp.
  d_hidden  grid (token tiles): each program walks the vocab tiles, recomputes the logits
            from the saved logsumexp and adds dlogits @ W_tile^T to its float32 rows.
  d_kernel  grid (vocab tiles) per vocab slab: each program walks the token tiles and adds
            H_tile^T @ dlogits to its float32 [D, BV] columns; each slab is cast to the
            kernel's dtype as soon as it is done, so the float32 part is [D, slab], not [D, V].

No atomics: every output block belongs to one program, so the result is deterministic and
the kernels run unchanged in `interpret=True` mode on the CPU (that is how they are tested).
The contraction over D runs in chunks of BD inside each program, so no [BT, D] block is ever
loaded at once. V and N need not be multiples of the tiles: the arrays are zero-padded to
whole tiles first (added tokens carry label -1 and weight 0; added vocab columns are masked by
index), so every block a program reads or writes lies inside its array (Triton on jax 0.11
does not mask a partial block, and interpret mode would hide one). Walked axes: a program's
last tile starts at V - BV (resp. N - BT) instead of running off the end, and masks the
columns (rows) the previous tile already covered.

Shape letters: N tokens, D hidden, V vocab; BT, BV, BD the token, vocab and hidden tiles.
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
  """Tile sizes (powers of two for Triton; the defaults are a safe guess, not tuned on a
  GPU). `vocab_slab` bounds the float32 kernel gradient held at once; it is rounded to a
  multiple of `vocab`."""
  tokens: int = 64
  vocab: int = 128
  hidden: int = 64
  vocab_slab: int = 16384
  num_warps: int | None = 4
  num_stages: int | None = 2


def supported(n: int, d: int, v: int, tiles: Tiles = Tiles()) -> bool:
  """Whether the kernels take this shape (else the caller uses the pure-JAX path)."""
  return d % tiles.hidden == 0 and v >= tiles.vocab and n >= tiles.tokens


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


def _logits(h_ref, w_ref, rows, cols, shape: tuple[int, int], d: int, bd: int,
            dtype) -> jax.Array:
  """[BT, BV] float32 = h[rows, :] @ w[:, cols], contracted over D in chunks of BD (the
  kernel tile is cast to the compute dtype chunk by chunk)."""
  def step(c, acc):
    dd = pl.ds(c * bd, bd)
    return acc + jnp.dot(h_ref[rows, dd].astype(dtype), w_ref[dd, cols].astype(dtype),
                         preferred_element_type=jnp.float32)
  return jax.lax.fori_loop(0, d // bd, step, jnp.zeros(shape, jnp.float32))


def _fwd_kernel(h_ref, w_ref, y_ref, m_ref, s_ref, t_ref, *, v: int, bd: int):
  bt, d = h_ref.shape
  bv = w_ref.shape[1]
  cols = pl.program_id(1) * bv + jnp.arange(bv)
  logits = _logits(h_ref, w_ref, slice(None), slice(None), (bt, bv), d, bd, h_ref.dtype)
  # Columns past V (the vocab tail's block) are masked; each tile has at least one real one.
  logits = jnp.where((cols < v)[None, :], logits, -jnp.inf)
  m = jnp.max(logits, axis=1)
  m_ref[...] = m
  s_ref[...] = jnp.sum(jnp.exp(logits - m[:, None]), axis=1)
  t_ref[...] = jnp.sum(jnp.where(cols[None, :] == y_ref[...][:, None], logits, 0.0), axis=1)


def _dlogits(logits, ok, cols, y, coef, lse, dtype) -> jax.Array:
  """coef * (softmax - onehot) in the compute dtype, zero where not `ok` (the `where` also
  drops whatever a masked or padded load produced there, NaN included)."""
  p = jnp.exp(logits - lse[:, None])
  d = coef[:, None] * (p - jnp.where(cols[None, :] == y[:, None], 1.0, 0.0))
  return jnp.where(ok, d, 0.0).astype(dtype)


def _dh_kernel(h_ref, w_ref, y_ref, coef_ref, lse_ref, dh_ref, *, v: int, bv: int, bd: int):
  bt, d = h_ref.shape
  dtype = h_ref.dtype
  y, coef, lse = y_ref[...], coef_ref[...], lse_ref[...]

  def zero(c, _):
    dh_ref[:, pl.ds(c * bd, bd)] = jnp.zeros((bt, bd), jnp.float32)
  jax.lax.fori_loop(0, d // bd, zero, None)

  def vocab_step(j, _):
    start = jnp.minimum(j * bv, v - bv)  # the last tile ends at V instead of running past it
    cols_ds = pl.ds(start, bv)
    cols = start + jnp.arange(bv)
    logits = _logits(h_ref, w_ref, slice(None), cols_ds, (bt, bv), d, bd, dtype)
    fresh = (cols >= j * bv)[None, :]  # columns an earlier tile did not cover
    dl = _dlogits(logits, fresh, cols, y, coef, lse, dtype)

    def add(c, _):
      dd = pl.ds(c * bd, bd)
      dh_ref[:, dd] += jnp.dot(dl, w_ref[dd, cols_ds].astype(dtype).T,
                               preferred_element_type=jnp.float32)
    jax.lax.fori_loop(0, d // bd, add, None)

  jax.lax.fori_loop(0, pl.cdiv(v, bv), vocab_step, None)


def _dw_kernel(h_ref, w_ref, y_ref, coef_ref, lse_ref, dw_ref, *, n: int, v: int, v0: int,
               bt: int, bd: int):
  d, bv = w_ref.shape
  dtype = h_ref.dtype
  cols = v0 + pl.program_id(0) * bv + jnp.arange(bv)
  cols_ok = cols < v

  def zero(c, _):
    dw_ref[pl.ds(c * bd, bd), :] = jnp.zeros((bd, bv), jnp.float32)
  jax.lax.fori_loop(0, d // bd, zero, None)

  def token_step(i, _):
    start = jnp.minimum(i * bt, n - bt)
    rows_ds = pl.ds(start, bt)
    rows = start + jnp.arange(bt)
    logits = _logits(h_ref, w_ref, rows_ds, slice(None), (bt, bv), d, bd, dtype)
    ok = (rows >= i * bt)[:, None] & cols_ok[None, :]  # rows an earlier tile did not cover
    dl = _dlogits(logits, ok, cols, y_ref[rows_ds], coef_ref[rows_ds], lse_ref[rows_ds], dtype)

    def add(c, _):
      dd = pl.ds(c * bd, bd)
      dw_ref[dd, :] += jnp.dot(h_ref[rows_ds, dd].T, dl, preferred_element_type=jnp.float32)
    jax.lax.fori_loop(0, d // bd, add, None)

  jax.lax.fori_loop(0, pl.cdiv(n, bt), token_step, None)


def _token_stats(h, w, y, v: int, tiles: Tiles, interpret: bool):
  """Per-token (logsumexp, target logit), float32 [N] each (arrays padded to whole tiles,
  `v` the real vocab size)."""
  n, d = h.shape
  bt, bv, bd = tiles.tokens, tiles.vocab, tiles.hidden
  nt, nv = n // bt, w.shape[1] // bv
  part = varying_out_struct((nv, n), jnp.float32, h)
  part_spec = pl.BlockSpec((None, bt), lambda i, j: (j, i))
  m, s, t = pl.pallas_call(
      functools.partial(_fwd_kernel, v=v, bd=bd),
      out_shape=(part, part, part),
      grid=(nt, nv),
      in_specs=[pl.BlockSpec((bt, d), lambda i, j: (i, 0)),
                pl.BlockSpec((d, bv), lambda i, j: (0, j)),
                pl.BlockSpec((bt,), lambda i, j: (i,))],
      out_specs=(part_spec, part_spec, part_spec),
      interpret=interpret, compiler_params=_compiler_params(tiles, interpret),
      name="fused_ce_fwd")(h, w, y)
  m_max = m.max(axis=0)
  lse = m_max + jnp.log(jnp.sum(s * jnp.exp(m - m_max), axis=0))
  return lse, t.sum(axis=0)


def _grad_hidden(h, w, y, coef, lse, v: int, tiles: Tiles, interpret: bool):
  n, d = h.shape
  bt = tiles.tokens
  row = pl.BlockSpec((bt,), lambda i: (i,))
  return pl.pallas_call(
      functools.partial(_dh_kernel, v=v, bv=tiles.vocab, bd=tiles.hidden),
      out_shape=varying_out_struct((n, d), jnp.float32, h),
      grid=(n // bt,),
      in_specs=[pl.BlockSpec((bt, d), lambda i: (i, 0)),
                pl.BlockSpec(w.shape, lambda i: (0, 0)),  # walked inside the program
                row, row, row],
      out_specs=pl.BlockSpec((bt, d), lambda i: (i, 0)),
      interpret=interpret, compiler_params=_compiler_params(tiles, interpret),
      name="fused_ce_dh")(h, w, y, coef, lse)


def _grad_kernel(h, w, y, coef, lse, v: int, tiles: Tiles, interpret: bool):
  """[D, V'] in w's dtype (V' the padded vocab), one vocab slab of float32 at a time."""
  (n, d), v_padded = h.shape, w.shape[1]
  bv = tiles.vocab
  slab = max(bv, tiles.vocab_slab // bv * bv)
  dw = jnp.zeros_like(w)
  for v0 in range(0, v_padded, slab):  # static: ceil(V' / slab) calls
    width = min(slab, v_padded - v0)
    full = pl.BlockSpec((n,), lambda j: (0,))
    dw_slab = pl.pallas_call(
        functools.partial(_dw_kernel, n=n, v=v, v0=v0, bt=tiles.tokens, bd=tiles.hidden),
        out_shape=varying_out_struct((d, width), jnp.float32, h),
        grid=(width // bv,),
        in_specs=[pl.BlockSpec((n, d), lambda j: (0, 0)),  # walked inside the program
                  pl.BlockSpec((d, bv), lambda j, o=v0 // bv: (0, j + o)),
                  full, full, full],
        out_specs=pl.BlockSpec((d, bv), lambda j: (0, j)),
        interpret=interpret, compiler_params=_compiler_params(tiles, interpret),
        name="fused_ce_dw")(h, w, y, coef, lse)
    dw = jax.lax.dynamic_update_slice_in_dim(dw, dw_slab.astype(w.dtype), v0, axis=1)
  return dw


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


def _pad_to_tiles(h, w, y, per_token: tuple, tiles: Tiles):
  """h, w, y and per-token arrays padded to whole tiles: zero rows with label -1 (and zero in
  `per_token`) at the end of the tokens, zero columns at the end of the vocab (the kernels
  mask columns >= V). Then no program reads or writes past an array, which Triton on jax
  0.11 does not mask and interpret mode would hide."""
  (n, _), v = h.shape, w.shape[1]
  pad_n, pad_v = -n % tiles.tokens, -v % tiles.vocab
  if pad_n:
    h = jnp.pad(h, [(0, pad_n), (0, 0)])
    y = jnp.pad(y, [(0, pad_n)], constant_values=-1)
    per_token = tuple(jnp.pad(x, [(0, pad_n)]) for x in per_token)
  if pad_v:
    w = jnp.pad(w, [(0, 0), (0, pad_v)])
  return h, w, y, per_token


def _fused_fwd(hidden_nd, kernel_dv, labels_n, weights_n, tiles, interpret):
  labels_n = labels_n.astype(jnp.int32)
  n, v = hidden_nd.shape[0], kernel_dv.shape[1]
  h, w, y, _ = _pad_to_tiles(hidden_nd, kernel_dv, labels_n, (), tiles)
  lse_n, target_n = (x[:n] for x in _token_stats(h, w, y, v, tiles, interpret))
  wt_n = weights_n.astype(jnp.float32)
  loss = jnp.sum(jnp.where(labels_n >= 0, wt_n * (lse_n - target_n), 0.0))
  return loss, (hidden_nd, kernel_dv, labels_n, weights_n, lse_n)


def _fused_bwd(tiles, interpret, res, g):
  hidden_nd, kernel_dv, labels_n, weights_n, lse_n = res
  coef_n = jnp.where(labels_n >= 0, g * weights_n.astype(jnp.float32), 0.0)
  n, v = hidden_nd.shape[0], kernel_dv.shape[1]
  h, w, y, (coef, lse) = _pad_to_tiles(hidden_nd, kernel_dv, labels_n, (coef_n, lse_n), tiles)
  args = (h, w, y, coef, lse, v, tiles, interpret)
  dh_nd = _grad_hidden(*args)[:n].astype(hidden_nd.dtype)
  return dh_nd, _grad_kernel(*args)[:, :v], None, None


fused_cross_entropy.defvjp(_fused_fwd, _fused_bwd)

"""Cross-entropy over the LM head, tiled so the [N, V] logits never exist at once.

`chunked_cross_entropy` is XTuner's `CELossConfig(mode='chunk')`. Its pure-JAX path tiles
tokens (`chunk_size`) and vocab (`vocab_tile`): the forward pass keeps a running logsumexp
per token over the vocab tiles, and the backward pass (custom VJP) recomputes each
(token chunk, vocab tile) block of logits from it, accumulates that tile's kernel gradient
over all tokens in a float32 [D, tile] buffer and writes it once, in the kernel's dtype.
No vocab-wide buffer is left: no [C, V] logit chunk, no float32 [D, V] accumulator, no
bf16 copy of a float32 kernel. At 16,384 tokens x 4,096 hidden x 151,936 vocab in bf16,
loss + gradients compile to 0.49 GiB of temporaries on the CPU backend (the previous
[C, V]-chunked version: 7.2 GiB; full logits: 20.9 GiB; scripts/bench_loss.py).
impl='pallas' runs the fused Pallas kernels of ops/pallas_loss.py instead (logits and
softmax - onehot per vocab slab in Triton kernels, the backward's matmuls XLA's); 'auto' picks
them on a GPU only once `AUTO_GPU_IMPL` records a measured win. `eager_cross_entropy` is the
same sum through the full logits (`loss.mode='eager'`, and the reference the chunked one is
tested against).

Both return the *weighted sum* over tokens; `loss_weights` gives XTuner's per-token weights
for `loss_reduction` token / sample / square, and the caller divides by the sum of weights
over the whole global batch, so micro-batching and data parallelism give exactly the loss of
one big batch.

Shape letters: N tokens, D hidden, V vocab, C chunk, K chunks, B rows, T tokens per row.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.ops import pallas_loss
from jaxtune.parallel.sharding import logical_shard_map

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "jax", "pallas")

# What "auto" runs on a GPU: "jax" until a GPU run of scripts/gpu_kernels.py records in
# docs/benchmarks.md that the fused kernels are right *and* faster there (its loss case times
# value_and_grad of both at 16k x 4096 x 151,936); then "pallas" (which still needs
# `pallas_works_here()`, the shape to fit and per-device tokens). A correct kernel alone is not
# a reason: the fused path does the same four matmuls as this one (two of them in Triton
# kernels, two in cuBLAS), so only a measurement says which is faster (issue 20).
AUTO_GPU_IMPL = "jax"


def _chunk_logits(h_cd: jax.Array, w_dv: jax.Array) -> jax.Array:
  """[C, D] x [D, V] in the compute dtype with float32 accumulation and result."""
  return jnp.dot(h_cd, w_dv, preferred_element_type=jnp.float32)


def _token_ce(logits_cv: jax.Array, labels_c: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token (logsumexp, CE) in float32; CE is garbage where the label is negative."""
  lse_c = jax.nn.logsumexp(logits_cv, axis=-1)
  target_c = jnp.take_along_axis(logits_cv, jnp.maximum(labels_c, 0)[:, None], axis=-1)[:, 0]
  return lse_c, lse_c - target_c


def _chunk_view(x: jax.Array, chunk: int, k: int, fill: int | float) -> jax.Array:
  """[N, ...] -> [C, K, ...] with token n = c * K + k (chunk k is `x[:, k]`), padded with
  `fill` up to C * K. Without padding this is a reshape, not a copy.

  Chunks are strided, not contiguous: when N is sharded over data-parallel devices the
  sharding lands on C, so every device works on its own rows of every chunk and no hidden
  state moves between devices (contiguous chunks would put whole chunks on one device and
  leave the others idle).
  """
  pad = chunk * k - x.shape[0]
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
  return x.reshape((chunk, k) + x.shape[1:])


def _chunk(x_ck: jax.Array, k: jax.Array) -> jax.Array:
  """Chunk k, [C, ...], of a `_chunk_view`."""
  return jax.lax.dynamic_index_in_dim(x_ck, k, axis=1, keepdims=False)


def _put_chunk(x_ck: jax.Array, k: jax.Array, value_c: jax.Array) -> jax.Array:
  return jax.lax.dynamic_update_index_in_dim(x_ck, value_c, k, axis=1)


def _geometry(n: int, chunk_size: int) -> tuple[int, int]:
  """(C, K): chunk length and count; C is capped at N so tiny inputs are not padded up."""
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  chunk = max(1, min(chunk_size, n))
  return chunk, -(-n // chunk)


def _vocab_loop(v: int, vocab_tile: int, body: Callable, carry):
  """carry = body(carry, start, width, fresh) over ceil(V / tile) vocab tiles of one width.

  V is rarely a multiple of the tile (151,936 = 2^7 x 1187), and padding the kernel would
  copy it whole, so the last tile starts at V - tile instead and overlaps the one before;
  `fresh(cols)` marks the columns that no earlier tile covered. One loop body, no copy.
  """
  tile = max(1, min(vocab_tile, v))

  def step(j, c):
    start = jnp.minimum(j * tile, v - tile)
    return body(c, start, tile, lambda cols: cols >= j * tile)

  return _loop(-(-v // tile), step, carry)


def _loop(trips: int, body: Callable, carry):
  """fori_loop, or one plain call when there is a single trip (small problems compile
  faster without the while loop)."""
  if trips == 1:
    return body(0, carry)
  return jax.lax.fori_loop(0, trips, body, carry)


def _kernel_tile(kernel_dv: jax.Array, start, width: int, dtype) -> jax.Array:
  """[D, width] columns of the kernel, cast to the compute dtype (one tile at a time: a
  float32 kernel is never copied whole into bf16)."""
  return jax.lax.dynamic_slice_in_dim(kernel_dv, start, width, axis=1).astype(dtype)


def _cols(c: int, start, width: int) -> jax.Array:
  """[C, width] int32: the vocab index of each column of the tile."""
  return jax.lax.broadcasted_iota(jnp.int32, (c, width), 1) + start


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_ce(hidden_nd: jax.Array, kernel_dv: jax.Array, labels_n: jax.Array,
                weights_n: jax.Array, chunk_size: int, vocab_tile: int) -> jax.Array:
  return _chunked_ce_fwd(hidden_nd, kernel_dv, labels_n, weights_n, chunk_size, vocab_tile)[0]


def _chunked_ce_fwd(hidden_nd: jax.Array, kernel_dv: jax.Array, labels_n: jax.Array,
                    weights_n: jax.Array, chunk_size: int, vocab_tile: int
                    ) -> tuple[jax.Array, tuple]:
  """Vocab tiles outside, token chunks inside: a running (max, sum of exp, target logit) per
  token over the tiles, so the largest buffer is one [C, tile] float32 logit block."""
  n, v = hidden_nd.shape[0], kernel_dv.shape[1]
  chunk, k = _geometry(n, chunk_size)
  h_ckd = _chunk_view(hidden_nd, chunk, k, 0)
  y_ck = _chunk_view(labels_n, chunk, k, -1)

  def vocab_tile_step(carry, start, width, fresh):
    w_dv = _kernel_tile(kernel_dv, start, width, hidden_nd.dtype)
    cols_cv = _cols(chunk, start, width)
    fresh_cv = fresh(cols_cv)

    def chunk_step(i, c):
      m_ck, s_ck, t_ck = c
      # Columns an earlier tile covered (the overlapping last tile) count as -inf.
      logits_cv = jnp.where(fresh_cv, _chunk_logits(_chunk(h_ckd, i), w_dv), -jnp.inf)
      y_c, m_c = _chunk(y_ck, i), _chunk(m_ck, i)
      m_new = jnp.maximum(m_c, logits_cv.max(axis=-1))
      s_c = _chunk(s_ck, i) * jnp.exp(m_c - m_new) + jnp.exp(logits_cv - m_new[:, None]).sum(-1)
      hit_cv = (cols_cv == y_c[:, None]) & fresh_cv
      t_c = _chunk(t_ck, i) + jnp.sum(jnp.where(hit_cv, logits_cv, 0.0), -1)
      return _put_chunk(m_ck, i, m_new), _put_chunk(s_ck, i, s_c), _put_chunk(t_ck, i, t_c)

    return _loop(k, chunk_step, carry)

  # *_like of the inputs: inside a shard_map the carries must be device-varying like them.
  zeros_ck = jnp.zeros_like(y_ck, jnp.float32)
  init = (jnp.full_like(zeros_ck, -jnp.inf), zeros_ck, zeros_ck)
  m_ck, s_ck, target_ck = _vocab_loop(v, vocab_tile, vocab_tile_step, init)
  lse_ck = m_ck + jnp.log(s_ck)
  wt_ck = _chunk_view(weights_n.astype(jnp.float32), chunk, k, 0)
  # `where`, not a product: a padded or ignored token may have an inf/nan CE. Per-token terms
  # are summed once, after the loops: a running scalar would cost one cross-device reduction
  # per chunk when the tokens are sharded.
  loss = jnp.sum(jnp.where(y_ck >= 0, wt_ck * (lse_ck - target_ck), 0.0))
  return loss, (hidden_nd, kernel_dv, labels_n, weights_n, lse_ck)


def _chunked_ce_bwd(chunk_size: int, vocab_tile: int, res: tuple, g: jax.Array) -> tuple:
  """Vocab tiles outside, token chunks inside, logits recomputed from the saved logsumexp.

  The kernel gradient of one tile is accumulated over all chunks in a float32 [D, tile]
  buffer and written once, in the kernel's dtype: no float32 [D, V] accumulator. The hidden
  gradient accumulates over tiles in a float32 [N, D] buffer.
  """
  hidden_nd, kernel_dv, labels_n, weights_n, lse_ck = res
  n, v = hidden_nd.shape[0], kernel_dv.shape[1]
  chunk, k = _geometry(n, chunk_size)
  dtype = hidden_nd.dtype
  h_ckd = _chunk_view(hidden_nd, chunk, k, 0)
  y_ck = _chunk_view(labels_n, chunk, k, -1)
  # d(sum w * CE)/d logits = coef * (softmax - onehot(label)), coef = g * w on trained tokens.
  coef_ck = jnp.where(y_ck >= 0, g * _chunk_view(weights_n.astype(jnp.float32), chunk, k, 0),
                      0.0)

  def vocab_tile_step(carry, start, width, fresh):
    dh_ckd, dw_dv = carry
    w_dv = _kernel_tile(kernel_dv, start, width, dtype)
    cols_cv = _cols(chunk, start, width)
    fresh_cv = fresh(cols_cv)

    def chunk_step(i, c):
      dh_ckd, dw_tile = c
      h_cd, y_c = _chunk(h_ckd, i), _chunk(y_ck, i)
      p_cv = jnp.exp(_chunk_logits(h_cd, w_dv) - _chunk(lse_ck, i)[:, None])
      hit_cv = cols_cv == y_c[:, None]
      coef_cv = jnp.where(fresh_cv, _chunk(coef_ck, i)[:, None], 0.0)
      # Cast to the compute dtype like an autocast linear backward; products accumulate in f32.
      dlogits_cv = (coef_cv * (p_cv - hit_cv)).astype(dtype)
      dh_cd = _chunk(dh_ckd, i) + jnp.dot(dlogits_cv, w_dv.T, preferred_element_type=jnp.float32)
      dw_tile = dw_tile + jnp.dot(h_cd.T, dlogits_cv, preferred_element_type=jnp.float32)
      return _put_chunk(dh_ckd, i, dh_cd), dw_tile

    dw_tile = jnp.zeros_like(w_dv, jnp.float32)
    dh_ckd, dw_tile = _loop(k, chunk_step, (dh_ckd, dw_tile))
    # The overlapping last tile keeps what the tile before wrote in the columns they share.
    old_dv = jax.lax.dynamic_slice_in_dim(dw_dv, start, width, axis=1)
    dw_tile = jnp.where(fresh_cv[:1], dw_tile.astype(dw_dv.dtype), old_dv)
    dw_dv = jax.lax.dynamic_update_slice_in_dim(dw_dv, dw_tile, start, axis=1)
    return dh_ckd, dw_dv

  # zeros_like keeps the inputs' sharding (and, in a shard_map, their varying type).
  init = (jnp.zeros_like(h_ckd, jnp.float32), jnp.zeros_like(kernel_dv))
  dh_ckd, dw_dv = _vocab_loop(v, vocab_tile, vocab_tile_step, init)
  dh_nd = dh_ckd.reshape((-1, hidden_nd.shape[1]))[:n].astype(dtype)
  return dh_nd, dw_dv, None, None


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


def _auto_sharded(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """Runs `fn` (scalar result) with the mesh's explicit axes, if any, switched to Auto.

  Under explicit sharding every dot here would need hand-written output shardings; inside,
  the partitioner places them as it does for any jit under an Auto mesh.
  """
  explicit = jax.sharding.get_abstract_mesh().explicit_axes
  if not explicit:
    return fn
  return jax.sharding.auto_axes(fn, axes=explicit, out_sharding=jax.sharding.PartitionSpec())


def _per_device(fn: Callable[..., jax.Array], token_axes: tuple[str, ...],
                check_vma: bool = True) -> Callable[..., jax.Array]:
  """`fn` over each device's own tokens, summed over `token_axes` (a shard_map).

  The kernel enters replicated over those axes (an FSDP all-gather) and is marked
  device-varying inside, so its gradient is reduced across devices once, by the transpose
  of that mark, instead of once per chunk as a plain jit over sharded tokens does. With
  check_vma=False there is no mark and shard_map sums that gradient itself, also once.
  """
  def local(axes, h, w, y, wt):
    split = axes["loss_tokens"]
    if not split:  # one device: nothing to mark or sum
      return fn(h, w, y, wt)
    if check_vma:
      w = jax.lax.pcast(w, split, to="varying")
    return jax.lax.psum(fn(h, w, y, wt), split)

  tokens = ("loss_tokens",)
  return logical_shard_map(local, in_names=(("loss_tokens", None), None, tokens, tokens),
                           out_names=(), rules=(("loss_tokens", token_axes),),
                           check_vma=check_vma)


@functools.cache
def pallas_works_here(interpret: bool = False) -> bool:
  """Whether the fused Pallas kernels compile and match the pure-JAX path on this backend.

  Checked once per process on a tiny problem (a Triton build or driver that cannot take
  them then costs a warning, not a failed run); 'auto' only trusts the kernels after that.
  The shape is an edge one for the default tiles: N = 200 is padded to whole token tiles, and
  V = 1000 (off the vocab tile, below one slab) takes two slabs, the second overlapping the
  first with its covered columns masked.
  """
  try:
    rng = np.random.default_rng(0)
    n, d, v = 200, 128, 1000
    # numpy inputs and a compiled executable: this runs now, even while a jit is tracing.
    args = (np.asarray(rng.normal(size=(n, d)), jnp.bfloat16),
            np.asarray(rng.normal(size=(d, v)) / np.sqrt(d), np.float32),
            np.where(np.arange(n) % 7 == 0, -100, rng.integers(0, v, n)).astype(np.int32),
            rng.uniform(0.5, 1.5, n).astype(np.float32))
    fused = lambda *a: pallas_loss.fused_cross_entropy(*a, pallas_loss.Tiles(), interpret)
    ref = lambda *a: _chunked_ce(*a, 128, 512)
    got, want = (jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()(*args)
                 for f in (fused, ref))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
      if not np.allclose(g, w, rtol=2e-2, atol=2e-2 * np.abs(w).max()):
        raise ValueError(f"fused loss differs from the reference by {np.abs(g - w).max()}")
    return True
  except Exception as e:  # pylint: disable=broad-exception-caught
    log.warning("Pallas fused cross-entropy unavailable on %s, using the pure-JAX chunked "
                "loss: %s", jax.default_backend(), e)
    return False


def _choose_impl(impl: str, n_local: int, d: int, v: int, token_axes, interpret: bool,
                 tiles: pallas_loss.Tiles) -> str:
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown loss impl {impl!r}; choose one of {IMPLEMENTATIONS}")
  fits = pallas_loss.supported(n_local, d, v, tiles)
  if impl == "pallas":
    if not fits:
      raise ValueError(f"the Pallas loss needs D % {tiles.hidden} == 0, V >= {tiles.vocab} and "
                       f">= {tiles.tokens} tokens per device; got N={n_local}, D={d}, V={v}")
    return impl
  if impl == "jax":
    return impl
  # auto: the kernels see one device's tokens, so they need token_axes (a shard_map) or a
  # single device; a Pallas call on globally sharded arrays would be gathered onto each.
  mesh = jax.sharding.get_abstract_mesh()
  local = bool(token_axes) or mesh.empty or mesh.size == 1
  on_gpu = jax.default_backend() == "gpu" and not interpret
  wanted = AUTO_GPU_IMPL == "pallas" and on_gpu and local and fits
  return "pallas" if wanted and pallas_works_here() else "jax"


def chunked_cross_entropy(hidden_nd: jax.Array, kernel_dv: jax.Array, labels_n: jax.Array,
                          weights_n: jax.Array, *, chunk_size: int,
                          token_axes: str | tuple[str, ...] | None = None,
                          vocab_tile: int = 4096, impl: str = "auto", interpret: bool = False,
                          pallas_tiles: pallas_loss.Tiles | None = None) -> jax.Array:
  """sum_n weights_n * CE_n over tokens with labels_n >= 0, without the [N, V] logits.

  Args:
    hidden_nd: final hidden states [N, D] in the compute dtype (bfloat16 or float32).
    kernel_dv: LM-head kernel [D, V], any float dtype; cast to hidden's dtype for the
      matmul (float32 accumulation). For a tied head pass the embedding table transposed.
    labels_n: int [N]; negative (XTuner's -100) means "no loss", whatever the weight.
    weights_n: float [N] per-token weights (see `loss_weights`); not differentiated.
    chunk_size: tokens per chunk (C). N need not be a multiple: the tail is padded inside.
    token_axes: optional mesh axes that shard N (e.g. ('data', 'fsdp')), under
      `jax.set_mesh`. Then every device loops over its own N / P tokens in chunks of C and
      the kernel gradient is all-reduced once. Without it the op is correct for any
      sharding, but with N sharded over P devices each chunk holds C / P tokens per device
      and XLA reduces each kernel-gradient tile across devices after every chunk.
    vocab_tile: vocab columns per tile of the pure-JAX path; the tail tile is narrower.
    impl: 'jax' (the pure-JAX chunked path, any backend), 'pallas' (the fused kernels of
      ops/pallas_loss.py) or 'auto': 'jax', and on a GPU `AUTO_GPU_IMPL` ('jax' until a
      measured win), which when 'pallas' also needs the kernels to work there
      (`pallas_works_here`), the shape to fit and each device to run on its own tokens
      (token_axes, or one device).
    interpret: run the Pallas kernels in interpret mode (CPU tests); with impl='pallas' only.
    pallas_tiles: tile sizes of the Pallas kernels (`pallas_loss.Tiles`).

  Returns:
    float32 scalar. Gradients flow to hidden and kernel, in their own dtypes (each kernel
    gradient tile is accumulated in float32 over all tokens, then cast); labels and weights
    get none.
  """
  if hidden_nd.ndim != 2 or kernel_dv.ndim != 2 or hidden_nd.shape[1] != kernel_dv.shape[0]:
    raise ValueError(f"expected hidden [N, D] and kernel [D, V], got {hidden_nd.shape} and "
                     f"{kernel_dv.shape}")
  if labels_n.shape != hidden_nd.shape[:1] or weights_n.shape != hidden_nd.shape[:1]:
    raise ValueError(f"labels {labels_n.shape} and weights {weights_n.shape} must be "
                     f"[N] = {hidden_nd.shape[:1]}")
  if vocab_tile <= 0:
    raise ValueError(f"vocab_tile must be positive, got {vocab_tile}")
  shards = 1
  if token_axes:
    token_axes = (token_axes,) if isinstance(token_axes, str) else tuple(token_axes)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(token_axes) <= set(mesh.axis_names):
      raise ValueError(f"token_axes={token_axes} needs a mesh with those axes set by "
                       f"jax.set_mesh; the current mesh has axes {mesh.axis_names}")
    shards = math.prod(mesh.shape[a] for a in token_axes)
    if hidden_nd.shape[0] % shards:
      raise ValueError(f"N = {hidden_nd.shape[0]} tokens do not split evenly over "
                       f"token_axes {token_axes} ({shards} devices)")
  tiles = pallas_tiles or pallas_loss.Tiles()
  (n, d), v = hidden_nd.shape, kernel_dv.shape[1]
  if _choose_impl(impl, n // shards, d, v, token_axes, interpret, tiles) == "pallas":
    fn = functools.partial(pallas_loss.fused_cross_entropy, tiles=tiles, interpret=interpret)
  else:
    fn = functools.partial(_chunked_ce, chunk_size=int(chunk_size), vocab_tile=int(vocab_tile))
  if token_axes:
    # Pallas' interpreter loses the varying type of its blocks inside a type-checked
    # shard_map (jax 0.12); unchecked, shard_map itself sums the replicated kernel's gradient.
    fn = _per_device(fn, token_axes, check_vma=not (interpret and fn.func is not _chunked_ce))
  with jax.named_scope("loss"):  # profiles read the LM head and loss by this name
    return _auto_sharded(fn)(hidden_nd, kernel_dv, labels_n.astype(jnp.int32), weights_n)


def eager_cross_entropy(hidden_nd: jax.Array, kernel_dv: jax.Array, labels_n: jax.Array,
                        weights_n: jax.Array) -> jax.Array:
  """The same weighted sum through the full [N, V] float32 logits (loss.mode='eager')."""
  def fn(h, w, y, wt):
    _, ce_n = _token_ce(_chunk_logits(h, w.astype(h.dtype)), y)
    return jnp.sum(jnp.where(y >= 0, wt.astype(jnp.float32) * ce_n, 0.0))
  with jax.named_scope("loss"):
    return _auto_sharded(fn)(hidden_nd, kernel_dv, labels_n, weights_n)


def loss_weights(labels_bt: jax.Array, segment_ids_bt: jax.Array, reduction: str) -> jax.Array:
  """Per-token loss weights [B, T] float32 for XTuner's `loss_reduction`.

  'token': 1 per trained token (label >= 0); 'sample': 1 / n_i; 'square': 1 / sqrt(n_i),
  where n_i counts the trained tokens of the packed sample the token belongs to, within its
  row. Untrained tokens get 0. A sample is a maximal run of equal segment id in a row, so
  any id scheme works (grain's 1-based ids with 0 = padding, global sample ids, ...).
  The caller divides sum(weights * CE) by sum(weights) over the whole global batch.
  """
  trained_bt = labels_bt >= 0
  if reduction == "token":
    return trained_bt.astype(jnp.float32)
  if reduction not in ("sample", "square"):
    raise ValueError(f"loss_reduction must be 'token', 'sample' or 'square', got {reduction!r}")
  b, t = labels_bt.shape
  # Run index per token: 0 at the row start, +1 wherever the segment id changes.
  starts_bt = jnp.concatenate(
      [jnp.zeros((b, 1), jnp.int32),
       (segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]).astype(jnp.int32)], axis=1)
  run_bt = jnp.cumsum(starts_bt, axis=1)
  count_bt = jax.vmap(lambda m, r: jax.ops.segment_sum(m, r, num_segments=t)[r])(
      trained_bt.astype(jnp.float32), run_bt)
  scale_bt = count_bt if reduction == "sample" else jnp.sqrt(count_bt)
  # count >= 1 wherever trained, so the guard only protects untrained tokens from 1/0.
  return jnp.where(trained_bt, 1.0 / jnp.maximum(scale_bt, 1.0), 0.0)

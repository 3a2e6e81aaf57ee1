"""Cross-entropy over the LM head, chunked so the [N, V] logits never exist at once.

`chunked_cross_entropy` is XTuner's `CELossConfig(mode='chunk')`: the head matmul, the
log-softmax and their gradients run `chunk_size` tokens at a time, so the only vocab-wide
buffers are one [C, V] chunk of logits and the [D, V] float32 kernel-gradient accumulator.
The backward pass recomputes each chunk's logits from the saved per-token logsumexp instead
of storing them. `eager_cross_entropy` is the same sum through the full logits
(`loss.mode='eager'`, and the reference the chunked one is tested against).

Both return the *weighted sum* over tokens; `loss_weights` gives XTuner's per-token weights
for `loss_reduction` token / sample / square, and the caller divides by the sum of weights
over the whole global batch, so micro-batching and data parallelism give exactly the loss of
one big batch.

Shape letters: N tokens, D hidden, V vocab, C chunk, K chunks, B rows, T tokens per row.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp


def _chunk_logits(h_cd: jax.Array, w_dv: jax.Array) -> jax.Array:
  """[C, D] x [D, V] in the compute dtype with float32 accumulation and result."""
  return jnp.dot(h_cd, w_dv, preferred_element_type=jnp.float32)


def _token_ce(logits_cv: jax.Array, labels_c: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token (logsumexp, CE) in float32; CE is garbage where the label is negative."""
  lse_c = jax.nn.logsumexp(logits_cv, axis=-1)
  target_c = jnp.take_along_axis(logits_cv, jnp.maximum(labels_c, 0)[:, None], axis=-1)[:, 0]
  return lse_c, lse_c - target_c


def _to_chunks(x: jax.Array, chunk: int, k: int, fill: int | float) -> jax.Array:
  """[N, ...] -> [K, C, ...] with token n = c * K + k, padded with `fill` up to C * K.

  Chunks are strided, not contiguous: when N is sharded over data-parallel devices the
  sharding lands on C, so every device works on its own rows of every chunk and no hidden
  state moves between devices (contiguous chunks would put whole chunks on one device and
  leave the others idle).
  """
  pad = chunk * k - x.shape[0]
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
  return jnp.swapaxes(x.reshape((chunk, k) + x.shape[1:]), 0, 1)


def _from_chunks(x_kc: jax.Array, n: int) -> jax.Array:
  """Inverse of `_to_chunks`: [K, C, ...] -> [N, ...]."""
  x = jnp.swapaxes(x_kc, 0, 1)
  return x.reshape((-1,) + x.shape[2:])[:n]


def _geometry(n: int, chunk_size: int) -> tuple[int, int]:
  """(C, K): chunk length and count; C is capped at N so tiny inputs are not padded up."""
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  chunk = max(1, min(chunk_size, n))
  return chunk, -(-n // chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_ce(hidden_nd: jax.Array, kernel_dv: jax.Array, labels_n: jax.Array,
                weights_n: jax.Array, chunk_size: int) -> jax.Array:
  return _chunked_ce_fwd(hidden_nd, kernel_dv, labels_n, weights_n, chunk_size)[0]


def _chunked_ce_fwd(hidden_nd: jax.Array, kernel_dv: jax.Array, labels_n: jax.Array,
                    weights_n: jax.Array, chunk_size: int) -> tuple[jax.Array, tuple]:
  n = hidden_nd.shape[0]
  chunk, k = _geometry(n, chunk_size)
  w_dv = kernel_dv.astype(hidden_nd.dtype)  # cast once, not once per chunk
  h_kcd = _to_chunks(hidden_nd, chunk, k, 0)
  y_kc = _to_chunks(labels_n, chunk, k, -1)
  wt_kc = _to_chunks(weights_n.astype(jnp.float32), chunk, k, 0)

  def body(_, xs):
    h_cd, y_c, wt_c = xs
    lse_c, ce_c = _token_ce(_chunk_logits(h_cd, w_dv), y_c)
    # `where`, not a product: a padded or ignored token may have an inf/nan CE.
    return None, (lse_c, jnp.where(y_c >= 0, wt_c * ce_c, 0.0))

  # Per-token terms leave the loop and are summed once: a running scalar would cost one
  # cross-device reduction per chunk when the tokens are sharded.
  _, (lse_kc, wce_kc) = jax.lax.scan(body, None, (h_kcd, y_kc, wt_kc))
  return jnp.sum(wce_kc), (hidden_nd, kernel_dv, labels_n, weights_n, lse_kc)


def _chunked_ce_bwd(chunk_size: int, res: tuple, g: jax.Array) -> tuple:
  hidden_nd, kernel_dv, labels_n, weights_n, lse_kc = res
  n = hidden_nd.shape[0]
  chunk, k = _geometry(n, chunk_size)
  dtype = hidden_nd.dtype
  w_dv = kernel_dv.astype(dtype)
  h_kcd = _to_chunks(hidden_nd, chunk, k, 0)
  y_kc = _to_chunks(labels_n, chunk, k, -1)
  # d(sum w * CE)/d logits = coef * (softmax - onehot(label)), coef = g * w on trained tokens.
  coef_kc = jnp.where(y_kc >= 0, g * _to_chunks(weights_n.astype(jnp.float32), chunk, k, 0), 0.0)

  def body(dw_dv, xs):
    h_cd, y_c, coef_c, lse_c = xs
    logits_cv = _chunk_logits(h_cd, w_dv)
    p_cv = jnp.exp(logits_cv - lse_c[:, None])
    hit_cv = jax.lax.broadcasted_iota(jnp.int32, logits_cv.shape, 1) == y_c[:, None]
    # Cast to the compute dtype like an autocast linear backward; products accumulate in f32.
    dlogits_cv = (coef_c[:, None] * (p_cv - hit_cv)).astype(dtype)
    dh_cd = jnp.dot(dlogits_cv, w_dv.T, preferred_element_type=jnp.float32).astype(dtype)
    dw_dv = dw_dv + jnp.dot(h_cd.T, dlogits_cv, preferred_element_type=jnp.float32)
    return dw_dv, dh_cd

  dw0 = jnp.zeros_like(kernel_dv, dtype=jnp.float32)  # zeros_like keeps the kernel's sharding
  dw_dv, dh_kcd = jax.lax.scan(body, dw0, (h_kcd, y_kc, coef_kc, lse_kc))
  return (_from_chunks(dh_kcd, n), dw_dv.astype(kernel_dv.dtype), None, None)


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


def _per_device(fn: Callable[..., jax.Array], token_axes: tuple[str, ...]
                ) -> Callable[..., jax.Array]:
  """`fn` over each device's own tokens, summed over `token_axes` (a shard_map).

  The kernel enters replicated over those axes (an FSDP all-gather) and is marked
  device-varying inside, so its gradient is reduced across devices once, by the transpose
  of that mark, instead of once per chunk as a plain jit over sharded tokens does.
  """
  spec_n, spec = jax.sharding.PartitionSpec(token_axes), jax.sharding.PartitionSpec()

  def local(h, w, y, wt):
    w = jax.lax.pcast(w, token_axes, to="varying")
    return jax.lax.psum(fn(h, w, y, wt), token_axes)

  return jax.shard_map(local, in_specs=(spec_n, spec, spec_n, spec_n), out_specs=spec,
                       axis_names=set(token_axes))


def chunked_cross_entropy(hidden_nd: jax.Array, kernel_dv: jax.Array, labels_n: jax.Array,
                          weights_n: jax.Array, *, chunk_size: int,
                          token_axes: str | tuple[str, ...] | None = None) -> jax.Array:
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
      and XLA reduces the [D, V] kernel gradient across devices after every chunk.

  Returns:
    float32 scalar. Gradients flow to hidden and kernel, in their own dtypes (the kernel
    gradient is accumulated in float32 over chunks); labels and weights get none.
  """
  if hidden_nd.ndim != 2 or kernel_dv.ndim != 2 or hidden_nd.shape[1] != kernel_dv.shape[0]:
    raise ValueError(f"expected hidden [N, D] and kernel [D, V], got {hidden_nd.shape} and "
                     f"{kernel_dv.shape}")
  if labels_n.shape != hidden_nd.shape[:1] or weights_n.shape != hidden_nd.shape[:1]:
    raise ValueError(f"labels {labels_n.shape} and weights {weights_n.shape} must be "
                     f"[N] = {hidden_nd.shape[:1]}")
  fn = functools.partial(_chunked_ce, chunk_size=int(chunk_size))
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
    fn = _per_device(fn, token_axes)
  return _auto_sharded(fn)(hidden_nd, kernel_dv, labels_n.astype(jnp.int32), weights_n)


def eager_cross_entropy(hidden_nd: jax.Array, kernel_dv: jax.Array, labels_n: jax.Array,
                        weights_n: jax.Array) -> jax.Array:
  """The same weighted sum through the full [N, V] float32 logits (loss.mode='eager')."""
  def fn(h, w, y, wt):
    _, ce_n = _token_ce(_chunk_logits(h, w.astype(h.dtype)), y)
    return jnp.sum(jnp.where(y >= 0, wt.astype(jnp.float32) * ce_n, 0.0))
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

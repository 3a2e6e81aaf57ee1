"""Self-attention over packed rows: a token sees earlier tokens of its own sample only (causal,
the text models), or every token of its own sample (`causal=False`, the InternViT tower).

Packed rows carry `segment_ids` [B, T]: 1, 2, ... per sample and 0 for padding. The mask is
`(segment_q == segment_k) & causal` (`segment_mask`). Padding tokens (segment 0) attend to
(earlier) padding, so no row of the softmax is empty (no NaN); their outputs are never used.
`segment_ids=None` says each row is one sample without padding (the InternViT tower's tiles):
"xla", "cudnn" and "dpa_xla" then build no [T, T] segment mask (cuDNN takes no bias, which
it refuses for an odd T such as the tower's 1,025 in training), the others run on ids of
ones.

Implementations:
  "blockwise" flash-style blocks in pure JAX (ops/flash_attention.py): online softmax, custom
            VJP that recomputes scores block by block, causal blocks skipped (non-causal:
            every block visited). Runs everywhere; O(T * block) memory in forward and
            backward.
  "xla"     plain jnp: einsum, mask, float32 softmax. Runs everywhere; O(T^2) scores memory
            (a Qwen3-8B layer at 16k tokens: ~128 GiB of temporaries for value_and_grad).
  "cudnn"   jax.nn.dot_product_attention(implementation="cudnn") with the same dense segment
            mask (turned into an additive bias by JAX). GPU only; bf16/fp16 inputs.
  "dpa_xla" the "cudnn" call with implementation="xla": the CPU twin of the cudnn path, so
            tests check the mask and layout we hand to jax.nn.dot_product_attention.
  "pallas"  Pallas Triton flash kernels (ops/pallas_attention.py, JAX's own kernel bodies):
            segment ids and causality applied inside each tile, so no [T, T] mask and O(T)
            memory; GQA by index map (k / v never repeated in the forward); per device
            under a mesh. NVIDIA GPUs only (float32 inputs get Triton's default dot
            precision, TF32 on recent GPUs); elsewhere it raises unless `interpret=True`
            (Pallas' interpreter, for CPU tests). Measured only by scripts/gpu_kernels.py.
  "auto"    "cudnn" on a GPU with bf16/fp16 inputs (4.6x faster than "xla" for Qwen3-0.6B at
            8k tokens on an H100; docs/benchmarks.md), "blockwise" otherwise (CPU, TPU, float32
            on GPU): the only path here whose memory does not grow with T^2.
            `scripts/gpu_kernels.py` measures "pallas" against "cudnn" and "blockwise" on a GPU
            (errors against per-sample attention, forward + backward time); if "pallas" wins
            there, flip `AUTO_GPU_IMPL` below to "pallas" (cudnn's dense mask is O(T^2)).

Rows split over a `sequence` mesh axis (context parallelism, `mesh.sequence`): every
implementation above runs per device inside a shard_map, wrapped by `_context_parallel`:
  Ulysses   (when each device's query heads divide over the sequence axis, and its kv heads
            too or kv heads repeated to the axis size, as XTuner does): an all-to-all turns
            [T / P tokens, all heads] into [all T tokens, heads / P], the kernel runs on whole
            rows, and an all-to-all turns the output back: four all-to-alls per layer forward
            (q, k, v, output) and four backward; every device does the same work.
  all-gather KV (otherwise, e.g. 40 heads on 16 devices): each device keeps its query
            slice and gathers the row's keys and values (O(T) memory, K / N of the query
            size under GQA), then runs the blockwise kernel with its queries' offset. The
            causal triangle makes later slices do more work than earlier ones (non-causal,
            every slice does the same work).
Segment ids are gathered whole, so a sample may start on one device and end on another.
"""

import math

import jax
import jax.numpy as jnp

from jaxtune.ops import pallas_attention
from jaxtune.ops.flash_attention import blockwise_attention
from jaxtune.ops.pallas_attention import KV_NAMES, Q_NAMES
from jaxtune.parallel.sharding import logical_shard_map, logical_to_spec

IMPLEMENTATIONS = ("auto", "blockwise", "xla", "cudnn", "dpa_xla", "pallas")
# The impls that run segment ids None (one sample per row) without a stand-in array of ones.
_TAKES_NO_SEGMENTS = ("xla", "cudnn", "dpa_xla")

# What "auto" runs on a GPU with bf16/fp16 inputs: "cudnn" (the measured path) or "pallas".
AUTO_GPU_IMPL = "cudnn"


def resolve_impl(impl: str, backend: str, dtype) -> str:
  """What `impl` runs on `backend` with inputs of `dtype`: "auto"'s rule, in one place (the
  planner's report and jaxtune.config.resolve read it too)."""
  if impl != "auto":
    return impl
  on_gpu = backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  return AUTO_GPU_IMPL if on_gpu else "blockwise"


def segment_mask(segment_ids_bt: jax.Array, causal: bool = True) -> jax.Array:
  """[B, T, S] bool: query t may attend key s (same segment, and s <= t when causal)."""
  seq_len = segment_ids_bt.shape[-1]
  same_segment_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
  if not causal:
    return same_segment_bts
  return same_segment_bts & jnp.tril(jnp.ones((seq_len, seq_len), dtype=jnp.bool_))


def _xla_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, causal=True):
  batch, seq_len, num_heads, head_dim = q_btnh.shape
  num_kv_heads = k_btkh.shape[2]
  group = num_heads // num_kv_heads
  # GQA: query head n uses kv head n // group (HF's repeat_kv order).
  q_btkgh = q_btnh.reshape(batch, seq_len, num_kv_heads, group, head_dim)
  scores_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_btkh,
                            preferred_element_type=jnp.float32)
  scores_bkgts = scores_bkgts * (1.0 / math.sqrt(head_dim))
  if segment_ids_bt is not None:
    mask_b11ts = segment_mask(segment_ids_bt, causal)[:, None, None]
  elif causal:
    mask_b11ts = jnp.tril(jnp.ones((seq_len, seq_len), dtype=jnp.bool_))
  else:
    mask_b11ts = None  # one sample per row, whole: nothing hidden
  if mask_b11ts is not None:
    scores_bkgts = jnp.where(mask_b11ts, scores_bkgts, jnp.finfo(jnp.float32).min)
  probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(v_btkh.dtype)
  out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, v_btkh)
  return out_btkgh.reshape(batch, seq_len, num_heads, head_dim)


def _jax_nn_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, implementation, causal=True):
  # The segment mask is dense [B, 1, T, T]: cuDNN's public API takes padding lengths only,
  # not per-sample offsets, so packed rows need the full mask (O(T^2) memory per row). Rows
  # of one sample (segment ids None) need none: is_causal says all.
  mask_b1ts = None if segment_ids_bt is None else segment_mask(segment_ids_bt, causal)[:, None]
  return jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, mask=mask_b1ts, is_causal=causal,
                                      implementation=implementation)


def _local_impl(impl: str, dtype, *, block_q: int, block_kv: int, interpret: bool,
                pallas_blocks: pallas_attention.Blocks | None, causal: bool = True):
  """impl as a function of one device's (q, k, v, segment ids), after its checks. Only
  "xla", "cudnn" and "dpa_xla" take segment ids None (`_TAKES_NO_SEGMENTS`)."""
  if impl == "blockwise":
    return lambda q, k, v, seg: blockwise_attention(
        q, k, v, seg, block_q=block_q, block_kv=block_kv, causal=causal).astype(v.dtype)
  if impl == "xla":
    return lambda q, k, v, seg: _xla_attention(q, k, v, seg, causal)
  if impl == "cudnn":
    if jax.default_backend() != "gpu":
      raise ValueError(f"attention impl 'cudnn' needs an NVIDIA GPU, but JAX's backend is "
                       f"'{jax.default_backend()}'. Use attention='auto' (blockwise) here.")
    if dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"attention impl 'cudnn' needs bfloat16 or float16 inputs, got "
                       f"{dtype}; set compute_dtype='bfloat16' or attention='auto'.")
    return lambda q, k, v, seg: _jax_nn_attention(q, k, v, seg, "cudnn", causal)
  if impl == "pallas":
    if jax.default_backend() != "gpu" and not interpret:
      raise ValueError(f"attention impl 'pallas' needs an NVIDIA GPU (Triton), but JAX's "
                       f"backend is '{jax.default_backend()}'. Use attention='auto' "
                       f"(blockwise) here, or interpret=True to run the kernels interpreted.")
    blocks = pallas_blocks or pallas_attention.Blocks()
    return lambda q, k, v, seg: pallas_attention.local_attention(
        q, k, v, seg, blocks=blocks, interpret=interpret, causal=causal)
  if impl == "dpa_xla":
    return lambda q, k, v, seg: _jax_nn_attention(q, k, v, seg, "xla", causal)
  raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLEMENTATIONS}")


def sequence_axes(x_bt: jax.Array) -> tuple[str, ...]:
  """The mesh axes (of more than one device) splitting the tokens of each row of x [B, T, ...];
  () if none."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return ()
  entry = logical_to_spec(Q_NAMES[:2], x_bt.shape[:2], mesh)[1]
  axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  return axes if math.prod(mesh.shape[a] for a in axes) > 1 else ()


def sequence_devices(x_bt: jax.Array) -> int:
  """How many devices split each row of x [B, T, ...] (1 if none)."""
  axes = sequence_axes(x_bt)
  return math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes) if axes else 1


def uses_ulysses(num_heads: int, num_kv_heads: int, devices: int) -> bool:
  """Whether heads split `devices` ways (Ulysses) or keys and values are gathered instead."""
  return num_heads % devices == 0 and (num_kv_heads % devices == 0
                                       or devices % num_kv_heads == 0)


def _context_parallel(local_fn, q_btnh, k_btkh, v_btkh, segment_ids_bt, seq_axes, check_vma,
                      causal=True):
  """`local_fn` on whole rows while the mesh splits each row over `seq_axes` (see the module
  docstring: Ulysses, or all-gather KV). `causal` must be what `local_fn` applies: the
  all-gather-KV path runs its own blockwise kernel."""
  mesh = jax.sharding.get_abstract_mesh()
  q_spec = logical_to_spec(Q_NAMES, q_btnh.shape, mesh)
  kv_spec = logical_to_spec(KV_NAMES, k_btkh.shape, mesh)
  # Heads keep their tensor split only when q and kv heads split alike (GQA stays local).
  heads = q_spec[2] if q_spec[2] == kv_spec[2] else None
  rules = (("cp_batch", q_spec[0]), ("cp_length", seq_axes), ("cp_heads", heads))
  devices = math.prod(mesh.shape[a] for a in seq_axes)

  def local(_, q, k, v, seg):
    n, kh = q.shape[2], k.shape[2]
    if uses_ulysses(n, kh, devices):
      if kh % devices:  # fewer kv heads than devices: each device gets one, repeated
        k, v = (jnp.repeat(x, devices // kh, axis=2) for x in (k, v))
      to_heads = lambda x: jax.lax.all_to_all(x, seq_axes, split_axis=2, concat_axis=1,
                                              tiled=True)
      seg = jax.lax.all_gather(seg, seq_axes, axis=1, tiled=True)
      o = local_fn(to_heads(q), to_heads(k), to_heads(v), seg)
      return jax.lax.all_to_all(o, seq_axes, split_axis=1, concat_axis=2, tiled=True)
    gather = lambda x: jax.lax.all_gather(x, seq_axes, axis=1, tiled=True)
    offset = jax.lax.axis_index(seq_axes) * q.shape[1]
    return blockwise_attention(q, gather(k), gather(v), seg, kv_segment_ids_bs=gather(seg),
                               q_offset=offset, causal=causal).astype(v.dtype)

  names = ("cp_batch", "cp_length", "cp_heads", None)
  fn = logical_shard_map(local, (names, names, names, ("cp_batch", "cp_length")), names,
                         rules=rules, check_vma=check_vma)
  return fn(q_btnh, k_btkh, v_btkh, segment_ids_bt)


def attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
              segment_ids_bt: jax.Array | None, *, impl: str = "auto", block_q: int = 512,
              block_kv: int = 512, interpret: bool = False,
              pallas_blocks: pallas_attention.Blocks | None = None,
              causal: bool = True) -> jax.Array:
  """Packed GQA attention with scale 1/sqrt(H); returns [B, T, N, H] in v's dtype.

  `causal` (default): token t sees keys s <= t of its own segment; `causal=False`: every key
  of its own segment. `segment_ids_bt` None: each row is one sample (no padding).

  `block_q` / `block_kv` are the "blockwise" tile sizes (capped at T); other impls ignore them.
  `interpret` runs "pallas" in Pallas' interpreter (any backend); `pallas_blocks` are its
  tiles (`pallas_attention.Blocks`). Under a mesh whose rules split the tokens of a row
  (`sequence_axes`), every impl runs per device on whole rows (`_context_parallel`).
  """
  num_heads, num_kv_heads = q_btnh.shape[2], k_btkh.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads ({num_kv_heads})")
  impl = resolve_impl(impl, jax.default_backend(), q_btnh.dtype)
  causal = bool(causal)
  local_fn = _local_impl(impl, q_btnh.dtype, block_q=block_q, block_kv=block_kv,
                         interpret=interpret, pallas_blocks=pallas_blocks, causal=causal)
  seq_axes = sequence_axes(q_btnh)
  if segment_ids_bt is None and (seq_axes or impl not in _TAKES_NO_SEGMENTS):
    segment_ids_bt = jnp.ones(q_btnh.shape[:2], jnp.int32)
  if seq_axes:
    # Pallas' interpreter drops the varying type of its blocks in a checked shard_map.
    return _context_parallel(local_fn, q_btnh, k_btkh, v_btkh, segment_ids_bt, seq_axes,
                             check_vma=not (impl == "pallas" and interpret), causal=causal)
  if impl == "pallas":  # per device under a mesh (rows and heads split; no collective)
    return pallas_attention.packed_attention(
        q_btnh, k_btkh, v_btkh, segment_ids_bt, blocks=pallas_blocks or pallas_attention.Blocks(),
        interpret=interpret, causal=causal)
  return local_fn(q_btnh, k_btkh, v_btkh, segment_ids_bt)

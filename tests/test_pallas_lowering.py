"""The Pallas kernels lower to Triton for an H100 on a machine without one.

The interpreter tests (test_pallas_attention.py, test_pallas_loss.py) check what the kernels
compute; this checks that every op in them has a Triton lowering (jax's Pallas -> Triton IR
step runs in Python, for an abstract device), which the interpreter does not. What it cannot
check is Triton's own compile and the speed: that needs the GPU (scripts/gpu_kernels.py).
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from jaxtune.ops import pallas_attention, pallas_loss
from jaxtune.ops.loss import chunked_cross_entropy

H100 = AbstractDevice("NVIDIA H100 80GB HBM3", 132, "gpu")
TRITON_CALL = "__gpu$xla.gpu.triton"


def _lowered_for_h100(fn, *args) -> str:
  with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=H100)):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


# (rows, tokens, q heads, kv heads, head dim): Qwen3-8B and -1.7B at 16k, head dim 64, and
# ragged ones (T and H off the tiles: the padded path).
ATTENTION_SHAPES = [(1, 16384, 32, 8, 128), (1, 16384, 16, 8, 128), (2, 8192, 8, 8, 64),
                    (1, 320, 4, 2, 128), (1, 320, 4, 4, 80)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_forward_and_backward_lower_to_triton(dtype, shape):
  b, t, n, k, h = shape
  q = jax.ShapeDtypeStruct((b, t, n, h), dtype)
  kv = jax.ShapeDtypeStruct((b, t, k, h), dtype)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def loss(q, k, v, seg):
    return pallas_attention.local_attention(q, k, v, seg).astype(jnp.float32).sum()

  text = _lowered_for_h100(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, seg)
  assert text.count(TRITON_CALL) == 2, "one forward and one backward Triton kernel"


# (tiles, tokens, heads, head dim): InternViT-300M (Intern-S1-mini) and InternViT-6B
# (Intern-S1) on 448-pixel tiles (1 + 32 x 32 tokens, padded inside to a whole tile), and a
# small ragged one (H off the powers of two).
VISION_SHAPES = [(64, 1025, 16, 64), (16, 1025, 25, 128), (3, 17, 4, 80)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape", VISION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_non_causal_attention_forward_and_backward_lower_to_triton(dtype, shape):
  """causal=False (the InternViT tower's kernels: another static kernel body)."""
  b, t, n, h = shape
  q = jax.ShapeDtypeStruct((b, t, n, h), dtype)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def loss(q, k, v, seg):
    return pallas_attention.local_attention(q, k, v, seg, causal=False).astype(
        jnp.float32).sum()

  text = _lowered_for_h100(jax.grad(loss, argnums=(0, 1, 2)), q, q, q, seg)
  assert text.count(TRITON_CALL) == 2, "one forward and one backward Triton kernel"
  assert "jaxtune_full_attention_fwd" in text and "jaxtune_full_attention_bwd" in text


# (tokens, hidden, vocab): the production shape (16k tokens, Qwen3-8B's hidden and vocab) and a
# ragged one (N and V off the tiles).
LOSS_SHAPES = [(16384, 4096, 151936), (200, 256, 1000)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_loss_and_its_gradients_lower_to_triton(dtype, shape):
  n, d, v = shape
  hidden = jax.ShapeDtypeStruct((n, d), dtype)
  kernel = jax.ShapeDtypeStruct((d, v), dtype)
  labels = jax.ShapeDtypeStruct((n,), jnp.int32)
  weights = jax.ShapeDtypeStruct((n,), jnp.float32)
  grad = jax.grad(pallas_loss.fused_cross_entropy, argnums=(0, 1))
  text = _lowered_for_h100(grad, hidden, kernel, labels, weights)
  # One compile per kernel whatever the number of vocab slabs (38 at the production shape):
  # the slab's offset is an operand, and the slab loop is a while loop around one call each.
  assert text.count(TRITON_CALL) == 2, "one forward (stats) and one backward (dlogits) kernel"
  for name in ("fused_ce_stats", "fused_ce_dlogits"):
    assert text.count(f'name = "{name}"') == 1, name
  slabs = -(-v // pallas_loss.slab_width(v, pallas_loss.Tiles()))
  assert text.count("stablehlo.while") == (2 if slabs > 1 else 0)


def test_fused_loss_lowers_inside_a_type_checked_shard_map():
  """The GPU wiring: chunked_cross_entropy(impl='pallas', token_axes=...) runs the kernels per
  device inside a shard_map with its varying-type check on (interpret mode has to turn it
  off, so only this checks the slab loop's carries and the kernels' output types there)."""
  n, d, v = 1024, 256, 1000
  args = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.float32))
  f = lambda h, w, y, wt: chunked_cross_entropy(h, w, y, wt, chunk_size=128, token_axes="x",
                                                impl="pallas")
  mesh = AbstractMesh((4,), ("x",), axis_types=(AxisType.Auto,), abstract_device=H100)
  with use_abstract_mesh(mesh):
    lowered = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).trace(*args).lower(
        lowering_platforms=("cuda",))
  assert lowered.as_text().count(TRITON_CALL) == 2


def _pallas_calls(jaxpr):
  """Every pallas_call equation in a closed jaxpr, sub-jaxprs (custom VJPs, loops) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _pallas_calls(inner)


def _call_name(eqn) -> str:
  """A pallas_call's kernel name (`name` in jax 0.12, `name_and_src_info` in 0.11)."""
  info = eqn.params.get("name") or eqn.params.get("name_and_src_info")
  return str(getattr(info, "name", info)).split()[0]


def _partial_blocks(fn, *args) -> list[str]:
  """Blocks that would hang over the end of their array: interpret mode pads the arrays and
  hides them; Triton on jax 0.11 reads and writes past the end."""
  found, calls = [], 0
  for eqn in _pallas_calls(jax.make_jaxpr(fn)(*args).jaxpr):
    calls += 1
    for mapping in eqn.params["grid_mapping"].block_mappings:
      shape = mapping.array_aval.shape
      for dim, block in zip(shape, mapping.block_shape):
        size = getattr(block, "block_size", None)
        if size is not None and dim % size:
          found.append(f"{_call_name(eqn)}: block {size} of {dim}")
  assert calls, "no pallas_call found"
  return found


# (tokens, vocab, vocab slab): N off the token tile; V off the vocab tile, the slab, or both;
# V smaller than the slab; a slab that is not a multiple of the vocab tile.
RAGGED_LOSS = [(70, 1000, 384), (64, 1000, 4096), (16, 128, 384), (33, 896, 200),
               (100, 1024, 256), (1, 129, 384)]


@pytest.mark.parametrize("n,v,slab", RAGGED_LOSS, ids=lambda x: str(x))
def test_ragged_loss_shapes_become_whole_blocks_before_any_kernel(n, v, slab):
  tiles = pallas_loss.Tiles(tokens=16, vocab=128, hidden=16, vocab_slab=slab)
  h, w = jnp.zeros((n, 32), jnp.bfloat16), jnp.zeros((32, v))
  y, wt = jnp.zeros((n,), jnp.int32), jnp.ones((n,))
  loss_grad = jax.grad(lambda h, w: pallas_loss.fused_cross_entropy(h, w, y, wt, tiles, True),
                       argnums=(0, 1))
  assert _partial_blocks(loss_grad, h, w) == []
  # Each kernel once in the program (the slab loop's body), however many slabs V takes.
  names = [_call_name(e) for e in _pallas_calls(jax.make_jaxpr(loss_grad)(h, w).jaxpr)]
  assert sorted(names) == ["fused_ce_dlogits", "fused_ce_stats"], names


def test_ragged_attention_shapes_become_whole_blocks_before_any_kernel():
  blocks = pallas_attention.Blocks(q=16, kv=16, bwd_major=16, bwd_minor=16)
  q, kv = jnp.zeros((1, 37, 4, 12)), jnp.zeros((1, 37, 2, 12))
  seg = jnp.ones((1, 37), jnp.int32)
  attention_grad = jax.grad(lambda q, k, v: pallas_attention.local_attention(
      q, k, v, seg, blocks=blocks, interpret=True).sum(), argnums=(0, 1, 2))
  assert _partial_blocks(attention_grad, q, kv, kv) == []

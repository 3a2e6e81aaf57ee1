"""The Pallas kernels lower to Triton for an H100 on a machine without one.

The interpreter tests (test_pallas_attention.py, test_pallas_loss.py) check what the kernels
compute; this checks that every op in them has a Triton lowering (jax's Pallas -> Triton IR
step runs in Python, for an abstract device), which the interpreter does not. What it cannot
check is Triton's own compile and the speed: that needs the GPU (scripts/gpu_kernels.py).
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from jaxtune.ops import pallas_attention, pallas_loss

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
  slabs = -(-v // pallas_loss.Tiles().vocab_slab)
  # forward, d_hidden, and one d_kernel kernel per vocab slab (its offset is baked in)
  assert text.count(TRITON_CALL) == 2 + slabs


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
          found.append(f"{eqn.params.get('name_and_src_info')}: block {size} of {dim}")
  assert calls, "no pallas_call found"
  return found


def test_ragged_shapes_become_whole_blocks_before_any_kernel():
  tiles = pallas_loss.Tiles(tokens=16, vocab=128, hidden=16, vocab_slab=384)
  h, w = jnp.zeros((70, 32)), jnp.zeros((32, 1000))
  y, wt = jnp.zeros((70,), jnp.int32), jnp.ones((70,))
  loss_grad = jax.grad(lambda h, w: pallas_loss.fused_cross_entropy(h, w, y, wt, tiles, True),
                       argnums=(0, 1))
  assert _partial_blocks(loss_grad, h, w) == []

  blocks = pallas_attention.Blocks(q=16, kv=16, bwd_major=16, bwd_minor=16)
  q, kv = jnp.zeros((1, 37, 4, 12)), jnp.zeros((1, 37, 2, 12))
  seg = jnp.ones((1, 37), jnp.int32)
  attention_grad = jax.grad(lambda q, k, v: pallas_attention.local_attention(
      q, k, v, seg, blocks=blocks, interpret=True).sum(), argnums=(0, 1, 2))
  assert _partial_blocks(attention_grad, q, kv, kv) == []

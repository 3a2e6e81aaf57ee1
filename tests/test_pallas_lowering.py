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

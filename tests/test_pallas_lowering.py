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


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 128), (4, 80)])
def test_attention_forward_and_backward_lower_to_triton(dtype, num_kv_heads, head_dim):
  b, t, n = 1, 320, 4   # T and H (80) off the tiles: the padded path lowers too
  q = jax.ShapeDtypeStruct((b, t, n, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((b, t, num_kv_heads, head_dim), dtype)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def loss(q, k, v, seg):
    return pallas_attention.local_attention(q, k, v, seg).astype(jnp.float32).sum()

  text = _lowered_for_h100(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, seg)
  assert text.count(TRITON_CALL) == 2, "one forward and one backward Triton kernel"


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_fused_loss_and_its_gradients_lower_to_triton(dtype):
  n, d, v = 200, 256, 1000   # N and V off the tiles
  hidden = jax.ShapeDtypeStruct((n, d), dtype)
  kernel = jax.ShapeDtypeStruct((d, v), dtype)
  labels = jax.ShapeDtypeStruct((n,), jnp.int32)
  weights = jax.ShapeDtypeStruct((n,), jnp.float32)
  grad = jax.grad(pallas_loss.fused_cross_entropy, argnums=(0, 1))
  text = _lowered_for_h100(grad, hidden, kernel, labels, weights)
  assert text.count(TRITON_CALL) >= 3, "forward, d_hidden and d_kernel Triton kernels"

"""Non-causal attention (the InternViT tower's) with rows split over the `sequence` mesh axis:
the Ulysses path and the all-gather-KV fallback against per-sample float64 attention, values
and gradients, with samples straddling the shard boundaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.ops import attention as attention_lib
from jaxtune.ops.attention import attention
from jaxtune.ops.pallas_attention import Blocks
from tests.test_attention import _torch_per_sample
from tests.test_sequence_parallel import _mesh, _rows, _sharded

Q_NAMES = ("activation_batch", "activation_length", "activation_heads", None)
KV_NAMES = ("activation_batch", "activation_length", "activation_kv_heads", None)
PALLAS = dict(interpret=True, pallas_blocks=Blocks(q=16, kv=16, bwd_major=16, bwd_minor=16))


def _split_run(mesh, impl, q, k, v, seg, do, **kwargs):
  """(out, dq, dk, dv) of sum(out * do), non-causal, with q, k, v and seg sharded on mesh."""
  with jax.set_mesh(mesh):
    args = (_sharded(mesh, q, Q_NAMES), _sharded(mesh, k, KV_NAMES), _sharded(mesh, v, KV_NAMES))
    seg_arg = None if seg is None else _sharded(mesh, seg, Q_NAMES[:2])
    assert attention_lib.sequence_axes(args[0]) == ("sequence",)
    fn = lambda q, k, v: attention(q, k, v, seg_arg, impl=impl, causal=False, **kwargs)
    out = jax.jit(fn)(*args)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * do), argnums=(0, 1, 2)))(
        *args)
  return (out, *grads)


def _assert_matches(got, want, seg):
  real = seg > 0
  np.testing.assert_allclose(np.asarray(got[0])[real], want[0][real], atol=2e-5)
  for name, g, w in zip(("dq", "dk", "dv"), got[1:], want[1:]):
    np.testing.assert_allclose(np.asarray(g), w, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("sizes,num_heads,num_kv_heads,path", [
    (dict(sequence=2), 4, 2, "ulysses"),
    (dict(sequence=4), 8, 2, "ulysses"),      # 2 kv heads repeated to the 4 devices
    (dict(sequence=4), 6, 2, "all-gather"),   # 6 heads do not split 4 ways
    (dict(sequence=2, fsdp=2), 3, 1, "all-gather"),
])
@pytest.mark.parametrize("impl", ["blockwise", "xla"])
def test_non_causal_attention_across_shards_matches_per_sample(sizes, num_heads, num_kv_heads,
                                                               path, impl):
  q, k, v, seg = _rows(2, 32, num_heads, num_kv_heads, seed=3)
  devices = sizes["sequence"]
  assert attention_lib.uses_ulysses(num_heads, num_kv_heads, devices) == (path == "ulysses")
  do = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)
  do *= (seg > 0)[:, :, None, None]
  got = _split_run(_mesh(**sizes), impl, q, k, v, seg, do, block_q=4, block_kv=4)
  _assert_matches(got, _torch_per_sample(q, k, v, seg, do, causal=False), seg)


@pytest.mark.parametrize("sizes", [dict(sequence=2), dict(sequence=4)])
def test_non_causal_pallas_across_shards_matches_per_sample(sizes):
  """The interpreted Pallas kernels under Ulysses (4 heads over 2) and all-gather KV (6 over
  4: the blockwise fallback, whatever the impl)."""
  num_heads = 4 if sizes["sequence"] == 2 else 6
  q, k, v, seg = _rows(2, 32, num_heads, 2, seed=4)
  do = np.random.default_rng(2).normal(size=q.shape).astype(np.float32)
  do *= (seg > 0)[:, :, None, None]
  got = _split_run(_mesh(**sizes), "pallas", q, k, v, seg, do, **PALLAS)
  _assert_matches(got, _torch_per_sample(q, k, v, seg, do, causal=False), seg)


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_no_segment_ids_across_shards_is_one_sample_per_row(impl):
  """segment_ids None (each row one sample, as the tower's tiles) under a split row: ids of
  ones are made for the shards."""
  q, k, v, _ = _rows(2, 32, 4, 2, seed=5)
  seg = np.ones(q.shape[:2], np.int32)
  do = np.random.default_rng(3).normal(size=q.shape).astype(np.float32)
  got = _split_run(_mesh(sequence=2), impl, q, k, v, None, do, block_q=8, block_kv=8)
  _assert_matches(got, _torch_per_sample(q, k, v, seg, do, causal=False), seg)

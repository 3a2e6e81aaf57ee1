"""Memory and time of packed attention forward + backward: xla (dense [T, T]) vs blockwise.

For one Qwen3-8B-shaped attention layer (32 query heads, 8 kv heads, head dim 128, bf16)
at 4,096 and 16,384 tokens per row, the temporaries of value_and_grad come from
`lower(abstract args).compile().memory_analysis()`: nothing is allocated, so it runs on a
CPU. A small shape is also run and timed on the default backend (and the large shapes too
on an accelerator, `--run-large auto`, except 'xla' where its [T, T] scores do not fit).
On a GPU, 'cudnn' (the dense-mask cuDNN path) and 'pallas' (the Triton flash kernels of
ops/pallas_attention.py; their accuracy check is scripts/gpu_kernels.py) are measured too.

Rows are packed with samples of `--sample` tokens (the last one shorter) so the segment
mask is real; the blockwise path skips kv blocks after the query block only (causality), so
its FLOPs do not depend on the packing.

  python scripts/bench_attention.py [--blocks Q,KV] [--small B,T,N,K,H] [--run-large auto|yes|no]
                                    [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.ops.attention import attention


def _loss(impl: str, block_q: int, block_kv: int):
  def loss(q, k, v, segment_ids):
    out = attention(q, k, v, segment_ids, impl=impl, block_q=block_q, block_kv=block_kv)
    return jnp.sum(out.astype(jnp.float32))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _abstract(b, t, n, k, h, dtype):
  return (jax.ShapeDtypeStruct((b, t, n, h), dtype), jax.ShapeDtypeStruct((b, t, k, h), dtype),
          jax.ShapeDtypeStruct((b, t, k, h), dtype), jax.ShapeDtypeStruct((b, t), jnp.int32))


def compiled_stats(impl, shape, dtype, blocks) -> dict:
  t0 = time.perf_counter()
  compiled = _loss(impl, *blocks).lower(*_abstract(*shape, dtype)).compile()
  mem = compiled.memory_analysis()
  b, t, n, _, h = shape
  return dict(temp_bytes=int(mem.temp_size_in_bytes),
              temp_gib=round(mem.temp_size_in_bytes / 2**30, 3),
              scores_f32_gib=round(b * n * t * t * 4 / 2**30, 3),
              # causal attention, forward (2 matmuls) + backward (5 with recompute), halved
              causal_flops=float(7 * 2 * b * n * t * t * h / 2),
              compile_s=round(time.perf_counter() - t0, 2))


def _inputs(shape, dtype, sample: int, seed: int = 0):
  b, t, n, k, h = shape
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32).astype(dtype)
  kk = jax.random.normal(keys[1], (b, t, k, h), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (b, t, k, h), jnp.float32).astype(dtype)
  segment_ids = np.broadcast_to(np.arange(t) // sample + 1, (b, t)).astype(np.int32)
  return q, kk, v, jnp.asarray(segment_ids)


def measured(impl, shape, dtype, blocks, sample: int, repeats: int) -> dict:
  args = _inputs(shape, dtype, sample)
  fn = _loss(impl, *blocks)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return dict(median_s=round(statistics.median(times), 5))


def bench(shape, dtype, blocks, impls, run_impls, sample, repeats) -> dict:
  b, t, n, k, h = shape
  res = dict(shape=dict(batch=b, tokens=t, heads=n, kv_heads=k, head_dim=h,
                        dtype=jnp.dtype(dtype).name, block_q=blocks[0], block_kv=blocks[1],
                        sample=sample))
  for impl in impls:
    res[impl] = compiled_stats(impl, shape, dtype, blocks)
    if impl in run_impls:
      res[impl]["run"] = measured(impl, shape, dtype, blocks, sample, repeats)
      res[impl]["run"]["tflops_per_s"] = round(
          res[impl]["causal_flops"] / res[impl]["run"]["median_s"] / 1e12, 3)
  if "xla" in res and "blockwise" in res:
    res["blockwise_over_xla_temp"] = round(res["blockwise"]["temp_bytes"]
                                           / max(res["xla"]["temp_bytes"], 1), 5)
  return res


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--blocks", default="512,512", help="block_q,block_kv of 'blockwise'")
  ap.add_argument("--small", default="1,2048,8,2,128", help="B,T,N,K,H of the timed shape")
  ap.add_argument("--sample", type=int, default=1000, help="tokens per packed sample")
  ap.add_argument("--run-large", choices=("auto", "yes", "no"), default="auto")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  backend = jax.default_backend()
  blocks = tuple(int(x) for x in args.blocks.split(","))
  impls = ("xla", "blockwise") + (("cudnn", "pallas") if backend == "gpu" else ())
  run_large = args.run_large == "yes" or (args.run_large == "auto" and backend != "cpu")
  large_run = tuple(i for i in impls if i != "xla") if run_large else ()
  small = tuple(int(x) for x in args.small.split(","))
  report = dict(
      backend=backend, device=str(jax.devices()[0].device_kind), jax=jax.__version__,
      machine=platform.machine(),
      note=("temp: per device, value_and_grad, compiled.memory_analysis(); causal_flops: "
            "7 T^2 H matmul FLOPs per head and row (forward 2, backward 5 with the scores "
            "recomputed), halved for causality; run: median wall time after a warm-up"),
      qwen3_8b_4k=bench((1, 4096, 32, 8, 128), jnp.bfloat16, blocks, impls, large_run,
                        args.sample, args.repeats),
      qwen3_8b_16k=bench((1, 16384, 32, 8, 128), jnp.bfloat16, blocks, impls, large_run,
                         args.sample, args.repeats),
      small=bench(small, jnp.bfloat16, blocks, impls, impls, args.sample, args.repeats),
  )
  text = json.dumps(report, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()

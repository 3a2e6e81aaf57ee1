"""Forward + backward of one Qwen3-MoE block (route + experts): grouped matmul vs dense loop.

`grouped` is `moe_experts` (tokens sorted by expert, `jax.lax.ragged_dot`, dropless);
`dense_loop` is `moe_experts_dense_loop` (every token through every expert, masked).
The step is jit(value_and_grad) of mean(y^2) w.r.t. x, the router kernel and the three
expert tensors, with x in the compute dtype and the weights in `--param-dtype` (fp32 master
weights cast inside, as in training).

Memory comes from `lower(abstract args).compile().memory_analysis()` at the full
Qwen3-30B-A3B shape (16,384 tokens, hidden 2,048, 128 experts, top-8, expert FFN 768):
nothing is allocated, so it runs anywhere. Timing (median of `--runs` after `--warmup`)
runs at `--tokens` x `--experts`: the full shape on a GPU, a reduced one on the CPU so that
both versions finish in about two minutes on two cores. `flops` is the matmul work each
version needs (18 M D F for fwd + bwd, M = N K grouped rows or N E dense rows).

Caveat: jax lowers `ragged_dot` to a real grouped matmul (`chlo.ragged_dot`) only on TPU and
GPU. On the CPU it expands the sorted rows to a masked [G, M, D] array and runs one dense dot
(`_ragged_dot_general_impl`): G times the work and memory, so there the grouped version's
memory and time describe that fallback, not the algorithm; `xla_flops` (XLA's cost analysis
of the full-shape step; a scan body is counted once, so the dense loop's is ~1 / E of its
work) shows it. XLA's GPU default also rewrites ragged dots to dense ones unless a ragged-dot
fusion applies; measure on the GPU before trusting either number.

  python scripts/bench_moe.py [--tokens N] [--experts E] [--impls grouped,dense_loop]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from jaxtune.ops import moe

IMPLS = {"grouped": moe.moe_experts, "dense_loop": moe.moe_experts_dense_loop}
FULL = dict(tokens=16384, hidden=2048, experts=128, top_k=8, ffn=768)


def _step(impl: str, top_k: int):
  fn = IMPLS[impl]

  def loss(x_nd, router_de, gate_edf, up_edf, down_efd):
    routing = moe.route(x_nd, router_de, top_k=top_k, norm_topk_prob=True)
    y_nd = fn(x_nd, routing, gate_edf, up_edf, down_efd)
    return jnp.mean(jnp.square(y_nd.astype(jnp.float32)))

  return jax.jit(jax.value_and_grad(loss, argnums=range(5)))


def _abstract(tokens, hidden, experts, ffn, dtype, param_dtype):
  s = jax.ShapeDtypeStruct
  return (s((tokens, hidden), dtype), s((hidden, experts), param_dtype),
          s((experts, hidden, ffn), param_dtype), s((experts, hidden, ffn), param_dtype),
          s((experts, ffn, hidden), param_dtype))


def _flops(impl, tokens, hidden, experts, top_k, ffn) -> float:
  rows = tokens * (top_k if impl == "grouped" else experts)
  return 18.0 * rows * hidden * ffn


def _memory(impl, shape, dtype, param_dtype) -> dict:
  t0 = time.perf_counter()
  compiled = _step(impl, shape["top_k"]).lower(*_abstract(
      shape["tokens"], shape["hidden"], shape["experts"], shape["ffn"], dtype,
      param_dtype)).compile()
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(xla_flops=float(cost.get("flops", float("nan"))) if cost else None,
              needed_flops=_flops(impl, shape["tokens"], shape["hidden"], shape["experts"],
                                  shape["top_k"], shape["ffn"]),
              temp_bytes=int(m.temp_size_in_bytes), argument_bytes=int(m.argument_size_in_bytes),
              output_bytes=int(m.output_size_in_bytes),
              temp_gib=round(m.temp_size_in_bytes / 2**30, 3),
              compile_s=round(time.perf_counter() - t0, 2))


def _inputs(shape, dtype, param_dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  n, d, e, f = shape["tokens"], shape["hidden"], shape["experts"], shape["ffn"]
  normal = lambda key, s, scale, dt: (scale * jax.random.normal(key, s, jnp.float32)).astype(dt)
  return (normal(k[0], (n, d), 1.0, dtype), normal(k[1], (d, e), 0.02, param_dtype),
          normal(k[2], (e, d, f), d ** -0.5, param_dtype),
          normal(k[3], (e, d, f), d ** -0.5, param_dtype),
          normal(k[4], (e, f, d), f ** -0.5, param_dtype))


def _time(impl, shape, dtype, param_dtype, runs, warmup) -> dict:
  step = _step(impl, shape["top_k"])
  args = jax.block_until_ready(_inputs(shape, dtype, param_dtype))
  t0 = time.perf_counter()
  jax.block_until_ready(step(*args))  # compile + first run: the warm-up
  first_s = time.perf_counter() - t0
  for _ in range(warmup):
    jax.block_until_ready(step(*args))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(step(*args))
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  flops = _flops(impl, shape["tokens"], shape["hidden"], shape["experts"], shape["top_k"],
                 shape["ffn"])
  return dict(median_s=round(med, 4), times_s=[round(t, 4) for t in times],
              compile_and_first_s=round(first_s, 2), tokens_per_s=round(shape["tokens"] / med, 1),
              tflops_per_s=round(flops / med / 1e12, 3), flops=flops)


def _check(shape, dtype, param_dtype) -> float:
  """Max |grouped - dense| of the block output at the timing shape (same routing)."""
  args = _inputs(dict(shape, tokens=min(shape["tokens"], 128)), dtype, param_dtype, seed=1)
  x, router = args[0], args[1]
  r = moe.route(x, router, top_k=shape["top_k"], norm_topk_prob=True)
  y1 = jax.jit(moe.moe_experts)(x, r, *args[2:])
  y2 = jax.jit(moe.moe_experts_dense_loop)(x, r, *args[2:])
  return float(jnp.max(jnp.abs(y1.astype(jnp.float32) - y2.astype(jnp.float32))))


def main() -> None:
  on_gpu = jax.default_backend() == "gpu"
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokens", type=int, default=None,
                 help="timing tokens (default: 16384 on GPU, 128 on CPU)")
  p.add_argument("--experts", type=int, default=None,
                 help="timing experts (default: 128 on GPU, 16 on CPU)")
  p.add_argument("--mem-tokens", type=int, default=FULL["tokens"])
  p.add_argument("--mem-experts", type=int, default=FULL["experts"])
  p.add_argument("--top-k", type=int, default=FULL["top_k"])
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--param-dtype", default="float32")
  p.add_argument("--impls", default="grouped,dense_loop")
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--warmup", type=int, default=0, help="extra untimed runs after the first")
  p.add_argument("--no-memory", action="store_true")
  args = p.parse_args()
  impls = [i for i in args.impls.split(",") if i]
  dtype, param_dtype = jnp.dtype(args.dtype), jnp.dtype(args.param_dtype)
  mem_shape = dict(FULL, tokens=args.mem_tokens, experts=args.mem_experts, top_k=args.top_k)
  time_shape = dict(FULL, top_k=args.top_k,
                    tokens=args.tokens or (FULL["tokens"] if on_gpu else 128),
                    experts=args.experts or (FULL["experts"] if on_gpu else 16))
  out = dict(ragged_dot_lowering="chlo.ragged_dot" if jax.default_backend() in ("gpu", "tpu")
             else "masked dense expansion (G x the work and memory)", backend=jax.default_backend(), device=jax.devices()[0].device_kind,
             cpu_count=os.cpu_count(), jax=jax.__version__,
             machine=platform.machine(), dtype=str(dtype), param_dtype=str(param_dtype),
             memory_shape=mem_shape, timing_shape=time_shape)
  if not args.no_memory:
    out["memory"] = {i: _memory(i, mem_shape, dtype, param_dtype) for i in impls}
  out["timing"] = {i: _time(i, time_shape, dtype, param_dtype, args.runs, args.warmup)
                   for i in impls}
  if set(impls) >= {"grouped", "dense_loop"}:
    t = out["timing"]
    out["speedup_grouped_vs_dense"] = round(
        t["dense_loop"]["median_s"] / t["grouped"]["median_s"], 2)
    out["max_abs_diff_grouped_vs_dense"] = _check(time_shape, dtype, param_dtype)
  print(json.dumps(out))


if __name__ == "__main__":
  main()

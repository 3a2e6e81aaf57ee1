"""Forward + backward of one Qwen3-MoE block (route + experts): tiled vs ragged_dot vs dense loop.

`tiled` is `moe_experts(impl="tiled")` (the default: expert-sorted rows padded to whole tiles,
a loop over the used tiles, custom VJP), `ragged_dot` is `moe_experts(impl="ragged_dot")`
and `dense_loop` is `moe_experts_dense_loop` (every token through every expert, masked).
The step is jit(value_and_grad) of mean(y^2) w.r.t. x, the router kernel and the three
expert tensors, with x in the compute dtype and the weights in `--param-dtype` (fp32 master
weights cast inside, as in training).

Memory and FLOPs come from `lower(abstract args).compile()` (`memory_analysis`,
`cost_analysis`) at the full Qwen3-30B-A3B shape (16,384 tokens, hidden 2,048, 128 experts,
top-8, expert FFN 768): nothing is allocated, so it runs anywhere. `needed_flops` is the
matmul work of the experts, 18 M D F for forward + backward (M = N K rows); the router adds
6 N D E. XLA's cost analysis counts a loop body once (checked: a scan of 1 or 16 matmuls
reports the same), so `xla_flops` undercounts both loops; `real_flops` adds the body's matmuls
for the remaining trips: 18 T D F per tile over the static tile bound (`_worst`) or over the
tiles the benchmark's random routing uses (`_used`: the loop stops there), and 18 N D F per
expert for the dense loop. ragged_dot has no loop: XLA's count is its real (expanded) work.

Timing (median of `--runs` after the compile + first run) runs at `--tokens` x `--experts`:
the full shape on a GPU, a reduced one on the CPU (ragged_dot is G times the work there) so
that everything finishes in about two minutes on two cores. `tile_sweep` compiles the tiled
step at the full shape for several tiles (padding vs loop length) and, on a GPU or with
`--sweep-timing`, times it at the timing shape.

Caveat: jax lowers `ragged_dot` to a real grouped matmul (`chlo.ragged_dot`) only on TPU and
GPU; on the CPU it expands the sorted rows to a masked [G, M, D] array and runs one dense dot
(G times the work and memory), and XLA's GPU default also rewrites ragged dots to dense ones
unless a ragged-dot fusion applies. The tiled loop runs on every backend as written.

  python scripts/bench_moe.py [--tokens N] [--experts E] [--impls tiled,ragged_dot,dense_loop]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from jaxtune.ops import moe

FULL = dict(tokens=16384, hidden=2048, experts=128, top_k=8, ffn=768)
ALL_IMPLS = ("tiled", "ragged_dot", "dense_loop")


def _experts_fn(impl: str, tile: int):
  if impl == "dense_loop":
    return moe.moe_experts_dense_loop
  if impl == "tiled":
    return functools.partial(moe.moe_experts, impl="tiled", tile=tile)
  return functools.partial(moe.moe_experts, impl=impl)


def _step(impl: str, top_k: int, tile: int):
  fn = _experts_fn(impl, tile)

  def loss(x_nd, router_de, gate_edf, up_edf, down_efd):
    routing = moe.route(x_nd, router_de, top_k=top_k, norm_topk_prob=True)
    y_nd = fn(x_nd, routing, gate_edf, up_edf, down_efd)
    return jnp.mean(jnp.square(y_nd.astype(jnp.float32)))

  return jax.jit(jax.value_and_grad(loss, argnums=range(5)))


def _abstract(shape, dtype, param_dtype):
  s = jax.ShapeDtypeStruct
  n, d, e, f = shape["tokens"], shape["hidden"], shape["experts"], shape["ffn"]
  return (s((n, d), dtype), s((d, e), param_dtype), s((e, d, f), param_dtype),
          s((e, d, f), param_dtype), s((e, f, d), param_dtype))


def _inputs(shape, dtype, param_dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  n, d, e, f = shape["tokens"], shape["hidden"], shape["experts"], shape["ffn"]
  normal = lambda key, s, scale, dt: (scale * jax.random.normal(key, s, jnp.float32)).astype(dt)
  return (normal(k[0], (n, d), 1.0, dtype), normal(k[1], (d, e), 0.02, param_dtype),
          normal(k[2], (e, d, f), d ** -0.5, param_dtype),
          normal(k[3], (e, d, f), d ** -0.5, param_dtype),
          normal(k[4], (e, f, d), f ** -0.5, param_dtype))


def _needed_flops(shape) -> float:
  return 18.0 * shape["tokens"] * shape["top_k"] * shape["hidden"] * shape["ffn"]


def _used_tiles(shape, dtype, tile: int) -> int:
  """Tiles the tiled loop runs for the benchmark's inputs (`_inputs`' x and router)."""
  k = jax.random.split(jax.random.key(0), 5)
  n, d, e = shape["tokens"], shape["hidden"], shape["experts"]

  @jax.jit
  def used():
    x = jax.random.normal(k[0], (n, d), jnp.float32).astype(dtype)
    router = 0.02 * jax.random.normal(k[1], (d, e), jnp.float32)
    r = moe.route(x, router, top_k=shape["top_k"], norm_topk_prob=True)
    return moe._tile_layout(r.experts_nk, 0, e, tile).used  # pylint: disable=protected-access
  return int(used())


def _memory(impl, shape, dtype, param_dtype, tile) -> dict:
  t0 = time.perf_counter()
  compiled = _step(impl, shape["top_k"], tile).lower(
      *_abstract(shape, dtype, param_dtype)).compile()
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla = float(cost.get("flops", float("nan"))) if cost else float("nan")
  needed = _needed_flops(shape)
  n, d, e, k, f = (shape[a] for a in ("tokens", "hidden", "experts", "top_k", "ffn"))
  out = dict(temp_gib=round(m.temp_size_in_bytes / 2**30, 3),
             argument_gib=round(m.argument_size_in_bytes / 2**30, 3),
             output_gib=round(m.output_size_in_bytes / 2**30, 3),
             temp_bytes=int(m.temp_size_in_bytes), argument_bytes=int(m.argument_size_in_bytes),
             xla_flops=xla, needed_flops=needed)
  if impl == "tiled":
    per_tile = 18.0 * tile * d * f
    worst, used = moe.num_tiles(n * k, e, tile), _used_tiles(shape, dtype, tile)
    out.update(tile=tile, tiles_static=worst, tiles_used=used,
               padding_worst=round((worst * tile - n * k) / (n * k), 4),
               padding_used=round((used * tile - n * k) / (n * k), 4),
               real_flops_worst=xla + (worst - 1) * per_tile,
               real_flops_used=xla + (used - 1) * per_tile)
    out["flops_ratio_worst"] = round(out["real_flops_worst"] / needed, 3)
    out["flops_ratio_used"] = round(out["real_flops_used"] / needed, 3)
  elif impl == "dense_loop":
    out["real_flops"] = xla + (e - 1) * 18.0 * n * d * f
    out["flops_ratio"] = round(out["real_flops"] / needed, 3)
  else:
    out["real_flops"] = xla
    out["flops_ratio"] = round(xla / needed, 3)
  out["compile_s"] = round(time.perf_counter() - t0, 2)
  return out


def _time(impl, shape, dtype, param_dtype, runs, tile, warmup=1) -> dict:
  step = _step(impl, shape["top_k"], tile)
  args = jax.block_until_ready(_inputs(shape, dtype, param_dtype))
  try:
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
      jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(runs):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - t0)
  except Exception as err:  # pylint: disable=broad-except  # e.g. out of memory on the GPU
    return dict(error=f"{type(err).__name__}: {str(err)[:300]}")
  med = statistics.median(times)
  needed = _needed_flops(shape)
  return dict(median_s=round(med, 4), times_s=[round(t, 4) for t in times],
              compile_s=round(compile_s, 2), warmup_runs=warmup,
              tokens_per_s=round(shape["tokens"] / med, 1),
              needed_tflops_per_s=round(needed / med / 1e12, 3))


def _check(shape, dtype, param_dtype, impls, tile) -> dict:
  """Max |impl - dense loop| of the block output at the timing shape, 128 tokens."""
  args = _inputs(dict(shape, tokens=min(shape["tokens"], 128)), dtype, param_dtype, seed=1)
  x, router = args[0], args[1]
  r = moe.route(x, router, top_k=shape["top_k"], norm_topk_prob=True)
  ref = jax.jit(moe.moe_experts_dense_loop)(x, r, *args[2:]).astype(jnp.float32)
  return {i: float(jnp.max(jnp.abs(jax.jit(_experts_fn(i, tile))(x, r, *args[2:])
                                   .astype(jnp.float32) - ref)))
          for i in impls if i != "dense_loop"}


def main() -> None:
  on_gpu = jax.default_backend() == "gpu"
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokens", type=int, default=None,
                 help="timing tokens (default: 16384 on GPU, 256 on CPU)")
  p.add_argument("--experts", type=int, default=None,
                 help="timing experts (default: 128 on GPU, 16 on CPU)")
  p.add_argument("--mem-tokens", type=int, default=FULL["tokens"])
  p.add_argument("--mem-experts", type=int, default=FULL["experts"])
  p.add_argument("--top-k", type=int, default=FULL["top_k"])
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--param-dtype", default="float32")
  p.add_argument("--impls", default=",".join(ALL_IMPLS))
  p.add_argument("--tile", type=int, default=moe.DEFAULT_TILE)
  p.add_argument("--sweep-tiles", default=None,
                 help="tiles for tile_sweep (default: 32,64,128,256,512 at the full shape; on "
                 "the CPU only tiles in (rows per expert / 4, max(rows per expert, tile)] "
                 "are timed)")
  p.add_argument("--sweep-timing", action="store_true",
                 help="on the CPU also time the swept tiles (always on the GPU)")
  p.add_argument("--runs", type=int, default=None,
                 help="timed runs (default: 5 on GPU; 2 on CPU, 1 for ragged_dot)")
  p.add_argument("--no-memory", action="store_true")
  args = p.parse_args()
  impls = [i for i in args.impls.split(",") if i]
  dtype, param_dtype = jnp.dtype(args.dtype), jnp.dtype(args.param_dtype)
  runs = args.runs or (5 if on_gpu else 2)
  mem_shape = dict(FULL, tokens=args.mem_tokens, experts=args.mem_experts, top_k=args.top_k)
  time_shape = dict(FULL, top_k=args.top_k,
                    tokens=args.tokens or (FULL["tokens"] if on_gpu else 256),
                    experts=args.experts or (FULL["experts"] if on_gpu else 16))
  sweep = [int(t) for t in (args.sweep_tiles or "32,64,128,256,512").split(",")]
  t_start = time.perf_counter()
  out = dict(ragged_dot_lowering="chlo.ragged_dot" if jax.default_backend() in ("gpu", "tpu")
             else "masked dense expansion (G x the work and memory)",
             backend=jax.default_backend(), device=jax.devices()[0].device_kind,
             cpu_count=os.cpu_count(), jax=jax.__version__, machine=platform.machine(),
             dtype=str(dtype), param_dtype=str(param_dtype), tile=args.tile,
             memory_shape=mem_shape, timing_shape=time_shape)
  if not args.no_memory:
    out["memory"] = {i: _memory(i, mem_shape, dtype, param_dtype, args.tile) for i in impls}
  # On the CPU ragged_dot does G times the work (~10-20 s a step here): one timed run, no
  # warm-up run (the CPU has no autotuning; the compile is timed apart).
  slow = {i: i == "ragged_dot" and not on_gpu and not args.runs for i in impls}
  out["runs"] = {i: 1 if slow[i] else runs for i in impls}
  out["timing"] = {i: _time(i, time_shape, dtype, param_dtype, out["runs"][i], args.tile,
                            warmup=0 if slow[i] else 1) for i in impls}
  if "tiled" in impls:
    rows_per_expert = time_shape["tokens"] * time_shape["top_k"] // time_shape["experts"]
    out["tile_sweep"] = {}
    for t in sweep:
      row = {}
      if not args.no_memory:
        m = (out["memory"]["tiled"] if t == args.tile else
             _memory("tiled", mem_shape, dtype, param_dtype, t))
        row.update({k: m[k] for k in ("temp_gib", "tiles_static", "tiles_used", "padding_worst",
                                      "padding_used", "flops_ratio_worst", "flops_ratio_used")})
      # Timed on the GPU, or with --sweep-timing on the CPU (only tiles that fit its shape).
      if on_gpu or (args.sweep_timing and rows_per_expert / 4 < t <= max(rows_per_expert,
                                                                          args.tile)):
        row["timing"] = (out["timing"]["tiled"] if t == args.tile else
                         _time("tiled", time_shape, dtype, param_dtype, runs, t))
      out["tile_sweep"][t] = row
  t = out["timing"]
  if "dense_loop" in t and "median_s" in t["dense_loop"]:
    out["speedup_vs_dense_loop"] = {i: round(t["dense_loop"]["median_s"] / t[i]["median_s"], 2)
                                    for i in impls if i != "dense_loop" and "median_s" in t[i]}
  if "dense_loop" in impls:
    out["max_abs_diff_vs_dense_loop"] = _check(time_shape, dtype, param_dtype, impls, args.tile)
  out["total_s"] = round(time.perf_counter() - t_start, 1)
  print(json.dumps(out))


if __name__ == "__main__":
  main()

"""Memory and FLOPs of the LM-head loss + gradient: eager (full logits) vs chunked.

At XTuner's documented shape (32,768 tokens, vocab 151,936, hidden 4,096, bf16 hidden,
chunk 1,024) everything comes from `lower(abstract args).compile()`: nothing is allocated,
so it runs on a laptop CPU. A small shape is also run and timed on the default backend; on a
GPU the large shape is run and timed too (`--run-large auto`).

`flops` counts the matmuls (2NDV each: eager 3, chunked 4, as its backward recomputes the
logits). `flops_xla` is XLA's cost_analysis, multiplied by the chunk count for the chunked
version because a while-loop body is counted once, not once per trip; on GPU it leaves out
cuBLAS calls, so it is only a cross-check on the CPU.

  python scripts/bench_loss.py [--small N,D,V,C] [--run-large auto|yes|no] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

_CHILD_ENV = dict(os.environ)  # timed children keep XLA's default (pooling) allocator
if "--measure" not in sys.argv:
  # This process only compiles; the timed runs are child processes that need the device's
  # memory, so hand every buffer (autotuning's included) straight back to the driver.
  os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from jaxtune.ops.loss import (  # pylint: disable=wrong-import-position
    chunked_cross_entropy, eager_cross_entropy)


def _loss_fn(mode: str, chunk: int):
  if mode == "eager":
    return eager_cross_entropy
  return lambda h, w, y, wt: chunked_cross_entropy(h, w, y, wt, chunk_size=chunk)


def _value_and_grad(mode: str, chunk: int):
  return jax.jit(jax.value_and_grad(_loss_fn(mode, chunk), argnums=(0, 1)))


def _abstract(n: int, d: int, v: int, hidden_dtype, kernel_dtype):
  return (jax.ShapeDtypeStruct((n, d), hidden_dtype), jax.ShapeDtypeStruct((d, v), kernel_dtype),
          jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.float32))


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def compiled_stats(mode: str, n: int, d: int, v: int, chunk: int, hidden_dtype,
                   kernel_dtype) -> dict:
  """Per-device memory and FLOPs of value_and_grad, from compilation alone."""
  t0 = time.perf_counter()
  compiled = _value_and_grad(mode, chunk).lower(
      *_abstract(n, d, v, hidden_dtype, kernel_dtype)).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  out = dict(temp_bytes=int(mem.temp_size_in_bytes),
             argument_bytes=int(mem.argument_size_in_bytes),
             output_bytes=int(mem.output_size_in_bytes))
  out["total_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"]
  out["total_gib"] = round(out["total_bytes"] / 2**30, 3)
  matmuls = 3 if mode == "eager" else 4  # chunked recomputes the logits in the backward
  out["flops"] = float(matmuls * 2 * n * d * v)
  # Both chunk loops run once per chunk and hold all but a negligible part of the work.
  chunks = 1 if mode == "eager" else -(-n // min(chunk, n))
  out["flops_xla_raw"] = _flops(compiled)
  out["flops_xla"] = out["flops_xla_raw"] * chunks
  out["compile_s"] = round(compile_s, 2)
  return out


def _inputs(n: int, d: int, v: int, hidden_dtype, kernel_dtype, seed: int = 0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  h = jax.random.normal(k1, (n, d), jnp.float32).astype(hidden_dtype)
  w = (jax.random.normal(k2, (d, v), jnp.float32) / np.sqrt(d)).astype(kernel_dtype)
  y = jax.random.randint(k3, (n,), 0, v).at[::4].set(-100)
  return h, w, y, jnp.ones((n,), jnp.float32)


def measured(mode: str, n: int, d: int, v: int, chunk: int, hidden_dtype, kernel_dtype,
             repeats: int) -> dict:
  """Median wall time of value_and_grad (after a compile + warm-up call), and the loss."""
  args = _inputs(n, d, v, hidden_dtype, kernel_dtype)
  fn = _value_and_grad(mode, chunk)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    loss, grads = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  out = dict(median_s=round(statistics.median(times), 5), loss=float(loss))
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:  # GPU allocators report it; the CPU one does not
    out["device_peak_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 3)
  del grads
  return out


def measured_in_subprocess(mode: str, n: int, d: int, v: int, chunk: int, repeats: int) -> dict:
  """`measured` in a fresh process, so the allocator's peak is this mode's alone (compiling
  the eager version autotunes its [N, V] matmul on the device, which would dominate it)."""
  cmd = [sys.executable, __file__, "--measure", f"{mode},{n},{d},{v},{chunk}",
         "--repeats", str(repeats)]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_CHILD_ENV)
  if done.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def bench(n, d, v, chunk, hidden_dtype, kernel_dtype, run: bool, repeats: int) -> dict:
  shape = dict(tokens=n, hidden=d, vocab=v, chunk=chunk, hidden_dtype=jnp.dtype(hidden_dtype).name,
               kernel_dtype=jnp.dtype(kernel_dtype).name,
               full_logits_f32_gib=round(n * v * 4 / 2**30, 3))
  res = dict(shape=shape)
  for mode in ("eager", "chunk"):
    res[mode] = compiled_stats(mode, n, d, v, chunk, hidden_dtype, kernel_dtype)
  if run:
    for mode in ("eager", "chunk"):
      res[mode]["run"] = measured_in_subprocess(mode, n, d, v, chunk, repeats)
      res[mode]["run"]["tflops_per_s"] = round(res[mode]["flops"] / res[mode]["run"]["median_s"]
                                               / 1e12, 2)
  res["chunk_over_eager"] = dict(
      temp_bytes=round(res["chunk"]["temp_bytes"] / res["eager"]["temp_bytes"], 4),
      total_bytes=round(res["chunk"]["total_bytes"] / res["eager"]["total_bytes"], 4),
      flops=round(res["chunk"]["flops"] / res["eager"]["flops"], 4))
  if run:
    res["chunk_over_eager"]["time"] = round(res["chunk"]["run"]["median_s"]
                                            / res["eager"]["run"]["median_s"], 4)
  return res


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--small", default="2048,256,8192,256", help="N,D,V,C of the timed shape")
  ap.add_argument("--run-large", choices=("auto", "yes", "no"), default="auto",
                  help="also run and time XTuner's shape (auto: only on an accelerator)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=None, help="also write the JSON here")
  ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # MODE,N,D,V,C: one run
  args = ap.parse_args()
  if args.measure:
    mode, *dims = args.measure.split(",")
    print(json.dumps(measured(mode, *(int(x) for x in dims), jnp.bfloat16, jnp.float32,
                              args.repeats)))
    return
  backend = jax.default_backend()
  run_large = args.run_large == "yes" or (args.run_large == "auto" and backend != "cpu")
  n, d, v, c = (int(x) for x in args.small.split(","))
  report = dict(
      backend=backend, device=str(jax.devices()[0].device_kind), jax=jax.__version__,
      machine=platform.machine(),
      note=("bytes: per device, from compiled.memory_analysis(); flops: the matmuls, "
            "2NDV each (eager 3, chunked 4: the backward recomputes the logits); flops_xla: "
            "cost_analysis, times the chunk count for 'chunk' (a loop body is counted once; "
            "on GPU it leaves out cuBLAS calls); run: median wall time of value_and_grad in a "
            "fresh process; the kernel is float32 like jaxtune's master weights, cast to bf16 "
            "for the matmuls"),
      xtuner_shape=bench(32768, 4096, 151936, 1024, jnp.bfloat16, jnp.float32, run_large,
                         args.repeats),
      small_shape=bench(n, d, v, c, jnp.bfloat16, jnp.float32, True, args.repeats),
  )
  text = json.dumps(report, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()

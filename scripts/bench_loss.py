"""Memory and FLOPs of the LM-head loss + gradient: eager (full logits) vs chunked.

Modes: 'eager' (full [N, V] logits), 'chunk_v1' (the previous chunked version, kept here
for comparison: token chunks of [C, V] logits and a float32 [D, V] kernel-gradient
accumulator), 'chunk' (today's pure-JAX path: token chunks x vocab tiles) and 'pallas' (the
fused kernels of jaxtune/ops/pallas_loss.py: per vocab slab a Triton kernel for the logits'
statistics and one for softmax - onehot, the backward's matmuls XLA's). Off a GPU 'pallas' is
compiled in interpret mode for its memory figures only (interpret mode adds copies of the
blocks, so they are an upper bound) and never run.

At the issue's shape (16,384 tokens x 4,096 hidden x 151,936 vocab, bf16 hidden and head)
and XTuner's documented one (32,768 tokens, bf16 hidden, float32 head, chunk 1,024)
everything comes from `lower(abstract args).compile()`: nothing is allocated, so it runs on
a laptop CPU. A small shape is also run and timed on the default backend; on a GPU the large
shapes are run and timed too (`--run-large auto`).

`flops` counts the matmuls (2NDV each: eager 3, chunked and pallas 4, as their backward
recomputes the logits). `flops_xla` is XLA's cost_analysis,
multiplied by the trip count of the innermost loop (chunks for 'chunk_v1', chunks x vocab
tiles for 'chunk') because a while-loop body is counted once, not once per trip; on GPU it
leaves out cuBLAS calls and Pallas kernels, so it is only a cross-check on the CPU.

  python scripts/bench_loss.py [--small N,D,V,C] [--run-large auto|yes|no] [--out FILE]
"""

from __future__ import annotations

import argparse
import functools
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

VOCAB_TILE = 4096  # chunked_cross_entropy's default


# ---- the previous chunked loss (token chunks only), for the memory comparison ------------

def _v1_chunks(x, chunk, k, fill):
  pad = chunk * k - x.shape[0]
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
  return jnp.swapaxes(x.reshape((chunk, k) + x.shape[1:]), 0, 1)


def _v1_geometry(n, chunk_size):
  chunk = max(1, min(chunk_size, n))
  return chunk, -(-n // chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def chunked_ce_v1(hidden_nd, kernel_dv, labels_n, weights_n, chunk_size):
  """jaxtune's chunked loss before vocab tiling: [C, V] float32 logits per chunk and a
  float32 [D, V] kernel-gradient accumulator (7.2 GiB at the issue's shape)."""
  return _v1_fwd(hidden_nd, kernel_dv, labels_n, weights_n, chunk_size)[0]


def _v1_fwd(hidden_nd, kernel_dv, labels_n, weights_n, chunk_size):
  chunk, k = _v1_geometry(hidden_nd.shape[0], chunk_size)
  w_dv = kernel_dv.astype(hidden_nd.dtype)

  def body(_, xs):
    h_cd, y_c, wt_c = xs
    logits_cv = jnp.dot(h_cd, w_dv, preferred_element_type=jnp.float32)
    lse_c = jax.nn.logsumexp(logits_cv, axis=-1)
    target_c = jnp.take_along_axis(logits_cv, jnp.maximum(y_c, 0)[:, None], axis=-1)[:, 0]
    return None, (lse_c, jnp.where(y_c >= 0, wt_c * (lse_c - target_c), 0.0))

  xs = (_v1_chunks(hidden_nd, chunk, k, 0), _v1_chunks(labels_n, chunk, k, -1),
        _v1_chunks(weights_n.astype(jnp.float32), chunk, k, 0))
  _, (lse_kc, wce_kc) = jax.lax.scan(body, None, xs)
  return jnp.sum(wce_kc), (hidden_nd, kernel_dv, labels_n, weights_n, lse_kc)


def _v1_bwd(chunk_size, res, g):
  hidden_nd, kernel_dv, labels_n, weights_n, lse_kc = res
  n = hidden_nd.shape[0]
  chunk, k = _v1_geometry(n, chunk_size)
  dtype = hidden_nd.dtype
  w_dv = kernel_dv.astype(dtype)
  y_kc = _v1_chunks(labels_n, chunk, k, -1)
  coef_kc = jnp.where(y_kc >= 0, g * _v1_chunks(weights_n.astype(jnp.float32), chunk, k, 0), 0.0)

  def body(dw_dv, xs):
    h_cd, y_c, coef_c, lse_c = xs
    logits_cv = jnp.dot(h_cd, w_dv, preferred_element_type=jnp.float32)
    hit_cv = jax.lax.broadcasted_iota(jnp.int32, logits_cv.shape, 1) == y_c[:, None]
    dlogits_cv = (coef_c[:, None] * (jnp.exp(logits_cv - lse_c[:, None]) - hit_cv)).astype(dtype)
    dh_cd = jnp.dot(dlogits_cv, w_dv.T, preferred_element_type=jnp.float32).astype(dtype)
    return dw_dv + jnp.dot(h_cd.T, dlogits_cv, preferred_element_type=jnp.float32), dh_cd

  dw_dv, dh_kcd = jax.lax.scan(body, jnp.zeros(kernel_dv.shape, jnp.float32),
                               (_v1_chunks(hidden_nd, chunk, k, 0), y_kc, coef_kc, lse_kc))
  dh_nd = jnp.swapaxes(dh_kcd, 0, 1).reshape(-1, hidden_nd.shape[1])[:n]
  return dh_nd, dw_dv.astype(kernel_dv.dtype), None, None


chunked_ce_v1.defvjp(_v1_fwd, _v1_bwd)


# ---- the benchmark ----------------------------------------------------------------------

def _loss_fn(mode: str, chunk: int):
  if mode == "eager":
    return eager_cross_entropy
  if mode == "chunk_v1":
    return lambda h, w, y, wt: chunked_ce_v1(h, w, y, wt, chunk)
  impl = {"chunk": "jax", "pallas": "pallas"}[mode]
  # Off a GPU the Pallas kernels only compile interpreted (memory figures, never timed).
  interpret = impl == "pallas" and jax.default_backend() != "gpu"
  return lambda h, w, y, wt: chunked_cross_entropy(h, w, y, wt, chunk_size=chunk, impl=impl,
                                                   vocab_tile=VOCAB_TILE, interpret=interpret)


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
  out["temp_gib"] = round(out["temp_bytes"] / 2**30, 3)
  out["total_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"]
  out["total_gib"] = round(out["total_bytes"] / 2**30, 3)
  # chunked versions and pallas recompute the logits in the backward
  matmuls = {"eager": 3, "chunk_v1": 4, "chunk": 4, "pallas": 4}[mode]
  out["flops"] = float(matmuls * 2 * n * d * v)
  # The innermost loops hold all but a negligible part of the work.
  trips = {"eager": 1, "chunk_v1": -(-n // min(chunk, n)),
           "chunk": -(-n // min(chunk, n)) * -(-v // min(VOCAB_TILE, v)),
           "pallas": float("nan")}[mode]
  out["flops_xla_raw"] = _flops(compiled)
  out["flops_xla"] = out["flops_xla_raw"] * trips
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


def measured_in_subprocess(mode: str, n: int, d: int, v: int, chunk: int, hidden_dtype,
                           kernel_dtype, repeats: int) -> dict:
  """`measured` in a fresh process, so the allocator's peak is this mode's alone (compiling
  the eager version autotunes its [N, V] matmul on the device, which would dominate it)."""
  dtypes = f"{jnp.dtype(hidden_dtype).name},{jnp.dtype(kernel_dtype).name}"
  cmd = [sys.executable, __file__, "--measure", f"{mode},{n},{d},{v},{chunk},{dtypes}",
         "--repeats", str(repeats)]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_CHILD_ENV)
  if done.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def bench(n, d, v, chunk, hidden_dtype, kernel_dtype, run: bool, repeats: int,
          modes: tuple[str, ...]) -> dict:
  shape = dict(tokens=n, hidden=d, vocab=v, chunk=chunk, vocab_tile=VOCAB_TILE,
               hidden_dtype=jnp.dtype(hidden_dtype).name,
               kernel_dtype=jnp.dtype(kernel_dtype).name,
               full_logits_f32_gib=round(n * v * 4 / 2**30, 3))
  res = dict(shape=shape)
  for mode in modes:
    res[mode] = compiled_stats(mode, n, d, v, chunk, hidden_dtype, kernel_dtype)
  if run:
    for mode in modes:
      if mode == "pallas" and jax.default_backend() != "gpu":
        continue  # interpret mode: not a measurement
      res[mode]["run"] = measured_in_subprocess(mode, n, d, v, chunk, hidden_dtype,
                                                kernel_dtype, repeats)
      res[mode]["run"]["tflops_per_s"] = round(res[mode]["flops"] / res[mode]["run"]["median_s"]
                                               / 1e12, 2)
  for mode in modes:
    if mode == "eager":
      continue
    ratio = res[f"{mode}_over_eager"] = dict(
        temp_bytes=round(res[mode]["temp_bytes"] / res["eager"]["temp_bytes"], 4),
        total_bytes=round(res[mode]["total_bytes"] / res["eager"]["total_bytes"], 4),
        flops=round(res[mode]["flops"] / res["eager"]["flops"], 4))
    if run and "run" in res[mode]:
      ratio["time"] = round(res[mode]["run"]["median_s"] / res["eager"]["run"]["median_s"], 4)
  return res


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--small", default="2048,256,8192,256", help="N,D,V,C of the timed shape")
  ap.add_argument("--run-large", choices=("auto", "yes", "no"), default="auto",
                  help="also run and time XTuner's shape (auto: only on an accelerator)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=None, help="also write the JSON here")
  ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # MODE,N,D,V,C,HT,KT
  args = ap.parse_args()
  if args.measure:
    mode, *dims, hidden_dtype, kernel_dtype = args.measure.split(",")
    print(json.dumps(measured(mode, *(int(x) for x in dims), jnp.dtype(hidden_dtype),
                              jnp.dtype(kernel_dtype), args.repeats)))
    return
  backend = jax.default_backend()
  run_large = args.run_large == "yes" or (args.run_large == "auto" and backend != "cpu")
  modes = ("eager", "chunk_v1", "chunk", "pallas")
  n, d, v, c = (int(x) for x in args.small.split(","))
  report = dict(
      backend=backend, device=str(jax.devices()[0].device_kind), jax=jax.__version__,
      machine=platform.machine(),
      note=("bytes: per device, from compiled.memory_analysis(); flops: the matmuls, "
            "2NDV each (eager 3, chunked and pallas 4: the backward recomputes the logits); "
            "flops_xla: cost_analysis, times the innermost loop's trip count (a loop body is "
            "counted once; on GPU it leaves out cuBLAS calls and Pallas kernels); run: median "
            "wall time of value_and_grad in a fresh process; chunk_v1: the chunked loss "
            "before vocab tiling; issue_shape has a bf16 head, xtuner_shape and small_shape "
            "a float32 one like jaxtune's master weights, cast to bf16 for the matmuls"),
      issue_shape=bench(16384, 4096, 151936, 1024, jnp.bfloat16, jnp.bfloat16, run_large,
                        args.repeats, modes),
      xtuner_shape=bench(32768, 4096, 151936, 1024, jnp.bfloat16, jnp.float32, run_large,
                         args.repeats, modes),
      small_shape=bench(n, d, v, c, jnp.bfloat16, jnp.float32, True, args.repeats, modes),
  )
  text = json.dumps(report, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()

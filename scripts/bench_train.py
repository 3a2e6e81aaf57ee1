"""Step time, tokens/s and MFU of the compiled train step on synthetic packed batches (JSON out).

  python scripts/bench_train.py --preset=qwen3_0_6b --pack=8192 --batch=1 --steps=10  # attention: auto
  python scripts/bench_train.py --preset=qwen3_tiny --pack=512 --batch=4   # CPU smoke run

Random-init weights and random tokens packed as samples of mixed lengths: the model, the
chunked loss, the optimizer and the jit-compiled step are the trainer's own.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import config as config_lib
from jaxtune import models
from jaxtune.models import presets
from jaxtune.parallel.mesh import make_mesh
from jaxtune.parallel.sharding import batch_sharding
from jaxtune.train import metrics as metrics_lib
from jaxtune.train.optim import lr_schedule, make_optimizer
from jaxtune.train.prefetch import to_global_array
from jaxtune.train.state import new_train_state, split_model
from jaxtune.train.step import compile_train_step


def synthetic_batch(rows: int, pack: int, vocab: int, mean_len: int, seed: int) -> dict:
  """Rows packed with samples of random lengths around mean_len; half of each sample trained."""
  rng = np.random.default_rng(seed)
  out = {k: np.zeros((rows, pack), np.int32) for k in ("input_ids", "segment_ids", "positions")}
  out["labels"] = np.full((rows, pack), -100, np.int32)
  for r in range(rows):
    t, seg = 0, 1
    while t < pack:
      n = int(min(pack - t, max(8, rng.integers(mean_len // 4, mean_len * 2))))
      ids = rng.integers(0, vocab, n)
      out["input_ids"][r, t:t + n] = ids
      out["segment_ids"][r, t:t + n] = seg
      out["positions"][r, t:t + n] = np.arange(n)
      half = n // 2
      out["labels"][r, t + half:t + n - 1] = ids[half + 1:]
      t, seg = t + n, seg + 1
  return out


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="qwen3_0_6b")
  p.add_argument("--layers", type=int, default=0, help="override num_hidden_layers")
  p.add_argument("--pack", type=int, default=8192)
  p.add_argument("--batch", type=int, default=1, help="global batch (packed rows per step)")
  p.add_argument("--micro", type=int, default=1, help="rows per rank per forward pass")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--attention", default="auto")
  p.add_argument("--remat", default="full")
  p.add_argument("--loss_mode", default="chunk")
  p.add_argument("--chunk", type=int, default=1024)
  p.add_argument("--compute_dtype", default="bfloat16")
  p.add_argument("--mean_len", type=int, default=1024)
  args = p.parse_args()

  model_cfg = getattr(presets, args.preset)()
  if args.layers:
    model_cfg.num_hidden_layers = args.layers
  cfg = config_lib.base_config()
  cfg.model = model_cfg
  cfg.loss.mode, cfg.loss.chunk_size = args.loss_mode, args.chunk
  n_dev = jax.device_count()
  sizes = config_lib.mesh_shape(cfg, n_dev)
  mesh = make_mesh(sizes)
  dp = config_lib.data_parallel_size(cfg, n_dev)
  num_micro = args.batch // (dp * args.micro)
  schedule = lr_schedule(cfg.lr, 1e-5, 1000)
  optimizer = make_optimizer(cfg.optim)  # unit lr: the step applies the schedule
  with jax.set_mesh(mesh):
    model = models.create_model(model_cfg, mesh, param_dtype=jnp.float32,
                                compute_dtype=jnp.dtype(args.compute_dtype), remat=args.remat,
                                attention=args.attention, seed=0)
    model_def, params = split_model(model)
    del model
    state = new_train_state(params, optimizer, mesh, model_def)
    step_fn = compile_train_step(state, model_def=model_def, loss_cfg=cfg.loss,
                                 optimizer=optimizer, schedule=schedule, num_micro=num_micro,
                                 batch_layout=models.text_batch_layout(args.batch, args.pack),
                                 batch_sharding=batch_sharding(mesh))
    host = synthetic_batch(args.batch, args.pack, model_cfg.vocab_size, args.mean_len, seed=0)
    batch = {k: to_global_array(v, batch_sharding(mesh)) for k, v in host.items()}
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    state, out = step_fn(state, batch)
    jax.block_until_ready(out)
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      state, out = step_fn(state, batch)
      out = jax.device_get(out)
      times.append(time.perf_counter() - t0)

  tokens = int(out["tokens"])
  step_time = float(np.median(times))
  flops = models.family(model_cfg.type).train_flops(model_cfg, host)
  peak = metrics_lib.peak_flops_per_device()
  result = dict(
      device=jax.devices()[0].device_kind, n_devices=n_dev, jax=jax.__version__,
      preset=args.preset, layers=model_cfg.num_hidden_layers, params=models.param_count(model_cfg),
      pack=args.pack, global_batch=args.batch, micro_batches=num_micro, attention=args.attention,
      remat=args.remat, loss_mode=args.loss_mode, chunk=args.chunk,
      compute_dtype=args.compute_dtype, compile_s=round(compile_s, 2),
      step_time_s=round(step_time, 4), tokens=tokens,
      tokens_per_sec_per_device=round(tokens / step_time / n_dev, 1),
      mfu=None if peak is None else round(metrics_lib.mfu(flops, step_time, peak, n_dev), 4),
      loss=float(out["loss"]),
      temp_gib=round(memory.temp_size_in_bytes / 2**30, 3) if memory else None,
      peak_gib=metrics_lib.device_memory_gib().get("mem_peak_gib"),
  )
  print(json.dumps(result))


if __name__ == "__main__":
  main()

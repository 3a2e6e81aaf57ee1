"""A LoRA step against a full fine-tuning step of the same model (one JSON line).

  python scripts/bench_lora.py                          # the miniature (qwen3_tiny), CPU
  python scripts/bench_lora.py --preset=qwen3_0_6b --pack=4096 --steps=5

Both steps are the trainer's (`jaxtune.config.resolve` then `jaxtune.train.build.build_run`,
random init, the same synthetic rows); LoRA with `--rank` on every projection (the default
targets). The issue's target: lora_over_full <= 1.2 on the CPU (the adapters add no second
pass over the base weights).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def step_seconds(preset: str, pack: int, batch: int, steps: int, rank: int,
                 compute_dtype: str) -> float:
  """Median seconds of `steps` train steps (after one compile-and-warm-up step)."""
  import jax  # pylint: disable=import-outside-toplevel

  from jaxtune import config, models  # pylint: disable=import-outside-toplevel
  from jaxtune.models import presets  # pylint: disable=import-outside-toplevel
  from jaxtune.train import build  # pylint: disable=import-outside-toplevel
  from jaxtune.train.prefetch import to_global_array  # pylint: disable=import-outside-toplevel
  from jaxtune.train.state import new_train_state, split_model  # pylint: disable=import-outside-toplevel

  cfg = config.base_config()
  cfg.model = getattr(presets, preset)()
  cfg.data.pack_max_length = cfg.data.sample_max_length = pack
  cfg.global_batch_size, cfg.data.micro_batch_size = batch, batch
  cfg.total_steps, cfg.remat, cfg.attention = steps + 1, "full", "xla"
  cfg.compute_dtype = compute_dtype
  cfg.lora.rank = rank
  resolved = config.resolve(cfg, 1, files=False)
  mesh = build.make_run_mesh(resolved, jax.devices()[:1])
  with build.run_context(resolved, mesh):
    run = build.build_run(resolved, mesh, total_steps=steps + 1)
    model_def, params = split_model(models.create_model(cfg.model, mesh,
                                                        **resolved.model_kwargs))
    state = new_train_state(params, run.optimizer, mesh, run.model_def)
    del model_def
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.model.vocab_size, (batch, pack)).astype(np.int32)
    host = dict(input_ids=ids, labels=np.roll(ids, -1, axis=1), segment_ids=np.ones_like(ids),
                positions=np.tile(np.arange(pack, dtype=np.int32), (batch, 1)))
    data = {k: to_global_array(v, run.batch_sharding) for k, v in host.items()}
    state, out = run.step(state, data)
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, out = run.step(state, data)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - start)
  return float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="qwen3_tiny")
  parser.add_argument("--pack", type=int, default=512)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--compute_dtype", default="float32")
  args = parser.parse_args()
  common = (args.preset, args.pack, args.batch, args.steps)
  full = step_seconds(*common, rank=0, compute_dtype=args.compute_dtype)
  adapted = step_seconds(*common, rank=args.rank, compute_dtype=args.compute_dtype)
  import jax  # pylint: disable=import-outside-toplevel
  print(json.dumps(dict(preset=args.preset, pack=args.pack, batch=args.batch,
                        rank=args.rank, compute_dtype=args.compute_dtype,
                        backend=jax.default_backend(), full_step_s=round(full, 4),
                        lora_step_s=round(adapted, 4),
                        lora_over_full=round(adapted / full, 3))))


if __name__ == "__main__":
  main()

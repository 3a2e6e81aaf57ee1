"""Step time, tokens/s, MFU and memory of the trainer's compiled train step (one JSON line).

  python scripts/bench_train.py                                   # Qwen3-1.7B, 16,384-token rows
  python scripts/bench_train.py --preset=qwen3_0_6b --pack=8192 --steps=8
  python scripts/bench_train.py --preset=qwen3_tiny --pack=512 --batch=2 --steps=2   # CPU smoke

A real fine-tuning step with random-init weights: the model, the chunked loss, clipping, AdamW
and the jit-compiled, donated step are the trainer's own, built the trainer's way (the flags
make a recipe, `jaxtune.config.resolve` then `jaxtune.train.build.build_run`); fp32 master
weights, `--compute_dtype` compute (bf16 by default), `--remat` policy. The batch is synthetic:
rows packed with samples whose lengths follow a log-normal law like SFT chats (`packed_rows`,
deterministic from `--seed`); `scripts/bench_torch_baseline.py` imports it to run PyTorch on
the very same rows. `--export_hf=DIR` writes the initial weights as an HF checkpoint, so the
baseline can start from the same weights (`--load_hf=DIR`) and the two first-step losses can be
compared.

JAX is imported inside the functions: `from bench_train import packed_rows` stays light.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

PRESETS = ("qwen3_tiny", "qwen3_0_6b", "qwen3_1_7b", "qwen3_4b")


# ---- the synthetic packed batch (shared with bench_torch_baseline.py) ----------------------

def sample_lengths(rng: np.random.Generator, count: int, *, mean_len: float, sigma: float,
                   min_len: int, max_len: int) -> np.ndarray:
  """`count` sample lengths, log-normal with mean `mean_len` before clipping to
  [min_len, max_len] (the median is mean_len / exp(sigma^2 / 2): many short chats, a long
  tail of long ones, as in SFT data)."""
  mu = math.log(mean_len) - sigma * sigma / 2
  lengths = np.rint(rng.lognormal(mu, sigma, count)).astype(np.int64)
  return np.clip(lengths, min_len, max_len)


def packed_rows(rows: int, pack: int, vocab: int, *, seed: int = 0, mean_len: float = 1536,
                sigma: float = 1.0, min_len: int = 16, train_frac: float = 0.5,
                lengths: str = "lognormal") -> dict[str, np.ndarray]:
  """A [rows, pack] packed batch in jaxtune's layout, a pure function of its arguments
  (the lengths depend on seed, pack and the length law only, not on the vocabulary).

  Each row is filled to the last token with samples (the one that does not fit is cut to the
  space left, as a soft packer does, so there is no padding): `segment_ids` 1, 2, ... per
  sample within the row, `positions` restart at 0 in each sample, random `input_ids`. The last
  `train_frac` of each sample is the trained response: `labels[t]` is the token at t + 1 there
  (already shifted: position t predicts labels[t]) and -100 elsewhere, including each sample's
  last position.

  lengths: 'lognormal' (the default, see `sample_lengths`) or 'uniform' (the older mix:
  uniform in [mean_len / 4, 2 mean_len)).
  """
  if lengths not in ("lognormal", "uniform"):
    raise ValueError(f"lengths must be 'lognormal' or 'uniform', got {lengths!r}")
  length_rng = np.random.default_rng([seed, 0])  # lengths do not depend on the vocabulary
  token_rng = np.random.default_rng([seed, 1])
  out = {k: np.zeros((rows, pack), np.int32) for k in ("input_ids", "segment_ids", "positions")}
  out["labels"] = np.full((rows, pack), -100, np.int32)
  for r in range(rows):
    t, seg = 0, 1
    while t < pack:
      if lengths == "lognormal":
        n = int(sample_lengths(length_rng, 1, mean_len=mean_len, sigma=sigma, min_len=min_len,
                               max_len=pack)[0])
      else:
        n = int(max(min_len, length_rng.integers(int(mean_len) // 4, int(mean_len) * 2)))
      n = min(n, pack - t)
      ids = token_rng.integers(0, vocab, n)
      out["input_ids"][r, t:t + n] = ids
      out["segment_ids"][r, t:t + n] = seg
      out["positions"][r, t:t + n] = np.arange(n)
      if n >= 2:
        prompt = min(n - 1, max(1, n - max(1, round(n * train_frac))))
        out["labels"][r, t + prompt - 1:t + n - 1] = ids[prompt:]
      t, seg = t + n, seg + 1
  return out


def batch_stats(batch: dict[str, np.ndarray]) -> dict:
  """Samples per row and length figures of a packed batch (for the JSON line)."""
  lengths = []
  for row in batch["segment_ids"]:
    counts = np.bincount(row[row > 0])
    lengths.extend(int(c) for c in counts[counts > 0])
  lengths = np.asarray(lengths)
  return dict(samples=int(lengths.size), mean_sample_len=round(float(lengths.mean()), 1),
              max_sample_len=int(lengths.max()),
              loss_tokens=int((batch["labels"] >= 0).sum()))


def add_batch_args(p: argparse.ArgumentParser) -> None:
  """The model and batch flags both benchmark scripts share, with the same defaults."""
  p.add_argument("--preset", default="qwen3_1_7b", help="one of " + ", ".join(PRESETS)
                 + " (any jaxtune.models.presets name works)")
  p.add_argument("--layers", type=int, default=0, help="override num_hidden_layers")
  p.add_argument("--vocab", type=int, default=0, help="override vocab_size (tests)")
  p.add_argument("--pack", type=int, default=16384, help="tokens per packed row")
  p.add_argument("--batch", type=int, default=1, help="packed rows per optimizer step")
  p.add_argument("--micro", type=int, default=1, help="rows per forward pass")
  p.add_argument("--steps", type=int, default=8, help="timed steps (median reported)")
  # Seed 50's first 16,384-token row is the median row of seeds 0-199: 12 samples (mean
  # 1,365 tokens, longest 4,929) and the median attention cost (sum of length^2).
  p.add_argument("--seed", type=int, default=50, help="seed of the synthetic batch")
  p.add_argument("--lengths", default="lognormal", choices=("lognormal", "uniform"))
  p.add_argument("--mean_len", type=float, default=1536, help="mean sample length")
  p.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of the lengths")
  p.add_argument("--train_frac", type=float, default=0.5,
                 help="trained (response) fraction of each sample")
  p.add_argument("--json_out", default="", help="also append the JSON line to this file")
  p.add_argument("--tag", default="", help="a case name written into the JSON line")


def model_config(args):
  """The preset with the --layers / --vocab overrides."""
  from jaxtune.models import presets  # pylint: disable=import-outside-toplevel
  overrides = {}
  if args.layers:
    overrides["num_hidden_layers"] = args.layers
  if args.vocab:
    overrides["vocab_size"] = args.vocab
  return getattr(presets, args.preset)(**overrides)


def make_batch(args, vocab: int) -> dict[str, np.ndarray]:
  return packed_rows(args.batch, args.pack, vocab, seed=args.seed, mean_len=args.mean_len,
                     sigma=args.sigma, train_frac=args.train_frac, lengths=args.lengths)


def emit(result: dict, args) -> None:
  """Prints the JSON line (the last line of stdout) and appends it to --json_out."""
  if args.tag:
    result = {"case": args.tag, **result}
  line = json.dumps(result)
  print(line, flush=True)
  if args.json_out:
    with open(args.json_out, "a", encoding="utf-8") as f:
      f.write(line + "\n")


# ---- the jaxtune step ------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_batch_args(p)
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
  p.add_argument("--attention", default="auto")
  p.add_argument("--remat", default="full")
  p.add_argument("--loss_mode", default="chunk")
  p.add_argument("--chunk", type=int, default=1024)
  p.add_argument("--compute_dtype", default="bfloat16")
  p.add_argument("--export_hf", default="", help="write the initial weights (fp32) here")
  args = p.parse_args(argv)

  import jax  # pylint: disable=import-outside-toplevel

  from jaxtune import config as config_lib  # pylint: disable=import-outside-toplevel
  from jaxtune import models  # pylint: disable=import-outside-toplevel
  from jaxtune.train import build  # pylint: disable=import-outside-toplevel
  from jaxtune.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  from jaxtune.train.prefetch import to_global_array  # pylint: disable=import-outside-toplevel
  from jaxtune.train.state import new_train_state, split_model  # pylint: disable=import-outside-toplevel

  t_start = time.perf_counter()
  model_cfg = model_config(args)
  cfg = config_lib.base_config()
  cfg.model = model_cfg
  cfg.loss.mode, cfg.loss.chunk_size = args.loss_mode, args.chunk
  cfg.attention, cfg.remat = args.attention, args.remat
  cfg.param_dtype, cfg.compute_dtype = "float32", args.compute_dtype
  cfg.global_batch_size, cfg.data.micro_batch_size = args.batch, args.micro
  cfg.data.pack_max_length = cfg.data.sample_max_length = args.pack
  cfg.optim.lr, cfg.total_steps, cfg.seed = 1e-5, 1000, 0
  n_dev = jax.device_count()
  try:
    resolved = config_lib.resolve(cfg, n_dev, files=False)
  except config_lib.ConfigError as e:
    raise SystemExit(f"bench_train: {e}") from None
  mesh = build.make_run_mesh(resolved)
  host = make_batch(args, model_cfg.vocab_size)
  with build.run_context(resolved, mesh):
    run = build.build_run(resolved, mesh, total_steps=cfg.total_steps, max_tiles=0)
    model = models.create_model(model_cfg, mesh, **resolved.model_kwargs)
    if args.export_hf:
      models.export_hf(model, model_cfg, args.export_hf, dtype="float32")
    _, params = split_model(model)
    del model
    state = new_train_state(params, run.optimizer, mesh, run.model_def)
    batch = {k: to_global_array(v, run.batch_sharding) for k, v in host.items()}
    jax.block_until_ready((state, batch))
    init_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    compiled = run.compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    t0 = time.perf_counter()
    state, out = compiled(state, batch)
    first = jax.device_get(out)
    first_step_s = time.perf_counter() - t0
    for _ in range(max(0, args.warmup - 1)):
      state, out = compiled(state, batch)
    jax.block_until_ready(out)
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      state, out = compiled(state, batch)
      out = jax.device_get(out)  # the loss reaches the host each step, as in the trainer
      times.append(time.perf_counter() - t0)

  tokens = int(out["tokens"])
  step_time = float(np.median(times)) if times else first_step_s
  flops = models.family(model_cfg.type).train_flops(model_cfg, host)
  peak = metrics_lib.peak_flops_per_device()
  mfu = metrics_lib.mfu(flops, step_time, peak, n_dev)
  result = dict(
      stack="jaxtune", device=jax.devices()[0].device_kind, n_devices=n_dev,
      jax=jax.__version__, preset=args.preset, layers=model_cfg.num_hidden_layers,
      vocab=model_cfg.vocab_size, params=models.param_count(model_cfg), pack=args.pack,
      global_batch=args.batch, micro_batches=resolved.num_micro, lengths=args.lengths,
      mean_len=args.mean_len, seed=args.seed, **batch_stats(host),
      attention=args.attention, remat=args.remat, loss_mode=args.loss_mode, chunk=args.chunk,
      param_dtype="float32", compute_dtype=args.compute_dtype,
      init_s=round(init_s, 2), compile_s=round(compile_s, 2),
      first_step_s=round(first_step_s, 3), step_time_s=round(step_time, 4),
      step_times_s=[round(t, 4) for t in times], tokens=tokens,
      tokens_per_sec=round(tokens / step_time, 1),
      tokens_per_sec_per_device=round(tokens / step_time / n_dev, 1),
      flops_per_step=flops, model_tflops_per_sec_per_device=round(flops / step_time / n_dev
                                                                  / 1e12, 2),
      peak_flops_per_device=peak, mfu=None if mfu is None else round(mfu, 4),
      first_loss=float(first["loss"]), loss=float(out["loss"]),
      grad_norm=float(out["grad_norm"]) if "grad_norm" in out else None,
      temp_gib=round(memory.temp_size_in_bytes / 2**30, 3) if memory else None,
      peak_gib=metrics_lib.device_memory_gib().get("mem_peak_gib"),
      **metrics_lib.host_memory_gib(),
  )
  emit(result, args)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])

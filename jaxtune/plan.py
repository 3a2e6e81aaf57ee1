"""Memory planner: compile a recipe's train step on N devices and report what one device needs.

    python -m jaxtune.plan --config=RECIPE [--config.x=v ...] [--devices=N] [--json]
        [--device_memory_gib=G] [--max_tiles=M]

It is a report over the trainer's own build (jaxtune.train.build: `config.resolve`, then
`build_run`, from abstract state and abstract batches) and compiles its step ahead of time:
nothing is allocated, no weights, data files or tokenizer are read (the recipe is resolved
with `files=False`). The default is the real devices; `--devices=N`
takes the first N of them, and on a CPU simulates N (it sets
`--xla_force_host_platform_device_count` before JAX starts).

What one device holds, from the compiled program (`memory_analysis`), and what the step does:
  params, optimizer state, batch: the step's arguments, from their shardings (frozen params
      included, with no optimizer state); `other_arguments` is what XLA counts beyond them;
  temporaries: activations kept for the backward pass, gradients and their accumulators,
      the optimizer's scratch (XLA's buffer assignment, after reuse);
  unaliased outputs: outputs not written in place of a donated argument (the metrics);
  per_device = their sum (the `per_device_gib` of the --json line): an upper bound on the
      step's peak, as not all of it is live at once.
  model_flops: the family's `train_flops` (the MFU numerator of metrics.jsonl) on a batch of
      full rows, one sample per row; xla_flops_per_device: XLA's `cost_analysis`, which counts
      a loop body once (the layer scan, the micro-batch scan), so it is far below the truth.
  fits: per_device <= the device's memory (`memory_stats()["bytes_limit"]`, or
      --device_memory_gib); None where neither is known (a CPU).

On a CPU the figures are the CPU compiler's: fusion and buffer reuse differ from a GPU's, so a
GPU's temporaries can be lower or higher (docs/benchmarks.md, "Memory planner").
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import Any

from ml_collections import ConfigDict

GIB = 1024 ** 3
_NOMINAL_STEPS = 1000  # an epoch_num recipe's step count needs the data; memory does not


def _shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  import jax  # pylint: disable=import-outside-toplevel
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def _device_memory_bytes(device) -> int | None:
  stats = device.memory_stats() or {}
  return stats.get("bytes_limit")


def plan(cfg: ConfigDict, num_devices: int | None = None, *,
         device_memory_gib: float | None = None, max_tiles: int | None = None) -> dict:
  """Compiles `cfg`'s train step on `num_devices` devices (default: all) and returns the report
  (see the module docstring; bytes are per device, `*_gib` the same in GiB)."""
  # Imported here, not at the top: `--devices` must set XLA_FLAGS before anything JAX runs.
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np

  from jaxtune import config as config_lib
  from jaxtune import models
  from jaxtune.models import lora
  from jaxtune.train import build
  from jaxtune.train.logs import quiet_libraries

  quiet_libraries()
  available = jax.devices()
  n = len(available) if num_devices is None else int(num_devices)
  if not 1 <= n <= len(available):
    raise config_lib.ConfigError(
        f"planning on {n} devices, but this process has {len(available)} "
        f"({jax.default_backend()}); on a CPU, `python -m jaxtune.plan --devices={n}` simulates "
        f"them (or set XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts)")
  devices = available[:n]
  resolved = config_lib.resolve(cfg, n, files=False)
  cfg = resolved.cfg
  family = models.family(cfg.model.type)
  mesh = build.make_run_mesh(resolved, devices)
  total_steps = cfg.total_steps or _NOMINAL_STEPS
  # Tile slots per row: the data's bound for a model whose data carries pixels (the trainer
  # sizes them to the packs' actual maximum, which is at most this), or --max_tiles.
  tiles = resolved.tiles_bound if max_tiles is None else int(max_tiles)

  t0 = time.perf_counter()
  with build.run_context(resolved, mesh):
    run = build.build_run(resolved, mesh, total_steps=total_steps, max_tiles=tiles)
    compiled = run.compile()
  compile_s = time.perf_counter() - t0

  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else {}
  trainable, _ = run.model_def.split_trainable(run.abstract_params)
  params_bytes = _shard_bytes(run.abstract_state.params)
  opt_bytes = _shard_bytes(run.abstract_state.opt_state)
  batch_bytes = _shard_bytes(run.abstract_batch)
  arguments = int(memory.argument_size_in_bytes)
  parts = dict(
      params_bytes=params_bytes,
      opt_state_bytes=opt_bytes,
      batch_bytes=batch_bytes,
      other_argument_bytes=arguments - params_bytes - opt_bytes - batch_bytes,
      temp_bytes=int(memory.temp_size_in_bytes),
      unaliased_output_bytes=int(memory.output_size_in_bytes - memory.alias_size_in_bytes),
  )
  per_device = sum(parts.values())

  # Full rows, one sample each: the most attention work a row of this length can carry.
  dummy = {k: np.ones(shape, dtype) for k, (shape, dtype) in run.batch_layout.items()
           if len(shape) <= 2}
  model_flops = float(family.train_flops(cfg.model, dummy))
  limit = (int(device_memory_gib * GIB) if device_memory_gib is not None
           else _device_memory_bytes(devices[0]))
  trainable_count = int(sum(math.prod(p.shape) for p in jax.tree.leaves(trainable)))
  lora_cfg = cfg.get("lora")
  if lora.enabled(lora_cfg):
    # The base counted as the model it is (a QLoRA base's codes pack two params a byte).
    param_count = models.param_count(cfg.model) + trainable_count
    adapted = lora.lora_targets(family, cfg.model, tuple(lora_cfg.targets))
    lora_report = dict(rank=int(lora_cfg.rank), alpha=float(lora_cfg.alpha),
                       quantize_base=lora_cfg.quantize_base, adapted=len(adapted))
  else:
    param_count = int(sum(math.prod(p.shape) for p in jax.tree.leaves(run.abstract_params)))
    lora_report = None
  return dict(
      model=cfg.model.type,
      param_count=param_count,
      trainable_param_count=trainable_count,
      frozen_param_count=param_count - trainable_count,
      lora=lora_report,
      backend=resolved.backend,
      device_kind=devices[0].device_kind,
      devices=n,
      mesh={k: int(v) for k, v in mesh.shape.items()},
      global_batch_size=int(cfg.global_batch_size),
      pack_max_length=int(cfg.data.pack_max_length),
      micro_batches=int(run.num_micro),
      max_tiles=tiles,
      tokens_per_step=int(cfg.global_batch_size * cfg.data.pack_max_length),
      param_dtype=cfg.param_dtype,
      compute_dtype=cfg.compute_dtype,
      optimizer_state_dtype=cfg.optim.state_dtype,
      remat=cfg.remat,
      attention=resolved.attention,
      **parts,
      alias_bytes=int(memory.alias_size_in_bytes),
      argument_bytes=arguments,
      output_bytes=int(memory.output_size_in_bytes),
      host_temp_bytes=int(getattr(memory, "host_temp_size_in_bytes", 0) or 0),
      per_device_bytes=per_device,
      per_device_gib=per_device / GIB,
      model_flops=model_flops,
      model_flops_per_device=model_flops / n,
      xla_flops_per_device=float(cost["flops"]) if "flops" in cost else None,
      device_memory_gib=None if limit is None else limit / GIB,
      fits=None if limit is None else per_device <= limit,
      compile_s=round(compile_s, 2),
  )


def _count(n: int) -> str:
  """A parameter count at a readable scale: 8.191 B, 43.6 M, 12.3 K."""
  for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
    if n >= scale:
      return f"{n / scale:.3f} {unit}" if unit == "B" else f"{n / scale:.1f} {unit}"
  return str(n)


def format_report(report: dict) -> str:
  """The human-readable table."""
  gib = lambda b: f"{b / GIB:10.3f} GiB"
  mem = report["device_memory_gib"]
  fits = {True: "yes", False: "NO", None: "unknown (no device memory figure: --device_memory_gib)"}
  mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
  lines = [
      f"jaxtune plan: {report['model']}, {report['param_count'] / 1e9:.3f} B params "
      f"({_count(report['trainable_param_count'])} trainable, "
      f"{_count(report['frozen_param_count'])} frozen) on {report['devices']} x "
      f"{report['device_kind']} ({report['backend']}), mesh {mesh}",
      f"  step: {report['global_batch_size']} rows x {report['pack_max_length']} tokens = "
      f"{report['tokens_per_step']:,} tokens, {report['micro_batches']} micro-batch(es)"
      + (f", {report['max_tiles']} tile slots per row" if report["max_tiles"] else ""),
  ]
  lora_report = report.get("lora")
  params = report["param_dtype"]
  if lora_report:
    base = lora_report["quantize_base"]
    base = report["compute_dtype"] if base == "none" else base
    lines.append(f"  LoRA: rank {lora_report['rank']}, alpha {lora_report['alpha']:g} on "
                 f"{lora_report['adapted']} adapted weights; the base frozen in {base}, "
                 "the adapters and their optimizer state float32")
    params = f"{base} (base) + float32 (adapters)"
  lines += [
      f"  dtypes: params {params}, compute {report['compute_dtype']}, "
      f"optimizer state {report['optimizer_state_dtype']}; remat {report['remat']}, attention "
      f"{report['attention']}",
      "  per device:",
      f"    parameters          {gib(report['params_bytes'])}",
      f"    optimizer state     {gib(report['opt_state_bytes'])}",
      f"    batch               {gib(report['batch_bytes'])}",
      f"    other arguments     {gib(report['other_argument_bytes'])}",
      f"    temporaries         {gib(report['temp_bytes'])}",
      f"    unaliased outputs   {gib(report['unaliased_output_bytes'])}",
      f"    total               {gib(report['per_device_bytes'])}"
      + (f"   (host, offloaded: {report['host_temp_bytes'] / GIB:.3f} GiB)"
         if report["host_temp_bytes"] else ""),
      f"  device memory: {'unknown' if mem is None else f'{mem:.2f} GiB'}; fits: "
      f"{fits[report['fits']]}",
      f"  FLOPs per step: {report['model_flops']:.4g} (model, full rows; "
      f"{report['model_flops_per_device']:.4g} per device); XLA cost analysis "
      + ("none" if report["xla_flops_per_device"] is None
         else f"{report['xla_flops_per_device']:.4g} per device (loop bodies counted once)"),
      f"  compiled in {report['compile_s']:.1f} s",
  ]
  return "\n".join(lines)


# ---- command line --------------------------------------------------------------------------

def _simulate_devices(argv: list[str]) -> None:
  """`--devices=N`: N host devices for the CPU backend, set before JAX creates it."""
  count = None
  for i, arg in enumerate(argv):
    if arg.startswith("--devices="):
      count = arg.split("=", 1)[1]
    elif arg == "--devices" and i + 1 < len(argv):
      count = argv[i + 1]
  if count is None or not count.isdigit():
    return  # absl reports a bad value
  flags_now = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                     os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags_now} --xla_force_host_platform_device_count={count}".strip()


def run() -> None:
  """`python -m jaxtune.plan`: flags as jaxtune.main's (--config, --config.x=v), plus these."""
  _simulate_devices(sys.argv)
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  from jaxtune import launch  # pylint: disable=import-outside-toplevel

  def config_error(message: str):
    print(f"jaxtune.plan: {message}", file=sys.stderr)
    sys.exit(launch.EXIT_CONFIG)

  def command_line_error(e: Exception):
    if isinstance(e, (AttributeError, KeyError)):  # how ml_collections reports an unknown key
      config_error(f"command-line error: unknown config key {str(e).strip(chr(34))}")
    config_error(f"command-line error: {type(e).__name__}: {e}")

  try:
    recipe = config_flags.DEFINE_config_file(
        "config", None, "Recipe file defining get_config(arg=None).", lock_config=True)
  except Exception as e:  # pylint: disable=broad-except  (the recipe's own errors)
    command_line_error(e)
  devices = flags.DEFINE_integer("devices", None, "Devices to plan for (default: all); on a "
                                 "CPU, that many are simulated.", lower_bound=1)
  as_json = flags.DEFINE_bool("json", False, "Print one JSON line instead of the table.")
  memory_gib = flags.DEFINE_float("device_memory_gib", None,
                                  "Device memory to check the plan against (default: the "
                                  "device's own figure, where the backend reports one).")
  tiles = flags.DEFINE_integer("max_tiles", None, "Image tile slots per row (default: the "
                               "data's bound for an image model, 0 for text).", lower_bound=0)

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except  (flags.Error, the recipe's errors)
      command_line_error(e)

  def main(argv):
    if len(argv) > 1:
      config_error(f"unexpected arguments {argv[1:]}: every setting is a --flag")
    try:
      cfg = recipe.value
      if cfg is None:
        config_error("--config=RECIPE is required (a recipe file defining get_config)")
      cfg.to_dict()  # a recipe that failed to load is a stand-in that raises when read
    except SystemExit:
      raise
    except Exception as e:  # pylint: disable=broad-except
      command_line_error(e)
    from jaxtune.config import ConfigError  # pylint: disable=import-outside-toplevel
    try:
      report = plan(cfg, devices.value, device_memory_gib=memory_gib.value,
                    max_tiles=tiles.value)
    except (ConfigError, ValueError) as e:
      config_error(f"configuration error: {e}")
    if as_json.value:
      print(json.dumps(report, sort_keys=True))
    else:
      print(format_report(report))

  app.run(main, flags_parser=parse)


if __name__ == "__main__":
  run()

"""Ulysses against all-gather KV, the two forms of attention over rows split by `mesh.sequence`.

    python scripts/bench_context_parallel.py [--case=qwen3_8b_128k] [--devices=8]

Compiles a `scripts/bench_memory.py` case's train step twice on simulated devices (nothing
allocated), once as configured (Ulysses where the heads divide) and once with all-gather KV
forced, and prints one JSON line per form: the step's temporaries per device and the bytes of
every kind of collective in the compiled program (each op counted once, so a loop body, e.g.
the layer scan, counts once: per layer). On the CPU backend collectives run in float32.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1,
          "pred": 1}
_COLLECTIVE = re.compile(
    r"= (.*?) (all-gather|all-to-all|reduce-scatter|all-reduce|collective-permute)\(")


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes of the results of each kind of collective in an HLO module's text."""
  sizes: collections.Counter = collections.Counter()
  for line in hlo_text.splitlines():
    match = _COLLECTIVE.search(line)
    if not match:
      continue
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
      if dtype in _BYTES:
        count = 1
        for d in filter(None, dims.split(",")):
          count *= int(d)
        sizes[match.group(2)] += count * _BYTES[dtype]
  return dict(sizes)


def one_form(case: str, devices: int, all_gather_kv: bool) -> dict:
  """Compiles the case in this process (XLA_FLAGS must already simulate `devices`)."""
  # pylint: disable=import-outside-toplevel
  import jax

  import bench_memory
  from jaxtune import config as config_lib
  from jaxtune.ops import attention
  from jaxtune.train import build
  if all_gather_kv:
    attention.uses_ulysses = lambda *_: False
  resolved = config_lib.resolve(bench_memory.get_config(case), devices, files=False)
  mesh = build.make_run_mesh(resolved, jax.devices()[:devices])
  with build.run_context(resolved, mesh):
    run = build.build_run(resolved, mesh, total_steps=1000, max_tiles=0)
    compiled = run.step.lower(run.abstract_state, run.abstract_batch).compile()
  gib = 1024 ** 3
  return dict(case=case, form="all-gather KV" if all_gather_kv else "ulysses",
              mesh={k: int(v) for k, v in mesh.shape.items()},
              temp_gib=round(compiled.memory_analysis().temp_size_in_bytes / gib, 3),
              collective_gib={k: round(v / gib, 3)
                              for k, v in collective_bytes(compiled.as_text()).items()})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--case", default="qwen3_8b_128k")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--form", choices=("ulysses", "all_gather_kv"), default=None,
                      help="compile one form here (the parent runs each in its own process)")
  args = parser.parse_args()
  if args.form:
    sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]
    print(json.dumps(one_form(args.case, args.devices, args.form == "all_gather_kv")))
    return
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"}
  for form in ("ulysses", "all_gather_kv"):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--case={args.case}",
                           f"--devices={args.devices}", f"--form={form}"], env=env, cwd=REPO,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
      print(json.dumps(dict(form=form, error=proc.stderr[-2000:])), flush=True)
    else:
      print(proc.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
  main()

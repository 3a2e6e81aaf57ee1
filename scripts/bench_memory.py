"""Memory budgets of full fine-tuning, from the planner (`python -m jaxtune.plan`).

    python scripts/bench_memory.py [--cases=qwen3_8b,qwen3_1_7b,qwen3_30b_a3b]
        [--timeout=3600] [--set=key=value ...]

Each case is planned in its own process, `python -m jaxtune.plan --config=scripts/
bench_memory.py:<case> --devices=N --json` (this file is also the recipe: `get_config(case)`),
so on a CPU the N devices are simulated and nothing is allocated. Prints one JSON line per case
(the planner's report plus `case` and `budget_gib`) and, last, a summary line.

Cases (AdamW, fp32 master weights, bf16 compute, remat full, attention auto, 16,384-token
rows, global batch 8, chunked loss):
  qwen3_8b        Qwen3-8B on 8 devices, mesh fsdp=8: the issue's budget, <= 40 GiB a device.
  qwen3_1_7b      Qwen3-1.7B on one device (8 accumulated micro-batches of one row).
  qwen3_30b_a3b   Qwen3-30B-A3B on 8 devices, mesh fsdp=8: every weight, experts too, split 8
                  ways (the least state per device; one layer's experts are gathered at a
                  time). qwen3_30b_a3b_ep: the recipe's expert=8 instead (experts split over
                  devices, the rest replicated: more state per device, no expert gathers).
Long context (issue 19; rows split over `mesh.sequence`, YaRN factor 4 over 32,768 positions):
  qwen3_8b_128k   Qwen3-8B, one 131,072-token row per step, 8 devices, mesh sequence=8:
                  <= 40 GiB a device (configs/sft_qwen3_8b_128k.py). --set=remat=offload
                  measures activation offload at the same size.
  qwen3_8b_32k    Qwen3-8B, 32,768-token rows, global batch 8, mesh fsdp=4 sequence=2:
                  <= 40 GiB a device.
  qwen3_30b_a3b_64k  Qwen3-30B-A3B, 65,536-token rows, 8 devices, mesh sequence=8: reported.
LoRA (issue 24; the base frozen in bf16, adapters and their AdamW state in float32):
  qwen3_8b_lora   Qwen3-8B, LoRA rank 16 on the seven projections, one device: <= 30 GiB.
  qwen3_8b_qlora  the same with lora.quantize_base='nf4': <= 16 GiB.
  intern_s1_mini_lora  Intern-S1-mini (InternViT-300M + Qwen3-8B), LoRA rank 16 on the language
                  model, vision tower and projector frozen, one device, image tiles up to the
                  data's bound (pack_max_length // 256): fits a 24 GiB device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_GIB = {"qwen3_8b": 40.0, "qwen3_8b_lora": 30.0, "qwen3_8b_qlora": 16.0,
              "intern_s1_mini_lora": 24.0, "qwen3_8b_128k": 40.0, "qwen3_8b_32k": 40.0}
ONE = dict(data=1, fsdp=1, tensor=1, expert=1)
LORA = dict(rank=16, alpha=32.0)
# case -> (preset function, devices, mesh, lora section overrides)
CASES = {
    "qwen3_8b": ("qwen3_8b", 8, dict(ONE, fsdp=8), None),
    "qwen3_1_7b": ("qwen3_1_7b", 1, ONE, None),
    "qwen3_30b_a3b": ("qwen3_30b_a3b", 8, dict(ONE, fsdp=8), None),
    "qwen3_30b_a3b_ep": ("qwen3_30b_a3b", 8, dict(ONE, expert=8), None),
    "qwen3_8b_lora": ("qwen3_8b", 1, ONE, LORA),
    "qwen3_8b_qlora": ("qwen3_8b", 1, ONE, dict(LORA, quantize_base="nf4")),
    "intern_s1_mini_lora": ("intern_s1_mini", 1, ONE, LORA),
    "qwen3_8b_128k": ("qwen3_8b", 8, dict(ONE, sequence=8), None),
    "qwen3_8b_32k": ("qwen3_8b", 8, dict(ONE, fsdp=4, sequence=2), None),
    "qwen3_30b_a3b_64k": ("qwen3_30b_a3b", 8, dict(ONE, sequence=8), None),
}
# Rows longer than the default 16,384 tokens: case -> (pack_max_length, global_batch_size).
LONG_ROWS = {"qwen3_8b_128k": (131072, 1), "qwen3_8b_32k": (32768, 8),
             "qwen3_30b_a3b_64k": (65536, 1)}
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768)


def get_config(case: str | None = None):
  """The recipe of one case (the planner loads this file with `:<case>`)."""
  from jaxtune.config import base_config, dataset  # pylint: disable=import-outside-toplevel
  from jaxtune.models import presets  # pylint: disable=import-outside-toplevel
  preset, _, mesh, lora = CASES[case or "qwen3_8b"]
  c = base_config()
  c.model = getattr(presets, preset)()
  if "vision" in c.model:  # as Intern-S1's LoRA guide: the tower and projector frozen
    c.model.freeze_vision = c.model.freeze_projector = True
  c.lora.update(lora or {})
  c.data.datasets = [dataset("sft", "data/sft.jsonl")]  # never read: the planner stands in
  c.data.sample_max_length = 8192
  c.data.pack_max_length = 16384
  c.global_batch_size = 8
  c.total_steps = 1000
  c.mesh.update(mesh)
  c.param_dtype = "float32"
  c.compute_dtype = "bfloat16"
  c.remat = "full"
  c.attention = "auto"
  c.loss.mode = "chunk"
  c.loss.chunk_size = 1024
  if case in LONG_ROWS:
    c.data.pack_max_length, c.global_batch_size = LONG_ROWS[case]
    c.data.sample_max_length = c.data.pack_max_length
    c.model.rope_scaling = YARN
    c.model.max_position_embeddings = 131072
  return c


def run_case(case: str, extra: list[str], timeout: float) -> dict:
  devices = CASES[case][1]
  cmd = [sys.executable, "-m", "jaxtune.plan", f"--config={os.path.abspath(__file__)}:{case}",
         f"--devices={devices}", "--json"] + [f"--config.{kv}" for kv in extra]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)}
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
  if proc.returncode != 0:
    return dict(case=case, error=proc.stderr[-2000:], returncode=proc.returncode)
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  report.update(case=case, wall_s=round(time.perf_counter() - t0, 1),
                budget_gib=BUDGET_GIB.get(case))
  if report["budget_gib"] is not None:
    report["within_budget"] = report["per_device_gib"] <= report["budget_gib"]
  return report


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--cases", default="qwen3_8b,qwen3_1_7b,qwen3_30b_a3b")
  parser.add_argument("--timeout", type=float, default=3600, help="seconds per case")
  parser.add_argument("--set", action="append", default=[],
                      help="a --config override for every case, e.g. --set=remat=dots")
  args = parser.parse_args()
  summary = {}
  for case in args.cases.split(","):
    report = run_case(case, args.set, args.timeout)
    print(json.dumps(report, sort_keys=True), flush=True)
    summary[case] = report.get("per_device_gib", report.get("error", "")[-200:])
  print(json.dumps({"summary_per_device_gib": summary}, sort_keys=True))


if __name__ == "__main__":
  main()

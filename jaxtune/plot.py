"""Training curves of a run: `jaxtune plot RUN_DIR` -> RUN_DIR/curves.png.

Reads RUN_DIR/metrics.jsonl (one JSON object per optimizer step, README "What a run writes")
and draws, against `step`: the training `loss` with every `eval_loss_<name>` (eval steps only),
the learning rate `lr`, and the throughput `tokens_per_sec`. Needs matplotlib (the `plot`
extra: pip install 'jaxtune[plot]'); it draws with the Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
import math
import os

METRICS = "metrics.jsonl"
OUTPUT = "curves.png"


class PlotError(Exception):
  """A run directory or environment that cannot be plotted (the CLI exits 2 on it)."""


def read_metrics(path: str) -> list[dict]:
  """The step records of a metrics.jsonl; a torn last line (a killed run) is skipped."""
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
        records.append(record)
  return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
  steps, values = [], []
  for r in records:
    v = r.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
      steps.append(r["step"])
      values.append(float(v))
  return steps, values


def plot_run(run_dir: str, out: str | None = None) -> str:
  """Draws RUN_DIR/metrics.jsonl into `out` (default RUN_DIR/curves.png); returns the path."""
  metrics = os.path.join(run_dir, METRICS)
  if not os.path.isfile(metrics):
    raise PlotError(f"no {METRICS} in {run_dir!r}: pass a run directory "
                    "(<work_dir>/<YYYYmmdd-HHMMSS>)")
  records = read_metrics(metrics)
  if not records:
    raise PlotError(f"{metrics} has no step records yet")
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise PlotError(f"matplotlib is needed to plot ({e}): pip install 'jaxtune[plot]'") from e

  eval_keys = sorted({k for r in records for k in r if k.startswith("eval_loss_")})
  fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
  loss_ax, lr_ax, speed_ax = axes
  dots = {"marker": "."} if len(records) <= 30 else {}  # a short run: points stay visible
  loss_ax.plot(*_series(records, "loss"), label="loss (train)", linewidth=1.2, **dots)
  for key in eval_keys:
    loss_ax.plot(*_series(records, key), marker="o", markersize=4,
                 label=f"eval {key[len('eval_loss_'):]}")
  loss_ax.set_ylabel("loss")
  loss_ax.legend(loc="best", fontsize="small")
  loss_ax.grid(alpha=0.3)
  lr_ax.plot(*_series(records, "lr"), color="tab:purple", **dots)
  lr_ax.set_ylabel("learning rate")
  lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
  lr_ax.grid(alpha=0.3)
  speed_ax.plot(*_series(records, "tokens_per_sec"), color="tab:red", **dots)
  speed_ax.set_ylabel("tokens / s")
  speed_ax.set_xlabel("step")
  speed_ax.grid(alpha=0.3)
  fig.suptitle(os.path.basename(os.path.normpath(os.path.abspath(run_dir))))
  fig.tight_layout()
  out = out or os.path.join(run_dir, OUTPUT)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out

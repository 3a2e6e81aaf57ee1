"""What a run shows while it trains: metrics.jsonl, TensorBoard, progress bar, log lines,
an optional profiler trace, and the summary at the end.

`RunMonitor.log_step(record)` takes one step's record (contract 4 fields plus extras) and
sends it everywhere; it also keeps the totals the summary reports. Only process 0 writes
files and draws the bar; every process keeps the totals.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import time

import jax
from tqdm import tqdm

from jaxtune.train import logs
from jaxtune.train import metrics as metrics_lib
from jaxtune.train import wandb_log

log = logging.getLogger(__name__)
step_log = logging.getLogger(logs.STEP_LOGGER)

# Record fields that are not scalars worth plotting.
_NOT_PLOTTED = ("step", "epoch", "skipped")


class RunMonitor:
  """metrics.jsonl + TensorBoard + W&B + tqdm + periodic log lines + totals for the summary."""

  def __init__(self, run_dir: str, *, total_steps: int, start_step: int, n_devices: int,
               is_main: bool, progress_bar: bool, tensorboard: bool, log_interval: int,
               started: float | None = None, recipe=None):
    """started: time.perf_counter() when the run began (wall time in the summary); recipe:
    the resolved config, for its observability.wandb_* keys (W&B, jaxtune.train.wandb_log)."""
    self.total_steps, self.start_step, self.n_devices = total_steps, start_step, n_devices
    self.log_interval = max(1, log_interval)
    self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if is_main:
      metrics_lib.truncate_jsonl(self.metrics_path, start_step)  # a resumed run rewrites them
    self._writer = metrics_lib.MetricsWriter(self.metrics_path, enabled=is_main)
    self._tb = None
    self.tensorboard_dir = os.path.join(run_dir, "tensorboard")
    if tensorboard and is_main:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      # purge_step hides the events a killed run wrote past the checkpoint it resumes from.
      self._tb = SummaryWriter(self.tensorboard_dir, flush_secs=10,
                               purge_step=start_step + 1 if start_step else None)
    self._show_bar = progress_bar and is_main
    self._bar = None
    self.started = started if started is not None else time.perf_counter()
    self._steps_started = time.perf_counter()
    self.totals = dict(steps=0, tokens=0, step_time=0.0, data_time=0.0, eval_time=0.0,
                       mfu=0.0, mfu_steps=0, skipped=0)
    self.last_eval: dict[str, float] = {}
    self._wandb = wandb_log.start(recipe, run_dir, is_main) if recipe is not None else None

  def start(self) -> None:
    """Call when the first step is about to run (after compilation): the bar and ETA start."""
    self._bar = tqdm(total=self.total_steps, initial=self.start_step, desc="train", unit="step",
                     dynamic_ncols=True, disable=not self._show_bar)
    self._steps_started = time.perf_counter()

  def log_step(self, record: dict) -> None:
    step = record["step"]
    t = self.totals
    t["steps"] += 1
    t["tokens"] += record["tokens"]
    t["step_time"] += record["step_time"]
    t["data_time"] += record.get("data_time", 0.0)
    t["eval_time"] += record.get("eval_time", 0.0)
    if record["mfu"] is not None:  # None: no known peak for this device (a CPU)
      t["mfu"] += record["mfu"]
      t["mfu_steps"] += 1
    t["skipped"] += int(record.get("skipped", False))
    evals = {k: v for k, v in record.items() if k.startswith("eval_loss_")}
    self.last_eval.update(evals)

    self._writer.write(record)
    if self._wandb is not None:
      self._wandb.log(record)
    if self._tb is not None:
      for key, value in record.items():
        if key not in _NOT_PLOTTED and isinstance(value, (int, float)) and math.isfinite(value):
          tag = f"eval/{key[len('eval_loss_'):]}" if key in evals else f"train/{key}"
          self._tb.add_scalar(tag, value, step)
    postfix = dict(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                   tgs=f"{record['tokens_per_sec_per_device']:.0f}")
    if record["mfu"] is not None:
      postfix["mfu"] = f"{record['mfu']:.3f}"
    self._bar.set_postfix(**postfix, refresh=False)
    self._bar.update(1)  # redraws, with this step's postfix
    if step % self.log_interval == 0 or step == self.total_steps:
      step_log.info(
          "step %d/%d epoch %d loss %.4f grad_norm %.3f lr %.3e tokens/s/device %.0f%s "
          "step %.3fs data %.3fs eta %s", step, self.total_steps, record["epoch"],
          record["loss"], record["grad_norm"], record["lr"],
          record["tokens_per_sec_per_device"],
          "" if record["mfu"] is None else f" mfu {record['mfu']:.3f}", record["step_time"],
          record.get("data_time", 0.0), self._eta(step))
    if evals:  # also on the console when the progress bar hides the step lines
      log.info("eval after step %d: %s (%.1f s)", step,
               ", ".join(f"{k[len('eval_loss_'):]} {v:.4f}" for k, v in evals.items()),
               record.get("eval_time", 0.0))

  def _eta(self, step: int) -> str:
    done = step - self.start_step
    if done <= 0:
      return "?"
    per_step = (time.perf_counter() - self._steps_started) / done
    return str(datetime.timedelta(seconds=round(per_step * (self.total_steps - step))))

  def summary(self, **fields) -> dict:
    """The end-of-run summary (also logged): totals of this session plus `fields`."""
    t = self.totals
    wall = time.perf_counter() - self.started
    out = dict(
        fields,
        steps_this_session=t["steps"], tokens_this_session=t["tokens"],
        wall_time_s=round(wall, 3), train_time_s=round(t["step_time"], 3),
        data_time_s=round(t["data_time"], 3), eval_time_s=round(t["eval_time"], 3),
        tokens_per_sec_per_device=(t["tokens"] / t["step_time"] / self.n_devices
                                   if t["step_time"] else None),
        mean_mfu=t["mfu"] / t["mfu_steps"] if t["mfu_steps"] else None,
        skipped_steps=t["skipped"], **self.last_eval)
    return out

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    self._writer.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      try:
        self._wandb.finish()
      except Exception as e:  # pylint: disable=broad-except  (the run's outcome stands)
        log.warning("closing the W&B run failed: %s", e)
      self._wandb = None


def log_summary(summary: dict) -> None:
  """A few readable lines: what was trained, how fast, and where the results are."""
  tps = summary.get("tokens_per_sec_per_device")
  mfu = summary.get("mean_mfu")
  log.info("done: %d/%d steps (%d this session), %d tokens trained in total (%d this "
           "session), %.1f s wall, %.1f s in steps, %.1f s waiting for data",
           summary["steps"], summary["total_steps"], summary["steps_this_session"],
           summary["consumed_tokens"], summary["tokens_this_session"], summary["wall_time_s"],
           summary["train_time_s"], summary["data_time_s"])
  log.info("speed: %s tokens/s/device, mean MFU %s%s",
           f"{tps:.0f}" if tps is not None else "n/a", f"{mfu:.3f}" if mfu is not None else
           "n/a", f", {summary['skipped_steps']} non-finite step(s) skipped"
           if summary["skipped_steps"] else "")
  evals = {k: v for k, v in summary.items() if k.startswith("eval_loss_")}
  if evals:
    log.info("eval: %s", ", ".join(f"{k[len('eval_loss_'):]} {v:.4f}" for k, v in evals.items()))
  log.info("checkpoint: %s", summary.get("checkpoint") or "none")
  log.info("HF export: %s", summary.get("hf_export") or "none")


class Profiler:
  """A JAX profiler trace of steps first..last (inclusive) into `<run_dir>/profile/`.

  View it with TensorBoard's profile plugin or Perfetto (`*.trace.json.gz`).
  """

  def __init__(self, run_dir: str, steps: tuple[int, ...] | list[int]):
    self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
    self.directory = os.path.join(run_dir, "profile")
    self.active = False

  def before_step(self, step: int) -> None:
    if step == self.first:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after_step(self, step: int) -> None:
    """Call once the step's outputs are on the host, so the trace holds the whole step."""
    if self.active and step >= self.last:
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      log.info("profiler trace of steps %d-%d written to %s", self.first, self.last,
               self.directory)

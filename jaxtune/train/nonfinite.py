"""The non-finite guard's bookkeeping: skipped steps are logged, too many in a row stop the run,
and so does a run in which no update was applied at all.

The step itself (jaxtune.train.step) already leaves parameters and optimizer state untouched
when the loss or gradient norm is NaN/Inf (or the norm is over `optim.skip_grad_norm_threshold`);
this counts those steps. Only non-finite ones count towards `max_consecutive_nonfinite`.

When it stops a run, the error names the causes it can tell apart: token ids past the
vocabulary (excluded by the start-up check, jaxtune.train.startup_checks), the learning rate
(not the cause when no update was applied before the failing steps), the starting weights and
the data of the failing steps.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)

_SHOWN_STEPS = 8


class NonFiniteError(FloatingPointError):
  """Too many consecutive steps had a non-finite loss or gradient norm, or no step of the run
  applied its update."""


def _finite(value) -> bool:
  return value is not None and math.isfinite(value)


class NonFiniteGuard:
  """Feed it every step's metrics record (`check`).

  total_steps: the run's last step; reached with no update applied in a run that started at
  step 0, the run stops (NonFiniteError) before that step's checkpoint and export.
  vocabulary: what the start-up id check found (startup_checks.Vocabulary), named as an
  excluded cause.
  """

  def __init__(self, max_consecutive: int, *, total_steps: int | None = None, vocabulary=None):
    self.max_consecutive = max_consecutive
    self.total_steps = total_steps
    self.vocabulary = vocabulary
    self.in_a_row = 0
    self.total = 0
    self.nonfinite_steps: list[int] = []
    self.first_step: int | None = None        # this session's first step
    self.applied = 0                          # updates applied in this session
    self.last_applied: dict | None = None     # the record of the last one

  def check(self, record: dict) -> None:
    """Counts a skipped step; raises NonFiniteError after `max_consecutive` non-finite ones in
    a row, or at the run's last step when no step of it applied its update."""
    if self.first_step is None:
      self.first_step = int(record["step"])
    if not record["skipped"]:
      self.in_a_row = 0
      self.applied += 1
      self.last_applied = record
      return
    self.total += 1
    if not record.get("nonfinite", True):
      self.in_a_row = 0
      log.warning("step %d: grad norm %s exceeds optim.skip_grad_norm_threshold: update skipped "
                  "(%d skipped in total)", record["step"], record["grad_norm"], self.total)
    else:
      self.in_a_row += 1
      self.nonfinite_steps.append(int(record["step"]))
      log.warning("step %d: loss %s / grad norm %s is not finite: update skipped (%d in a row, "
                  "%d in total)", record["step"], record["loss"], record["grad_norm"],
                  self.in_a_row, self.total)
      if self.in_a_row >= self.max_consecutive:
        raise NonFiniteError(
            f"{self.in_a_row} steps in a row (the last: step {record['step']}) had a non-finite "
            f"loss or gradient norm (max_consecutive_nonfinite={self.max_consecutive}); "
            "stopping without a new checkpoint. The parameters never took those updates. "
            f"{self.causes(record)} Once fixed, continue from the last checkpoint, if any "
            "(--config.auto_resume=True).")
    self._check_all_skipped(record)

  def _check_all_skipped(self, record: dict) -> None:
    step = int(record["step"])
    if self.applied or self.total_steps is None or step < self.total_steps:
      return
    steps = step - self.first_step + 1
    nonfinite = len(self.nonfinite_steps)
    kinds = ", ".join(p for p in (
        f"{nonfinite} with a non-finite loss or gradient norm" if nonfinite else "",
        f"{steps - nonfinite} over optim.skip_grad_norm_threshold" if steps > nonfinite else "")
                      if p)
    if self.first_step != 1:  # resumed: earlier sessions may have trained
      log.warning("no update was applied in this session: all its %d step(s) (%d to %d) were "
                  "skipped (%s)", steps, self.first_step, step, kinds)
      return
    raise NonFiniteError(
        f"no update was applied in this run: every one of its {steps} step(s) was skipped "
        f"({kinds}), so its parameters are the starting ones; stopping before the checkpoint "
        f"and export of step {step}. {self.causes(record)}")

  def causes(self, record: dict) -> str:
    """The likely causes of the failing steps that can be told apart from here."""
    out = []
    if self.vocabulary is not None:
      out.append(f"token ids: not the cause ({self.vocabulary.describe()})")
    if self.applied == 0:
      out.append("the learning rate: not the cause (no update was applied before the first "
                 "failing step); the starting weights (load_from, or the checkpoint resumed "
                 "from): look for NaN or Inf in them")
    else:
      last = self.last_applied
      out.append(f"the learning rate: updates were applied until step {last['step']} (loss "
                 f"{last['loss']:.4g}, lr {last['lr']:.3g}), then training diverged? Lower "
                 "optim.lr, lengthen the warmup (lr.warmup_ratio) or set optim.max_grad_norm")
    if _finite(record.get("loss")) and not _finite(record.get("grad_norm")):
      out.append("the loss is finite but the gradient norm is not: an overflow in the backward "
                 "pass (compute_dtype / param_dtype too narrow?)")
    shown = ", ".join(str(s) for s in self.nonfinite_steps[:_SHOWN_STEPS])
    more = (f" and {len(self.nonfinite_steps) - _SHOWN_STEPS} more"
            if len(self.nonfinite_steps) > _SHOWN_STEPS else "")
    if shown:
      out.append(f"the data of steps {shown}{more} (metrics.jsonl marks them 'skipped'): "
                 "look for unusual samples in those batches")
    return "Likely causes: " + "; ".join(out) + "."

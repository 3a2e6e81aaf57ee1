"""The non-finite guard's bookkeeping: skipped steps are logged, too many in a row stop the run.

The step itself (jaxtune.train.step) already leaves parameters and optimizer state untouched
when the loss or gradient norm is NaN/Inf (or the norm is over `optim.skip_grad_norm_threshold`);
this counts those steps. Only non-finite ones count towards `max_consecutive_nonfinite`.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
  """Too many consecutive steps had a non-finite loss or gradient norm."""


class NonFiniteGuard:
  def __init__(self, max_consecutive: int):
    self.max_consecutive = max_consecutive
    self.in_a_row = 0
    self.total = 0

  def check(self, record: dict) -> None:
    """Counts a skipped step; raises NonFiniteError after `max_consecutive` non-finite ones in
    a row."""
    if not record["skipped"]:
      self.in_a_row = 0
      return
    self.total += 1
    if not record.get("nonfinite", True):
      self.in_a_row = 0
      log.warning("step %d: grad norm %s exceeds optim.skip_grad_norm_threshold: update skipped "
                  "(%d skipped in total)", record["step"], record["grad_norm"], self.total)
      return
    self.in_a_row += 1
    log.warning("step %d: loss %s / grad norm %s is not finite: update skipped (%d in a row, "
                "%d in total)", record["step"], record["loss"], record["grad_norm"],
                self.in_a_row, self.total)
    if self.in_a_row >= self.max_consecutive:
      raise NonFiniteError(
          f"{self.in_a_row} steps in a row (the last: step {record['step']}) had a non-finite "
          f"loss or gradient norm (max_consecutive_nonfinite={self.max_consecutive}); stopping "
          "without a new checkpoint. The parameters never took those updates: lower optim.lr, "
          "check the data of those steps (metrics.jsonl marks them 'skipped'), or resume from "
          "the last checkpoint.")

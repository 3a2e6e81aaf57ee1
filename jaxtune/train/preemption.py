"""SIGTERM / SIGINT: finish the current step, save a checkpoint, stop cleanly.

Cluster schedulers send SIGTERM some time before they kill a job; Ctrl-C sends SIGINT. The
handler only records the request; the training loop asks `should_stop()` at every step
boundary. With several processes, each may see the signal at a different step (or only one
sees it), so the flags are OR-reduced across processes at every boundary: all processes stop
after the same step and write the same checkpoint. A second SIGINT interrupts at once.
"""

from __future__ import annotations

import logging
import signal
import threading

from jaxtune.train import multihost

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """Installs the handlers on enter, restores the previous ones on exit."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._on_signal) for s in _SIGNALS}
    else:  # Python only delivers signals to the main thread
      log.warning("fit() runs outside the main thread: SIGTERM/SIGINT will not stop it "
                  "gracefully")
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _on_signal(self, signum: int, _frame) -> None:
    name = signal.Signals(signum).name
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
    self.signal_name = name
    log.warning("received %s: stopping after the current step with a checkpoint%s", name,
                " (press Ctrl-C again to abort at once)" if signum == signal.SIGINT else "")

  def should_stop(self) -> bool:
    """Whether any process was asked to stop; every process must call this at each boundary."""
    local = self.signal_name is not None
    stop = multihost.any_process(local)
    if stop and not local:
      self.signal_name = "a signal on another process"
    return stop

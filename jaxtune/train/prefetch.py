"""Moves host batches onto the mesh in a background thread, so the step never waits on data.

An error in that thread (building a batch, placing it) is raised in the training loop as a
PrefetchError naming the step whose batch failed, with the original error chained.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import jax
import numpy as np

_DONE = object()


class PrefetchError(RuntimeError):
  """The background thread failed to prepare a batch."""


class _Failed:
  def __init__(self, error: BaseException, step: int):
    self.error, self.step = error, step


def to_global_array(host_rows: np.ndarray, sharding) -> jax.Array:
  """This host's rows of the global batch -> one global array sharded over the mesh."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(host_rows))


class prefetch_to_device:  # pylint: disable=invalid-name  (used like a generator function)
  """Iterates (device_batch, host_batch) with `depth` batches prepared ahead.

  first_step: the trainer step of the first batch (error messages name the step)."""

  def __init__(self, batches: Iterator[dict], sharding, depth: int = 2, first_step: int = 1):
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._next_step = first_step  # the step of the batch being prepared
    self._thread = threading.Thread(target=self._fill, args=(batches, sharding), daemon=True,
                                    name="jaxtune-prefetch")
    self._thread.start()

  def _fill(self, batches, sharding) -> None:
    try:
      for host in batches:
        if self._stop.is_set():
          return
        device = {k: to_global_array(v, sharding) for k, v in host.items()}
        while not self._stop.is_set():
          try:
            self._queue.put((device, host), timeout=0.1)
            break
          except queue.Full:
            continue
        self._next_step += 1
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consumer)
      self._queue.put(_Failed(e, self._next_step))
      return
    self._queue.put(_DONE)

  def __iter__(self):
    return self

  def __next__(self):
    item = self._queue.get()
    if item is _DONE:
      raise StopIteration
    if isinstance(item, _Failed):
      error = item.error
      raise PrefetchError(f"the data prefetch thread failed preparing the batch of step "
                          f"{item.step}: {type(error).__name__}: {error}") from error
    return item

  def close(self) -> None:
    self._stop.set()
    while True:  # unblock a producer waiting on a full queue
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=5)

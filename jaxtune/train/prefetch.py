"""Moves host batches onto the mesh in a background thread, so the step never waits on data."""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import jax
import numpy as np

_DONE = object()


def to_global_array(host_rows: np.ndarray, sharding) -> jax.Array:
  """This host's rows of the global batch -> one global array sharded over the mesh."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(host_rows))


class prefetch_to_device:  # pylint: disable=invalid-name  (used like a generator function)
  """Iterates (device_batch, host_batch) with `depth` batches prepared ahead."""

  def __init__(self, batches: Iterator[dict], sharding, depth: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, args=(batches, sharding), daemon=True)
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
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consumer)
      self._queue.put(e)
      return
    self._queue.put(_DONE)

  def __iter__(self):
    return self

  def __next__(self):
    item = self._queue.get()
    if item is _DONE:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    self._stop.set()
    while True:  # unblock a producer waiting on a full queue
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=5)

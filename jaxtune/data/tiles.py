"""Decoded image tiles for the batches: a thread pool and a bounded LRU around
`images.load_tiles`.

Batches are built in the prefetch thread; each batch's images are decoded here in parallel
(Pillow releases the GIL while decoding and resizing), each image once however many samples
use it, and kept in an LRU of `max_bytes` (images repeat across epochs, samples and
sample_ratio). A file that fails to decode is remembered with its reason, so every later batch
(and a resumed run) sees the same failure.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import threading

import numpy as np

from jaxtune.data import images


class TileDecoder:
  """decode(keys) -> {key: read-only uint8 tiles [n, S, S, 3] | why it failed}, where a key is
  (path, image_wh, images in its sample)."""

  def __init__(self, *, image_size: int, min_patch: int, max_patch: int, max_bytes: int,
               workers: int):
    self.image_size, self.min_patch, self.max_patch = image_size, min_patch, max_patch
    self.max_bytes, self.workers = max_bytes, workers
    self._lock = threading.Lock()
    self._cache: collections.OrderedDict = collections.OrderedDict()   # LRU, guarded
    self._cache_bytes = 0
    self._pool: cf.ThreadPoolExecutor | None = None
    self.failures: dict[tuple, str] = {}   # image -> why it failed to decode

  def _load(self, key: tuple) -> np.ndarray:
    path, image_wh, n_images = key
    return images.load_tiles(path, image_wh, n_images, self.min_patch, self.max_patch,
                             self.image_size, normalized=False)

  def decode(self, keys: set[tuple]) -> dict[tuple, np.ndarray | str]:
    out, todo = {}, []
    with self._lock:
      for key in sorted(keys):
        if key in self.failures:
          out[key] = self.failures[key]
        elif key in self._cache:
          self._cache.move_to_end(key)
          out[key] = self._cache[key]
        else:
          todo.append(key)
    if not todo:
      return out
    futures = None
    if len(todo) > 1 and self.workers > 1:
      with self._lock:
        if self._pool is None:
          self._pool = cf.ThreadPoolExecutor(min(self.workers, 32),
                                             thread_name_prefix="jaxtune-image-decode")
      futures = [self._pool.submit(self._load, key) for key in todo]
    for k, key in enumerate(todo):
      try:
        tiles = futures[k].result() if futures is not None else self._load(key)
      except (images.ImageError, OSError) as e:
        out[key] = str(e)
        with self._lock:
          self.failures[key] = str(e)
        continue
      tiles.flags.writeable = False
      out[key] = tiles
      self._remember(key, tiles)
    return out

  def _remember(self, key: tuple, tiles: np.ndarray) -> None:
    """Into the LRU, oldest out first."""
    if tiles.nbytes > self.max_bytes:
      return
    with self._lock:
      if key in self._cache:
        return
      self._cache[key] = tiles
      self._cache_bytes += tiles.nbytes
      while self._cache_bytes > self.max_bytes:
        _, old = self._cache.popitem(last=False)
        self._cache_bytes -= old.nbytes

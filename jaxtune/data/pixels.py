"""Pixel tiles for built rows, from the image references start-up kept.

Start-up reads each packed image sample's images once (`ImageRefs.collect`: path, size, tile
count, in the order of its <IMG_CONTEXT> tokens) into a few flat arrays, not a Python object per
image, so a corpus of millions of images costs tens of bytes each. At batch time (`Pixels.add`)
a row's tiles follow its image tokens: its samples in order, each sample's images in order,
each image's tiles as `images.load_tiles` gives them, decoded by `tiles.TileDecoder` (a thread
pool and a bounded LRU). Every number (tile size, tokens per tile, channels) is the model
family's `MediaSpec`. A file that passed the header check but does not decode is an error
naming the sample, or with data.skip_bad_samples its labels are masked (counted in stats).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Callable

import numpy as np

from jaxtune.data import packing, sources, templates
from jaxtune.data.media import MediaSpec
from jaxtune.data.sources import DataError, ImageRef
from jaxtune.data.tiles import TileDecoder

log = logging.getLogger("jaxtune.data.pipeline")
SHOWN_LOCATIONS = 5


@dataclasses.dataclass
class ImageRefs:
  """The images of some unique lines: line uids[i] has refs bounds[i]:bounds[i + 1]."""
  uids: np.ndarray        # int64, sorted
  bounds: np.ndarray      # int64 [lines + 1]
  paths: list[str]        # each distinct image path once
  path_of: np.ndarray     # int32 [refs]: index into paths
  wh: np.ndarray          # int32 [refs, 2]
  n_images: np.ndarray    # int32 [refs]: images of its sample (they share the tile budget)
  tiles: np.ndarray       # int32 [refs]

  @classmethod
  def collect(cls, uids, read_refs: Callable[[int], list[ImageRef]]) -> "ImageRefs":
    """Reads the refs of each unique line in `uids` once (read_refs(u) parses its line)."""
    uids = np.unique(np.asarray(uids, np.int64))
    counts, index, path_of, wh, n_images, tiles = [], {}, [], [], [], []
    for u in uids.tolist():
      refs = read_refs(u)
      counts.append(len(refs))
      for r in refs:
        path_of.append(index.setdefault(r.path, len(index)))
        wh.append(r.image_wh)
        n_images.append(r.n_images)
        tiles.append(r.tiles)
    return cls(uids, np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64),
               list(index), np.asarray(path_of, np.int32),
               np.asarray(wh, np.int32).reshape(-1, 2), np.asarray(n_images, np.int32),
               np.asarray(tiles, np.int32))

  def __len__(self) -> int:
    return len(self.uids)

  def of(self, u: int) -> list[ImageRef]:
    """The images of unique line u, in token order ([] when it has none)."""
    i = int(np.searchsorted(self.uids, u))
    if i == len(self.uids) or self.uids[i] != u:
      return []
    return [ImageRef(self.paths[int(self.path_of[k])], (int(self.wh[k, 0]), int(self.wh[k, 1])),
                     int(self.n_images[k]), int(self.tiles[k]))
            for k in range(int(self.bounds[i]), int(self.bounds[i + 1]))]


def key_of(ref: ImageRef) -> tuple:
  """What decodes to the same tiles: the file, its size and its sample's image count."""
  return (ref.path, ref.image_wh, ref.n_images)


class Pixels:
  """Adds pixel_values uint8 [rows, max_tiles, S, S, C] and tile_segment_ids [rows, max_tiles]
  to built rows. `sample_uid[s]` is packed sample s's unique line, `where(s)` names it."""

  def __init__(self, media: MediaSpec, refs: ImageRefs, *, max_tiles: int, min_patch: int,
               max_patch: int, cache_bytes: int, workers: int, skip_bad: bool,
               sample_uid: np.ndarray, where: Callable[[int], str], stats: dict[str, Any]):
    self.media, self.refs, self.max_tiles = media, refs, max_tiles
    self.skip_bad, self.sample_uid, self.where, self.stats = skip_bad, sample_uid, where, stats
    self.decoder = TileDecoder(image_size=media.tile_size, min_patch=min_patch,
                               max_patch=max_patch, max_bytes=cache_bytes, workers=workers)
    self._lock = threading.Lock()               # guards the decode-failure bookkeeping
    self._skipped: set[int] = set()             # unique samples skipped for a decode failure

  def add(self, rows: dict[str, np.ndarray], packs: np.ndarray, plan: packing.PackPlan,
          tiles: np.ndarray) -> None:
    """The pixels of the rows of `packs` (tiles: each packed sample's tile count)."""
    size, n_rows, m = self.media.tile_size, len(packs), self.media
    if not len(self.refs):              # no sample has images: every slot stays unused
      owner, owned = np.zeros((n_rows, self.max_tiles), np.int32), []
    else:
      owner, owned = packing.tile_slots(plan, packs, tiles, self.max_tiles)
    pixels = np.zeros((n_rows, self.max_tiles, size, size, m.channels), np.uint8)
    refs = {s: self.refs.of(int(self.sample_uid[s])) for _, _, s, _ in owned}
    decoded = self.decoder.decode({key_of(r) for rs in refs.values() for r in rs})
    for row, seg, s, slot in owned:
      failed = [(r, decoded[key_of(r)]) for r in refs[s] if isinstance(decoded[key_of(r)], str)]
      if failed:
        self._failed(rows, row, seg, s, failed)
        continue   # its slots stay owned (the row's image tokens still need features): zeros
      for r in refs[s]:
        pixels[row, slot:slot + r.tiles] = decoded[key_of(r)]
        slot += r.tiles
    counts = (rows["input_ids"] == m.image_token_id).sum(1) if m.image_token_id is not None \
        else np.zeros(n_rows, np.int64)
    used = (owner > 0).sum(1)
    if not np.array_equal(counts, used * m.tokens_per_tile):
      r = int(np.flatnonzero(counts != used * m.tokens_per_tile)[0])
      raise RuntimeError(f"row {r} (pack {int(packs[r])}) holds {int(counts[r])} "
                         f"{templates.IMG_CONTEXT} tokens but {int(used[r])} tiles x "
                         f"{m.tokens_per_tile}: a jaxtune bug, please report it")
    rows["pixel_values"] = pixels
    rows["tile_segment_ids"] = owner

  def _failed(self, rows, row: int, seg: int, s: int, failed: list) -> None:
    """A sample whose image passed the start-up check (header) but does not decode."""
    where = self.where(s)
    if not self.skip_bad:
      raise DataError(f"{where}: {failed[0][1]} (its header passed the start-up check; only "
                      "decoding found this). Fix or replace the file, or set "
                      "data.skip_bad_samples=True to train without this sample")
    rows["labels"][row][rows["segment_ids"][row] == seg] = packing.IGNORE
    uid = int(self.sample_uid[s])
    with self._lock:
      first, new = not self._skipped, uid not in self._skipped
      self._skipped.add(uid)
      stats = self.stats
      stats["image_decode_failures"] = len(self.decoder.failures)
      stats["image_decode_skipped_samples"] = len(self._skipped)
      if new and len(stats["image_decode_failure_locations"]) < SHOWN_LOCATIONS:
        stats["image_decode_failure_locations"].append(f"{where}: {failed[0][1]}")
    if first:
      log.warning("data: %s: %s; its labels are masked and its tiles left zero "
                  "(data.skip_bad_samples=True; counted in stats['image_decode_failures'], "
                  "this warning is shown once)", where, failed[0][1])


def read_refs(corpus, specs, opts, expected_tiles: dict[int, int]) -> ImageRefs:
  """The ImageRefs of the unique lines in `expected_tiles` (u -> its tile count from the
  tokens), each line read and parsed once, at start-up."""
  files = corpus.flat_files

  def one(u: int) -> list[ImageRef]:
    src, d = files[int(corpus.u_file[u])], int(corpus.u_ds[u])
    try:
      refs = sources.sample_images(sources.decode_line(src.line(int(corpus.u_local[u]))),
                                   opts[d])
    except ValueError as e:
      raise DataError(f"{corpus.where(u, specs)}: {e} (it parsed while tokenizing: was the file "
                      "changed during the start-up?)") from None
    if sum(r.tiles for r in refs) != expected_tiles[u]:
      raise DataError(f"{corpus.where(u, specs)}: the line now has "
                      f"{sum(r.tiles for r in refs)} image tiles, {expected_tiles[u]} when it "
                      "was tokenized: was the file changed during the start-up?")
    return refs

  return ImageRefs.collect(sorted(expected_tiles), one)

"""The pipeline's stages as random-access Grain datasets, for a user to compose.

SFTData builds these over its id store (no copy of it): `samples(d)` (a dataset's tokenized
lines), `mixed()` (the packed samples in packing order), `packs(order)` (built rows). Each is a
`grain.MapDataset.source` over a small picklable sequence, so the usual Grain transforms (map,
random_map, filter, to_iter_dataset, mp_prefetch) apply to it.

A sample element: input_ids int32 [n], labels int32 [n] (shifted as in rows: labels[t] is the
target of token t, IGNORE where token t+1 is not trained and on the last token), dataset, line
(its index among the dataset's lines, files in order), index (its place in this dataset) and,
for image data, tiles. `encode` turns input_ids / labels back into the store's form.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxtune.data import encoding
from jaxtune.data.encoding import ID_MASK, TRAINED_BIT
from jaxtune.data.packing import IGNORE
from jaxtune.data.sources import DataError

_TRAINED = np.uint32(TRAINED_BIT)


def decode(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids, labels) of one sample's stored ids (trained flag in bit 31)."""
  raw = np.asarray(raw, np.uint32)
  ids = (raw & np.uint32(ID_MASK)).astype(np.int32)
  labels = np.full(len(raw), IGNORE, np.int32)
  if len(raw) > 1:
    labels[:-1] = np.where(raw[1:] >= _TRAINED, ids[1:], IGNORE)
  return ids, labels


def encode(input_ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """The stored form of a sample: ids with bit 31 set on every trained token (the first token
  is never a target, so its flag is not kept)."""
  ids = np.asarray(input_ids, np.int64)
  labels = np.asarray(labels, np.int64)
  if ids.shape != labels.shape or ids.ndim != 1:
    raise ValueError(f"input_ids {ids.shape} and labels {labels.shape} must be 1-D and alike")
  if len(ids) and (ids.min() < 0 or ids.max() > ID_MASK):
    raise ValueError("input_ids must be token ids in [0, 2**31)")
  trained = np.zeros(len(ids), bool)
  trained[1:] = labels[:-1] != IGNORE
  if np.any(trained[1:] & (labels[:-1] != ids[1:])):
    raise ValueError("labels[t] must be IGNORE or input_ids[t + 1] (labels are shifted)")
  return (ids.astype(np.uint32) | np.where(trained, _TRAINED, np.uint32(0))).astype(np.uint32)


class SampleSource:
  """Random access to samples laid out in one id array: sample k is
  tokens[starts[k]:starts[k] + lengths[k]]. Pickles with the ids it reaches (for workers)."""

  def __init__(self, tokens: np.ndarray, starts, lengths, dataset, line,
               tiles: np.ndarray | None = None):
    self.tokens = tokens
    self.starts, self.lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    self.dataset, self.line = np.asarray(dataset, np.int64), np.asarray(line, np.int64)
    self.tiles = None if tiles is None else np.asarray(tiles, np.int64)

  def __len__(self) -> int:
    return len(self.starts)

  def raw(self, k: int) -> np.ndarray:
    s = int(self.starts[k])
    return np.asarray(self.tokens[s:s + int(self.lengths[k])])

  def __getitem__(self, k: int) -> dict[str, Any]:
    k = int(k)
    if not -len(self) <= k < len(self):
      raise IndexError(f"sample {k} outside {len(self)}")
    k %= len(self)
    ids, labels = decode(self.raw(k))
    out = dict(input_ids=ids, labels=labels, dataset=int(self.dataset[k]),
               line=int(self.line[k]), index=k)
    if self.tiles is not None:
      out["tiles"] = int(self.tiles[k])
    return out

  def __getstate__(self):
    # Only the ids of these samples travel (a worker process cannot share the mapping).
    lo = int(self.starts.min(initial=0))
    hi = int((self.starts + self.lengths).max(initial=0))
    state = dict(self.__dict__)
    state["tokens"] = np.array(self.tokens[lo:hi]) if len(self) else np.zeros(0, np.uint32)
    state["starts"] = self.starts - lo
    return state


class PackSource:
  """Random access to built rows: element k is row 0 of data.pack_rows([order[k]])."""

  def __init__(self, data, order: np.ndarray | None = None):
    self.data = data
    self.order = None if order is None else np.asarray(order, np.int64)

  def __len__(self) -> int:
    return self.data.plan.num_packs if self.order is None else len(self.order)

  def __getitem__(self, k: int) -> dict[str, np.ndarray]:
    k = int(k)
    if not -len(self) <= k < len(self):
      raise IndexError(f"element {k} outside {len(self)}")
    p = k % len(self) if self.order is None else int(self.order[k])
    return {key: v[0] for key, v in self.data.pack_rows(np.array([p])).items()}


def stack_rows(rows) -> dict[str, np.ndarray]:
  """A batch of rows, keys in the rows' order (Grain's default batch_fn sorts them)."""
  return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def source(seq) -> "Any":
  import grain  # pylint: disable=import-outside-toplevel
  return grain.MapDataset.source(seq)


def apply_sample_transform(transform, tokens, occ_start, cut, occ_ds, occ_line, occ_tiles, keep,
                           filtered, occ_loss, limits):
  """Runs SFTData's sample_transform over the samples to pack (where `keep`); marks the ones
  it drops in `filtered` and updates `occ_loss` of the ones it changes, in place. Returns
  (ids, each occurrence's start in them, its length, whether any id changed): the store
  itself when no id changed, else a new in-memory array of the packed samples (a map costs a
  copy of them)."""
  import grain  # pylint: disable=import-outside-toplevel
  pos = np.flatnonzero(keep)
  src = SampleSource(tokens, occ_start[pos], cut[pos], occ_ds[pos], occ_line[pos],
                     None if occ_tiles is None else occ_tiles[pos])
  out = transform(source(src))
  if isinstance(out, grain.MapDataset):
    out = out.to_iter_dataset(grain.ReadOptions(num_threads=0))
  got: dict[int, np.ndarray | None] = {}
  for el in out:
    if not isinstance(el, dict) or "index" not in el:
      raise DataError("sample_transform must yield sample dicts that keep their `index` "
                      f"(the sample they came from), got {type(el).__name__}")
    k = int(el["index"])
    if k in got or not 0 <= k < len(src):
      raise DataError(f"sample_transform gave sample index {k} "
                      + ("twice" if k in got else f"outside the {len(src)} samples")
                      + ": each element must keep the `index` of the sample it came from")
    raw = src.raw(k)
    new = encode(el["input_ids"], el["labels"])
    same = len(new) == len(raw) and (len(raw) == 0 or (
        np.array_equal(new[1:], raw[1:]) and new[0] == raw[0] & encoding.ID_MASK))
    if not same and src.tiles is not None and src.tiles[k]:
      raise DataError(f"sample_transform changed the ids of sample {k}, which has images: "
                      "samples with images may be filtered, not changed")
    got[k] = None if same else new[:int(limits[src.dataset[k]])]
  kept = np.array(sorted(got), np.int64)
  filtered[pos] = True
  filtered[pos[kept]] = False
  if all(v is None for v in got.values()):
    return tokens, occ_start, cut, False
  parts = [src.raw(k) if got[k] is None else got[k] for k in kept.tolist()]
  lens = np.array([len(p) for p in parts], np.int64)
  filtered[pos[kept[lens == 0]]] = True             # emptied: nothing left to pack
  new_tokens = np.concatenate(parts) if parts else np.zeros(0, np.uint32)
  new_starts = np.cumsum(lens) - lens
  occ_start, cut = occ_start.copy(), cut.copy()
  occ_start[pos[kept]], cut[pos[kept]] = new_starts, lens
  occ_loss[pos[kept]] = encoding.range_sums(new_tokens >= encoding.TRAINED_BIT,
                                            new_starts + 1, new_starts + lens)
  return new_tokens, occ_start, cut, True

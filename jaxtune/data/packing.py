"""Packing samples into rows of exactly `pack_max_length` tokens, and building those rows.

A plan is a list of spans (sample, offset inside it, length) grouped into packs. Three levels:
  soft  XTuner's buffered greedy: walk the shuffled samples, fill a pack while the next sample
        fits; when it does not, fill the gap with the smallest samples of the next `buffer`
        (100) ones that fit, close the pack and start the next with the sample that did not
        fit. Samples are never split.
  hard  concatenate the stream and cut every `pack_max_length` tokens; samples may be split
        (each piece is its own segment), the tail shorter than a row is dropped.
  none  one sample per row, padded.

Images (Intern-S1): each sample may bring image tiles, and a row holds at most `max_tiles` of
them, so that the pixel batch has a static shape. soft and none respect both limits: a sample
fits a pack when its tokens and its tiles both do (the look-ahead then skips samples with too
many tiles and keeps looking, since a longer one may have none). Without tiles (or all zero)
the packs are exactly the text ones. hard cannot carry images: it splits samples.

Rows: labels are already shifted (labels[t] is the target of position t) and -100 on the last
token of every span and on padding, so nothing learns across a boundary. Segment ids are
1-based per span (0 = padding); positions restart at 0 in every span.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jaxtune.data.encoding import ID_MASK

IGNORE = -100
LEVELS = ("soft", "hard", "none")
_LOOP_SPAN = 64   # tokens: spans longer on average are copied one by one when building rows


@dataclasses.dataclass
class PackPlan:
  sample: np.ndarray    # int64 [spans]: index into the packed sample list
  offset: np.ndarray    # int64 [spans]: first token of the span inside its sample
  length: np.ndarray    # int64 [spans]
  bounds: np.ndarray    # int64 [packs + 1]: spans of pack p are bounds[p]:bounds[p+1]
  closed_by_tiles: int = 0   # soft: packs closed because the next sample's tiles did not fit

  @property
  def num_packs(self) -> int:
    return len(self.bounds) - 1

  def pack_tokens(self) -> np.ndarray:
    """Non-padding tokens of each pack."""
    cum = np.concatenate([[0], np.cumsum(self.length)])
    return cum[self.bounds[1:]] - cum[self.bounds[:-1]]

  def pack_tiles(self, tiles: np.ndarray) -> np.ndarray:
    """Image tiles of each pack, given the tiles of each sample (int64 [packs])."""
    pack_of = np.repeat(np.arange(self.num_packs), np.diff(self.bounds))
    return np.bincount(pack_of, weights=np.asarray(tiles)[self.sample],
                       minlength=self.num_packs).astype(np.int64)


def _plan(groups: list[list[int]], lengths: np.ndarray) -> PackPlan:
  sample = np.fromiter((s for g in groups for s in g), dtype=np.int64)
  bounds = np.concatenate([[0], np.cumsum([len(g) for g in groups], dtype=np.int64)])
  return PackPlan(sample, np.zeros(len(sample), np.int64), lengths[sample].astype(np.int64),
                  bounds.astype(np.int64))


def _check_tiles(tiles: np.ndarray | None, n: int, max_tiles: int | None) -> np.ndarray | None:
  """The tiles per sample (None when there are none), checked against the bound."""
  if tiles is None:
    return None
  tiles = np.asarray(tiles, dtype=np.int64)
  if len(tiles) != n:
    raise ValueError(f"{len(tiles)} tile counts for {n} samples")
  if not tiles.any():
    return None
  if max_tiles is None:
    raise ValueError("samples have image tiles: pass max_tiles (the tiles a row holds)")
  if tiles.max() > max_tiles:
    raise ValueError(f"a sample of {tiles.max()} image tiles exceeds max_tiles {max_tiles}")
  return tiles


def soft_pack(lengths: np.ndarray, pack_len: int, buffer: int = 100,
              tiles: np.ndarray | None = None, max_tiles: int | None = None) -> PackPlan:
  """Packs samples (in the given order) without splitting any; see the module docstring.
  tiles: image tiles per sample, at most `max_tiles` per pack."""
  lengths = np.asarray(lengths, dtype=np.int64)
  if len(lengths) and lengths.max() > pack_len:
    raise ValueError(f"a sample of {lengths.max()} tokens exceeds pack_max_length {pack_len}")
  n = len(lengths)
  tiles = _check_tiles(tiles, n, max_tiles)
  if tiles is None:
    return _plan(_soft_groups(lengths.tolist(), pack_len, buffer), lengths)
  groups, closed = _soft_groups_tiles(lengths.tolist(), tiles.tolist(), pack_len, int(max_tiles),
                                      buffer)
  plan = _plan(groups, lengths)
  plan.closed_by_tiles = closed
  return plan


def _look_ahead(used: bytearray, p: int, buffer: int, lens: list[int]) -> list[int]:
  """The next `buffer` unused samples after p, shortest first (XTuner's gap filling)."""
  ahead, q = [], p + 1
  while q < len(used) and len(ahead) < buffer:
    if not used[q]:
      ahead.append(q)
    q += 1
  return sorted(ahead, key=lens.__getitem__)


def _soft_groups(lens: list[int], pack_len: int, buffer: int) -> list[list[int]]:
  n = len(lens)
  used = bytearray(n)
  groups, cur, cur_len, p = [], [], 0, 0
  while p < n:
    if used[p]:
      p += 1
      continue
    if cur_len + lens[p] <= pack_len:
      cur.append(p)
      cur_len += lens[p]
      used[p] = 1
      p += 1
      continue
    gap = pack_len - cur_len
    if gap > 0 and buffer > 0:
      for q in _look_ahead(used, p, buffer, lens):
        if lens[q] > gap:
          break  # sorted: nothing larger fits either
        cur.append(q)
        used[q] = 1
        gap -= lens[q]
    groups.append(cur)
    cur, cur_len = [], 0
  if cur:
    groups.append(cur)
  return groups


def _soft_groups_tiles(lens: list[int], tl: list[int], pack_len: int, max_tiles: int,
                       buffer: int) -> tuple[list[list[int]], int]:
  """_soft_groups with a second limit, `max_tiles` tiles per pack; also returns how many
  packs were closed by it (the next sample's tokens fitted, its tiles did not)."""
  n = len(lens)
  used = bytearray(n)
  groups, cur, cur_len, cur_tiles, p, closed = [], [], 0, 0, 0, 0
  while p < n:
    if used[p]:
      p += 1
      continue
    fits_len = cur_len + lens[p] <= pack_len
    if fits_len and cur_tiles + tl[p] <= max_tiles:
      cur.append(p)
      cur_len += lens[p]
      cur_tiles += tl[p]
      used[p] = 1
      p += 1
      continue
    closed += fits_len
    gap, tile_gap = pack_len - cur_len, max_tiles - cur_tiles
    if gap > 0 and buffer > 0:
      for q in _look_ahead(used, p, buffer, lens):
        if lens[q] > gap:
          break  # sorted: nothing longer fits either
        if tl[q] > tile_gap:
          continue  # a longer sample with fewer tiles may still fit
        cur.append(q)
        used[q] = 1
        gap -= lens[q]
        tile_gap -= tl[q]
    groups.append(cur)
    cur, cur_len, cur_tiles = [], 0, 0
  if cur:
    groups.append(cur)
  return groups, closed


def none_pack(lengths: np.ndarray, pack_len: int, tiles: np.ndarray | None = None,
              max_tiles: int | None = None) -> PackPlan:
  lengths = np.asarray(lengths, dtype=np.int64)
  if len(lengths) and lengths.max() > pack_len:
    raise ValueError(f"a sample of {lengths.max()} tokens exceeds pack_max_length {pack_len}")
  _check_tiles(tiles, len(lengths), max_tiles)
  return _plan([[i] for i in range(len(lengths))], lengths)


def hard_pack(lengths: np.ndarray, pack_len: int) -> PackPlan:
  """Cuts the concatenated samples every `pack_len` tokens; the short tail is dropped."""
  lengths = np.asarray(lengths, dtype=np.int64)
  starts = np.concatenate([[0], np.cumsum(lengths)])
  packs = int(starts[-1] // pack_len)
  end = packs * pack_len
  nonempty = lengths > 0
  cuts = np.union1d(starts[:-1][nonempty], np.arange(0, end, pack_len, dtype=np.int64))
  cuts = cuts[cuts < end]
  span_end = np.append(cuts[1:], end)
  sample = np.searchsorted(starts, cuts, side="right") - 1
  # A zero-length sample shares its start with the next one; searchsorted picks the last.
  offset = cuts - starts[sample]
  pack_of = cuts // pack_len
  bounds = np.searchsorted(pack_of, np.arange(packs + 1), side="left").astype(np.int64)
  return PackPlan(sample.astype(np.int64), offset.astype(np.int64),
                  (span_end - cuts).astype(np.int64), bounds)


def make_plan(level: str, lengths: np.ndarray, pack_len: int, buffer: int = 100,
              tiles: np.ndarray | None = None, max_tiles: int | None = None) -> PackPlan:
  """tiles / max_tiles: image tiles per sample and per pack (soft and none only). `level` is
  a resolved one (config.validate turns the older 'expand_soft' into 'soft')."""
  if level == "soft":
    return soft_pack(lengths, pack_len, buffer, tiles, max_tiles)
  if level == "hard":
    if tiles is not None and np.any(tiles):
      raise ValueError("pack_level 'hard' splits samples, and so an image's tokens from its "
                       "tiles: pack samples with images with 'soft' or 'none'")
    return hard_pack(lengths, pack_len)
  if level == "none":
    return none_pack(lengths, pack_len, tiles, max_tiles)
  raise ValueError(f"unknown pack_level '{level}'; choose one of {list(LEVELS)}")


GROUP_BATCH_FACTOR = 4       # XTuner's LengthGroupedSampler: at least 4 megabatches ...
MAX_GROUP_BATCHES = 50       # ... of at most 50 global batches each


def length_grouped_order(flops: np.ndarray, batch_rows: int, group_size: int,
                         rng: np.random.Generator) -> np.ndarray:
  """XTuner's `LengthGroupedSampler` order: shuffle the packs, cut the order into megabatches
  of min(packs // (4 x batch_rows), 50) (at least 1) batches, sort each megabatch by attention
  cost (descending, stable), cut it into groups of `group_size` (the packs that run side by
  side on the data-parallel ranks) and shuffle the groups within the megabatch."""
  flops = np.asarray(flops)
  n = len(flops)
  mult = max(1, min(n // (batch_rows * GROUP_BATCH_FACTOR), MAX_GROUP_BATCHES))
  mega = mult * batch_rows
  order = rng.permutation(n)
  out = []
  for a in range(0, n, mega):
    block = order[a:a + mega]
    block = block[np.argsort(-flops[block], kind="stable")]
    groups = [block[i:i + group_size] for i in range(0, len(block), group_size)]
    out.extend(groups[g] for g in rng.permutation(len(groups)))
  return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def build_rows(plan: PackPlan, packs: np.ndarray, tokens: np.ndarray, starts: np.ndarray,
               pack_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Rows [len(packs), pack_len] of input_ids, labels, segment_ids, positions (int32).

  `tokens` holds every sample's ids (trained flag in bit 31); sample i starts at `starts[i]`.
  The rows are built at once, laid end to end: each span's tokens are copied to their place,
  the rest is a few numpy passes per batch (not per row), each writing its output in place.
  """
  tokens = np.asarray(tokens)   # a memory-mapped cache: plain slices are cheaper
  packs = np.asarray(packs, np.int64)
  rows, size = len(packs), len(packs) * pack_len
  lo, hi = plan.bounds[packs], plan.bounds[packs + 1]
  counts = hi - lo                                     # spans per row
  row_first = np.cumsum(counts) - counts               # each row's first span
  span = np.repeat(lo - row_first, counts) + np.arange(int(counts.sum()))
  lens = plan.length[span]
  first = starts[plan.sample[span]] + plan.offset[span]
  cum = np.concatenate([[0], np.cumsum(lens)])         # spans end to end (no padding)
  row_lo, row_hi = cum[row_first], cum[row_first + counts]
  row = np.repeat(np.arange(rows), counts)
  dest = row * pack_len + cum[:-1] - row_lo[row]       # where each span starts in the rows
  fill = (row_hi - row_lo).tolist()                    # tokens per row; the rest is padding

  # One slot past the end (untrained padding): labels are then raw[1:] with no copy.
  raw = np.empty(size + 1, np.uint32)
  if len(span) * _LOOP_SPAN <= cum[-1]:                # long spans: join each row's slices
    pieces = [tokens[f:f + n] for f, n in zip(first.tolist(), lens.tolist())]
    for r, (a, n) in enumerate(zip(row_first.tolist(), counts.tolist())):
      if n:
        np.concatenate(pieces[a:a + n], out=raw[r * pack_len:r * pack_len + fill[r]])
  else:                                                # many short spans: one gather
    stream = tokens[np.repeat(first - cum[:-1], lens) + np.arange(int(cum[-1]))]
    for r, (a, b) in enumerate(zip(row_lo.tolist(), row_hi.tolist())):
      raw[r * pack_len:r * pack_len + b - a] = stream[a:b]
  for r, n in enumerate(fill):
    raw[r * pack_len + n:(r + 1) * pack_len] = pad_id
  raw[size] = pad_id

  signed = raw.view(np.int32)
  # labels[t] = the id of token t+1 if it is trained (bit 31 set), else IGNORE: flipping bit 31
  # leaves trained ids as they are and makes the others far below IGNORE.
  labels = np.bitwise_xor(signed[1:], np.int32(-2**31))
  np.maximum(labels, np.int32(IGNORE), out=labels)
  labels[pack_len - 1::pack_len] = IGNORE             # a row's last column: next is another row
  labels[dest + lens - 1] = IGNORE                     # last token of every span: no target
  ids = np.bitwise_and(signed, np.int32(ID_MASK), out=signed)[:size]
  # Segment ids and positions: each row's padding is one more span, of segment 0, whose
  # positions are zeroed afterwards.
  pad = pack_len - np.asarray(fill, np.int64)
  at = row_first + counts + np.arange(rows)            # the padding spans, among all spans
  all_lens = np.empty(len(span) + rows, np.int64)
  all_seg = np.zeros(len(span) + rows, np.int32)
  is_span = np.ones(len(all_lens), bool)
  is_span[at] = False
  all_lens[at], all_lens[is_span] = pad, lens
  all_seg[is_span] = np.arange(1, len(span) + 1) - row_first[row]
  segment_ids = np.repeat(all_seg, all_lens)
  begin = (np.cumsum(all_lens) - all_lens).astype(np.int32)
  positions = np.repeat(begin, all_lens)
  np.subtract(_arange(size), positions, out=positions)
  for r, n in enumerate(fill):
    positions[r * pack_len + n:(r + 1) * pack_len] = 0
  return {"input_ids": ids.reshape(rows, pack_len), "labels": labels.reshape(rows, pack_len),
          "segment_ids": segment_ids.reshape(rows, pack_len),
          "positions": positions.reshape(rows, pack_len)}


def tile_slots(plan: PackPlan, packs: np.ndarray, tiles: np.ndarray,
               max_tiles: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
  """Where the image tiles of rows `packs` go: (tile_segment_ids int32 [rows, max_tiles]: the
  segment id (as build_rows numbers them, 1-based) of the sample owning each slot, 0 unused;
  [(row, segment, sample, first slot)] of every span with tiles).

  Slots follow the row's image tokens: spans in order, each span's tiles contiguous.
  """
  packs = np.asarray(packs, np.int64)
  owner = np.zeros((len(packs), max_tiles), np.int32)
  owned = []
  for row, p in enumerate(packs.tolist()):
    slot = 0
    lo, hi = int(plan.bounds[p]), int(plan.bounds[p + 1])
    for seg, s in enumerate(plan.sample[lo:hi].tolist(), start=1):
      n = int(tiles[s])
      if n == 0:
        continue
      if slot + n > max_tiles:
        raise ValueError(f"pack {p} holds more than max_tiles={max_tiles} image tiles")
      owner[row, slot:slot + n] = seg
      owned.append((row, seg, s, slot))
      slot += n
  return owner, owned


@functools.lru_cache(maxsize=4)
def _arange(size: int) -> np.ndarray:
  out = np.arange(size, dtype=np.int32)
  out.flags.writeable = False
  return out

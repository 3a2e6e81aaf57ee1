"""Packing samples into rows of exactly `pack_max_length` tokens, and building those rows.

A plan is a list of spans (sample, offset inside it, length) grouped into packs. Three levels:
  soft  XTuner's buffered greedy: walk the shuffled samples, fill a pack while the next sample
        fits; when it does not, fill the gap with the smallest samples of the next `buffer`
        (100) ones that fit, close the pack and start the next with the sample that did not
        fit. Samples are never split.
  hard  concatenate the stream and cut every `pack_max_length` tokens; samples may be split
        (each piece is its own segment), the tail shorter than a row is dropped.
  none  one sample per row, padded.

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

  @property
  def num_packs(self) -> int:
    return len(self.bounds) - 1

  def pack_tokens(self) -> np.ndarray:
    """Non-padding tokens of each pack."""
    cum = np.concatenate([[0], np.cumsum(self.length)])
    return cum[self.bounds[1:]] - cum[self.bounds[:-1]]


def _plan(groups: list[list[int]], lengths: np.ndarray) -> PackPlan:
  sample = np.fromiter((s for g in groups for s in g), dtype=np.int64)
  bounds = np.concatenate([[0], np.cumsum([len(g) for g in groups], dtype=np.int64)])
  return PackPlan(sample, np.zeros(len(sample), np.int64), lengths[sample].astype(np.int64),
                  bounds.astype(np.int64))


def soft_pack(lengths: np.ndarray, pack_len: int, buffer: int = 100) -> PackPlan:
  """Packs samples (in the given order) without splitting any; see the module docstring."""
  lengths = np.asarray(lengths, dtype=np.int64)
  if len(lengths) and lengths.max() > pack_len:
    raise ValueError(f"a sample of {lengths.max()} tokens exceeds pack_max_length {pack_len}")
  n = len(lengths)
  lens = lengths.tolist()
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
      ahead, q = [], p + 1
      while q < n and len(ahead) < buffer:
        if not used[q]:
          ahead.append(q)
        q += 1
      for q in sorted(ahead, key=lens.__getitem__):
        if lens[q] > gap:
          break  # sorted: nothing larger fits either
        cur.append(q)
        used[q] = 1
        gap -= lens[q]
    groups.append(cur)
    cur, cur_len = [], 0
  if cur:
    groups.append(cur)
  return _plan(groups, lengths)


def none_pack(lengths: np.ndarray, pack_len: int) -> PackPlan:
  lengths = np.asarray(lengths, dtype=np.int64)
  if len(lengths) and lengths.max() > pack_len:
    raise ValueError(f"a sample of {lengths.max()} tokens exceeds pack_max_length {pack_len}")
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


def make_plan(level: str, lengths: np.ndarray, pack_len: int, buffer: int = 100) -> PackPlan:
  if level in ("soft", "expand_soft"):
    return soft_pack(lengths, pack_len, buffer)
  if level == "hard":
    return hard_pack(lengths, pack_len)
  if level == "none":
    return none_pack(lengths, pack_len)
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


@functools.lru_cache(maxsize=4)
def _arange(size: int) -> np.ndarray:
  out = np.arange(size, dtype=np.int32)
  out.flags.writeable = False
  return out

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

import numpy as np

from jaxtune.data.encoding import ID_MASK

IGNORE = -100
LEVELS = ("soft", "hard", "none")


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


def build_rows(plan: PackPlan, packs: np.ndarray, tokens: np.ndarray, starts: np.ndarray,
               pack_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Rows [len(packs), pack_len] of input_ids, labels, segment_ids, positions (int32).

  `tokens` holds every sample's ids (trained flag in bit 31); sample i starts at `starts[i]`.
  """
  rows = len(packs)
  out = {
      "input_ids": np.full((rows, pack_len), pad_id, np.int32),
      "labels": np.full((rows, pack_len), IGNORE, np.int32),
      "segment_ids": np.zeros((rows, pack_len), np.int32),
      "positions": np.zeros((rows, pack_len), np.int32),
  }
  for r, p in enumerate(packs):
    lo, hi = plan.bounds[p], plan.bounds[p + 1]
    first = starts[plan.sample[lo:hi]] + plan.offset[lo:hi]
    lens = plan.length[lo:hi]
    n = int(lens.sum())
    if n == 0:
      continue
    idx = np.repeat(first - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(n)
    raw = tokens[idx]
    ids = (raw & ID_MASK).astype(np.int32)
    trained = raw >= np.uint32(1 << 31)
    span_start = np.concatenate([[0], np.cumsum(lens)[:-1]])
    labels = np.full(n, IGNORE, np.int32)
    labels[:-1] = np.where(trained[1:], ids[1:], IGNORE)
    labels[span_start[1:] - 1] = IGNORE   # last token of every span but the final one
    labels[n - 1] = IGNORE
    out["input_ids"][r, :n] = ids
    out["labels"][r, :n] = labels
    out["segment_ids"][r, :n] = np.repeat(np.arange(1, len(lens) + 1, dtype=np.int32), lens)
    out["positions"][r, :n] = np.arange(n, dtype=np.int32) - np.repeat(span_start, lens)
  return out

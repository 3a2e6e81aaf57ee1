"""JSONL lines -> token ids + trained mask, in worker processes.

One pass: parse, validate, render the template, encode, keep the ids (XTuner counts tokens in
one pass, throws the ids away and tokenizes again while training; jaxtune tokenizes once).

Results are compact: one flat uint32 array per chunk holding every sample's ids with the
trained flag in bit 31, plus each sample's length.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import mmap
import multiprocessing
import os
import sys
import types
from typing import Sequence

import numpy as np

from jaxtune.data import sources, templates
from jaxtune.data.tokenizer import TokenEncoder

log = logging.getLogger(__name__)
TRAINED_BIT = np.uint32(1 << 31)
# Below this many lines (or bytes of JSONL), starting worker processes costs more than it saves.
MIN_LINES_FOR_WORKERS = 4000
MIN_BYTES_FOR_WORKERS = 8 << 20
ID_MASK = np.uint32((1 << 31) - 1)


@dataclasses.dataclass(frozen=True)
class EncodeJob:
  """What shapes the tokens of a line besides the line itself and the tokenizer."""
  template: str
  opts: sources.ParseOptions


@dataclasses.dataclass
class EncodedChunk:
  tokens: np.ndarray          # uint32: id | trained << 31, samples back to back
  lengths: np.ndarray         # int64 per line (0 for a bad line)
  loss: np.ndarray            # int64 per line: trained tokens after the first (label count)
  images: np.ndarray          # int64 per line: <IMG_CONTEXT> tokens
  bad: list[tuple[int, str]]  # (position in the chunk, what is wrong)

  @classmethod
  def build(cls, tokens: np.ndarray, lengths: np.ndarray, bad, image_id: int | None):
    starts = np.cumsum(lengths) - lengths
    loss = range_sums(tokens >= TRAINED_BIT, starts + 1, starts + lengths)
    images = (range_sums((tokens & ID_MASK) == image_id, starts, starts + lengths)
              if image_id is not None else np.zeros(len(lengths), np.int64))
    return cls(tokens, lengths, loss, images, bad)


def range_sums(flags: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
  """Set flags in each [lo, hi): ranges sorted and not overlapping (repeats allowed)."""
  lo = np.minimum(np.asarray(lo, np.int64), len(flags))
  hi = np.minimum(np.asarray(hi, np.int64), len(flags))
  if len(lo) == 0:
    return np.zeros(0, np.int64)
  padded = np.append(flags, False).view(np.uint8)
  uniq, back = np.unique(np.stack([lo, np.maximum(lo, hi)], 1), axis=0, return_inverse=True)
  sums = np.add.reduceat(padded, uniq.reshape(-1), dtype=np.int64)[0::2]
  sums[uniq[:, 0] >= uniq[:, 1]] = 0      # reduceat gives flags[lo] for an empty range
  return sums[back.reshape(-1)]


def encode_lines(encoder: TokenEncoder, job: EncodeJob, path: str,
                 spans: np.ndarray) -> EncodedChunk:
  """Encodes the lines at byte `spans` ([n, 2]) of `path`; bad lines are recorded, not raised
  (the caller decides, so the first bad line in file order is the one reported)."""
  template = templates.get_template(job.template)
  lengths, bad = np.zeros(len(spans), np.int64), []
  chunks, flags, sizes = [], [], []   # every piece of the chunk, joined once at the end
  image_id = encoder.added.get(templates.IMG_CONTEXT)
  if len(spans) == 0:
    return EncodedChunk.build(np.zeros(0, np.uint32), lengths, bad, image_id)
  parse, render, encode = sources.parse_sample, templates.render, encoder.encode_bytes
  opts = job.opts
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
    for k, (start, end) in enumerate(spans.tolist()):
      try:
        messages, tools = parse(sources.decode_line(data[start:end]), opts)
        pieces = render(messages, template, tools)
        encoded = [encode(p.text) if not p.image_tokens else
                   np.asarray(templates.encode([p], template, encoder)[0], np.uint32).tobytes()
                   for p in pieces]
      except (ValueError, KeyError) as e:
        bad.append((k, str(e)))
        continue
      piece_sizes = [len(b) >> 2 for b in encoded]
      n = sum(piece_sizes)
      if n == 0:
        bad.append((k, "the sample renders to no tokens"))
        continue
      chunks.extend(encoded)
      flags.extend([p.trained for p in pieces])
      sizes.extend(piece_sizes)
      lengths[k] = n
  tokens = np.frombuffer(b"".join(chunks), dtype=np.uint32).copy()
  if len(tokens):
    tokens |= np.repeat(np.where(flags, TRAINED_BIT, np.uint32(0)), sizes)
  return EncodedChunk.build(tokens, lengths, bad, image_id)


_WORKER_ENCODER: TokenEncoder | None = None


def _init_worker(encoder: TokenEncoder) -> None:
  global _WORKER_ENCODER  # pylint: disable=global-statement
  _WORKER_ENCODER = encoder
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _work(args) -> EncodedChunk:
  return encode_lines(_WORKER_ENCODER, *args)


def available_cpus() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def resolve_workers(num_workers: int) -> int:
  """data.num_workers: 0 sizes the pool from the CPUs this process may use."""
  return max(1, num_workers if num_workers > 0 else available_cpus())


@dataclasses.dataclass(frozen=True)
class Task:
  job: EncodeJob
  path: str
  spans: np.ndarray


def _ready() -> bool:
  return True


class EncoderPool:
  """`num_workers` tokenizing in parallel: this process plus `num_workers - 1` worker
  processes, started on demand or early (`start`) so they warm up meanwhile.

  Workers are spawned (not forked: the caller may already run JAX's threads, which fork would
  break) without re-importing the caller's `__main__`: they need only jaxtune, and a script
  without an `if __name__ == "__main__":` guard (or code piped to stdin) would otherwise be run
  again, or fail, in every worker.
  """

  def __init__(self, encoder: TokenEncoder, num_workers: int):
    self.encoder, self.num_workers = encoder, num_workers
    self._pool: cf.ProcessPoolExecutor | None = None

  def __enter__(self) -> "EncoderPool":
    return self

  def __exit__(self, *exc) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

  def start(self) -> None:
    if self._pool is not None or self.num_workers <= 1:
      return
    spawned = self.num_workers - 1   # this process is the last worker
    pool = cf.ProcessPoolExecutor(spawned, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_init_worker, initargs=(self.encoder,))
    main = sys.modules["__main__"]
    # A spawned child re-imports the parent's __main__ unless it has neither __spec__ nor
    # __file__. Each submit below starts one worker now, while a bare stand-in is in place.
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
      for _ in range(spawned):
        pool.submit(_ready)
    finally:
      sys.modules["__main__"] = main
    self._pool = pool

  def run(self, tasks: Sequence[Task]) -> list[EncodedChunk]:
    """Encodes tasks, in order; in this process when there is little work."""
    lines = sum(len(t.spans) for t in tasks)
    if self._pool is None and (self.num_workers <= 1 or lines < MIN_LINES_FOR_WORKERS):
      return [encode_lines(self.encoder, t.job, t.path, t.spans) for t in tasks]
    self.start()
    futures = [self._pool.submit(_work, (t.job, t.path, t.spans)) for t in tasks]
    results: list[EncodedChunk | None] = [None] * len(tasks)
    # Meanwhile this process works from the other end on tasks no worker has taken yet, so it
    # is busy from the first second (a spawned worker needs ~1 s to start).
    for i in range(len(tasks) - 1, -1, -1):
      if not futures[i].cancel():
        break
      results[i] = encode_lines(self.encoder, tasks[i].job, tasks[i].path, tasks[i].spans)
    try:
      for i, future in enumerate(futures):
        if results[i] is None:
          results[i] = future.result()
    except cf.process.BrokenProcessPool as e:
      # A worker died (e.g. killed for memory): slower, but correct.
      log.warning("data: tokenizer worker processes failed (%s); tokenizing in this process "
                  "instead.", e)
      self._pool = None
      results = [r if r is not None else encode_lines(self.encoder, t.job, t.path, t.spans)
                 for r, t in zip(results, tasks)]
    return results


def split_tasks(job: EncodeJob, path: str, spans: np.ndarray, chunk_lines: int) -> list[Task]:
  return [Task(job, path, spans[i:i + chunk_lines]) for i in range(0, len(spans), chunk_lines)]

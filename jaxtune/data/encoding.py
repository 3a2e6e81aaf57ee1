"""JSONL lines -> token ids + trained mask, in worker processes.

One pass: parse, validate, render the template, encode, keep the ids (XTuner counts tokens in
one pass, throws the ids away and tokenizes again while training; jaxtune tokenizes once).

Results are compact: one flat uint32 array per chunk holding every sample's ids with the
trained flag in bit 31, plus each sample's length. With worker processes, every process appends
its chunks' ids to one shared file (the store) instead: the parent then maps that file and holds
every id once, with no copy to join them (the chunks land in the order they finish, so each
line's ids are found through its start, not by position).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import logging
import mmap
import multiprocessing
import os
import pickle
import sys
import tempfile
import threading
import types
from typing import Sequence

import numpy as np

from jaxtune.data import images, sources, templates
from jaxtune.data.tokenizer import TokenEncoder

log = logging.getLogger(__name__)
TRAINED_BIT = np.uint32(1 << 31)
# Below this many lines (or bytes of JSONL), starting worker processes costs more than it saves.
MIN_LINES_FOR_WORKERS = 4000
MIN_BYTES_FOR_WORKERS = 8 << 20
ID_MASK = np.uint32((1 << 31) - 1)
_LONG = 1 << 16          # max_id_in: a run of ids this long is read as slices
_CHUNK = 1 << 24         # ids of one slice read (and masked) at once: 64 MiB
_GATHER = 1 << 22        # ids of short runs gathered at once (with a 32 MiB index)


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
  stored_at: int | None = None  # where the ids went in the pool's store (then `tokens` is empty)
  # Bad lines whose problem is an image file (missing, unreadable, another size), not the
  # line: a cached entry rechecks them, since fixing the file does not change the cache key.
  recheck: list[int] = dataclasses.field(default_factory=list)

  @classmethod
  def build(cls, tokens: np.ndarray, lengths: np.ndarray, bad, image_id: int | None,
            loss: np.ndarray | None = None, recheck: list[int] | None = None):
    starts = np.cumsum(lengths) - lengths
    if loss is None:
      loss = range_sums(tokens >= TRAINED_BIT, starts + 1, starts + lengths)
    images = (range_sums((tokens & ID_MASK) == image_id, starts, starts + lengths)
              if image_id is not None else np.zeros(len(lengths), np.int64))
    return cls(tokens, lengths, loss, images, bad, recheck=list(recheck or ()))


def range_sums(flags: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
  """Set flags in each [lo, hi): ranges sorted and not overlapping (repeats allowed)."""
  lo = np.minimum(np.asarray(lo, np.int64), len(flags))
  hi = np.minimum(np.asarray(hi, np.int64), len(flags))
  if len(lo) == 0:
    return np.zeros(0, np.int64)
  if np.count_nonzero(flags) <= len(flags) >> 6:
    # Few set (e.g. image tokens): count them by position. reduceat below casts per range and
    # can cost ~0.1 s for 10^4 ranges over 10^6 flags.
    at = np.flatnonzero(flags)
    return (np.searchsorted(at, np.maximum(lo, hi)) - np.searchsorted(at, lo)).astype(np.int64)
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
  lengths, bad, recheck = np.zeros(len(spans), np.int64), [], []
  chunks, flags, sizes = [], [], []   # id bytes of every piece, its flag and token count
  image_id = encoder.added.get(templates.IMG_CONTEXT)
  if len(spans) == 0:
    return EncodedChunk.build(np.zeros(0, np.uint32), lengths, bad, image_id)
  table = templates.splice_table(template, encoder)
  fast = _Spliced(template, encoder, table) if table is not None else None
  decode, opts = sources.decode_line, job.opts
  marks = np.zeros(len(spans), np.int64)   # pieces appended once each line is done
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
    for k, (start, end) in enumerate(spans.tolist()):
      at_chunk, at_piece = len(chunks), len(sizes)
      try:
        obj = decode(data[start:end])
        n = fast(obj, chunks, flags, sizes) if fast is not None else None
        if n is None:
          n = _encode_general(obj, opts, template, encoder, chunks, flags, sizes)
      except (ValueError, KeyError) as e:
        bad.append((k, str(e)))
        if isinstance(e, images.ImageError):
          recheck.append(k)
        del chunks[at_chunk:], flags[at_piece:], sizes[at_piece:]
      else:
        if n == 0:
          bad.append((k, "the sample renders to no tokens"))
        lengths[k] = n
      marks[k] = len(sizes)
  buf = bytearray().join(chunks)          # writable: the flags are or-ed in place
  tokens = np.frombuffer(buf, dtype=np.uint32) if buf else np.zeros(0, np.uint32)
  sizes_a, flags_a = np.asarray(sizes, np.int64), np.asarray(flags, bool)
  if len(tokens):
    tokens |= np.repeat(np.where(flags_a, TRAINED_BIT, np.uint32(0)), sizes_a)
  return EncodedChunk.build(tokens, lengths, bad, image_id,
                            _label_counts(sizes_a, flags_a, marks), recheck)


def max_id_in(tokens: np.ndarray, starts, lengths) -> int:
  """The largest id (trained flag masked off) among tokens[starts[k]:starts[k] + lengths[k]]
  for every k; -1 when there is none.

  Only those ranges are read: the id store can have unmapped gaps between its files
  (jaxtune.data.idstore). Overlapping and adjacent ranges are merged first; long ones are read
  as slices, the short rest gathered in bounded batches.
  """
  starts = np.asarray(starts, np.int64)
  lengths = np.asarray(lengths, np.int64)
  keep = lengths > 0
  starts, ends = starts[keep], starts[keep] + lengths[keep]
  if not len(starts):
    return -1
  order = np.argsort(starts, kind="stable")
  starts, ends = starts[order], ends[order]
  reach = np.maximum.accumulate(ends)
  first = np.ones(len(starts), bool)
  first[1:] = starts[1:] > reach[:-1]
  heads = np.flatnonzero(first)
  lo, hi = starts[heads], np.maximum.reduceat(ends, heads)
  sizes = hi - lo
  mask = ID_MASK
  best = -1
  for k in np.flatnonzero(sizes >= _LONG):
    for a in range(int(lo[k]), int(hi[k]), _CHUNK):
      best = max(best, int((tokens[a:min(a + _CHUNK, int(hi[k]))] & mask).max()))
  short = np.flatnonzero(sizes < _LONG)
  if len(short):
    total = np.cumsum(sizes[short])
    cuts = np.searchsorted(total, np.arange(_GATHER, int(total[-1]), _GATHER), side="right")
    for group in np.split(short, cuts):
      if not len(group):
        continue
      n = sizes[group]
      offsets = np.cumsum(n) - n
      index = np.repeat(lo[group] - offsets, n) + np.arange(int(n.sum()), dtype=np.int64)
      best = max(best, int((np.asarray(tokens[index]) & mask).max()))
  return best


def _label_counts(sizes: np.ndarray, flags: np.ndarray, marks: np.ndarray) -> np.ndarray:
  """Per line: trained tokens after its first, from its pieces' sizes and trained flags."""
  line = np.repeat(np.arange(len(marks)), np.diff(marks, prepend=0))
  trained = np.bincount(line, weights=sizes * flags, minlength=len(marks)).astype(np.int64)
  nonempty = np.flatnonzero(sizes > 0)
  lines, first = np.unique(line[nonempty], return_index=True)
  trained[lines] -= flags[nonempty[first]]   # the first token has no label
  return trained


def _encode_general(obj, opts: sources.ParseOptions, template: templates.ChatTemplate,
                    encoder: TokenEncoder, chunks: list, flags: list, sizes: list) -> int:
  """Any sample: validate (image files too: header only), render into pieces, encode each;
  appends only on success."""
  messages, tools = sources.parse_sample(obj, opts, check_images=True)
  pieces = templates.render(messages, template, tools, encoder.eos_token)
  encoded = [encoder.encode_bytes(p.text) if not p.image_tokens else
             np.asarray(templates.encode([p], template, encoder)[0], np.uint32).tobytes()
             for p in pieces]
  piece_sizes = [len(b) >> 2 for b in encoded]
  chunks.extend(encoded)
  flags.extend([p.trained for p in pieces])
  sizes.extend(piece_sizes)
  return sum(piece_sizes)


class _Spliced:
  """The common sample (string contents; no tools, tool calls or images) encoded straight from
  the decoded JSON: no Message or Piece objects, and each message's constant template ids
  spliced around its encoded text (templates.splice_table). The pieces come from
  `templates.plan`, the same rules the general path renders, so the ids and flags are exactly
  its; returns None, having appended nothing, for any other sample."""

  def __init__(self, template: templates.ChatTemplate, encoder: TokenEncoder,
               table: dict[str, templates.Splice]):
    self.template, self.table, self.encode = template, table, encoder.encode_bytes
    self.eos = encoder.eos_token
    # An encoder whose state can run past a message's end (Intern-S1's domain tags) says
    # which texts leave it as they found it; the others are encoded whole by the general path.
    self.splice_safe = getattr(encoder, "splice_safe", None)
    self.constant: dict[tuple, bytes] = {}   # ids of inserted pieces (separator, eos, system)

  def _constant(self, role: str | None, text: str) -> bytes:
    key = (role, text)
    if key not in self.constant:
      whole = text if role is None else self.template.wrap(role, text)
      self.constant[key] = bytes(self.encode(whole))
    return self.constant[key]

  def __call__(self, obj, chunks: list, flags: list, sizes: list) -> int | None:
    table = self.table
    if type(obj) is dict:
      msgs = obj.get("messages", obj.get("dialogs"))
      if msgs is None:
        text = obj.get("content", obj.get("text"))
        if type(text) is not str:
          return None
        msgs = ({"role": "pretrain", "content": text},)
      elif obj.get("tools") is not None:
        return None
    else:
      msgs = obj
    if type(msgs) not in (list, tuple) or not msgs:
      return None
    triples = []
    for m in msgs:
      if type(m) is not dict:
        return None
      role, text = m.get("role"), m.get("content")
      if type(role) is not str or role not in table or type(text) is not str \
          or templates.IMG_CONTEXT in text or (self.splice_safe and not self.splice_safe(text)):
        return None
      loss = None
      if len(m) > 2:
        loss = m.get("loss")
        if m.get("tool_calls") or type(loss) not in (bool, type(None)):
          return None
      triples.append((role, text, loss))
    n, encode = 0, self.encode
    for p in templates.plan(triples, self.template, None, self.eos):
      if p.message is None:
        body = self._constant(p.role, p.text)
        chunks.append(body)
        size = len(body) >> 2
      else:
        s = table[p.role]
        body = encode(s.pre + p.text + s.post)
        chunks += (s.head, body, s.tail)
        size = s.fixed + (len(body) >> 2)
      flags.append(p.trained)
      sizes.append(size)
      n += size
    return n


_WORKER_ENCODER: TokenEncoder | None = None
_STORE_FDS: dict[str, int] = {}   # store path -> this process's append descriptor


def _init_worker(encoder: TokenEncoder | str) -> None:
  """`encoder` itself, or the path of a file holding it pickled (see EncoderPool.start)."""
  global _WORKER_ENCODER  # pylint: disable=global-statement
  if isinstance(encoder, str):
    with open(encoder, "rb") as f:
      encoder = pickle.load(f)
  _WORKER_ENCODER = encoder
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def store_chunk(chunk: EncodedChunk, store: str) -> EncodedChunk:
  """Appends the chunk's ids to the store file and records where they went.

  Every process opens the file with O_APPEND: each write lands whole at the end of the file,
  and this descriptor's offset afterwards tells where (descriptors are per process, so no other
  writer moves it). When the file cannot take them (disk full), the ids stay in the chunk: a
  worker's then come back through the result pipe, slower but correct."""
  if not chunk.tokens.nbytes:
    return chunk
  data = chunk.tokens.data.cast("B")
  try:
    fd = _STORE_FDS.get(store)
    if fd is None:
      fd = _STORE_FDS[store] = os.open(store, os.O_WRONLY | os.O_APPEND)
    written = os.write(fd, data)
  except OSError:
    return chunk
  at = os.lseek(fd, 0, os.SEEK_CUR) - written
  # A short write leaves unused bytes that the next chunks land after; if they broke the 4-byte
  # alignment, those chunks stay in memory too.
  if written != len(data) or at % 4:
    return chunk
  chunk.stored_at = at // 4
  chunk.tokens = np.zeros(0, np.uint32)
  return chunk


def _forget_store(store: str) -> None:
  fd = _STORE_FDS.pop(store, None)
  if fd is not None:
    os.close(fd)


def _work(job: EncodeJob, path: str, spans: np.ndarray, store: str | None) -> EncodedChunk:
  """Encodes in a worker. With a store, the ids go back through it: ~3 fewer copies of them
  than pickling them through the result pipe, and no unpickling in the parent (whose main
  thread is tokenizing too)."""
  chunk = encode_lines(_WORKER_ENCODER, job, path, spans)
  return store_chunk(chunk, store) if store is not None else chunk


def map_store(path: str) -> np.ndarray:
  """The store's ids, read-only, straight from the page cache (no copy). The file is unlinked:
  the mapping keeps it alive as long as the array is."""
  with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size // 4 * 4   # a short write may leave a ragged end
    mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else b""
  with contextlib.suppress(OSError):
    os.unlink(path)
  return np.frombuffer(mapped, np.uint32) if size else np.zeros(0, np.uint32)


def join_tokens(chunks: Sequence[EncodedChunk],
                store: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  """(ids, start of each line's ids in them) of chunks, their lines in order.

  Chunks all in `store` (the mapped store file) are not copied; otherwise every id is copied,
  in line order, into one new array."""
  local = [np.cumsum(c.lengths) - c.lengths for c in chunks]
  if not chunks:
    return np.zeros(0, np.uint32), np.zeros(0, np.int64)
  if store is not None and all(c.stored_at is not None or not c.tokens.nbytes for c in chunks):
    starts = np.concatenate([(c.stored_at or 0) + s for c, s in zip(chunks, local)])
    return store, starts.astype(np.int64)
  parts = [store[c.stored_at:c.stored_at + int(c.lengths.sum())] if c.stored_at is not None
           else c.tokens for c in chunks]
  base = np.cumsum([0] + [len(p) for p in parts[:-1]])
  tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)
  return tokens, np.concatenate([b + s for b, s in zip(base, local)]).astype(np.int64)


def _close(pool: cf.ProcessPoolExecutor | None, state: str | None, store: str | None) -> None:
  if pool is not None:
    pool.shutdown(wait=True, cancel_futures=True)
  for path in (state, store):
    if path is not None:
      with contextlib.suppress(OSError):
        os.unlink(path)


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
    self._state: str | None = None   # the pickled encoder, for workers to start from
    self._store: str | None = None   # the file every process appends its ids to

  def __enter__(self) -> "EncoderPool":
    return self

  def __exit__(self, *exc) -> None:
    # Joining the workers takes ~0.1 s and the encoder file must outlive their start-up: both
    # happen in the background.
    if self._store is not None:
      _forget_store(self._store)
    if self._pool is not None or self._state is not None or self._store is not None:
      threading.Thread(target=_close, args=(self._pool, self._state, self._store),
                       name="jaxtune-encoder-pool-close").start()
    self._pool = self._state = self._store = None

  def _encoder_arg(self) -> TokenEncoder | str:
    """The encoder (~2 MB pickled) goes through a file: handed to a spawned worker directly,
    it would be written into the worker's start-up pipe, which blocks this process until the
    worker has started Python and reads it (~0.2 s)."""
    try:
      fd, self._state = tempfile.mkstemp(prefix="jaxtune-encoder-", suffix=".pkl")
      with os.fdopen(fd, "wb") as f:
        pickle.dump(self.encoder, f, protocol=pickle.HIGHEST_PROTOCOL)
      return self._state
    except OSError:
      return self.encoder

  def start(self) -> None:
    if self._pool is not None or self.num_workers <= 1:
      return
    spawned = self.num_workers - 1   # this process is the last worker
    with contextlib.suppress(OSError):
      fd, self._store = tempfile.mkstemp(prefix="jaxtune-tokens-", suffix=".u32")
      os.close(fd)
    pool = cf.ProcessPoolExecutor(spawned, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_init_worker, initargs=(self._encoder_arg(),))
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
    """Encodes tasks, in order; in this process when there is little work. With workers, the
    ids are in the store: `join_tokens(chunks, pool.mapped_store())` collects them."""
    lines = sum(len(t.spans) for t in tasks)
    if self._pool is None and (self.num_workers <= 1 or lines < MIN_LINES_FOR_WORKERS):
      return [encode_lines(self.encoder, t.job, t.path, t.spans) for t in tasks]
    self.start()
    futures = [self._pool.submit(_work, t.job, t.path, t.spans, self._store) for t in tasks]
    results: list[EncodedChunk | None] = [None] * len(tasks)
    # Meanwhile this process works from the other end on tasks no worker has taken yet, so it
    # is busy from the first second (a spawned worker needs ~1 s to start).
    for i in range(len(tasks) - 1, -1, -1):
      if not futures[i].cancel():
        break
      results[i] = encode_lines(self.encoder, tasks[i].job, tasks[i].path, tasks[i].spans)
      if self._store is not None:
        store_chunk(results[i], self._store)
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

  def mapped_store(self) -> np.ndarray | None:
    """The ids `run` put in the store, mapped (see map_store); None without a store."""
    if self._store is None:
      return None
    _forget_store(self._store)
    mapped = map_store(self._store)   # unlinks it; if this fails, closing the pool does
    self._store = None
    return mapped


def split_tasks(job: EncodeJob, path: str, spans: np.ndarray, chunk_lines: int) -> list[Task]:
  return [Task(job, path, spans[i:i + chunk_lines]) for i in range(0, len(spans), chunk_lines)]

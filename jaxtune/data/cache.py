"""Tokenized lines, kept per JSONL file, in memory and (with `data.cache_dir`) on disk.

An entry holds the ids + trained mask of a set of a file's lines and which lines were bad. Its
key hashes everything that shapes those tokens: the file's content, the tokenizer, the chat
template, the parse options (media_root, tiling limits) and the source code of the modules that
produce the ids (`CODE_MODULES`: any edit to them invalidates every entry). So a
second start with the same inputs loads the ids instead of tokenizing (the counting pass and
the tokenization are one pass in jaxtune), and a change to one file, the tokenizer, a template
or a parameter invalidates exactly the entries it affects. Sample ratio, seed, truncation and
packing are applied after the cache, so changing them reuses every entry.

Image files are not in the key (hashing every image would cost more than the cache saves): a
line found bad because of its image file (missing, unreadable, another size than image_wh) is
marked in its entry and checked again whenever the entry is reused, so fixing the file takes
effect at the next start; an image that breaks after its line was cached is caught when it is
loaded for a batch (SFTData: a DataError, or the sample skipped with data.skip_bad_samples).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time

import numpy as np

from jaxtune.data import templates
from jaxtune.data.encoding import EncodedChunk, EncodeJob, join_tokens
from jaxtune.data.idstore import FileIds
from jaxtune.data.sources import SourceFile

TOKENS_FILE = "tokens.u32"   # an entry's ids, raw uint32 (id | trained << 31), line order
STALE_SECONDS = 3600         # a partial entry (.tmp-*) this old was left by a crash

# The modules whose code (and constants) produce the ids and the entry's layout: the key hashes
# their source files' bytes, so any change to them invalidates the cache (no version to bump).
CODE_MODULES = ("jaxtune.data.sources", "jaxtune.data.images", "jaxtune.data.templates",
                "jaxtune.data.encoding", "jaxtune.data.tokenizer", "jaxtune.data.tokenizer_files",
                "jaxtune.data.intern_s1_tokenizer", "jaxtune.data.encoders", "jaxtune.data.cache")


@functools.lru_cache(maxsize=8)
def code_fingerprint(modules: tuple[str, ...] = CODE_MODULES) -> str:
  """sha1 over the source files of `modules` (names and bytes, in the given order)."""
  digest = hashlib.sha1()
  for name in modules:
    path = importlib.util.find_spec(name).origin
    with open(path, "rb") as f:
      digest.update(name.encode() + b"\0" + f.read() + b"\0")
  return digest.hexdigest()


@dataclasses.dataclass
class Entry:
  lines: np.ndarray     # int64, sorted: indices of the file's lines held here
  starts: np.ndarray    # int64 per held line: where its ids begin in `tokens`
  lengths: np.ndarray   # int64 per held line; 0 = bad line
  loss: np.ndarray      # int64 per held line: labels that carry loss
  images: np.ndarray    # int64 per held line: <IMG_CONTEXT> tokens
  tokens: np.ndarray    # uint32: the ids (may be shared with other entries, in any order)
  bad: dict[int, str]   # line index -> what is wrong
  # Bad lines whose problem is an image file, not the line (encoding.EncodedChunk.recheck): the
  # key does not cover image files, so the pipeline checks these again when it reuses an entry.
  recheck: frozenset[int] = frozenset()

  def covers(self, local: np.ndarray) -> bool:
    at = np.searchsorted(self.lines, local)
    return bool(np.all(at < len(self.lines)) and np.all(self.lines[np.minimum(
        at, len(self.lines) - 1)] == local)) if len(self.lines) else len(local) == 0

  def select(self, local: np.ndarray) -> tuple[np.ndarray | FileIds, np.ndarray, np.ndarray,
                                                np.ndarray, np.ndarray]:
    """(tokens, starts, lengths, loss, images) of lines `local` (sorted). No ids are copied:
    the tokens are mapped (a cache file, the store), so lines this host does not use cost
    address space only, never memory."""
    if len(local) == len(self.lines):
      return self.tokens, self.starts, self.lengths, self.loss, self.images
    at = np.searchsorted(self.lines, local)
    return self.tokens, self.starts[at], self.lengths[at], self.loss[at], self.images[at]

  def compact(self) -> tuple[np.ndarray, np.ndarray]:
    """(ids of the held lines back to back, their starts in that array): what is stored."""
    starts = np.cumsum(self.lengths) - self.lengths
    total = int(self.lengths.sum())
    tokens = np.asarray(self.tokens)
    if len(tokens) == total and np.array_equal(starts, self.starts):
      return tokens, starts
    # Copied a run at a time: consecutive lines whose ids follow each other (a task's lines).
    ends = self.starts + self.lengths
    cuts = np.flatnonzero(self.starts[1:] != ends[:-1]) + 1
    out = np.empty(total, np.uint32)
    for a, b in zip(np.concatenate([[0], cuts]).tolist(),
                    np.concatenate([cuts, [len(starts)]]).tolist()):
      src, n = int(self.starts[a]), int(ends[b - 1] - self.starts[a])
      out[starts[a]:starts[a] + n] = tokens[src:src + n]
    return out, starts


def entry_from_chunks(need: np.ndarray, chunks: list[EncodedChunk],
                      store: np.ndarray | None) -> Entry:
  cat = lambda name: np.concatenate([getattr(c, name) for c in chunks]).astype(np.int64)
  tokens, starts = join_tokens(chunks, store)
  bad, recheck, base = {}, set(), 0
  for c in chunks:
    for k, what in c.bad:
      bad[int(need[base + k])] = what
    recheck.update(int(need[base + k]) for k in c.recheck)
    base += len(c.lengths)
  return Entry(np.asarray(need, np.int64), starts, cat("lengths"), cat("loss"), cat("images"),
               tokens, bad, frozenset(recheck))


class TokenCache:
  """Entries on disk under `cache_dir` (nothing is written when it is None)."""

  def __init__(self, cache_dir: str | None, encoder):
    self.dir = cache_dir
    self.enabled = bool(cache_dir)
    self.tokenizer = encoder.fingerprint
    self.code_modules = CODE_MODULES
    self.hits = self.misses = 0
    self.used: set[str] = set()           # entries this run read or wrote (never pruned)

  def key(self, src: SourceFile, job: EncodeJob) -> str:
    parts = dict(code=code_fingerprint(self.code_modules), file=src.content_hash, tokenizer=self.tokenizer,
                 template=templates.get_template(job.template).fingerprint(),
                 media_root=job.opts.media_root, min_patch=job.opts.min_dynamic_patch,
                 max_patch=job.opts.max_dynamic_patch,
                 allow_outside_media_root=job.opts.allow_outside_media_root,
                 tile_size=job.opts.tile_size, tokens_per_tile=job.opts.tokens_per_tile)
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

  def _path(self, src: SourceFile, job: EncodeJob) -> str:
    stem = os.path.splitext(os.path.basename(src.path))[0][:40]
    return os.path.join(self.dir, f"{stem}-{self.key(src, job)}")

  def load(self, src: SourceFile, job: EncodeJob) -> Entry | None:
    if not self.enabled:
      return None
    path = self._path(src, job)
    entry = self._read(path)
    if entry is None:
      self.misses += 1
    else:
      self.hits += 1
      self.used.add(os.path.basename(path))
    return entry

  def _read(self, path: str) -> Entry | None:
    """The entry at `path`, its ids left on disk (`FileIds`: mapped later, all files at once,
    with no descriptor kept open); None if absent, partial or of another layout."""
    try:
      with open(os.path.join(path, "bad.json")) as f:
        bad = {int(k): v for k, v in json.load(f).items()}
      with np.load(os.path.join(path, "lines.npz")) as arrays:
        lines, lengths = arrays["lines"], arrays["lengths"]
        loss, images = arrays["loss"], arrays["images"]
        recheck = frozenset(arrays["recheck"].tolist())
      ids = os.path.join(path, TOKENS_FILE)
      total = int(lengths.sum())
      if os.path.getsize(ids) != 4 * total:
        return None
      os.utime(path)                      # recency, for pruning (data.cache_max_gib)
    except (OSError, ValueError, KeyError):
      return None
    return Entry(lines, np.cumsum(lengths) - lengths, lengths, loss, images,
                 FileIds(ids, total), bad, recheck)

  def store(self, src: SourceFile, job: EncodeJob, entry: Entry) -> Entry | None:
    """Writes the entry; returns it read back (its ids then on disk, not in memory), or None
    without a cache."""
    if not self.enabled:
      return None
    final = self._path(src, job)
    os.makedirs(self.dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=self.dir, prefix=".tmp-")
    try:
      np.savez(os.path.join(tmp, "lines.npz"), lines=entry.lines, lengths=entry.lengths,
               loss=entry.loss, images=entry.images,
               recheck=np.asarray(sorted(entry.recheck), np.int64))
      entry.compact()[0].tofile(os.path.join(tmp, TOKENS_FILE))   # raw: mapped page-aligned
      with open(os.path.join(tmp, "bad.json"), "w") as f:
        json.dump({str(k): v for k, v in entry.bad.items()}, f)
      if os.path.isdir(final):          # a smaller entry for the same key: replace it
        shutil.rmtree(final, ignore_errors=True)
      os.replace(tmp, final)            # atomic: readers see the old entry or the new one
    except OSError:
      shutil.rmtree(tmp, ignore_errors=True)
      if not os.path.isdir(final):
        raise
    self.used.add(os.path.basename(final))
    return self._read(final)

  def prune(self, max_bytes: float | None) -> list[str]:
    """Removes the least recently used entries (not those of this run) until cache_dir holds
    at most `max_bytes`; also partial entries left by a crash. Returns the removed names."""
    if not self.enabled or not os.path.isdir(self.dir):
      return []
    entries, removed = [], []
    for name in os.listdir(self.dir):
      path = os.path.join(self.dir, name)
      if name.startswith(".tmp-"):
        with contextlib.suppress(OSError):
          if time.time() - os.path.getmtime(path) > STALE_SECONDS:
            shutil.rmtree(path)
            removed.append(name)
        continue
      with contextlib.suppress(OSError):
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        entries.append((os.path.getmtime(path), name, size))
    if max_bytes is None:
      return removed
    total = sum(e[2] for e in entries)
    for _, name, size in sorted(entries):
      if total <= max_bytes:
        break
      if name in self.used:
        continue
      shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)
      total -= size
      removed.append(name)
    return removed

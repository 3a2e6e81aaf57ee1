"""Tokenized lines, kept per JSONL file, in memory and (with `data.cache_dir`) on disk.

An entry holds the ids + trained mask of a set of a file's lines and which lines were bad. Its
key hashes everything that shapes those tokens: the file's content, the tokenizer, the chat
template, the parse options (media_root, tiling limits) and the encoding code's version. So a
second start with the same inputs loads the ids instead of tokenizing (the counting pass and
the tokenization are one pass in jaxtune), and a change to one file, the tokenizer, a template
or a parameter invalidates exactly the entries it affects. Sample ratio, seed, truncation and
packing are applied after the cache, so changing them reuses every entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from jaxtune.data import templates
from jaxtune.data.encoding import EncodedChunk, EncodeJob, join_tokens
from jaxtune.data.sources import SourceFile

# Bump when parsing, rendering or encoding changes the tokens produced for the same input.
ENCODING_VERSION = 2


@dataclasses.dataclass
class Entry:
  lines: np.ndarray     # int64, sorted: indices of the file's lines held here
  starts: np.ndarray    # int64 per held line: where its ids begin in `tokens`
  lengths: np.ndarray   # int64 per held line; 0 = bad line
  loss: np.ndarray      # int64 per held line: labels that carry loss
  images: np.ndarray    # int64 per held line: <IMG_CONTEXT> tokens
  tokens: np.ndarray    # uint32: the ids (may be shared with other entries, in any order)
  bad: dict[int, str]   # line index -> what is wrong

  def covers(self, local: np.ndarray) -> bool:
    at = np.searchsorted(self.lines, local)
    return bool(np.all(at < len(self.lines)) and np.all(self.lines[np.minimum(
        at, len(self.lines) - 1)] == local)) if len(self.lines) else len(local) == 0

  def select(self, local: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                np.ndarray]:
    """(tokens, starts, lengths, loss, images) of lines `local` (sorted). All the lines: no
    ids are copied. Some (another host's share, sample_ratio < 1): theirs only are copied, so
    the rest of the entry (or of a store shared with other files) can be let go."""
    if len(local) == len(self.lines):
      return self.tokens, self.starts, self.lengths, self.loss, self.images
    at = np.searchsorted(self.lines, local)
    part = Entry(self.lines[at], self.starts[at], self.lengths[at], self.loss[at],
                 self.images[at], self.tokens, {})
    return (*part.compact(), part.lengths, part.loss, part.images)

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
  bad, base = {}, 0
  for c in chunks:
    for k, what in c.bad:
      bad[int(need[base + k])] = what
    base += len(c.lengths)
  return Entry(np.asarray(need, np.int64), starts, cat("lengths"), cat("loss"), cat("images"),
               tokens, bad)


class TokenCache:
  """Entries on disk under `cache_dir` (nothing is written when it is None)."""

  def __init__(self, cache_dir: str | None, encoder):
    self.dir = cache_dir
    self.enabled = bool(cache_dir)
    self.tokenizer = encoder.fingerprint
    self.hits = self.misses = 0

  def key(self, src: SourceFile, job: EncodeJob) -> str:
    if src.content_hash is None:
      src.content_hash = hashlib.sha1(src.data).hexdigest()
    parts = dict(version=ENCODING_VERSION, file=src.content_hash, tokenizer=self.tokenizer,
                 template=templates.get_template(job.template).fingerprint(),
                 media_root=job.opts.media_root, min_patch=job.opts.min_dynamic_patch,
                 max_patch=job.opts.max_dynamic_patch)
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

  def _path(self, src: SourceFile, job: EncodeJob) -> str:
    stem = os.path.splitext(os.path.basename(src.path))[0][:40]
    return os.path.join(self.dir, f"{stem}-{self.key(src, job)}")

  def load(self, src: SourceFile, job: EncodeJob) -> Entry | None:
    if not self.enabled:
      return None
    path = self._path(src, job)
    try:
      with open(os.path.join(path, "bad.json")) as f:
        bad = {int(k): v for k, v in json.load(f).items()}
      arrays = np.load(os.path.join(path, "lines.npz"))
      lengths = arrays["lengths"]
      entry = Entry(arrays["lines"], np.cumsum(lengths) - lengths, lengths, arrays["loss"],
                    arrays["images"], np.load(os.path.join(path, "tokens.npy"), mmap_mode="r"),
                    bad)
    except (OSError, ValueError, KeyError):   # absent, partial or from an older version
      self.misses += 1
      return None
    self.hits += 1
    return entry

  def store(self, src: SourceFile, job: EncodeJob, entry: Entry) -> None:
    if not self.enabled:
      return
    final = self._path(src, job)
    os.makedirs(self.dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=self.dir, prefix=".tmp-")
    try:
      np.savez(os.path.join(tmp, "lines.npz"), lines=entry.lines, lengths=entry.lengths,
               loss=entry.loss, images=entry.images)
      np.save(os.path.join(tmp, "tokens.npy"), entry.compact()[0])
      with open(os.path.join(tmp, "bad.json"), "w") as f:
        json.dump({str(k): v for k, v in entry.bad.items()}, f)
      if os.path.isdir(final):          # a smaller entry for the same key: replace it
        shutil.rmtree(final, ignore_errors=True)
      os.replace(tmp, final)            # atomic: readers see the old entry or the new one
    except OSError:
      shutil.rmtree(tmp, ignore_errors=True)
      if not os.path.isdir(final):
        raise

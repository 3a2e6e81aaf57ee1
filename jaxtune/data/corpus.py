"""The corpus stage: the datasets' JSONL lines -> this host's samples, each line tokenized once.

Read: index every line of every dataset's files (`sources.SourceFile`). Ratio and mix: apply
`sample_ratio` to each file on its own (XTuner), mix all datasets into one order shuffled with
`data.seed` and take this host's share (`occurrences`). Tokenize: each unique line this host
needs, once however often it repeats, in worker processes, through the token cache
(`cache_dir`); the ids of every file end up side by side in one mapped array (`idstore`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import numpy as np

from jaxtune.data import cache as cache_lib
from jaxtune.data import encoding, idstore, sources, templates
from jaxtune.data.encoders import open_encoder
from jaxtune.data.sources import DataError, DatasetSpec
from jaxtune.data.tokenizer import TokenEncoder, tokenizer_dir

log = logging.getLogger(__name__)
_LINE_BITS = 40   # a (dataset, line) key: dataset << 40 | line


def make_encoder(tokenizer: Any) -> TokenEncoder:
  """A TokenEncoder from a tokenizer directory, a HF tokenizer loaded from one, or itself."""
  if isinstance(tokenizer, TokenEncoder):
    return tokenizer
  path = tokenizer if isinstance(tokenizer, str) else tokenizer_dir(tokenizer)
  if path is None:
    raise ValueError("cannot find the tokenizer's directory; pass the tokenizer path or a "
                     "tokenizer loaded with load_tokenizer(path)")
  return open_encoder(path)


def rng(*key: int) -> np.random.Generator:
  """The generator of one random stream, seeded with (data.seed, stream, ...)."""
  return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def occurrences(specs: Sequence[DatasetSpec], file_lines: list[list[int]], seed: int,
                share: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
  """(dataset, line) of this host's samples after sample_ratio, mixed with `seed`.

  As in XTuner, a folder's sample_ratio applies to each file on its own (int(n_f x ratio)
  samples of file f; the fractional part drawn with (seed, dataset, file)). `share`: (this
  host, hosts) takes every hosts-th sample of the mixed order from this host's index on; None
  keeps them all."""
  occ_ds, occ_line = [], []
  for d, spec in enumerate(specs):
    base = np.cumsum([0] + file_lines[d][:-1])
    sel = np.concatenate([
        b + sources.ratio_indices(n, spec.sample_ratio, rng(seed, d, 1, f))
        for f, (n, b) in enumerate(zip(file_lines[d], base.tolist()))]).astype(np.int64)
    if len(sel) == 0:
      raise DataError(f"dataset '{spec.name}': sample_ratio {spec.sample_ratio} of "
                      f"{sum(file_lines[d])} samples leaves none (it applies to each of "
                      f"its {len(file_lines[d])} file(s) on its own)")
    occ_ds.append(np.full(len(sel), d, np.int64))
    occ_line.append(sel)
  occ_ds, occ_line = np.concatenate(occ_ds), np.concatenate(occ_line)
  order = rng(seed, 0).permutation(len(occ_ds))
  mine = order if share is None else order[share[0]::share[1]]
  return occ_ds[mine], occ_line[mine]


@dataclasses.dataclass
class Corpus:
  """This host's samples (occurrences: after ratio and mixing, a line may repeat) and the
  unique lines they use, tokenized. Unique line u's ids are tokens[starts[u]:][:lengths[u]]
  (trained flag in bit 31); a bad line has length 0 and is listed in `bad`."""
  files: list[list[sources.SourceFile]]   # per dataset, its files in order
  ds_lines: list[int]                     # lines per dataset
  occ_ds: np.ndarray                      # int64 [samples]: dataset of each sample
  occ_line: np.ndarray                    # int64 [samples]: its line in the dataset
  occ_uid: np.ndarray                     # int64 [samples]: its unique line
  u_ds: np.ndarray                        # int64 [unique]: dataset of each unique line
  u_line: np.ndarray                      # int64 [unique]: its line in the dataset
  u_file: np.ndarray                      # int64 [unique]: its file (datasets' files flattened)
  u_local: np.ndarray                     # int64 [unique]: its line in that file
  tokens: np.ndarray                      # uint32: every unique line's ids
  starts: np.ndarray                      # int64 [unique]
  lengths: np.ndarray                     # int64 [unique]
  loss: np.ndarray                        # int64 [unique]: trained tokens after the first
  n_image: np.ndarray                     # int64 [unique]: <IMG_CONTEXT> tokens
  bad: list[tuple[int, str]]              # (unique line, `file:line (dataset): why`)

  @property
  def flat_files(self) -> list[sources.SourceFile]:
    return [f for fs in self.files for f in fs]

  def where(self, u: int, specs: Sequence[DatasetSpec]) -> str:
    """`file:line (dataset 'name')` of unique line u."""
    src = self.flat_files[int(self.u_file[u])]
    return sources.where(src.path, int(src.lineno[int(self.u_local[u])]),
                         specs[int(self.u_ds[u])].name)


def read(specs: Sequence[DatasetSpec], opts: Sequence[sources.ParseOptions],
         encoder: TokenEncoder, cache: cache_lib.TokenCache, num_workers: int, seed: int,
         share: tuple[int, int] | None, clock=None) -> Corpus:
  """Reads, mixes and tokenizes (module docstring). Bad lines are listed, not raised."""
  paths = [sources.list_jsonl(spec.anno_path, spec.name) for spec in specs]
  for spec in specs:
    templates.get_template(spec.chat_template)
  with encoding.EncoderPool(encoder, num_workers) as pool:
    # Without a cache, tokenizing is certain: let the workers start while files are read.
    if not cache.enabled and sum(os.path.getsize(p) for ps in paths for p in ps) \
        >= encoding.MIN_BYTES_FOR_WORKERS:
      pool.start()
    files = [[sources.SourceFile.read(p) for p in ps] for ps in paths]
    ds_lines = [sum(len(s) for s in srcs) for srcs in files]
    for spec, n in zip(specs, ds_lines):
      if n == 0:
        raise DataError(f"dataset '{spec.name}': {spec.anno_path} holds no samples "
                        "(every line is blank)")
    occ_ds, occ_line = occurrences(specs, [[len(s) for s in srcs] for srcs in files], seed,
                                   share)
    if clock is not None:
      clock.lap("read")
    # Unique lines this host needs; each is tokenized once however often it repeats.
    key = occ_ds * (1 << _LINE_BITS) + occ_line
    uniq, occ_uid = np.unique(key, return_inverse=True)
    u_ds, u_line = uniq >> _LINE_BITS, uniq & ((1 << _LINE_BITS) - 1)
    u_file, u_local = locate(files, u_ds, u_line)
    tokens, starts, lengths, loss, n_image, bad = _encode(
        pool, specs, opts, cache, num_workers, files, u_ds, u_file, u_local)
  return Corpus(files, ds_lines, occ_ds, occ_line, occ_uid.reshape(-1).astype(np.int64), u_ds,
                u_line, u_file, u_local, tokens, starts, lengths, loss, n_image, bad)


def locate(files: list[list[sources.SourceFile]], u_ds: np.ndarray,
           u_line: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(file, line in it) of each (dataset, line): files numbered across datasets in order."""
  file_base = np.cumsum([0] + [len(fs) for fs in files])
  u_file = np.zeros(len(u_ds), np.int64)
  u_local = np.zeros(len(u_ds), np.int64)
  for d in np.unique(u_ds):
    at = np.flatnonzero(u_ds == d)
    bounds = np.cumsum([0] + [len(s) for s in files[d]])
    f_of = np.searchsorted(bounds, u_line[at], side="right") - 1
    u_file[at], u_local[at] = file_base[d] + f_of, u_line[at] - bounds[f_of]
  return u_file, u_local


def _encode(pool, specs, opts, cache, num_workers, files, u_ds, u_file, u_local):
  """The unique lines' ids (one array; line k's begin at starts[k]), starts, lengths, loss,
  images and the bad list."""
  slots, tasks = [], []
  flat = [f for fs in files for f in fs]
  for f in np.unique(u_file):
    pos = np.flatnonzero(u_file == f)
    d, src, local = int(u_ds[pos[0]]), flat[f], u_local[pos]
    job = encoding.EncodeJob(specs[d].chat_template, opts[d])
    entry = cache.load(src, job)
    if entry is not None and entry.covers(local) and _still_bad(cache, entry, src, job, local):
      slots.append((d, src, job, pos, local, entry, None))
      continue
    # With a cache, encode the whole file, so that any ratio, seed or host reuses it.
    need = np.arange(len(src)) if cache.enabled else local
    spans = np.stack([src.starts[need], src.ends[need]], axis=1)
    # Small tasks: the processes finish within ~0.1 s of each other.
    chunk = max(256, min(512, len(need) // (4 * num_workers) + 1))
    first = len(tasks)
    tasks.extend(encoding.split_tasks(job, src.path, spans, chunk))
    slots.append((d, src, job, pos, local, need, (first, len(tasks))))
  chunks = pool.run(tasks) if tasks else []
  store = pool.mapped_store()

  parts, bad = [], []
  for d, src, job, pos, local, entry, task_range in slots:
    if task_range is not None:
      entry = cache_lib.entry_from_chunks(entry, chunks[task_range[0]:task_range[1]], store)
      # Read back from the cache: its ids then come from the entry's file like a hit's, and
      # the store (and any ids in memory) can be let go.
      entry = cache.store(src, job, entry) or entry
    parts.append((pos, entry.select(local)))
    for p, l in zip(pos.tolist(), local.tolist()) if entry.bad else ():
      if l in entry.bad:
        where = sources.where(src.path, int(src.lineno[l]), specs[d].name)
        bad.append((p, f"{where}: {entry.bad[l]}"))
  del store, chunks
  # Parts share one array (a fresh run's store) or each have their own (cache entries, on
  # disk): those are mapped side by side into one array, with no copy and no descriptor
  # left open (idstore), so thousands of files cost neither memory nor descriptors.
  arrays = list({id(p[0]): p[0] for _, p in parts}.values())
  tokens, bases = idstore.flat_ids(arrays)
  base = {id(a): int(b) for a, b in zip(arrays, bases)}
  n = len(u_ds)
  starts, lengths, loss, images = (np.zeros(n, np.int64) for _ in range(4))
  for pos, (ids, st, ln, ls, im) in parts:
    starts[pos], lengths[pos], loss[pos], images[pos] = st + base[id(ids)], ln, ls, im
  return tokens, starts, lengths, loss, images, sorted(bad)


def _still_bad(cache, entry: cache_lib.Entry, src: sources.SourceFile, job, local) -> bool:
  """Whether a cached entry's lines that were bad because of an image file still are; the
  cache key does not cover image files, so these are checked again (header only). When one
  passes now, the file is tokenized again (False)."""
  again = sorted(entry.recheck.intersection(local.tolist())) if entry.recheck else ()
  for l in again:
    try:
      sources.parse_sample(sources.decode_line(src.line(l)), job.opts, check_images=True)
    except ValueError as e:
      entry.bad[l] = str(e)                  # the problem now (it may be another one)
    else:
      log.info("data: %s:%d: its image now passes the check; tokenizing the file again",
               src.path, int(src.lineno[l]))
      cache.hits, cache.misses = cache.hits - 1, cache.misses + 1
      return False
  return True

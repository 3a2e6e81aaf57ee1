"""The data the trainer consumes: `SFTData(data_cfg, tokenizer, global_batch_size=...)`.

Start-up (once): index the JSONL lines of every dataset, apply `sample_ratio`, mix all datasets
into one order shuffled with `data.seed`, take this host's share of it, tokenize each needed
line once (worker processes; `cache_dir` reuses earlier results), truncate, and pack.

Iteration: packs are reshuffled every epoch with (seed, epoch); step k of an epoch is packs
order[k*R:(k+1)*R] (R = this host's rows), so `batches(epoch, start_step)` seeks in O(1) and a
resumed run sees exactly the batches of an uninterrupted one.

Stages as Grain datasets (samples(d), mixed(), packs(), grain_dataset(epoch)) let a user insert
a Grain transform between them: sample_transform before packing, batch_transform after
batching (docs/data.md, "Composing with Grain").

Images (Intern-S1, `image_size=448`): a sample's images are checked at start-up (header only:
the file exists, reads, has the size `image_wh` says), its tiles (<IMG_CONTEXT> tokens / 256)
are counted from the tokens, and packs hold at most data.max_tiles_per_pack tiles. When any
sample has images, every batch then also carries `pixel_values` uint8 [rows, max_tiles, 448, 448, 3] (the model
normalises them on the device: a quarter of the bytes to cache and send) and
`tile_segment_ids` int32 [rows, max_tiles]; tile k of a row covers the row's image tokens
[256k, 256k + 256). Pixels are decoded while the batch is built (the prefetch thread), in a
thread pool, with recently decoded images kept in a bounded LRU (data.image_cache_mb).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from jaxtune.data import cache as cache_lib
from jaxtune.data import encoding, idstore, images, packing, sources, stages, templates
from jaxtune.data.cache import TokenCache
from jaxtune.data.sources import DataError, DatasetSpec
from jaxtune.data.tiles import TileDecoder
from jaxtune.data.encoders import open_encoder
from jaxtune.data.tokenizer import ENDOFTEXT, TokenEncoder, tokenizer_dir

if TYPE_CHECKING:
  import grain

log = logging.getLogger(__name__)
_SHOWN_LOCATIONS = 5


def make_encoder(tokenizer: Any) -> TokenEncoder:
  """A TokenEncoder from a tokenizer directory, a HF tokenizer loaded from one, or itself."""
  if isinstance(tokenizer, TokenEncoder):
    return tokenizer
  path = tokenizer if isinstance(tokenizer, str) else tokenizer_dir(tokenizer)
  if path is None:
    raise ValueError("cannot find the tokenizer's directory; pass the tokenizer path or a "
                     "tokenizer loaded with load_tokenizer(path)")
  return open_encoder(path)


def _rng(*key: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


class SFTData:
  """Packed, shuffled, sharded SFT batches. See the module docstring."""

  def __init__(self, data_cfg, tokenizer, *, global_batch_size: int, process_index: int = 0,
               process_count: int = 1, data_parallel: int | None = None,
               allgather: Callable[[int], Sequence[int]] | None = None,
               image_size: int | None = None, image_token_id: int | None = None,
               global_order: bool = False, host_rows: Sequence[int] | None = None,
               sample_transform: Callable[[Any], Any] | None = None,
               batch_transform: Callable[[Any], Any] | None = None):
    """image_size: the vision tower's tile size (448: Intern-S1's; the only one the token
    counts support). Samples with images are packed with their tiles and every batch carries
    `pixel_values` and `tile_segment_ids` (see the module docstring), text-only batches too,
    so that the layout is static. None (a text model): samples with images are an error.
    image_token_id: the model's image token (its config), checked against the tokenizer's
    <IMG_CONTEXT>, whose id the batches are laid out with.

    global_order: every host reads all samples and builds the order of one host reading
    all global_batch_size rows; this host then takes rows `host_rows` of each batch (default:
    its contiguous block). So the batches do not depend on the host count, and a run resumes
    on another number of hosts with exactly the remaining batches (what training needs).
    Without it each host tokenizes and packs only its own share (evaluation: every pack is seen
    once whatever the split).

    sample_transform: a function from the mixed samples (a grain.MapDataset, see mixed()) to
    a grain.MapDataset or IterDataset of the samples to pack, run once at start-up before
    packing (packing needs every length): filter, map (a sample keeps its `index`), or move
    the work to Grain's worker processes with to_iter_dataset(...).mp_prefetch(...).
    batch_transform: a function from grain_dataset(epoch) to a grain.MapDataset of the same
    length (map / random_map: random access, so resume stays exact) that the batches of
    batches() and iterator() then come from."""
    clock = _Clock()
    self.encoder = make_encoder(tokenizer)
    clock.lap("encoder")
    self.seed = int(data_cfg.get("seed", 42))
    self.pack_len = int(data_cfg.get("pack_max_length", 4096))
    self.level = str(data_cfg.get("pack_level", "soft"))
    self.level = "soft" if self.level == "expand_soft" else self.level
    if self.level not in packing.LEVELS:
      raise ValueError(f"data.pack_level must be one of {list(packing.LEVELS)}, got "
                       f"'{self.level}'")
    self.default_max_len = int(data_cfg.get("sample_max_length", 2048))
    self.skip_bad = bool(data_cfg.get("skip_bad_samples", False))
    self.buffer = int(data_cfg.get("pack_buffer_size", 100))
    self.prefetch = int(data_cfg.get("prefetch", 2))
    self.round_up = bool(data_cfg.get("round_up", True))
    # XTuner turns length grouping off for pack_level 'none' (it refuses both at once).
    self.group_by_length = bool(data_cfg.get("group_by_length", True)) and self.level != "none"
    self.micro_batch_size = int(data_cfg.get("micro_batch_size", 1))
    if image_size is not None and int(image_size) != images.TILE:
      raise ValueError(f"image_size={image_size}: only {images.TILE} (Intern-S1's tiles) is "
                       f"supported: the <IMG_CONTEXT> counts assume {images.TILE}-pixel tiles "
                       f"of {images.TOKENS_PER_TILE} tokens")
    self.image_size = None if image_size is None else int(image_size)
    # Every tile brings 256 tokens: a row can never hold more than pack_len // 256 of them.
    bound = data_cfg.get("max_tiles_per_pack")
    if bound is None:
      bound = max(1, self.pack_len // images.TOKENS_PER_TILE)
    elif isinstance(bound, bool) or not isinstance(bound, (int, np.integer)) or bound < 1:
      raise DataError(f"data.max_tiles_per_pack must be a positive integer (image tiles per "
                      f"packed row) or None (pack_max_length // {images.TOKENS_PER_TILE}), got "
                      f"{bound!r}")
    self.tile_bound = int(bound) if self.image_size is not None else 0  # the packer's limit
    self.image_cache_bytes = int(float(data_cfg.get("image_cache_mb", 512)) * 2**20)
    self.process_index, self.process_count = int(process_index), int(process_count)
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size ({global_batch_size}) must be a multiple of the "
                       f"process count ({process_count})")
    self.global_batch_size = int(global_batch_size)
    self.global_order = bool(global_order)
    layout_hosts = 1 if self.global_order else process_count  # whose order the batches follow
    self.rows = global_batch_size // layout_hosts
    self.group_rows, self.micro_steps = _rank_layout(self.global_batch_size, layout_hosts,
                                                     data_parallel, self.micro_batch_size)
    self.host_rows = None
    if self.global_order:
      share = global_batch_size // process_count
      self.host_rows = (np.arange(self.process_index * share, (self.process_index + 1) * share)
                        if host_rows is None else np.asarray(host_rows, np.int64))
    self.pad_id = self.encoder.added.get(ENDOFTEXT, 0)
    self.image_token_id = self.encoder.added.get(templates.IMG_CONTEXT)
    if image_token_id is not None and image_token_id != self.image_token_id:
      raise DataError(
          f"the model's image_token_id is {image_token_id} but the tokenizer at "
          f"{getattr(self.encoder, 'path', '?')} has "
          + (f"{templates.IMG_CONTEXT} = {self.image_token_id}" if self.image_token_id
             is not None else f"no {templates.IMG_CONTEXT} token")
          + ": the model would put image features at the wrong tokens. Use the model's own "
          "tokenizer (tokenizer_path), or fix model.image_token_id")
    self.specs = [DatasetSpec.from_config(d, i) for i, d in enumerate(data_cfg.get("datasets"))]
    if not self.specs:
      raise DataError("data.datasets is empty: add at least one dataset")
    self.num_workers = encoding.resolve_workers(int(data_cfg.get("num_workers", 0)))
    self.cache = TokenCache(data_cfg.get("cache_dir"), self.encoder)
    self.min_patch = int(data_cfg.get("min_dynamic_patch", 1))
    self.max_patch = int(data_cfg.get("max_dynamic_patch", 12))
    self.opts = [s.parse_options(self.min_patch, self.max_patch) for s in self.specs]
    stale = idstore.clean_stale_stores()
    if stale:
      log.info("data: removed %d token store file(s) left in TMPDIR by an earlier crash",
               len(stale))
    self._image_lock = threading.Lock()           # guards the decode-failure bookkeeping
    self._tiles_decoder = TileDecoder(image_size=self.image_size or images.TILE,
                                      min_patch=self.min_patch, max_patch=self.max_patch,
                                      max_bytes=self.image_cache_bytes,
                                      workers=self.num_workers)
    self._skipped_samples: set[int] = set()       # unique samples skipped for a decode failure
    self._refs: dict[int, list[sources.ImageRef]] = {}
    self.sample_transform, self.batch_transform = sample_transform, batch_transform
    self._build(clock)
    max_gib = data_cfg.get("cache_max_gib")
    pruned = self.cache.prune(None if max_gib is None else float(max_gib) * 2**30)
    if pruned:
      log.info("data: pruned %d cache entr(y/ies) from %s (data.cache_max_gib=%s)",
               len(pruned), self.cache.dir, max_gib)
    self.steps_per_epoch = self._agree_steps(allgather)
    self._finish_stats()

  # ---------------------------------------------------------------- start-up
  def _build(self, clock: _Clock) -> None:
    paths = [sources.list_jsonl(spec.anno_path, spec.name) for spec in self.specs]
    for spec in self.specs:
      templates.get_template(spec.chat_template)
    with encoding.EncoderPool(self.encoder, self.num_workers) as pool:
      # Without a cache, tokenizing is certain: let the workers start while files are read.
      if not self.cache.enabled and sum(os.path.getsize(p) for ps in paths for p in ps) \
          >= encoding.MIN_BYTES_FOR_WORKERS:
        pool.start()
      files = [[sources.SourceFile.read(p) for p in ps] for ps in paths]
      ds_lines = [sum(len(s) for s in srcs) for srcs in files]
      for spec, n in zip(self.specs, ds_lines):
        if n == 0:
          raise DataError(f"dataset '{spec.name}': {spec.anno_path} holds no samples "
                          "(every line is blank)")
      occ_ds, occ_line = self._occurrences([[len(s) for s in srcs] for srcs in files])
      clock.lap("read")
      # Unique lines this host needs; each is tokenized once however often it repeats.
      key = occ_ds * (1 << 40) + occ_line
      uniq, occ_uid = np.unique(key, return_inverse=True)
      u_ds, u_line = uniq >> 40, uniq & ((1 << 40) - 1)
      tokens, starts, lengths, loss, n_image, bad = self._encode(pool, files, u_ds, u_line)
    clock.lap("tokenize")
    if bad and not self.skip_bad:
      more = f" (and {len(bad) - 1} more bad line(s))" if len(bad) > 1 else ""
      raise DataError(f"{bad[0][1].rstrip('.')}{more}. Fix the line{'s' if more else ''}, or "
                      "set data.skip_bad_samples=True to skip bad lines (then counted, and the "
                      "first few named in the log)")

    # Truncation (per dataset limit) and bookkeeping per occurrence.
    # hard packing splits long samples across rows instead (XTuner): nothing is cut.
    limits = np.array([self._max_len(s) for s in self.specs], np.int64)
    full = lengths[occ_uid]
    keep = full > 0                                   # bad lines are skipped
    cut = np.minimum(full, limits[occ_ds])
    truncated = keep & (full > cut)
    occ_loss = loss[occ_uid]
    if truncated.any():                               # labels left after the cut
      first = starts[occ_uid[truncated]]
      occ_loss[truncated] = encoding.range_sums(tokens >= encoding.TRAINED_BIT, first + 1,
                                                first + cut[truncated])
    occ_images = n_image[occ_uid]
    dropped = self._image_drops(tokens, starts, lengths, occ_uid, cut,
                                truncated & (occ_images > 0))
    keep &= ~dropped
    self._check_images_allowed(np.bincount(occ_ds[keep & (occ_images > 0)],
                                           minlength=len(self.specs)))
    occ_tiles = occ_images // images.TOKENS_PER_TILE
    # A sample with more tiles than a row holds is dropped (reported), like a cut image.
    over_tiles = keep & (occ_tiles > self.tile_bound) if self.image_size is not None \
        else np.zeros(len(keep), bool)
    keep &= ~over_tiles
    # The unique samples, for samples(d): their ids stay in the store.
    self._store, self._starts = tokens, starts        # unique sample u: _starts[u] on
    self._u_ds, self._u_line, self._u_lengths, self._u_images = u_ds, u_line, lengths, n_image
    occ_start, filtered, self._transformed = starts[occ_uid], np.zeros(len(keep), bool), False
    if self.sample_transform is not None:
      tokens, occ_start, cut, self._transformed = stages.apply_sample_transform(
          self.sample_transform, tokens, occ_start, cut, occ_ds, occ_line,
          occ_tiles if self.image_size is not None else None, keep, filtered, occ_loss, limits)
      keep &= ~filtered
    self._samples = occ_uid[keep]                     # packed sample -> unique sample
    self._lengths = cut[keep]
    self._sample_ds = occ_ds[keep]
    self._sample_line = occ_line[keep]
    self._tiles = occ_tiles[keep]                     # image tiles of each packed sample
    self._tokens = tokens                             # the ids packed rows are built from
    self._sample_starts = occ_start[keep]             # where each packed sample's ids begin
    self._images = np.bincount(occ_ds[keep & (occ_images > 0)], minlength=len(self.specs))
    # To read the lines of image samples back at batch time (their files, flattened).
    self._files = [f for fs in files for f in fs] if self._images.any() else None
    clock.lap("truncate")
    tiles = self._tiles if self.image_size is not None else None
    self.plan = packing.make_plan(self.level, self._lengths, self.pack_len, self.buffer,
                                  tiles, self.tile_bound or None)
    # The batches' tile slots: the fullest pack's tiles (<= the bound; 0 without images, so
    # text-only data carries no pixel arrays and the model's layout has none).
    self.max_tiles = int(self.plan.pack_tiles(self._tiles).max(initial=0)) \
        if self.image_size is not None else 0
    clock.lap("pack")
    digest = hashlib.sha1(self.encoder.fingerprint.encode())
    for arr in (self._samples, self._lengths, self.plan.sample, self.plan.length):
      digest.update(np.ascontiguousarray(arr).tobytes())
    if self.image_size is not None:   # text data keeps the hash it always had
      digest.update(np.ascontiguousarray(self._tiles).tobytes() + b"%d" % self.tile_bound)
    if self._transformed:             # a sample_transform changed ids: they are the data now
      digest.update(np.ascontiguousarray(self._tokens).tobytes())
    self.data_hash = digest.hexdigest()[:16]
    self._record_stats(files, ds_lines, occ_ds, keep, truncated, dropped, over_tiles, occ_loss,
                       occ_tiles, bad, u_ds, filtered)
    clock.lap("stats")
    self.stats["startup_seconds"] = clock.laps

  def _check_images_allowed(self, per_ds: np.ndarray) -> None:
    """Samples with images need an image model and a packing that keeps them whole."""
    if not per_ds.any():
      return
    names = [s.name for s, n in zip(self.specs, per_ds) if n]
    if self.image_size is None:
      raise DataError(
          f"dataset(s) {names} hold samples with images, but this data is built for a text "
          "model (SFTData without image_size): train them with an Intern-S1 model type, "
          f"whose data carries pixel tiles (image_size={images.TILE}), or remove the image "
          "samples from these datasets")
    if self.level == "hard":
      raise DataError(
          f"dataset(s) {names} hold samples with images, and data.pack_level='hard' splits "
          "samples across rows, which would separate an image's <IMG_CONTEXT> tokens from its "
          "tiles: set data.pack_level='soft' (XTuner's default for multimodal data) or 'none'")

  def _max_len(self, spec: DatasetSpec) -> int:
    """Tokens a sample keeps: sample_max_length (at most pack_max_length); unlimited with
    pack_level 'hard', which splits a long sample across rows."""
    if self.level == "hard":
      return np.iinfo(np.int64).max
    return int(min(spec.sample_max_length or self.default_max_len, self.pack_len))

  def _occurrences(self, file_lines: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(dataset, line) of this host's samples after sample_ratio, mixed with data.seed.

    As in XTuner, a folder's sample_ratio applies to each file on its own (int(n_f x ratio)
    samples of file f; the fractional part drawn with (seed, dataset, file))."""
    occ_ds, occ_line = [], []
    for d, spec in enumerate(self.specs):
      base = np.cumsum([0] + file_lines[d][:-1])
      sel = np.concatenate([
          b + sources.ratio_indices(n, spec.sample_ratio, _rng(self.seed, d, 1, f))
          for f, (n, b) in enumerate(zip(file_lines[d], base.tolist()))]).astype(np.int64)
      if len(sel) == 0:
        raise DataError(f"dataset '{spec.name}': sample_ratio {spec.sample_ratio} of "
                        f"{sum(file_lines[d])} samples leaves none (it applies to each of "
                        f"its {len(file_lines[d])} file(s) on its own)")
      occ_ds.append(np.full(len(sel), d, np.int64))
      occ_line.append(sel)
    occ_ds, occ_line = np.concatenate(occ_ds), np.concatenate(occ_line)
    order = _rng(self.seed, 0).permutation(len(occ_ds))
    mine = order if self.global_order else order[self.process_index::self.process_count]
    return occ_ds[mine], occ_line[mine]

  def _encode(self, pool, files, u_ds, u_line):
    """The unique lines' ids (one array; line k's begin at starts[k]), starts, lengths,
    loss, images and the bad list. Also records where each unique line is (self._u_file,
    self._u_local: its file in `files` flattened, its index there)."""
    slots, tasks = [], []
    file_base = np.cumsum([0] + [len(fs) for fs in files])
    self._u_file = np.zeros(len(u_ds), np.int64)
    self._u_local = np.zeros(len(u_ds), np.int64)
    for d in np.unique(u_ds):
      at = np.flatnonzero(u_ds == d)
      bounds = np.cumsum([0] + [len(s) for s in files[d]])
      f_of = np.searchsorted(bounds, u_line[at], side="right") - 1
      job = encoding.EncodeJob(self.specs[d].chat_template, self.opts[d])
      for f in np.unique(f_of):
        src, pos = files[d][f], at[f_of == f]
        local = u_line[pos] - bounds[f]
        self._u_file[pos], self._u_local[pos] = file_base[d] + f, local
        entry = self.cache.load(src, job)
        if entry is not None and entry.covers(local) and self._still_bad(entry, src, job, local):
          slots.append((d, src, job, pos, local, entry, None))
          continue
        # With a cache, encode the whole file, so that any ratio, seed or host reuses it.
        need = np.arange(len(src)) if self.cache.enabled else local
        spans = np.stack([src.starts[need], src.ends[need]], axis=1)
        # Small tasks: the processes finish within ~0.1 s of each other.
        chunk = max(256, min(512, len(need) // (4 * self.num_workers) + 1))
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
        entry = self.cache.store(src, job, entry) or entry
      parts.append(entry.select(local))
      for p, l in zip(pos.tolist(), local.tolist()) if entry.bad else ():
        if l in entry.bad:
          where = sources.where(src.path, int(src.lineno[l]), self.specs[d].name)
          bad.append((p, f"{where}: {entry.bad[l]}"))
    del store, chunks
    # Parts share one array (a fresh run's store) or each have their own (cache entries, on
    # disk): those are mapped side by side into one array, with no copy and no descriptor
    # left open (idstore), so thousands of files cost neither memory nor descriptors.
    arrays = list({id(p[0]): p[0] for p in parts}.values())
    tokens, bases = idstore.flat_ids(arrays)
    base = {id(a): int(b) for a, b in zip(arrays, bases)}
    starts = np.concatenate([p[1] + base[id(p[0])] for p in parts]).astype(np.int64)
    lengths, loss, images = (np.concatenate([p[k] for p in parts]).astype(np.int64)
                             for k in (2, 3, 4))
    return tokens, starts, lengths, loss, images, sorted(bad)

  def _still_bad(self, entry: cache_lib.Entry, src: sources.SourceFile, job, local) -> bool:
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
        self.cache.hits, self.cache.misses = self.cache.hits - 1, self.cache.misses + 1
        return False
    return True

  def _image_drops(self, tokens, starts, lengths, occ_uid, cut, candidates) -> np.ndarray:
    """Truncated multimodal samples whose image tokens would be cut are dropped instead."""
    dropped = np.zeros(len(occ_uid), bool)
    img = self.encoder.added.get(templates.IMG_CONTEXT)
    for k in np.flatnonzero(candidates):
      u = occ_uid[k]
      cut_off = tokens[starts[u] + cut[k]:starts[u] + lengths[u]]
      dropped[k] = bool(((cut_off & encoding.ID_MASK) == img).any())
    return dropped

  def _agree_steps(self, allgather) -> int:
    """round_up (XTuner's default): ceil(packs / rows), the last batch topped up from the start
    of the epoch's order; else packs // rows, the incomplete last batch dropped."""
    packs = self.plan.num_packs
    local = -(-packs // self.rows) if self.round_up else packs // self.rows
    if self.process_count == 1 or self.global_order:  # global: one plan, the same everywhere
      return local
    if allgather is None:
      allgather = _jax_allgather(self.process_count)
    agreed = allgather(local)
    return int(max(agreed) if self.round_up else min(agreed))

  # ---------------------------------------------------------------- stats
  def _record_stats(self, files, ds_lines, occ_ds, keep, truncated, dropped, over_tiles,
                    occ_loss, occ_tiles, bad, u_ds, filtered) -> None:
    loss = occ_loss[keep]
    per_ds = {}
    for d, spec in enumerate(self.specs):
      mask_ds = self._sample_ds == d
      bad_ds = [m for p, m in bad if u_ds[p] == d]
      entry = dict(
          files=len(files[d]), lines=ds_lines[d], sample_ratio=spec.sample_ratio,
          samples=int((occ_ds == d).sum()), packed_samples=int(mask_ds.sum()),
          tokens=int(self._lengths[mask_ds].sum()), loss_tokens=int(loss[mask_ds].sum()),
          truncated=int((truncated & (occ_ds == d)).sum()),
          image_samples=int(self._images[d]), image_tiles=int(self._tiles[mask_ds].sum()),
          dropped_image_cut=int((dropped & (occ_ds == d)).sum()),
          dropped_tile_bound=int((over_tiles & (occ_ds == d)).sum()),
          bad=int(((~keep) & ~dropped & ~over_tiles & ~filtered & (occ_ds == d)).sum()),
          bad_lines=len(bad_ds),
          bad_locations=bad_ds[:_SHOWN_LOCATIONS],
          sample_max_length=None if self.level == "hard" else self._max_len(spec))
      if self.sample_transform is not None:
        entry["filtered"] = int((filtered & (occ_ds == d)).sum())
      per_ds[spec.name] = entry
      if entry["truncated"]:
        log.warning("dataset '%s': %d sample(s) longer than %d tokens were truncated",
                    spec.name, entry["truncated"], entry["sample_max_length"])
      if entry["dropped_image_cut"]:
        log.warning("dataset '%s': %d multimodal sample(s) dropped: truncation would cut "
                    "their image tokens", spec.name, entry["dropped_image_cut"])
      if entry["dropped_tile_bound"]:
        log.warning("dataset '%s': %d multimodal sample(s) dropped: more than %d image tiles "
                    "(data.max_tiles_per_pack), so they fit no row; raise the bound or lower "
                    "data.max_dynamic_patch", spec.name, entry["dropped_tile_bound"],
                    self.tile_bound)
      if bad_ds:
        log.warning("dataset '%s': skipped %d bad line(s) (skip_bad_samples=True), first: %s",
                    spec.name, len(bad_ds), "; ".join(bad_ds[:_SHOWN_LOCATIONS]))
    self.stats: dict[str, Any] = {"datasets": per_ds}

  def _finish_stats(self) -> None:
    tokens = int(self.plan.pack_tokens().sum())
    packs = self.plan.num_packs
    used = self.steps_per_epoch * self.rows
    self.stats.update(
        pack_level=self.level, pack_max_length=self.pack_len, packs=packs,
        pack_efficiency=tokens / max(1, packs * self.pack_len),
        steps_per_epoch=self.steps_per_epoch, rows_per_step=self.global_batch_size,
        rows_per_host=self.rows, round_up=self.round_up,
        packs_dropped_per_epoch=max(0, packs - used),
        packs_repeated_per_epoch=max(0, used - packs),
        group_by_length=self.group_by_length, group_rows=self.group_rows,
        process_index=self.process_index, process_count=self.process_count)
    if self.image_size is not None:
      per_pack = self.plan.pack_tiles(self._tiles)
      self.stats.update(
          image_size=self.image_size, max_tiles_per_pack=self.tile_bound,
          tile_slots=self.max_tiles,
          image_samples=int(self._images.sum()), image_tiles=int(per_pack.sum()),
          packs_with_images=int((per_pack > 0).sum()),
          tiles_per_pack_max=int(per_pack.max()) if packs else 0,
          tiles_per_pack_mean=float(per_pack.mean()) if packs else 0.0,
          tile_slot_use=float(per_pack.sum() / max(1, packs * self.max_tiles)),
          packs_closed_by_tile_limit=int(self.plan.closed_by_tiles),
          dropped_tile_bound=sum(d["dropped_tile_bound"]
                                 for d in self.stats["datasets"].values()),
          image_decode_failures=0, image_decode_skipped_samples=0,
          image_decode_failure_locations=[])
    if packs > used:
      log.info("data: %d pack(s) per epoch left out (data.round_up=False: the last incomplete "
               "batch of %d rows is dropped; which ones changes every epoch)", packs - used,
               self.rows)
    if self.steps_per_epoch == 0 and packs == 0:   # round_up cannot help: nothing to pack
      why = []
      for name, d in self.stats["datasets"].items():
        lost = [f"{d['bad_lines']} bad line(s) skipped (data.skip_bad_samples=True), the "
                f"first: {d['bad_locations'][0]}" if d["bad_lines"] else "",
                f"{d['dropped_image_cut']} dropped: truncation would cut their image tokens "
                "(raise sample_max_length)" if d["dropped_image_cut"] else "",
                f"{d['dropped_tile_bound']} dropped: more image tiles than "
                "data.max_tiles_per_pack" if d["dropped_tile_bound"] else "",
                f"{d.get('filtered', 0)} removed by sample_transform" if d.get("filtered")
                else ""]
        why.append(f"dataset '{name}' ({d['samples']} sample(s)): "
                   + ("; ".join(w for w in lost if w) or "none left"))
      raise DataError("no sample is left to train on: " + " | ".join(why) + ". Fix the "
                      "data: no batch or round_up setting helps while nothing is left to pack.")
    if self.steps_per_epoch == 0:
      raise DataError(f"only {packs} pack(s) of {self.pack_len} tokens on this host but "
                      f"{self.rows} rows per step: an epoch has no full batch. Add data, "
                      "raise sample_ratio, lower global_batch_size / pack_max_length or set "
                      "data.round_up=True.")

  # ---------------------------------------------------------------- iteration
  def epoch_order(self, epoch: int) -> np.ndarray:
    """The packs of every row of the epoch, in row order: steps_per_epoch x rows of them.

    The shuffled (or length-grouped) order of the epoch's packs, cut to whole batches
    (round_up=False) or topped up from its start (round_up=True, XTuner's rule: the order
    repeated until the last batch is full). With group_by_length, each batch's rows are laid
    out so that every micro-batch's group of similar packs lands on different ranks."""
    n, total = self.plan.num_packs, self.steps_per_epoch * self.rows
    if self.group_by_length:
      order = packing.length_grouped_order(self.pack_flops, self.rows, self.group_rows,
                                           _rng(self.seed, 3, epoch))
    else:
      order = _rng(self.seed, 2, epoch).permutation(n)
    order = np.resize(order, total) if n else np.zeros(0, np.int64)   # cyclic: wraps to start
    if self.group_by_length and self.micro_steps > 1:
      # Position j of a batch (micro-step j // G, rank slot j % G) -> row (j % G) * A + j // G,
      # the row that the trainer's micro-batch split puts there (train.step.split_micro_batches).
      order = order.reshape(-1, self.micro_steps, self.group_rows).transpose(0, 2, 1).reshape(-1)
    return order

  @functools.cached_property
  def pack_flops(self) -> np.ndarray:
    """Attention cost of each pack: the sum of its segments' squared lengths."""
    pack_of = np.repeat(np.arange(self.plan.num_packs), np.diff(self.plan.bounds))
    return np.bincount(pack_of, weights=self.plan.length.astype(np.float64) ** 2,
                       minlength=self.plan.num_packs)

  def batch(self, epoch: int, step: int, order: np.ndarray | None = None) -> dict[str,
                                                                                  np.ndarray]:
    if not 0 <= step < self.steps_per_epoch:
      raise IndexError(f"step {step} outside epoch of {self.steps_per_epoch} steps")
    order = self.epoch_order(epoch) if order is None else order
    packs = order[step * self.rows:(step + 1) * self.rows]
    if self.host_rows is not None and len(packs) == self.rows:  # this host's rows of the batch
      packs = packs[self.host_rows]
    return self.pack_rows(packs)

  def pack_rows(self, packs: np.ndarray) -> dict[str, np.ndarray]:
    """The rows of packs `packs` (indices into the plan), with their pixels when
    image_size is set."""
    packs = np.asarray(packs, np.int64)
    rows = packing.build_rows(self.plan, packs, self._tokens, self._sample_starts,
                              self.pack_len, self.pad_id)
    if self.max_tiles:   # data with images: every batch (text-only rows too) has the arrays
      self._add_images(rows, packs)
    return rows

  # ---------------------------------------------------------------- images
  def _add_images(self, rows: dict[str, np.ndarray], packs: np.ndarray) -> None:
    """pixel_values [rows, max_tiles, S, S, 3] and tile_segment_ids [rows, max_tiles].

    A row's tiles follow its image tokens: its samples in order, each sample's images in
    order, each image's tiles as load_tiles gives them."""
    size, n_rows = self.image_size, len(packs)
    if self._files is None:             # no sample has images: every slot stays unused
      owner, owned = np.zeros((n_rows, self.max_tiles), np.int32), []
    else:
      owner, owned = packing.tile_slots(self.plan, packs, self._tiles, self.max_tiles)
    pixels = np.zeros((n_rows, self.max_tiles, size, size, 3), np.uint8)
    refs = {s: self._sample_refs(s) for _, _, s, _ in owned}
    tiles = self._tiles_decoder.decode({self._image_key(r) for rs in refs.values()
                                        for r in rs})
    for row, seg, s, slot in owned:
      failed = [(r, tiles[self._image_key(r)]) for r in refs[s]
                if isinstance(tiles[self._image_key(r)], str)]
      if failed:
        self._decode_failed(rows, row, seg, s, failed)
        continue   # its slots stay owned (the row's image tokens still need features): zeros
      for r in refs[s]:
        pixels[row, slot:slot + r.tiles] = tiles[self._image_key(r)]
        slot += r.tiles
    image_id = self.image_token_id
    counts = ((rows["input_ids"] == image_id).sum(1) if image_id is not None
              else np.zeros(n_rows, np.int64))
    used = (owner > 0).sum(1)
    if not np.array_equal(counts, used * images.TOKENS_PER_TILE):
      r = int(np.flatnonzero(counts != used * images.TOKENS_PER_TILE)[0])
      raise RuntimeError(f"row {r} (pack {int(packs[r])}) holds {int(counts[r])} "
                         f"{templates.IMG_CONTEXT} tokens but {int(used[r])} tiles x "
                         f"{images.TOKENS_PER_TILE}: a jaxtune bug, please report it")
    rows["pixel_values"] = pixels
    rows["tile_segment_ids"] = owner

  def _where(self, s: int) -> str:
    """`file:line (dataset 'name')` of packed sample s."""
    u = int(self._samples[s])
    src = self._files[int(self._u_file[u])]
    return sources.where(src.path, int(src.lineno[self._u_local[u]]),
                         self.specs[int(self._sample_ds[s])].name)

  def _sample_refs(self, s: int) -> list[sources.ImageRef]:
    """The images of packed sample s, read back from its line (memoised per line): only
    lines with images are read again, so text data costs nothing here."""
    u = int(self._samples[s])
    refs = self._refs.get(u)
    if refs is not None:
      return refs
    src = self._files[int(self._u_file[u])]
    opts = self.opts[int(self._sample_ds[s])]
    try:
      refs = sources.sample_images(sources.decode_line(src.line(int(self._u_local[u]))), opts)
    except ValueError as e:
      raise DataError(f"{self._where(s)}: {e} (it parsed at start-up: was the file changed "
                      "during the run? Restart to read it again)") from None
    if sum(r.tiles for r in refs) != self._tiles[s]:
      raise DataError(f"{self._where(s)}: the line now has {sum(r.tiles for r in refs)} "
                      f"image tiles, {int(self._tiles[s])} at start-up: was the file changed "
                      "during the run? Restart to read it again")
    self._refs[u] = refs
    return refs

  def _image_key(self, ref: sources.ImageRef) -> tuple:
    return (ref.path, ref.image_wh, ref.n_images)

  def _decode_failed(self, rows, row: int, seg: int, s: int, failed: list) -> None:
    """A sample whose image passed the start-up check (header) but does not decode."""
    where = self._where(s)
    if not self.skip_bad:
      raise DataError(f"{where}: {failed[0][1]} (its header passed the start-up check; only "
                      "decoding found this). Fix or replace the file, or set "
                      "data.skip_bad_samples=True to train without this sample")
    rows["labels"][row][rows["segment_ids"][row] == seg] = packing.IGNORE
    with self._image_lock:
      first = not self._skipped_samples
      new = int(self._samples[s]) not in self._skipped_samples
      self._skipped_samples.add(int(self._samples[s]))
      stats = self.stats
      stats["image_decode_failures"] = len(self._tiles_decoder.failures)
      stats["image_decode_skipped_samples"] = len(self._skipped_samples)
      if new and len(stats["image_decode_failure_locations"]) < _SHOWN_LOCATIONS:
        stats["image_decode_failure_locations"].append(f"{where}: {failed[0][1]}")
    if first:
      log.warning("data: %s: %s; its labels are masked and its tiles left zero "
                  "(data.skip_bad_samples=True; counted in stats['image_decode_failures'], "
                  "this warning is shown once)", where, failed[0][1])

  # ---------------------------------------------------------------- stages (Grain datasets)
  def samples(self, dataset: int | str) -> "grain.MapDataset":
    """The tokenized lines of one dataset (index or name) that this host read, in line order,
    before ratio, truncation and sample_transform: element i is a sample dict (stages), its
    ids read from the store on access."""
    d = dataset if isinstance(dataset, (int, np.integer)) else \
        [s.name for s in self.specs].index(dataset)
    at = np.flatnonzero(self._u_ds == d)
    tiles = self._u_images[at] // images.TOKENS_PER_TILE if self.image_size is not None else None
    return stages.source(stages.SampleSource(self._store, self._starts[at], self._u_lengths[at],
                                             self._u_ds[at], self._u_line[at], tiles))

  def mixed(self) -> "grain.MapDataset":
    """The packed samples in packing order (ratio applied, mixed with data.seed, truncated,
    after sample_transform): element k is sample k of the plan, with its dataset and line."""
    tiles = self._tiles if self.image_size is not None else None
    return stages.source(stages.SampleSource(self._tokens, self._sample_starts, self._lengths,
                                             self._sample_ds, self._sample_line, tiles))

  def packs(self, order: Sequence[int] | None = None) -> "grain.MapDataset":
    """Built rows: element k is pack order[k] (default: pack k) as pack_rows gives it, one
    row (arrays without the batch axis)."""
    return stages.source(stages.PackSource(self, order))

  def grain_dataset(self, epoch: int, composed: bool = False) -> "grain.MapDataset":
    """Epoch `epoch` as a random-access Grain dataset: element k is the batch of step k
    (this host's rows), with batch_transform applied.

    composed: the batches as packs(this host's order).batch(rows), element for element the
    same; building rows one by one is slower than one batch at once (the default)."""
    import grain  # pylint: disable=import-outside-toplevel
    order = self.epoch_order(epoch)
    if composed:
      mine = order.reshape(self.steps_per_epoch, self.rows)
      mine = mine if self.host_rows is None else mine[:, self.host_rows]
      ds = self.packs(mine.reshape(-1)).batch(mine.shape[1], batch_fn=stages.stack_rows)
    else:
      ds = grain.MapDataset.range(self.steps_per_epoch).map(
          functools.partial(self._batch_at, epoch, order))
    if self.batch_transform is None:
      return ds
    out = self.batch_transform(ds)
    if not isinstance(out, grain.MapDataset) or len(out) != self.steps_per_epoch:
      raise DataError("batch_transform must return a grain.MapDataset of one batch per step "
                      f"({self.steps_per_epoch}): map or random_map, not filter or batch")
    return out

  def _batch_at(self, epoch: int, order: np.ndarray, step: int) -> dict[str, np.ndarray]:
    return self.batch(epoch, int(step), order)

  def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This host's rows of every global batch of `epoch`, from `start_step` on.

    Batches are built ahead by a Grain prefetch thread (data.prefetch batches, default 2;
    0 builds each one on demand), so the next batch is ready when the step ends.
    """
    if not 0 <= start_step <= self.steps_per_epoch:
      raise IndexError(f"start_step {start_step} outside epoch of {self.steps_per_epoch} steps")
    if start_step == self.steps_per_epoch:
      return iter(())
    if self.prefetch <= 0 and self.batch_transform is not None:
      ds = self.grain_dataset(epoch)
      return (ds[k] for k in range(start_step, self.steps_per_epoch))
    if self.prefetch <= 0:
      order = self.epoch_order(epoch)
      return (self.batch(epoch, k, order) for k in range(start_step, self.steps_per_epoch))
    import grain  # pylint: disable=import-outside-toplevel
    ds = self.grain_dataset(epoch)[start_step:]
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                     prefetch_buffer_size=self.prefetch)))

  def max_token_id(self) -> int:
    """The largest id in the packed samples (what rows are built from); -1 when none."""
    return encoding.max_id_in(self._tokens, self._sample_starts, self._lengths)

  def iterator(self, epoch: int = 0, step: int = 0) -> "DataIterator":
    return DataIterator(self, epoch, step)

  def signature(self) -> dict[str, Any]:
    """What a checkpointed position is only valid for (global_order: any host count)."""
    hosts = {} if self.global_order else dict(process_count=self.process_count)
    return dict(seed=self.seed, packs=self.plan.num_packs, pack_max_length=self.pack_len,
                pack_level=self.level, rows=self.rows, **hosts,
                steps_per_epoch=self.steps_per_epoch, data_hash=self.data_hash,
                round_up=self.round_up,
                group_rows=self.group_rows if self.group_by_length else 0,
                micro_steps=self.micro_steps if self.group_by_length else 0,
                **({} if self.image_size is None else
                   dict(image_size=self.image_size, max_tiles=self.max_tiles)))


class DataIterator:
  """Endless iterator over epochs; its state (epoch, step) goes into the checkpoint."""

  def __init__(self, data: SFTData, epoch: int = 0, step: int = 0):
    self.data, self.epoch, self.step = data, epoch, step
    self._it = None

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.step >= self.data.steps_per_epoch:
      self.epoch, self.step, self._it = self.epoch + 1, 0, None
    if self._it is None:
      self._it = self.data.batches(self.epoch, self.step)
    batch = next(self._it)
    self.step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable: the position of the next batch and what it is valid for."""
    return dict(epoch=self.epoch, step=self.step, **self.data.signature())

  def set_state(self, state: dict[str, Any]) -> None:
    mine = self.data.signature()
    diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
    if diff:
      raise DataError("the checkpoint's data position does not match this data pipeline "
                      f"(saved vs now: {diff}); resuming would not see the same batches. "
                      "Use the same data, data config, tokenizer and host count.")
    self.epoch, self.step, self._it = int(state["epoch"]), int(state["step"]), None


def _rank_layout(global_batch_size: int, process_count: int, data_parallel: int | None,
                 micro_batch_size: int) -> tuple[int, int]:
  """(G, A) for one host's rows: G packs run side by side on this host's data-parallel ranks in
  each of the step's A micro-batches (rows = G x A). Without data_parallel, every row is its own
  rank (A = 1)."""
  rows = global_batch_size // process_count
  if data_parallel is None:
    return rows, 1
  per_pass = int(data_parallel) * max(1, micro_batch_size)
  if per_pass % process_count or global_batch_size % per_pass:
    return rows, 1
  group = per_pass // process_count
  return group, rows // group


class _Clock:
  def __init__(self):
    self.laps: dict[str, float] = {}
    self._t = time.perf_counter()

  def lap(self, name: str) -> None:
    now = time.perf_counter()
    self.laps[name] = round(now - self._t, 3)
    self._t = now


def _jax_allgather(count: int) -> Callable[[int], Sequence[int]]:
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  if jax.process_count() != count:
    raise ValueError(f"process_count={count} but JAX runs {jax.process_count()} process(es); "
                     "pass allgather= to agree on the epoch length without JAX")
  return lambda n: [int(x) for x in np.asarray(
      multihost_utils.process_allgather(np.asarray([n], np.int64))).reshape(-1)]

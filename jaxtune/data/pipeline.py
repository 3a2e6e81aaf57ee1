"""The data the trainer consumes: `SFTData(data_cfg, tokenizer, global_batch_size=...)`.

A thin facade over the stages, each its own module: `corpus` (read the JSONL lines, apply
sample_ratio, mix with data.seed, take this host's share, tokenize once through the cache),
`selection` (bad lines, truncation, drops, sample_transform), `packing` (the plan and built
rows), `pixels` (image tiles for the rows, from the refs start-up kept), `batches` (epoch order,
host rows, the iterator and its checkpointable position) and `stats`. Grain views of the stages
(samples(d), mixed(), packs(), grain_dataset(epoch)) come from `stages`; docs/data.md has it all.

`data_cfg` is a validated data section (`jaxtune.config.base_config().data` holds every key's
default; `config.validate` resolves the old names): this module restates no default. Image
numbers (tile size, tokens per tile, the image token) come from the model family's MediaSpec.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from jaxtune.data import batches as batches_lib
from jaxtune.data import corpus as corpus_lib
from jaxtune.data import encoding, idstore, packing, pixels, selection, stages, templates
from jaxtune.data import stats as stats_lib
from jaxtune.data.batches import DataIterator
from jaxtune.data.cache import TokenCache
from jaxtune.data.corpus import make_encoder
from jaxtune.data.media import MediaSpec, tiles_bound
from jaxtune.data.sources import DataError, DatasetSpec
from jaxtune.data.tokenizer import ENDOFTEXT

if TYPE_CHECKING:
  import grain

__all__ = ["DataIterator", "SFTData", "make_encoder"]
log = logging.getLogger(__name__)


class SFTData:
  """Packed, shuffled, sharded SFT batches. See the module docstring."""

  def __init__(self, data_cfg, tokenizer, *, global_batch_size: int, process_index: int = 0,
               process_count: int = 1, data_parallel: int | None = None,
               allgather: Callable[[int], Sequence[int]] | None = None,
               media: MediaSpec | None = None, global_order: bool = False,
               host_rows: Sequence[int] | None = None,
               sample_transform: Callable[[Any], Any] | None = None,
               batch_transform: Callable[[Any], Any] | None = None):
    """media: the model family's images (`family.media(cfg.model)`; None: a text model,
    samples with images are an error); batches then carry `pixel_values` and
    `tile_segment_ids`, text-only ones too (a static layout).
    global_order: every host builds the order of one host reading all rows and takes its
    `host_rows` of each batch (default: its block), so a run resumes on another host count;
    without it each host reads and packs only its share (evaluation).
    sample_transform: mixed() -> the samples to pack (filter, or map keeping `index`), once
    before packing. batch_transform: grain_dataset(epoch) -> a MapDataset of the same length
    (docs/data.md, "Composing with Grain")."""
    clock = stats_lib.Clock()
    self.encoder = make_encoder(tokenizer)
    clock.lap("encoder")
    c = data_cfg
    self.seed, self.pack_len, self.level = int(c.seed), int(c.pack_max_length), c.pack_level
    if self.level not in packing.LEVELS:
      raise ValueError(f"data.pack_level must be one of {list(packing.LEVELS)}, got "
                       f"'{self.level}' (validate the config: it resolves older names)")
    self.skip_bad, self.prefetch, self.round_up = c.skip_bad_samples, c.prefetch, c.round_up
    # XTuner turns length grouping off for pack_level 'none' (it refuses both at once).
    self.group_by_length = bool(c.group_by_length) and self.level != "none"
    self.micro_batch_size, self.media = int(c.micro_batch_size), media
    self.tile_bound = tiles_bound(c, media)          # the packer's limit; 0 without media
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size ({global_batch_size}) must be a multiple of the "
                       f"process count ({process_count})")
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.global_batch_size, self.global_order = int(global_batch_size), bool(global_order)
    layout_hosts = 1 if self.global_order else process_count  # whose order the batches follow
    self.rows = global_batch_size // layout_hosts
    self.group_rows, self.micro_steps = batches_lib.rank_layout(
        self.global_batch_size, layout_hosts, data_parallel, self.micro_batch_size)
    self.host_rows = None
    if self.global_order:
      share = global_batch_size // process_count
      self.host_rows = (np.arange(self.process_index * share, (self.process_index + 1) * share)
                        if host_rows is None else np.asarray(host_rows, np.int64))
    self.pad_id = self.encoder.added.get(ENDOFTEXT, 0)
    self.image_token_id = self.encoder.added.get(templates.IMG_CONTEXT)
    if media is not None and media.image_token_id not in (None, self.image_token_id):
      raise DataError(
          f"the model's image_token_id is {media.image_token_id} but the tokenizer at "
          f"{getattr(self.encoder, 'path', '?')} has "
          + (f"{templates.IMG_CONTEXT} = {self.image_token_id}" if self.image_token_id
             is not None else f"no {templates.IMG_CONTEXT} token")
          + ": the model would put image features at the wrong tokens. Use the model's own "
          "tokenizer (tokenizer_path), or fix model.image_token_id")
    if media is not None:     # the batches are laid out with the tokenizer's image token
      self.media = media._replace(image_token_id=self.image_token_id)
    self.specs = [DatasetSpec.from_config(d, i) for i, d in enumerate(c.datasets)]
    if not self.specs:
      raise DataError("data.datasets is empty: add at least one dataset")
    self.num_workers = encoding.resolve_workers(int(c.num_workers))
    self.cache = TokenCache(c.cache_dir, self.encoder)
    self.opts = [s.parse_options(c.min_dynamic_patch, c.max_dynamic_patch, media)
                 for s in self.specs]
    if stale := idstore.clean_stale_stores():
      log.info("data: removed %d token store file(s) left in TMPDIR by an earlier crash",
               len(stale))
    self.sample_transform, self.batch_transform = sample_transform, batch_transform
    self._build(c, clock)
    if pruned := self.cache.prune(None if c.cache_max_gib is None
                                  else float(c.cache_max_gib) * 2**30):
      log.info("data: pruned %d cache entr(y/ies) from %s (data.cache_max_gib=%s)",
               len(pruned), self.cache.dir, c.cache_max_gib)
    local = batches_lib.local_steps(self.plan.num_packs, self.rows, self.round_up)
    self.steps_per_epoch = batches_lib.agree_steps(local, self.round_up, layout_hosts, allgather)
    self.layout = batches_lib.Layout(self.seed, self.rows, self.steps_per_epoch,
                                     self.group_by_length, self.group_rows, self.micro_steps,
                                     self.host_rows)
    self.stats.update(stats_lib.packing_stats(
        self.plan, level=self.level, pack_len=self.pack_len, steps_per_epoch=self.steps_per_epoch,
        rows=self.rows, global_batch_size=self.global_batch_size, round_up=self.round_up),
        group_by_length=self.group_by_length, group_rows=self.group_rows,
        process_index=self.process_index, process_count=self.process_count)
    if media is not None:
      self.stats.update(stats_lib.image_stats(
          self.plan, self._tiles, self.stats["datasets"], tile_size=media.tile_size,
          tile_bound=self.tile_bound, tile_slots=self.max_tiles))
    stats_lib.check_epoch(self.stats)
    self._pixels = None if media is None else pixels.Pixels(
        self.media, self._refs, max_tiles=self.max_tiles, min_patch=c.min_dynamic_patch,
        max_patch=c.max_dynamic_patch, cache_bytes=int(float(c.image_cache_mb) * 2**20),
        workers=self.num_workers, skip_bad=self.skip_bad, sample_uid=self._samples,
        where=lambda s: self.corpus.where(self._samples[s], self.specs), stats=self.stats)

  def _build(self, c, clock: stats_lib.Clock) -> None:
    """Start-up: corpus -> selection -> packing plan, the image refs and the data hash."""
    share = None if self.global_order else (self.process_index, self.process_count)
    self.corpus = corpus_lib.read(self.specs, self.opts, self.encoder, self.cache,
                                  self.num_workers, self.seed, share, clock)
    clock.lap("tokenize")
    selection.check_bad(self.corpus, self.skip_bad)
    max_len = [selection.max_length(s, self.level, int(c.sample_max_length), self.pack_len)
               for s in self.specs]
    sel = selection.select(self.corpus, self.specs, np.array(max_len, np.int64),
                           level=self.level, media=self.media, tile_bound=self.tile_bound,
                           image_id=self.image_token_id, transform=self.sample_transform)
    self._samples, self._lengths, self._tiles = sel.samples, sel.lengths, sel.tiles
    self._sample_ds, self._sample_line = sel.sample_ds, sel.sample_line
    self._tokens, self._sample_starts = sel.tokens, sel.sample_starts
    self._starts = self.corpus.starts                # where unique line u's ids begin
    clock.lap("truncate")
    tiles = self._tiles if self.media is not None else None
    self.plan = packing.make_plan(self.level, self._lengths, self.pack_len,
                                  int(c.pack_buffer_size), tiles, self.tile_bound or None)
    # The batches' tile slots: the fullest pack's tiles (<= the bound; 0 without images, so
    # text-only data carries no pixel arrays and the model's layout has none).
    self.max_tiles = int(self.plan.pack_tiles(self._tiles).max(initial=0)) if tiles is not None \
        else 0
    clock.lap("pack")
    # Each packed image sample's images, read once now for every batch that needs them.
    with_images = self._tiles > 0
    self._refs = pixels.read_refs(self.corpus, self.specs, self.opts, dict(zip(
        self._samples[with_images].tolist(), self._tiles[with_images].tolist())))
    clock.lap("images")
    digest = hashlib.sha1(self.encoder.fingerprint.encode())
    for arr in (self._samples, self._lengths, self.plan.sample, self.plan.length):
      digest.update(np.ascontiguousarray(arr).tobytes())
    if self.media is not None:        # text data keeps the hash it always had
      digest.update(np.ascontiguousarray(self._tiles).tobytes() + b"%d" % self.tile_bound)
    if sel.transformed:               # a sample_transform changed ids: they are the data now
      digest.update(np.ascontiguousarray(self._tokens).tobytes())
    self.data_hash = digest.hexdigest()[:16]
    self.stats: dict[str, Any] = {"datasets": stats_lib.per_dataset(
        self.specs, self.corpus, sel, [None if self.level == "hard" else m for m in max_len],
        tile_bound=self.tile_bound, transform=self.sample_transform is not None)}
    clock.lap("stats")
    self.stats["startup_seconds"] = clock.laps

  # ---------------------------------------------------------------- rows and batches
  @functools.cached_property
  def pack_flops(self) -> np.ndarray:
    """Attention cost of each pack: the sum of its segments' squared lengths."""
    return batches_lib.pack_flops(self.plan)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The packs of every row of the epoch, in row order (batches.Layout.epoch_order)."""
    return self.layout.epoch_order(epoch, self.plan.num_packs, lambda: self.pack_flops)

  def batch(self, epoch: int, step: int, order: np.ndarray | None = None) -> dict[str,
                                                                                  np.ndarray]:
    """This host's rows of step `step` of `epoch` (order: that epoch's, if already made)."""
    order = self.epoch_order(epoch) if order is None else order
    return self.pack_rows(self.layout.step_packs(order, step))

  def pack_rows(self, packs: np.ndarray) -> dict[str, np.ndarray]:
    """The rows of packs `packs` (indices into the plan), with their pixels given media."""
    packs = np.asarray(packs, np.int64)
    rows = packing.build_rows(self.plan, packs, self._tokens, self._sample_starts,
                              self.pack_len, self.pad_id)
    if self.max_tiles:   # data with images: every batch (text-only rows too) has the arrays
      self._pixels.add(rows, packs, self.plan, self._tiles)
    return rows

  def max_token_id(self) -> int:
    """The largest id in the packed samples (what rows are built from); -1 when none."""
    return encoding.max_id_in(self._tokens, self._sample_starts, self._lengths)

  # ---------------------------------------------------------------- stages (Grain datasets)
  def samples(self, dataset: int | str) -> "grain.MapDataset":
    """One dataset's (index or name) lines this host read, tokenized, in line order."""
    d = dataset if isinstance(dataset, (int, np.integer)) else \
        [s.name for s in self.specs].index(dataset)
    c = self.corpus
    at = np.flatnonzero(c.u_ds == d)
    tiles = c.n_image[at] // self.media.tokens_per_tile if self.media is not None else None
    return stages.source(stages.SampleSource(c.tokens, c.starts[at], c.lengths[at], c.u_ds[at],
                                             c.u_line[at], tiles))

  def mixed(self) -> "grain.MapDataset":
    """The packed samples in packing order: element k is sample k of the plan."""
    tiles = self._tiles if self.media is not None else None
    return stages.source(stages.SampleSource(self._tokens, self._sample_starts, self._lengths,
                                             self._sample_ds, self._sample_line, tiles))

  def packs(self, order: Sequence[int] | None = None) -> "grain.MapDataset":
    """Built rows: element k is pack order[k] (default: pack k), one row (no batch axis)."""
    return stages.source(stages.PackSource(self, order))

  def grain_dataset(self, epoch: int, composed: bool = False) -> "grain.MapDataset":
    """Epoch `epoch` as a random-access Grain dataset: element k is the batch of step k (this
    host's rows), then batch_transform. composed: packs(this host's order).batch(rows),
    element for element the same, slower (rows built one by one)."""
    import grain  # pylint: disable=import-outside-toplevel
    order = self.epoch_order(epoch)
    if composed:
      mine = self.layout.host_order(order)
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
    """This host's rows of every batch of `epoch` from `start_step` on, built ahead by a Grain
    prefetch thread (data.prefetch batches; 0 builds each one on demand)."""
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

  # ---------------------------------------------------------------- position (checkpoints)
  def iterator(self, epoch: int = 0, step: int = 0) -> DataIterator:
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
                **({} if self.media is None else
                   dict(image_size=self.media.tile_size, max_tiles=self.max_tiles)))

  def state_at(self, epoch: int, step: int) -> dict[str, Any]:
    """The checkpointable state (JSON) of the position before step `step` of `epoch`: what
    DataIterator.get_state gives there."""
    return batches_lib.state(self.signature(), epoch, step)

  def position_of(self, state: dict[str, Any]) -> tuple[int, int]:
    """(epoch, step) of a saved state; DataError if this pipeline would give other batches."""
    return batches_lib.position_of(self.signature(), state)

  check_state = position_of   # what a resume that only needs the check calls


"""The pipeline's stages as Grain datasets: equal to what SFTData builds, and composable."""

import json
import pickle

import numpy as np
import pytest

from jaxtune.config import dataset
from jaxtune.data import DataError, SFTData, stages
from jaxtune.data.packing import IGNORE
from jaxtune.data.tokenizer import TokenEncoder
from data_section import data_section, intern_media

# The tokenizer and the two-dataset chat corpus of the pipeline tests (the same lines).
from test_data_pipeline import KEYS, corpus, enc, tok  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import


def cfg_for(corpus, **kw):
  cfg = dict(datasets=[dataset("a", corpus["a"], 1.5), dataset("b", corpus["b"], 2.0)],
             sample_max_length=256, pack_max_length=256, pack_level="soft", num_workers=1,
             cache_dir=None, seed=7, prefetch=2)
  cfg.update(kw)
  return data_section(**cfg)


def same(b1, b2):
  return all(np.array_equal(b1[k], b2[k]) for k in KEYS)


def spans(data, p):
  lo, hi = data.plan.bounds[p], data.plan.bounds[p + 1]
  return zip(data.plan.sample[lo:hi].tolist(), data.plan.offset[lo:hi].tolist(),
             data.plan.length[lo:hi].tolist())


@pytest.mark.parametrize("level", ["soft", "hard", "none"])
def test_stages_equal_what_sftdata_builds(corpus, enc, level):
  data = SFTData(cfg_for(corpus, pack_level=level, sample_max_length=64), enc,
                 global_batch_size=2)
  mixed, packs = data.mixed(), data.packs()
  assert len(mixed) == len(data.plan.sample if level != "hard" else data._lengths)
  by_line = {}
  for d, name in enumerate(["a", "b"]):
    src = data.samples(name)
    assert len(src) == len(data.samples(d)) == {"a": 60, "b": 25}[name]
    by_line[d] = {src[i]["line"]: src[i] for i in range(len(src))}
  for k in range(len(mixed)):
    el = mixed[k]
    full = by_line[el["dataset"]][el["line"]]           # the truncated sample's source line
    n = len(el["input_ids"])
    assert el["index"] == k and n == data._lengths[k]
    assert np.array_equal(el["input_ids"], full["input_ids"][:n])
    assert np.array_equal(el["labels"][:-1], full["labels"][:n - 1])
  for p in range(len(packs)):
    row, ref = packs[p], data.pack_rows([p])
    assert all(np.array_equal(row[key], ref[key][0]) for key in KEYS)
    for seg, (s, off, n) in enumerate(spans(data, p), start=1):   # rows are the samples
      at = row["segment_ids"] == seg
      el = mixed[s]
      assert np.array_equal(row["input_ids"][at], el["input_ids"][off:off + n])
      want = el["labels"][off:off + n].copy()
      want[-1] = IGNORE
      assert np.array_equal(row["labels"][at], want)


def test_composed_batches_equal_the_fast_path(corpus, enc):
  data = SFTData(cfg_for(corpus), enc, global_batch_size=4)
  for epoch in (0, 1):
    composed = data.grain_dataset(epoch, composed=True)
    assert len(composed) == data.steps_per_epoch
    for k in range(data.steps_per_epoch):
      assert same(composed[k], data.batch(epoch, k))
      assert list(composed[k]) == list(data.batch(epoch, k))
  # The fast path, composed by hand: batch the pack indices, build each batch at once.
  import grain  # pylint: disable=import-outside-toplevel
  by_index = grain.MapDataset.source(data.epoch_order(1)).batch(data.rows).map(data.pack_rows)
  assert all(same(by_index[k], data.batch(1, k)) for k in range(data.steps_per_epoch))
  # global_order on two hosts: each host's rows are the per-host slice of the same batches.
  hosts = [SFTData(cfg_for(corpus), enc, global_batch_size=4, global_order=True,
                   process_index=i, process_count=2) for i in range(2)]
  for k in range(data.steps_per_epoch):
    parts = [h.grain_dataset(1, composed=True)[k] for h in hosts]
    assert all(same(part, h.batch(1, k)) for part, h in zip(parts, hosts))
    whole = {key: np.concatenate([part[key] for part in parts]) for key in KEYS}
    assert same(whole, data.batch(1, k))


def test_stage_sources_pickle_for_worker_processes(corpus, enc):
  data = SFTData(cfg_for(corpus), enc, global_batch_size=4)
  mixed = data.mixed()
  back = pickle.loads(pickle.dumps(mixed))
  for k in (0, 7, len(mixed) - 1):
    assert np.array_equal(back[k]["input_ids"], mixed[k]["input_ids"])
    assert np.array_equal(back[k]["labels"], mixed[k]["labels"])
  el = mixed[3]
  raw = stages.encode(el["input_ids"], el["labels"])
  assert np.array_equal(stages.decode(raw)[1], el["labels"])


def test_sample_filter_changes_what_is_packed_and_resumes(corpus, enc):
  delta = set(enc.encode(" delta"))

  def no_delta(ds):
    return ds.filter(lambda el: not delta.intersection(el["input_ids"].tolist()))

  plain = SFTData(cfg_for(corpus), enc, global_batch_size=4)
  dropped = sum(bool(delta.intersection(plain.mixed()[k]["input_ids"].tolist()))
                for k in range(len(plain.mixed())))
  assert 0 < dropped < len(plain.mixed())
  data = SFTData(cfg_for(corpus), enc, global_batch_size=4, sample_transform=no_delta)
  assert len(data.mixed()) == len(plain.mixed()) - dropped
  assert sum(d["filtered"] for d in data.stats["datasets"].values()) == dropped
  assert all(d["bad"] == 0 for d in data.stats["datasets"].values())
  assert data.data_hash != plain.data_hash
  for batch in data.batches(0):
    ids = batch["input_ids"][batch["segment_ids"] > 0]
    assert not delta.intersection(ids.tolist())
  # Exact resume: the same transform rebuilds the same packs, and the state matches.
  it = data.iterator()
  n = data.steps_per_epoch + 2
  reference = [next(it) for _ in range(n + 3)]
  it = data.iterator()
  for _ in range(n):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  resumed = SFTData(cfg_for(corpus), enc, global_batch_size=4,
                    sample_transform=no_delta).iterator()
  resumed.set_state(state)
  assert all(same(next(resumed), ref) for ref in reference[n:])
  with pytest.raises(DataError, match="does not match"):
    plain.iterator().set_state(state)


def test_sample_map_in_a_thread_pool_changes_ids_and_labels(corpus, enc):
  import grain  # pylint: disable=import-outside-toplevel

  def mask_b(el):   # train nothing of dataset b, and drop its last token
    if el["dataset"] == 1:
      el = dict(el, input_ids=el["input_ids"][:-1], labels=np.full(len(el["labels"]) - 1,
                                                                     IGNORE, np.int32))
    return el

  def transform(ds):
    return ds.map(mask_b).to_iter_dataset(grain.ReadOptions(num_threads=2))

  plain = SFTData(cfg_for(corpus), enc, global_batch_size=4)
  data = SFTData(cfg_for(corpus), enc, global_batch_size=4, sample_transform=transform)
  assert data.stats["datasets"]["b"]["loss_tokens"] == 0
  assert data.stats["datasets"]["a"]["loss_tokens"] == plain.stats["datasets"]["a"]["loss_tokens"]
  assert data.stats["datasets"]["b"]["tokens"] == plain.stats["datasets"]["b"]["tokens"] - 50
  assert data.data_hash != plain.data_hash
  mixed = data.mixed()
  for k in range(len(mixed)):
    el = mixed[k]
    assert (el["dataset"] == 1) == np.all(el["labels"] == IGNORE)
  again = SFTData(cfg_for(corpus), enc, global_batch_size=4, sample_transform=transform)
  assert again.data_hash == data.data_hash
  assert all(same(a, b) for a, b in zip(again.batches(1), data.batches(1)))


def test_batch_transform_feeds_batches_and_resume(corpus, enc):
  def noise(ds):
    return ds.random_map(lambda b, rng: dict(b, noise=rng.integers(0, 1 << 30, 4)), seed=3)

  data = SFTData(cfg_for(corpus), enc, global_batch_size=4, batch_transform=noise)
  on_demand = SFTData(cfg_for(corpus, prefetch=0), enc, global_batch_size=4,
                      batch_transform=noise)
  full = list(data.batches(1))
  assert len(full) == data.steps_per_epoch
  assert all(same(b, data.batch(1, k)) for k, b in enumerate(full))
  tail = list(on_demand.batches(1, start_step=2))
  assert all(np.array_equal(a["noise"], b["noise"]) for a, b in zip(tail, full[2:]))
  bad = SFTData(cfg_for(corpus), enc, global_batch_size=4,
                batch_transform=lambda ds: ds.batch(2))
  with pytest.raises(DataError, match="batch_transform"):
    next(iter(bad.batches(0)))


def test_image_stages_and_a_filter_keep_pixels_exact(tmp_path):
  from test_data_multimodal import (SHAPES, cfg_of, image_line, image_tokenizer,  # pylint: disable=import-outside-toplevel
                                    make_image, mm, write_jsonl)
  (tmp_path / "tok").mkdir()
  enc = TokenEncoder(image_tokenizer(str(tmp_path / "tok")))
  for k, (name, (w, h)) in enumerate(SHAPES.items()):
    make_image(tmp_path / f"{name}.jpg", w, h, k)
  lines = [image_line(f"m{i}", [(f"{x}.jpg", *SHAPES[x])]) for i, x in
           enumerate(["sq", "wide", "tall"] * 3)]
  cfg = cfg_of(mm("img", write_jsonl(tmp_path / "img.jsonl", lines), tmp_path))
  plain = SFTData(cfg, enc, global_batch_size=2, media=intern_media())
  assert [plain.mixed()[k]["tiles"] for k in range(9)] == plain._tiles.tolist()
  data = SFTData(cfg, enc, global_batch_size=2, media=intern_media(),
                 sample_transform=lambda ds: ds.filter(lambda el: el["tiles"] != 3))
  assert len(data.mixed()) == 6 and data.stats["datasets"]["img"]["filtered"] == 3
  assert data.data_hash != plain.data_hash and data.stats["image_tiles"] == 3 * (1 + 4)
  for p in range(data.plan.num_packs):
    row, ref = data.packs()[p], data.pack_rows([p])
    assert all(np.array_equal(row[key], ref[key][0]) for key in ref)
    assert "pixel_values" in row
  for k in range(data.steps_per_epoch):
    got, want = data.grain_dataset(0, composed=True)[k], data.batch(0, k)
    assert list(got) == list(want) and all(np.array_equal(got[key], want[key]) for key in want)

  def grow(ds):   # a map may not change a sample with images
    return ds.map(lambda el: dict(el, input_ids=el["input_ids"][:-1], labels=el["labels"][:-1]))
  with pytest.raises(DataError, match="images"):
    SFTData(cfg, enc, global_batch_size=2, media=intern_media(), sample_transform=grow)

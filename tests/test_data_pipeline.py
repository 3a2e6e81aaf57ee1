"""SFTData end to end: epochs, exact resume, host shards, worker processes and the cache."""

import collections
import json
import os
import re
import shutil
import tempfile
import threading

import numpy as np
import pytest

from jaxtune.config import dataset
from jaxtune.data import DataError, SFTData, encoding
from jaxtune.data.tokenizer import TokenEncoder, build_qwen_tokenizer
from data_section import data_section, intern_media

TOK_DIR = os.path.join(tempfile.gettempdir(), "jaxtune-tests", "qwen3-tokenizer")
KEYS = ("input_ids", "labels", "segment_ids", "positions")


@pytest.fixture(scope="module")
def tok():
  return build_qwen_tokenizer(TOK_DIR)


@pytest.fixture(scope="module")
def enc(tok):
  return TokenEncoder(tok)


def chat(tag, i, rng):
  q = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.integers(2, 40)))
  return {"messages": [{"role": "user", "content": f"[{tag}{i}] {q}"},
                       {"role": "assistant", "content": f"answer {tag}{i}"}]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  paths = {}
  for tag, n in (("a", 60), ("b", 25)):
    paths[tag] = str(root / f"{tag}.jsonl")
    with open(paths[tag], "w") as f:
      for i in range(n):
        f.write(json.dumps(chat(tag, i, rng)) + "\n")
  return paths


def cfg_for(corpus, **kw):
  cfg = dict(datasets=[dataset("a", corpus["a"], 1.5), dataset("b", corpus["b"], 2.0)],
             sample_max_length=256, pack_max_length=256, pack_level="soft", num_workers=1,
             cache_dir=None, seed=7)
  cfg.update(kw)
  return data_section(**cfg)


def same(b1, b2):
  return all(np.array_equal(b1[k], b2[k]) for k in KEYS)


def segments(batch):
  """(input ids, labels) of every segment of every row."""
  out = []
  for r in range(batch["input_ids"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      at = seg == s
      out.append((batch["input_ids"][r][at], batch["labels"][r][at]))
  return out


def test_batches_shapes_and_epoch_coverage(corpus, enc):
  data = SFTData(cfg_for(corpus), enc, global_batch_size=1)
  assert data.stats["datasets"]["a"]["samples"] == 90
  assert data.stats["datasets"]["b"]["samples"] == 50
  seen = collections.Counter()
  steps = 0
  for batch in data.batches(0):
    steps += 1
    for k in KEYS:
      assert batch[k].dtype == np.int32 and batch[k].shape == (1, 256)
    for ids, labels in segments(batch):
      text = enc.decode(ids)
      tag = re.search(r"\[([ab]\d+)\]", text).group(1)
      seen[tag] += 1
      # Exactly the assistant answer and its <|im_end|> carry loss, shifted by one.
      trained = labels[labels != -100]
      assert enc.decode(trained) == f"answer {tag}<|im_end|>"
      assert labels[-1] == -100
  assert steps == data.steps_per_epoch == data.stats["packs"]
  # Every sample exactly once per epoch (ratio 1.5: half of a's lines twice; 2.0: b twice).
  assert sum(seen.values()) == 140
  assert all(seen[f"b{i}"] == 2 for i in range(25))
  assert sorted(collections.Counter(seen[f"a{i}"] for i in range(60)).items()) == [(1, 30),
                                                                                    (2, 30)]


def test_resume_at_any_step_gives_the_tail(corpus, tok):
  data = SFTData(cfg_for(corpus), tok, global_batch_size=4)
  full = list(data.batches(1))
  again = SFTData(cfg_for(corpus), tok, global_batch_size=4)
  for k in (0, 3, len(full) - 1):
    tail = list(again.batches(1, start_step=k))
    assert len(tail) == len(full) - k
    assert all(same(a, b) for a, b in zip(tail, full[k:]))
  assert not same(next(data.batches(0)), full[0])             # epochs reshuffle
  other_seed = SFTData(cfg_for(corpus, seed=8), tok, global_batch_size=4)
  assert not same(next(other_seed.batches(1)), full[0])


def test_iterator_state_resumes_across_epochs(corpus, tok):
  data = SFTData(cfg_for(corpus), tok, global_batch_size=4)
  it = data.iterator()
  n = data.steps_per_epoch + 3
  reference = [next(it) for _ in range(n + 4)]
  it = data.iterator()
  for _ in range(n):
    next(it)
  state = json.loads(json.dumps(it.get_state()))              # survives a checkpoint
  resumed = SFTData(cfg_for(corpus), tok, global_batch_size=4).iterator()
  resumed.set_state(state)
  assert all(same(next(resumed), ref) for ref in reference[n:])
  wrong = SFTData(cfg_for(corpus, pack_max_length=512, sample_max_length=256), tok,
                  global_batch_size=4).iterator()
  with pytest.raises(DataError, match="does not match"):
    wrong.set_state(state)


def thread_allgather(count):
  barrier, values, lock = threading.Barrier(count), {}, threading.Lock()

  def allgather(rank, n):
    with lock:
      values[rank] = n
    barrier.wait()
    return [values[r] for r in range(count)]
  return allgather


def test_two_hosts_partition_the_epoch(corpus, enc):
  single = SFTData(cfg_for(corpus), enc, global_batch_size=2)
  gather = thread_allgather(2)
  hosts = [None, None]

  def build(rank):
    hosts[rank] = SFTData(cfg_for(corpus), enc, global_batch_size=2, process_index=rank,
                          process_count=2, allgather=lambda n: gather(rank, n))
  threads = [threading.Thread(target=build, args=(r,)) for r in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  # Each host holds a disjoint half of the global sample order; together exactly one epoch.
  occurrences = lambda d: collections.Counter(
      enc.decode(d._tokens[d._starts[u]:d._starts[u] + 12] & encoding.ID_MASK)
      for u in d._samples)
  union = occurrences(hosts[0]) + occurrences(hosts[1])
  assert union == occurrences(single)
  assert sum(h.stats["datasets"]["a"]["samples"] for h in hosts) == 90
  assert hosts[0].steps_per_epoch == hosts[1].steps_per_epoch
  for h in hosts:
    batch = next(h.batches(0))
    assert batch["input_ids"].shape == (1, 256)
    assert h.steps_per_epoch == max(x.plan.num_packs for x in hosts)   # round_up
  with pytest.raises(ValueError, match="multiple of the process count"):
    SFTData(cfg_for(corpus), enc, global_batch_size=3, process_count=2,
            allgather=lambda n: [n, n])


def test_worker_processes_give_the_same_batches(corpus, tok, monkeypatch, tmp_path):
  """With workers, both datasets' ids share one store file in the order tasks finish; with a
  cache, each file's entry is written back in line order and read back from there."""
  inline = SFTData(cfg_for(corpus), tok, global_batch_size=2)
  monkeypatch.setattr(encoding, "MIN_LINES_FOR_WORKERS", 0)
  pooled = SFTData(cfg_for(corpus, num_workers=2), tok, global_batch_size=2)
  assert all(same(a, b) for a, b in zip(inline.batches(0), pooled.batches(0)))
  cache = str(tmp_path / "cache")
  cold = SFTData(cfg_for(corpus, num_workers=2, cache_dir=cache), tok, global_batch_size=2)
  warm = SFTData(cfg_for(corpus, num_workers=2, cache_dir=cache), tok, global_batch_size=2)
  assert (warm.cache.hits, warm.cache.misses) == (2, 0)
  for data in (cold, warm):
    assert all(same(a, b) for a, b in zip(inline.batches(0), data.batches(0)))


def test_cache_skips_tokenizing_and_invalidates_exactly(corpus, tok, tmp_path):
  cache = str(tmp_path / "cache")
  files = {k: str(tmp_path / f"{k}.jsonl") for k in corpus}
  for k, p in corpus.items():
    shutil.copy(p, files[k])
  build = lambda **kw: SFTData(cfg_for(files, cache_dir=cache, **kw), tok, global_batch_size=2)
  cold = build()
  assert (cold.cache.hits, cold.cache.misses) == (0, 2)
  warm = build()
  assert (warm.cache.hits, warm.cache.misses) == (2, 0)
  assert all(same(a, b) for a, b in zip(cold.batches(0), warm.batches(0)))
  # Ratio, seed and packing are applied after the cache: every entry is reused.
  assert build(seed=1, pack_level="none").cache.hits == 2
  # Editing one file invalidates that file only.
  with open(files["b"], "a") as f:
    f.write(json.dumps({"messages": [{"role": "user", "content": "new"}]}) + "\n")
  changed = build()
  assert (changed.cache.hits, changed.cache.misses) == (1, 1)
  assert changed.stats["datasets"]["b"]["lines"] == 26
  # A different template for one dataset invalidates that dataset's entry only.
  cfg = cfg_for(files, cache_dir=cache)
  cfg.datasets = [dataset("a", files["a"], 1.5, chat_template="intern-s1"),
                  dataset("b", files["b"], 2.0)]
  assert SFTData(cfg, tok, global_batch_size=2).cache.misses == 1
  # A different tokenizer invalidates everything.
  other = str(tmp_path / "tok2")
  shutil.copytree(tok, other)
  with open(os.path.join(other, "tokenizer.json")) as f:
    spec = json.load(f)
  with open(os.path.join(other, "tokenizer.json"), "w") as f:
    json.dump(spec, f, indent=1)
  assert SFTData(cfg_for(files, cache_dir=cache), other, global_batch_size=2).cache.misses == 2


def test_cache_entry_compacts_a_shared_out_of_order_store():
  """An entry whose lines sit in a store shared with other files, in task-finishing order and
  with bad (empty) lines, is written to the cache back to back in line order."""
  from jaxtune.data import cache  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  lengths = rng.integers(0, 6, 40) * (rng.random(40) > 0.2)     # some bad lines: length 0
  ids = [rng.integers(1, 1000, n).astype(np.uint32) for n in lengths]
  tasks = [list(range(k, min(k + 7, 40))) for k in range(0, 40, 7)]
  store, starts = [np.full(9, 99, np.uint32)], np.zeros(40, np.int64)   # another file's ids
  at = 9
  for task in rng.permutation(len(tasks)):                   # tasks land in any order
    for line in tasks[task]:
      starts[line] = at
      store.append(ids[line])
      at += lengths[line]
  entry = cache.Entry(np.arange(40), starts, lengths, np.zeros(40, np.int64),
                      np.zeros(40, np.int64), np.concatenate(store), {})
  tokens, new_starts = entry.compact()
  np.testing.assert_array_equal(tokens, np.concatenate(ids))
  np.testing.assert_array_equal(new_starts, np.cumsum(lengths) - lengths)
  # Some lines only (another host's share): nothing is copied, their ids are found in place.
  some = np.arange(3, 40, 4)
  tokens, new_starts, got_lengths, _, _ = entry.select(some)
  assert tokens is entry.tokens
  for k, s, n in zip(some, new_starts, got_lengths):
    np.testing.assert_array_equal(tokens[s:s + n], ids[k])


def test_bad_line_in_cached_file_still_stops(corpus, tok, tmp_path):
  path = str(tmp_path / "bad.jsonl")
  with open(path, "w") as f:
    f.write('{"messages": [{"role": "user", "content": "hi"}]}\n[1, 2]\n')
  cfg = dict(datasets=[dataset("bad", path)], pack_max_length=64, sample_max_length=64,
             cache_dir=str(tmp_path / "c"), skip_bad_samples=True, num_workers=1)
  assert SFTData(data_section(**cfg), tok, global_batch_size=1).stats["datasets"]["bad"]["bad"] == 1
  cfg["skip_bad_samples"] = False
  with pytest.raises(DataError, match=f"{re.escape(path)}:2 .*message 0 must be an object"):
    SFTData(data_section(**cfg), tok, global_batch_size=1)


def check_rows(batch, level, pack_len):
  for r in range(batch["input_ids"].shape[0]):
    ids, labels = batch["input_ids"][r], batch["labels"][r]
    seg, pos = batch["segment_ids"][r], batch["positions"][r]
    assert len(ids) == pack_len
    assert (labels[seg == 0] == -100).all() and (pos[seg == 0] == 0).all()
    n_seg = int(seg.max())
    assert (np.diff(seg[seg > 0]) >= 0).all() and set(seg[seg > 0]) == set(range(1, n_seg + 1))
    for s in range(1, n_seg + 1):
      at = np.flatnonzero(seg == s)
      assert (np.diff(at) == 1).all()                              # contiguous
      assert (pos[at] == np.arange(len(at))).all()                 # positions restart
      assert labels[at[-1]] == -100                                # nothing crosses a boundary
      inner = labels[at[:-1]]
      assert ((inner == -100) | (inner == ids[at[1:]])).all()      # shifted by one
      if level != "hard":                                          # whole samples only
        assert ids[at[0]] == 151644 and ids[at[-1]] == 198
    if level == "none":
      assert n_seg == 1
    if level == "hard":
      assert (seg > 0).all()


@pytest.mark.parametrize("level", ["soft", "hard", "none"])
def test_pack_levels_end_to_end(corpus, enc, level):
  data = SFTData(cfg_for(corpus, pack_level=level, pack_max_length=128,
                         sample_max_length=128), enc, global_batch_size=2)
  rows = 0
  for batch in data.batches(0):
    check_rows(batch, level, 128)
    rows += 2
  total = sum(d["tokens"] for d in data.stats["datasets"].values())
  if level == "hard":
    assert data.stats["packs"] == total // 128 and data.stats["pack_efficiency"] == 1.0
  else:
    assert (data.stats["packs"] == 140) == (level == "none")    # soft packs several per row
  assert rows == data.steps_per_epoch * 2
  assert data.stats["packs_repeated_per_epoch"] == -data.stats["packs"] % 2   # round_up
  assert data.stats["packs_dropped_per_epoch"] == 0


def test_prefetching_and_on_demand_batches_agree(corpus, enc):
  eager = SFTData(cfg_for(corpus, prefetch=0), enc, global_batch_size=2)
  ahead = SFTData(cfg_for(corpus, prefetch=4), enc, global_batch_size=2)
  assert all(same(a, b) for a, b in zip(eager.batches(2, 1), ahead.batches(2, 1)))
  assert len(list(ahead.grain_dataset(0))) == ahead.steps_per_epoch
  assert same(ahead.grain_dataset(1)[3], eager.batch(1, 3))


@pytest.fixture(scope="module")
def image_tok(tok, tmp_path_factory):
  """The Qwen3 tokenizer plus Intern-S1's image tokens (as added tokens)."""
  out = str(tmp_path_factory.mktemp("tok_img"))
  shutil.copy(os.path.join(tok, "tokenizer_config.json"), out)
  with open(os.path.join(tok, "tokenizer.json")) as f:
    spec = json.load(f)
  for i, t in enumerate(["<img>", "</img>", "<IMG_CONTEXT>"]):
    spec["added_tokens"].append(dict(id=151669 + i, content=t, single_word=False, lstrip=False,
                                     rstrip=False, normalized=False, special=True))
  with open(os.path.join(out, "tokenizer.json"), "w") as f:
    json.dump(spec, f)
  return out


def test_image_samples_are_counted_refused_or_dropped(image_tok, tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  Image.new("RGB", (448, 448)).save(tmp_path / "x.jpg")   # start-up checks the image's header
  line = {"messages": [{"role": "user", "content": [
      {"type": "text", "text": "<IMG_CONTEXT>\nwhat is it?"},
      {"type": "image_url", "image_url": {"url": "x.jpg", "image_wh": [448, 448]}}]},
      {"role": "assistant", "content": "a cat"}]}
  path = str(tmp_path / "mm.jsonl")
  with open(path, "w") as f:
    f.write(json.dumps(line) + "\n" + json.dumps(chat("t", 0, np.random.default_rng(0))) + "\n")
  cfg = data_section(**dict(datasets=[dataset("mm", path, chat_template="intern-s1",
                                          media_root=str(tmp_path))],
                        pack_max_length=512, sample_max_length=512, num_workers=1))
  with pytest.raises(DataError, match="hold samples with images"):
    SFTData(cfg, image_tok, global_batch_size=1)
  data = SFTData(cfg, image_tok, global_batch_size=1, media=intern_media())
  s = data.stats["datasets"]["mm"]
  assert s["image_samples"] == 1
  # One 448x448 tile: <img> + 256 x <IMG_CONTEXT> + </img>, after the default system prompt.
  ids = data._tokens[:s["tokens"]] & encoding.ID_MASK
  assert (ids == 151671).sum() == 256 and (ids == 151669).sum() == 1
  cfg.sample_max_length = 100                       # would cut into the image tokens
  data = SFTData(cfg, image_tok, global_batch_size=1, media=intern_media())
  assert data.stats["datasets"]["mm"]["dropped_image_cut"] == 1
  assert data.stats["datasets"]["mm"]["packed_samples"] == 1


@pytest.mark.slow
def test_inspection_cli(corpus, tok, tmp_path):
  import subprocess
  import sys
  recipe = tmp_path / "recipe.py"
  recipe.write_text(f"""
from jaxtune.config import base_config, dataset
def get_config(arg=None):
  c = base_config()
  c.tokenizer_path = {tok!r}
  c.data.datasets = [dataset("a", {corpus['a']!r}, 1.5), dataset("b", {corpus['b']!r})]
  c.data.sample_max_length = 256
  c.data.pack_max_length = 256
  c.global_batch_size = 2
  c.epoch_num = 1
  return c
""")
  out = subprocess.run([sys.executable, "-m", "jaxtune.data", f"--config={recipe}",
                        "--show_row=0"], capture_output=True, text=True, check=True)
  assert "steps per epoch" in out.stdout and "efficiency" in out.stdout
  assert "⟦answer " in out.stdout and "<|im_end|>⟧" in out.stdout
  bad = subprocess.run([sys.executable, "-m", "jaxtune.data", f"--config={recipe}",
                        "--config.data.pack_level=bogus"], capture_output=True, text=True)
  assert bad.returncode == 2 and "data.pack_level" in bad.stderr


def test_workers_start_when_main_cannot_be_reimported(corpus, tok):
  import subprocess
  import sys
  code = f"""
from jaxtune.config import base_config, dataset
from jaxtune.data import SFTData, encoding
encoding.MIN_LINES_FOR_WORKERS = 0
cfg = base_config().data
cfg.datasets = [dataset("a", {corpus['a']!r})]
cfg.num_workers, cfg.pack_max_length, cfg.sample_max_length = 2, 256, 256
print("packs", SFTData(cfg, {tok!r}, global_batch_size=1).stats["packs"])
"""
  # Code piped to stdin, no __main__ guard: spawned workers must not try to re-run it.
  out = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "packs" in out.stdout and "failed" not in out.stderr

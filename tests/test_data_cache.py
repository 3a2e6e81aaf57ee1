"""The token cache at scale: keys that cover the encoding code, bounded descriptors and memory
over many files, crash leftovers cleaned, cache_dir pruned by size."""

import json
import os
import sys
import tempfile
import time

import numpy as np
import pytest

from jaxtune.config import dataset
from jaxtune.data import SFTData, cache, idstore
from jaxtune.data.encoding import EncodeJob
from jaxtune.data.sources import ParseOptions, SourceFile
from jaxtune.data.tokenizer import TokenEncoder, build_qwen_tokenizer
from data_section import data_section

TOK_DIR = os.path.join(tempfile.gettempdir(), "jaxtune-tests", "qwen3-tokenizer")
KEYS = ("input_ids", "labels", "segment_ids", "positions")


@pytest.fixture(scope="module")
def enc():
  return TokenEncoder(build_qwen_tokenizer(TOK_DIR))


def chat(i):
  return {"messages": [{"role": "user", "content": f"question {i} " + "x " * (i % 17)},
                       {"role": "assistant", "content": f"answer {i}"}]}


def folder(root, files, lines):
  os.makedirs(root, exist_ok=True)
  for f in range(files):
    with open(os.path.join(root, f"part{f:04d}.jsonl"), "w") as out:
      for i in range(lines):
        out.write(json.dumps(chat(f * lines + i)) + "\n")
  return root


def cfg(path, **kw):
  out = dict(datasets=[dataset("d", path)], sample_max_length=128, pack_max_length=256,
             pack_level="soft", num_workers=1, cache_dir=None, seed=1)
  out.update(kw)
  return data_section(**out)


def open_fds():
  return len(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------------ the key covers the code
def test_cache_key_covers_the_source_of_the_encoding_modules(tmp_path, enc, monkeypatch):
  for name in ("jaxtune.data.encoding", "jaxtune.data.templates", "jaxtune.data.tokenizer",
               "jaxtune.data.sources", "jaxtune.data.images", "jaxtune.data.cache"):
    assert name in cache.CODE_MODULES
  mod = tmp_path / "jt_fake_encoding.py"
  mod.write_text("PREFIX = '<|im_start|>'\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  src = SourceFile.read(folder(str(tmp_path / "data"), 1, 3) + "/part0000.jsonl")
  job = EncodeJob("qwen3", ParseOptions())
  tc = cache.TokenCache(str(tmp_path / "cache"), enc)
  before = tc.key(src, job)
  tc.code_modules = cache.CODE_MODULES + ("jt_fake_encoding",)
  with_mod = tc.key(src, job)
  assert with_mod != before
  mod.write_text("PREFIX = '<|im_start|> '\n")          # one constant changes
  cache.code_fingerprint.cache_clear()
  changed = tc.key(src, job)
  assert changed != with_mod
  mod.write_text("PREFIX = '<|im_start|>'\n")           # back: the same key again
  cache.code_fingerprint.cache_clear()
  assert tc.key(src, job) == with_mod
  tc.code_modules = cache.CODE_MODULES
  assert tc.key(src, job) == before


# ------------------------------------------------------------------ many files
def test_many_cached_files_keep_no_descriptor_and_no_copy_of_the_ids(tmp_path, enc):
  root = folder(str(tmp_path / "many"), 300, 4)
  c = cfg(root, cache_dir=str(tmp_path / "cache"))
  base = open_fds()
  cold = SFTData(c, enc, global_batch_size=2)
  assert open_fds() - base <= 3
  warm = SFTData(c, enc, global_batch_size=2)
  assert warm.cache.hits == 300 and warm.cache.misses == 0
  assert open_fds() - base <= 3          # not one per file (300 sources + 300 entries)
  for data in (cold, warm):
    # The ids are the cache files, mapped side by side: no array of them in memory.
    assert isinstance(data._tokens.base, idstore._Region)
    assert not data._tokens.flags.writeable and not data._tokens.flags.owndata
  for k in range(3):
    a, b = warm.batch(0, k), cold.batch(0, k)
    assert all(np.array_equal(a[key], b[key]) for key in KEYS)
  plain = SFTData(cfg(root), enc, global_batch_size=2)
  assert all(np.array_equal(plain.batch(1, 2)[key], warm.batch(1, 2)[key]) for key in KEYS)
  del cold, warm, plain


def test_flat_ids_maps_files_and_memory_side_by_side(tmp_path):
  segs = []
  for i, n in enumerate([10, 0, 5000, 1, 1025]):
    p = str(tmp_path / f"{i}.u32")
    (np.arange(n, dtype=np.uint32) + 100000 * i).tofile(p)
    segs.append(idstore.FileIds(p, n))
  segs.append(np.array([7, 8, 9], np.uint32))
  base = open_fds()
  arr, bases = idstore.flat_ids(segs)
  assert open_fds() == base
  for s, b in zip(segs, bases):
    want = s.read() if isinstance(s, idstore.FileIds) else s
    np.testing.assert_array_equal(arr[b:b + len(want)], want)
  view = arr[bases[2]:bases[2] + 3]
  del arr                               # a view keeps the mapping alive
  assert view.tolist() == [200000, 200001, 200002]
  with pytest.raises(ValueError):
    view[0] = 1                         # read-only


def test_rss_stays_flat_over_a_cached_folder(tmp_path, enc):
  """Anonymous memory (not the mapped ids) grows by far less than the ids' size."""
  root = folder(str(tmp_path / "big"), 40, 400)
  c = cfg(root, cache_dir=str(tmp_path / "cache"))
  SFTData(c, enc, global_batch_size=2)
  anon = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon"))
                     .split()[1]) * 1024
  before = anon()
  data = SFTData(c, enc, global_batch_size=2)
  ids_bytes = 4 * len(data._tokens)
  assert ids_bytes > 1 << 20
  assert anon() - before < ids_bytes / 2


# ------------------------------------------------------------------ crash leftovers
def test_stale_token_stores_are_removed_and_live_ones_kept(tmp_path):
  tmp = str(tmp_path)
  old = time.time() - 3 * idstore.STALE_GRACE_SECONDS
  names = ("jaxtune-tokens-dead.u32", "jaxtune-tokens-open.u32", "jaxtune-tokens-young.u32",
           "jaxtune-encoder-dead.pkl", "other-file.u32")
  for name in names:
    with open(os.path.join(tmp, name), "wb") as f:
      f.write(b"\0" * 64)
    if name != "jaxtune-tokens-young.u32":
      os.utime(os.path.join(tmp, name), (old, old))
  held = open(os.path.join(tmp, "jaxtune-tokens-open.u32"), "rb")   # a live writer
  try:
    removed = idstore.clean_stale_stores(tmp)
  finally:
    held.close()
  assert sorted(os.path.basename(p) for p in removed) == ["jaxtune-encoder-dead.pkl",
                                                          "jaxtune-tokens-dead.u32"]
  assert sorted(os.listdir(tmp)) == ["jaxtune-tokens-open.u32", "jaxtune-tokens-young.u32",
                                     "other-file.u32"]


def test_a_start_cleans_what_a_crashed_start_left(tmp_path, enc, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  left = tmp_path / "jaxtune-tokens-crashed.u32"
  left.write_bytes(b"\0" * 4096)
  old = time.time() - 3600
  os.utime(left, (old, old))
  SFTData(cfg(folder(str(tmp_path / "d"), 1, 5)), enc, global_batch_size=1)
  assert not left.exists()


# ------------------------------------------------------------------ pruning by size
def test_cache_is_pruned_to_its_size_limit_oldest_first(tmp_path, enc):
  root = folder(str(tmp_path / "p"), 6, 30)
  cache_dir = str(tmp_path / "cache")
  SFTData(cfg(root, cache_dir=cache_dir), enc, global_batch_size=1)
  entries = sorted(os.listdir(cache_dir))
  assert len(entries) == 6
  size = lambda name: sum(os.path.getsize(os.path.join(cache_dir, name, f))
                          for f in os.listdir(os.path.join(cache_dir, name)))
  # A run over two of the files keeps them; the others go oldest first until the limit holds.
  for k, name in enumerate(entries):
    t = time.time() - 1000 + k
    os.utime(os.path.join(cache_dir, name), (t, t))
  two = str(tmp_path / "two")
  os.makedirs(two)
  for f in ("part0000.jsonl", "part0001.jsonl"):
    os.link(os.path.join(root, f), os.path.join(two, f))
  limit = size(entries[0]) + size(entries[1]) + size(entries[5]) + 1
  data = SFTData(cfg(two, cache_dir=cache_dir, cache_max_gib=limit / 2**30), enc,
                 global_batch_size=1)
  assert data.cache.hits == 2
  left = sorted(os.listdir(cache_dir))
  assert left == [entries[0], entries[1], entries[5]]     # 2, 3, 4 were the oldest unused
  partial = os.path.join(cache_dir, ".tmp-crashed")
  os.makedirs(partial)
  os.utime(partial, (time.time() - 2 * cache.STALE_SECONDS,) * 2)
  SFTData(cfg(two, cache_dir=cache_dir), enc, global_batch_size=1)
  assert not os.path.exists(partial)

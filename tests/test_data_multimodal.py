"""SFTData with images (Intern-S1): start-up checks, tile-aware packing, pixel batches.

Expectations are computed by hand (tile grids below) or by a naive reference that walks each
row's segments, finds the sample from its decoded text and lays out `load_tiles` of its
images one after another.
"""

import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from jaxtune.config import dataset
from jaxtune.data import DataError, SFTData, packing
from jaxtune.data.images import load_tiles
from jaxtune.data.tokenizer import TokenEncoder, build_qwen_tokenizer
from jaxtune.data.media import MediaSpec
from data_section import data_section, intern_media

# XTuner's example files as shipped with the package: urls "resource/..." under media_root FIX.
FIX = os.path.join(os.path.dirname(os.path.dirname(__file__)), "jaxtune", "assets", "xtuner")
DOG = os.path.join(FIX, "resource", "mscoco_dog_000000319154.jpg")          # 375 x 500
CATS = os.path.join(FIX, "resource", "mscoco_twocat_000000039769.jpg")      # 640 x 480
SINGLE = os.path.join(FIX, "mllm_sft_single_image_example_data.jsonl")
MULTI = os.path.join(FIX, "mllm_sft_multi_image_example_data.jsonl")
IMG = "<IMG_CONTEXT>"
BASE_TOK = os.path.join(os.environ.get("TMPDIR", "/tmp"), "jaxtune-tests", "qwen3-tokenizer")


def image_tokenizer(out: str) -> str:
  """The Qwen3 tokenizer plus Intern-S1's <img>, </img>, <IMG_CONTEXT> as added tokens."""
  base = build_qwen_tokenizer(BASE_TOK)
  shutil.copy(os.path.join(base, "tokenizer_config.json"), out)
  with open(os.path.join(base, "tokenizer.json")) as f:
    spec = json.load(f)
  have = {t["content"] for t in spec["added_tokens"]}
  for t in ["<img>", "</img>", IMG]:
    if t not in have:
      spec["added_tokens"].append(dict(id=max(a["id"] for a in spec["added_tokens"]) + 1,
                                       content=t, single_word=False, lstrip=False,
                                       rstrip=False, normalized=False, special=True))
  with open(os.path.join(out, "tokenizer.json"), "w") as f:
    json.dump(spec, f)
  return out


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
  return TokenEncoder(image_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def write_jsonl(path, lines):
  with open(path, "w") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n")
  return str(path)


def make_image(path, w, h, seed):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def image_line(tag, imgs, wh=None):
  """A chat whose user turn holds images `imgs` [(url, w, h)] and the tag `[tag]`."""
  parts = [{"type": "image_url", "image_url": dict(url=u, image_wh=[w, h])} for u, w, h in imgs]
  text = "".join(IMG + "\n" for _ in imgs) + f"[{tag}] what is shown?"
  return {"messages": [{"role": "user", "content": parts + [{"type": "text", "text": text}]},
                       {"role": "assistant", "content": f"answer {tag}"}]}


def text_line(tag, words):
  return {"messages": [{"role": "user", "content": f"[{tag}] " + "word " * words},
                       {"role": "assistant", "content": f"answer {tag}"}]}


def cfg_of(*datasets, **kw):
  out = dict(datasets=list(datasets), pack_max_length=2048, sample_max_length=2048,
             num_workers=1, seed=3, prefetch=0)
  out.update(kw)
  return data_section(**out)


def mm(name, path, root, ratio=1.0):
  return dataset(name, path, ratio, media_root=str(root), chat_template="intern-s1")


# Synthetic images and their tiles, by hand (InternVL grids, 448-pixel tiles; XTUNER_FACTS):
#   448 x 448: aspect 1 -> 1x1, a single tile, no thumbnail                      -> 1
#   900 x 448: aspect 2.01 -> 2x1 (+ thumbnail)                                  -> 3
#   200 x 600: aspect 1/3 -> 1x3 (+ thumbnail)                                   -> 4
#   two images (budget 12 // 2 = 6 each): 900 x 448 -> 2x1 + 1 = 3, 448 x 448 -> 1 -> 4
SHAPES = {"sq": (448, 448), "wide": (900, 448), "tall": (200, 600)}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
  """An image dataset (1- and 2-image samples), a text one; {tag: [(path, w, h)]}, tiles."""
  root = tmp_path_factory.mktemp("mixed")
  for k, (name, (w, h)) in enumerate(SHAPES.items()):
    make_image(root / f"{name}.jpg", w, h, k)
  kinds = [(["sq"], 1), (["wide"], 3), (["tall"], 4), (["wide", "sq"], 4)]
  lines, images, tiles = [], {}, {}
  for i in range(16):
    names, n = kinds[i % len(kinds)]
    imgs = [(f"{x}.jpg", *SHAPES[x]) for x in names]
    lines.append(image_line(f"m{i}", imgs))
    images[f"m{i}"] = [(str(root / u), w, h) for u, w, h in imgs]
    tiles[f"m{i}"] = n
  rng = np.random.default_rng(0)
  text = [text_line(f"t{i}", int(rng.integers(20, 600))) for i in range(20)]
  return dict(root=root, img=write_jsonl(root / "img.jsonl", lines),
              text=write_jsonl(root / "text.jsonl", text), images=images, tiles=tiles)


_REF_TILES: dict = {}


def ref_tiles(path, w, h, n):
  key = (path, n)
  if key not in _REF_TILES:
    _REF_TILES[key] = load_tiles(path, (w, h), n, 1, 12, normalized=False)
  return _REF_TILES[key]


def check_row_pixels(batch, row, enc, images):
  """Naive reference: walk the row's segments in order; each sample's images' load_tiles go
  one after another into the next free slots. Returns the tiles used."""
  ids, seg = batch["input_ids"][row], batch["segment_ids"][row]
  img_id = enc.added[IMG]
  slots = batch["tile_segment_ids"].shape[1]
  want = np.zeros((slots, 448, 448, 3), np.uint8)
  want_seg = np.zeros(slots, np.int32)
  at = 0
  for s in range(1, int(seg.max()) + 1):
    text = enc.decode(ids[seg == s])
    tag = re.search(r"\[(\w+)\]", text).group(1)
    refs = images.get(tag, [])
    for path, w, h in refs:
      t = ref_tiles(path, w, h, len(refs))
      want[at:at + len(t)] = t
      want_seg[at:at + len(t)] = s
      at += len(t)
    # The segment's own image tokens: 256 per tile it owns.
    assert int(((ids == img_id) & (seg == s)).sum()) == 256 * int((want_seg == s).sum())
  np.testing.assert_array_equal(batch["tile_segment_ids"][row], want_seg)
  np.testing.assert_array_equal(batch["pixel_values"][row], want)
  assert int((ids == img_id).sum()) == 256 * at
  return at


# ---------------------------------------------------------------- XTuner's own examples
def test_xtuner_example_files_parse_and_pack(enc):
  cfg = cfg_of(mm("single", SINGLE, FIX), mm("multi", MULTI, FIX), pack_max_length=8192,
               sample_max_length=8192)
  # XTuner's multi-image file has a wrong image_wh on line 6 (the two-cat image, 640 x 480,
  # listed as 375 x 500): XTuner fails when it loads it mid-training; jaxtune at start-up.
  with pytest.raises(DataError) as err:
    SFTData(cfg, enc, global_batch_size=2, media=intern_media())
  msg = str(err.value)
  assert f"{MULTI}:6" in msg and CATS in msg and "[375, 500]" in msg and "[640, 480]" in msg
  cfg.skip_bad_samples = True
  data = SFTData(cfg, enc, global_batch_size=2, media=intern_media())
  single, multi = data.stats["datasets"]["single"], data.stats["datasets"]["multi"]
  assert single["image_samples"] == 22 and single["bad"] == 0
  assert multi["image_samples"] == 10 and multi["bad_lines"] == 1
  # One image: 375 x 500 -> 3x4 + thumbnail = 13 tiles; 640 x 480 -> 4x3 + 1 = 13 too.
  # Two images share the budget (12 // 2 = 6): 2x3 + 1 = 7 and 3x2 + 1 = 7 -> 14.
  assert single["image_tiles"] == 22 * 13 and multi["image_tiles"] == 10 * 14
  assert data.stats["image_tiles"] == 22 * 13 + 10 * 14
  assert data.stats["max_tiles_per_pack"] == 8192 // 256      # the bound: never binding here
  assert data.max_tiles == data.stats["tiles_per_pack_max"] == data.stats["tile_slots"] <= 32
  refs = {"dog": load_tiles(DOG, (375, 500), 1, 1, 12, normalized=False),
          "cats": load_tiles(CATS, (640, 480), 1, 1, 12, normalized=False)}
  dog2 = load_tiles(DOG, (375, 500), 2, 1, 12, normalized=False)
  cats2 = load_tiles(CATS, (640, 480), 2, 1, 12, normalized=False)
  assert len(refs["dog"]) == 13 and len(dog2) == len(cats2) == 7
  pairs = {"dog, cats": np.concatenate([dog2, cats2]), "cats, dog": np.concatenate([cats2, dog2])}
  img_id, checked, pair_orders = enc.added[IMG], 0, set()
  for k in range(data.steps_per_epoch):
    batch = data.batch(0, k)
    assert batch["pixel_values"].shape == (2, data.max_tiles, 448, 448, 3)
    assert batch["pixel_values"].dtype == np.uint8
    assert batch["tile_segment_ids"].dtype == np.int32
    for row in range(2):
      seg, ids = batch["segment_ids"][row], batch["input_ids"][row]
      for s in range(1, int(seg.max()) + 1):
        n = int((ids[seg == s] == img_id).sum())
        assert n == 256 * int((batch["tile_segment_ids"][row] == s).sum())
        if n == 3328:   # a single-image sample: 13 tiles = 3,328 tokens, dog or cats
          text = enc.decode(ids[seg == s])
          which = "dog" if "狗" in text or "dog" in text else "cats"
          got = batch["pixel_values"][row][batch["tile_segment_ids"][row] == s]
          np.testing.assert_array_equal(got, refs[which])
          checked += 1
        elif n:
          assert n == 14 * 256
          got = batch["pixel_values"][row][batch["tile_segment_ids"][row] == s]
          order = [k for k, v in pairs.items() if np.array_equal(got, v)]
          assert len(order) == 1
          pair_orders.add(order[0])
  assert checked >= 8 and pair_orders == set(pairs)   # line 1 has the dog first, the others not


def test_images_need_an_image_model_and_soft_or_none_packing(enc, mixed):
  cfg = cfg_of(mm("img", mixed["img"], mixed["root"]))
  with pytest.raises(DataError, match="hold samples with images.*Intern-S1"):
    SFTData(cfg, enc, global_batch_size=1)
  cfg.pack_level = "hard"
  with pytest.raises(DataError, match="pack_level='hard' splits samples.*'soft'"):
    SFTData(cfg, enc, global_batch_size=1, media=intern_media())
  # The model's image token must be the tokenizer's <IMG_CONTEXT>.
  with pytest.raises(DataError, match="image_token_id is 7 but the tokenizer"):
    SFTData(cfg, enc, global_batch_size=1, media=MediaSpec(448, 256, 7))
  # Text-only data with an image model: no tile slots, no pixel arrays (the model's layout
  # has none, and its tower never runs).
  text = SFTData(cfg_of(dataset("t", mixed["text"])), enc, global_batch_size=2,
                 media=MediaSpec(448, 256, enc.added[IMG]))
  assert text.max_tiles == 0
  batch = text.batch(0, 0)
  assert set(batch) == {"input_ids", "labels", "segment_ids", "positions"}
  plain = SFTData(cfg_of(dataset("t", mixed["text"])), enc, global_batch_size=2)
  assert set(plain.batch(0, 0)) == {"input_ids", "labels", "segment_ids", "positions"}
  for key in plain.batch(0, 0):   # the text rows are the same with or without image_size
    np.testing.assert_array_equal(plain.batch(0, 0)[key], batch[key])


# ---------------------------------------------------------------- batches
def test_pixels_follow_the_image_tokens_of_mixed_rows(enc, mixed):
  cfg = cfg_of(mm("img", mixed["img"], mixed["root"], 1.5), dataset("text", mixed["text"], 2.0))
  data = SFTData(cfg, enc, global_batch_size=1, media=intern_media())
  s = data.stats
  assert s["datasets"]["img"]["samples"] == 24 and s["datasets"]["text"]["samples"] == 40
  used = text_rows = 0
  seen = []
  for k in range(data.steps_per_epoch):      # one row per step: every pack once
    batch = data.batch(1, k)
    n = check_row_pixels(batch, 0, enc, mixed["images"])
    assert n <= data.max_tiles <= 8
    used += n
    text_rows += n == 0
    seg, ids = batch["segment_ids"][0], batch["input_ids"][0]
    seen += [re.search(r"\[(\w+)\]", enc.decode(ids[seg == q])).group(1)
             for q in range(1, int(seg.max()) + 1)]
  # 1.5 x 16 image lines: each once, 8 of them twice; tiles counted by hand per line.
  image_seen = [t for t in seen if t.startswith("m")]
  assert len(image_seen) == 24 and set(image_seen) == set(mixed["tiles"])
  assert used == sum(mixed["tiles"][t] for t in image_seen) == s["image_tiles"]
  assert s["datasets"]["img"]["image_tiles"] == used
  assert text_rows > 0 and s["packs_with_images"] < s["packs"]


def test_tile_bound_is_respected_dropped_and_reported(enc, mixed, tmp_path):
  root = mixed["root"]
  lines = [image_line(f"w{i}", [("wide.jpg", 900, 448)]) for i in range(12)]      # 3 tiles
  lines += [image_line(f"s{i}", [("sq.jpg", 448, 448)]) for i in range(6)]        # 1 tile
  lines.append(image_line("big", [("wide.jpg", 900, 448), ("wide.jpg", 900, 448)]))  # 6 tiles
  path = write_jsonl(tmp_path / "b.jsonl", lines)
  images = {f"w{i}": [(str(root / "wide.jpg"), 900, 448)] for i in range(12)}
  images.update({f"s{i}": [(str(root / "sq.jpg"), 448, 448)] for i in range(6)})
  cfg = cfg_of(mm("b", path, root), dataset("text", mixed["text"], 0.5),
               max_tiles_per_pack=4)
  data = SFTData(cfg, enc, global_batch_size=1, media=intern_media())
  s = data.stats
  assert s["datasets"]["b"]["dropped_tile_bound"] == 1 and s["dropped_tile_bound"] == 1
  assert s["datasets"]["b"]["packed_samples"] == 18 and s["datasets"]["text"]["samples"] == 10
  assert s["image_tiles"] == 12 * 3 + 6 and s["tiles_per_pack_max"] <= 4
  # Two 3-tile samples (~800 tokens each) fit 2048 tokens but not 4 tiles.
  assert s["packs_closed_by_tile_limit"] > 0 and data.max_tiles == 4
  per_pack = []
  for k in range(data.steps_per_epoch):
    batch = data.batch(0, k)
    assert batch["tile_segment_ids"].shape == (1, 4)
    per_pack.append(check_row_pixels(batch, 0, enc, images))
  assert max(per_pack) == s["tiles_per_pack_max"] and sum(per_pack) == 42
  assert np.isclose(np.mean(per_pack), s["tiles_per_pack_mean"])
  # pack_level 'none': one sample per row; the bound drops the same sample.
  cfg.pack_level = "none"
  none = SFTData(cfg, enc, global_batch_size=1, media=intern_media())
  assert none.stats["dropped_tile_bound"] == 1 and none.stats["packs"] == 18 + 10
  with pytest.raises(DataError, match="data.max_tiles_per_pack"):
    SFTData(cfg_of(mm("b", path, root), max_tiles_per_pack=0), enc, global_batch_size=1,
            media=intern_media())


def test_soft_packing_with_tiles_by_hand():
  # Text: [0, 1, 2, 3] fit 20 tokens together. With tiles [2, 2, 2, 0] and 4 per pack, sample
  # 2 fits the tokens but not the tiles: the pack closes (counted), the look-ahead adds 3.
  lengths = np.array([5, 5, 5, 5])
  text = packing.soft_pack(lengths, 20)
  assert text.bounds.tolist() == [0, 4] and text.closed_by_tiles == 0
  plan = packing.soft_pack(lengths, 20, tiles=np.array([2, 2, 2, 0]), max_tiles=4)
  assert plan.sample.tolist() == [0, 1, 3, 2] and plan.bounds.tolist() == [0, 3, 4]
  assert plan.closed_by_tiles == 1
  # Sample 1 does not fit the tokens; the look-ahead skips sample 2 (short, but too many
  # tiles) and still takes the longer sample 3 (no tiles).
  plan = packing.soft_pack(np.array([5, 6, 2, 3]), 10, tiles=np.array([2, 0, 2, 0]),
                           max_tiles=2)
  assert plan.sample.tolist() == [0, 3, 1, 2] and plan.bounds.tolist() == [0, 2, 4]
  assert plan.closed_by_tiles == 0
  # No tiles (or all zero): exactly the text packs.
  rng = np.random.default_rng(1)
  lengths = rng.integers(1, 300, 500)
  ref = packing.soft_pack(lengths, 512)
  zero = packing.soft_pack(lengths, 512, tiles=np.zeros(500, np.int64), max_tiles=3)
  assert ref.sample.tolist() == zero.sample.tolist()
  assert ref.bounds.tolist() == zero.bounds.tolist()
  tiles = rng.integers(0, 4, 500) * (rng.random(500) < 0.4)
  plan = packing.soft_pack(lengths, 512, tiles=tiles, max_tiles=3)
  assert sorted(plan.sample.tolist()) == list(range(500))
  for p in range(plan.num_packs):
    members = plan.sample[plan.bounds[p]:plan.bounds[p + 1]]
    assert lengths[members].sum() <= 512 and tiles[members].sum() <= 3
  with pytest.raises(ValueError, match="exceeds max_tiles"):
    packing.soft_pack(lengths, 512, tiles=tiles + 4 * (np.arange(500) == 7), max_tiles=3)


# ---------------------------------------------------------------- bad images
def bad_cases(root):
  (root / "garbage.jpg").write_bytes(b"this is not an image at all")
  return {
      "missing": (image_line("x", [("nowhere.jpg", 448, 448)]), "nowhere.jpg", "does not exist"),
      "unreadable": (image_line("x", [("garbage.jpg", 448, 448)]), "garbage.jpg",
                     "not a readable image"),
      "wrong size": (image_line("x", [("wide.jpg", 448, 900)]), "wide.jpg",
                     "image_wh in the data is [448, 900] but the image is [900, 448]"),
      "no image_wh": ({"messages": [{"role": "user", "content": [
          {"type": "image_url", "image_url": {"url": "sq.jpg"}},
          {"type": "text", "text": IMG + " what?"}]},
          {"role": "assistant", "content": "a"}]}, "sq.jpg", "has no image_wh"),
  }


def test_bad_images_stop_the_start_up_or_are_skipped(enc, mixed, tmp_path):
  root = mixed["root"]
  cases = bad_cases(root)
  for name, (line, image, what) in cases.items():
    path = write_jsonl(tmp_path / "bad.jsonl", [text_line("ok", 3), line])
    with pytest.raises(DataError) as err:
      SFTData(cfg_of(mm("bad", path, root)), enc, global_batch_size=1, media=intern_media())
    msg = str(err.value)
    assert f"{path}:2" in msg and os.path.join(str(root), image) in msg and what in msg, \
        (name, msg)
  lines = [text_line("ok", 3)] + [c[0] for c in cases.values()] + [text_line("ok2", 3)]
  path = write_jsonl(tmp_path / "all.jsonl", lines)
  data = SFTData(cfg_of(mm("bad", path, root), skip_bad_samples=True), enc,
                 global_batch_size=1, media=intern_media())
  s = data.stats["datasets"]["bad"]
  assert s["bad_lines"] == 4 and s["packed_samples"] == 2
  assert [loc.split(" ")[0] for loc in s["bad_locations"]] == [f"{path}:{i}" for i in range(2, 6)]


def test_cached_lines_recheck_their_images(enc, tmp_path):
  root = tmp_path / "media"
  root.mkdir()
  path = write_jsonl(tmp_path / "c.jsonl", [image_line("c0", [("late.jpg", 448, 448)]),
                                            text_line("c1", 5)])
  cfg = cfg_of(mm("c", path, root), cache_dir=str(tmp_path / "cache"))
  with pytest.raises(DataError, match="does not exist"):
    SFTData(cfg, enc, global_batch_size=1, media=intern_media())
  make_image(root / "late.jpg", 448, 448, 9)       # fixed: the cached bad line is rechecked
  data = SFTData(cfg, enc, global_batch_size=1, media=intern_media())
  assert data.stats["datasets"]["c"]["image_samples"] == 1 and data.cache.hits == 0
  again = SFTData(cfg, enc, global_batch_size=1, media=intern_media())
  assert again.cache.hits == 1 and again.stats["datasets"]["c"]["image_samples"] == 1
  # An image that breaks after its line was cached is caught when it is loaded.
  make_image(root / "late.jpg", 300, 448, 9)
  stale = SFTData(cfg, enc, global_batch_size=1, media=intern_media())
  with pytest.raises(DataError) as err:
    [stale.batch(0, k) for k in range(stale.steps_per_epoch)]
  assert f"{path}:1" in str(err.value) and "late.jpg" in str(err.value)


def test_truncated_image_fails_at_batch_time_or_is_skipped(enc, mixed, tmp_path):
  make_image(tmp_path / "whole.jpg", 900, 448, 5)
  data = (tmp_path / "whole.jpg").read_bytes()
  (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])   # the header is intact
  lines = [image_line("cut", [("cut.jpg", 900, 448)]),
           image_line("ok", [("whole.jpg", 900, 448)])]
  lines += [text_line(f"t{i}", 30) for i in range(3)]
  path = write_jsonl(tmp_path / "t.jsonl", lines)
  cfg = cfg_of(mm("t", path, tmp_path), pack_level="none", prefetch=2)
  strict = SFTData(cfg, enc, global_batch_size=1, media=intern_media())   # start-up passes
  with pytest.raises(DataError) as err:
    list(strict.batches(0))                  # through the prefetch thread
  msg = str(err.value)
  assert f"{path}:1" in msg and str(tmp_path / "cut.jpg") in msg and "truncated" in msg
  cfg.skip_bad_samples = True
  runs = []
  for _ in range(2):                         # deterministic: a resumed run sees the same
    skip = SFTData(cfg, enc, global_batch_size=1, media=intern_media())
    runs.append(list(skip.batches(0)))
    assert skip.stats["image_decode_failures"] == 1
    assert skip.stats["image_decode_skipped_samples"] == 1
    assert f"{path}:1" in skip.stats["image_decode_failure_locations"][0]
  cut_rows = 0
  for a, b in zip(*runs):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
    text = enc.decode(a["input_ids"][0][a["segment_ids"][0] == 1])
    if "[cut]" in text:
      cut_rows += 1
      assert (a["labels"][0] == -100).all() and not a["pixel_values"].any()
      assert a["tile_segment_ids"][0].tolist() == [1, 1, 1]   # slots kept
    elif "[ok]" in text:
      assert (a["labels"][0] != -100).any()
      whole = load_tiles(str(tmp_path / "whole.jpg"), (900, 448), 1, 1, 12, normalized=False)
      np.testing.assert_array_equal(a["pixel_values"][0][:3], whole)
  assert cut_rows == 1


# ---------------------------------------------------------------- resume and hosts
def test_resume_and_hosts_get_the_same_pixels(enc, mixed):
  cfg = cfg_of(mm("img", mixed["img"], mixed["root"], 2.0), dataset("text", mixed["text"], 3.0),
               prefetch=2)
  one = SFTData(cfg, enc, global_batch_size=4, media=intern_media())
  full = list(one.batches(1))
  resumed = list(one.batches(1, 2))
  assert len(resumed) == len(full) - 2 and len(full) >= 4
  for a, b in zip(full[2:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  hosts = [SFTData(cfg, enc, global_batch_size=4, media=intern_media(), process_index=h,
                   process_count=2, global_order=True) for h in range(2)]
  odd = SFTData(cfg, enc, global_batch_size=4, media=intern_media(), process_index=1,
                process_count=2, global_order=True, host_rows=[3, 0])
  for k in (0, 3):
    whole = one.batch(1, k)
    for h, rows in ((0, [0, 1]), (1, [2, 3])):
      part = hosts[h].batch(1, k)
      for key in whole:
        np.testing.assert_array_equal(part[key], whole[key][rows])
    part = odd.batch(1, k)
    np.testing.assert_array_equal(part["pixel_values"], whole["pixel_values"][[3, 0]])
    np.testing.assert_array_equal(part["tile_segment_ids"], whole["tile_segment_ids"][[3, 0]])
  assert any(one.batch(1, k)["tile_segment_ids"].any() for k in (0, 3))

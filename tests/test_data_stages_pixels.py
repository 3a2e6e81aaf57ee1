"""Images through the pipeline with the numbers of a MediaSpec, not Intern-S1's: 16-pixel tiles
of 2 tokens. The image refs kept at start-up (compact arrays) give back what was parsed, the
batch is never read from the JSONL again, and the pixels equal tiles made by hand."""

import os

import numpy as np
import pytest
from PIL import Image

from jaxtune.config import dataset
from jaxtune.data import SFTData, images, sources
from jaxtune.data.media import MediaSpec, tiles_bound
from jaxtune.data.pixels import ImageRefs
from jaxtune.data.sources import ImageRef
from jaxtune.data.tokenizer import TokenEncoder
from data_section import data_section
from test_data_multimodal import IMG, image_line, image_tokenizer, text_line, write_jsonl


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
  return TokenEncoder(image_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def test_refs_round_trip_through_compact_arrays():
  refs = {3: [ImageRef("/m/a.png", (32, 16), 2, 3), ImageRef("/m/b.png", (16, 16), 2, 1)],
          7: [ImageRef("/m/a.png", (32, 16), 1, 3)], 9: []}
  kept = ImageRefs.collect([9, 7, 3, 7], refs.__getitem__)
  assert kept.uids.tolist() == [3, 7, 9] and kept.paths == ["/m/a.png", "/m/b.png"]
  assert kept.path_of.dtype == np.int32 and kept.wh.shape == (3, 2)
  for u, want in refs.items():
    assert kept.of(u) == want
  assert kept.of(5) == []


def test_tiles_bound_follows_the_media():
  media = MediaSpec(tile_size=16, tokens_per_tile=2, image_token_id=None)
  assert tiles_bound(data_section(pack_max_length=64), media) == 32
  assert tiles_bound(data_section(pack_max_length=64), None) == 0
  assert tiles_bound(data_section(max_tiles_per_pack=5), media) == 5


def test_small_tiles_end_to_end_without_reading_lines_again(enc, tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)   # 32 x 16: a 2 x 1 grid + thumb
  Image.fromarray(wide).save(tmp_path / "wide.png")
  path = write_jsonl(tmp_path / "d.jsonl", [image_line("w", [("wide.png", 32, 16)]),
                                            text_line("t", 3)])
  media = MediaSpec(tile_size=16, tokens_per_tile=2, image_token_id=enc.added[IMG])
  cfg = data_section(datasets=[dataset("d", path, media_root=str(tmp_path),
                                       chat_template="intern-s1")],
                     pack_max_length=256, sample_max_length=256, num_workers=1, prefetch=0,
                     pack_level="none", group_by_length=False)
  data = SFTData(cfg, enc, global_batch_size=1, media=media)
  assert data.max_tiles == 3 and data.stats["image_size"] == 16
  assert data.stats["max_tiles_per_pack"] == 256 // 2
  # Batches come from the refs start-up kept: no line is read or parsed again.
  monkeypatch.setattr(sources, "decode_line", lambda *a: pytest.fail("line parsed again"))
  rows = [data.batch(0, k) for k in range(data.steps_per_epoch)]
  (img_row,) = [r for r in rows if (r["input_ids"] == media.image_token_id).any()]
  assert (img_row["input_ids"] == media.image_token_id).sum() == 3 * 2
  assert img_row["pixel_values"].shape == (1, 3, 16, 16, 3)
  assert img_row["tile_segment_ids"].tolist() == [[1, 1, 1]]
  # By hand: the two 16 x 16 halves of the image, then the whole image resized to 16 x 16.
  thumb = np.asarray(Image.fromarray(wide).resize((16, 16), Image.Resampling.BICUBIC))
  want = np.stack([wide[:, :16], wide[:, 16:], thumb])
  np.testing.assert_array_equal(img_row["pixel_values"][0], want)
  np.testing.assert_array_equal(
      want, images.load_tiles(os.path.join(tmp_path, "wide.png"), (32, 16), 1, 1, 12, 16,
                              normalized=False))

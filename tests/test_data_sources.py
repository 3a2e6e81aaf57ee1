"""JSONL sources: sample_ratio, folder traversal, and every bad-input message."""

import json
import os
import tempfile

import numpy as np
import pytest

from jaxtune.config import dataset
from jaxtune.data import sources
from jaxtune.data.pipeline import SFTData
from jaxtune.data.sources import DataError
from jaxtune.data.tokenizer import build_qwen_tokenizer
from data_section import data_section

TOK_DIR = os.path.join(tempfile.gettempdir(), "jaxtune-tests", "qwen3-tokenizer")


@pytest.fixture(scope="module")
def tok():
  return build_qwen_tokenizer(TOK_DIR)


def chat(i):
  return {"messages": [{"role": "user", "content": f"question {i}"},
                       {"role": "assistant", "content": f"answer {i}"}]}


def write(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
  return path


def data_cfg(*datasets, **kw):
  cfg = dict(datasets=list(datasets), sample_max_length=256, pack_max_length=256,
             pack_level="soft", num_workers=1, cache_dir=None, seed=3)
  cfg.update(kw)
  return data_section(**cfg)


def test_ratio_counts_repeats_and_subsets():
  rng = np.random.default_rng(0)
  sel = sources.ratio_indices(10, 2.5, rng)
  assert len(sel) == 25
  counts = np.bincount(sel, minlength=10)
  assert sorted(counts.tolist()) == [2] * 5 + [3] * 5        # every sample twice, 5 thrice
  sel = sources.ratio_indices(10, 0.3, np.random.default_rng(0))
  assert len(sel) == 3 and len(set(sel.tolist())) == 3       # without replacement
  assert sources.ratio_indices(10, 0.3, np.random.default_rng(0)).tolist() == sel.tolist()
  assert sources.ratio_indices(10, 1.0, rng).tolist() == list(range(10))
  assert sorted(sources.ratio_indices(7, 3.0, rng).tolist()) == sorted(list(range(7)) * 3)
  assert len(sources.ratio_indices(1000, 0.5, rng)) == 500
  subsets = {tuple(sources.ratio_indices(10, 0.3, np.random.default_rng(s))) for s in range(20)}
  assert len(subsets) > 1                                    # the seed picks the subset


def test_sample_ratio_in_the_pipeline(tmp_path, tok):
  path = write(str(tmp_path / "a.jsonl"), [chat(i) for i in range(10)])
  for ratio, n in ((2.5, 25), (0.3, 3), (1.0, 10)):
    d = SFTData(data_cfg(dataset("a", path, ratio)), tok, global_batch_size=1)
    assert d.stats["datasets"]["a"]["samples"] == n
    assert d.stats["datasets"]["a"]["packed_samples"] == n


def test_folder_is_searched_recursively_and_sorted(tmp_path):
  root = tmp_path / "data"
  for rel in ("b.jsonl", "a/z.jsonl", "a/b/c.jsonl", "notes.txt", "a/x.json"):
    write(str(root / rel), [chat(0)])
  found = sources.list_jsonl(str(root), "ds")
  rel = [os.path.relpath(p, root) for p in found]
  assert rel == ["a/b/c.jsonl", "a/z.jsonl", "b.jsonl"]
  assert sources.list_jsonl(str(root / "b.jsonl"), "ds") == [str(root / "b.jsonl")]


def test_folder_dataset_reads_every_file(tmp_path, tok):
  write(str(tmp_path / "d/one.jsonl"), [chat(i) for i in range(3)])
  write(str(tmp_path / "d/sub/two.jsonl"), [chat(i) for i in range(3, 7)] + [""])
  d = SFTData(data_cfg(dataset("d", str(tmp_path / "d"))), tok, global_batch_size=1)
  assert d.stats["datasets"]["d"]["files"] == 2
  assert d.stats["datasets"]["d"]["samples"] == 7           # blank lines are not samples


BAD_LINES = {
    "not JSON": ('{"messages": [', "not valid JSON"),
    "no messages": ({"id": 3, "conversation": []}, "no 'messages'"),
    "unknown role": ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    "non-string content": ({"messages": [{"role": "user", "content": 42}]},
                           "content must be a string or a list of parts, got int"),
    "loss not bool": ({"messages": [{"role": "user", "content": "x", "loss": "yes"}]},
                      "'loss' must be true or false"),
    "image count": ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "<IMG_CONTEXT> and <IMG_CONTEXT>"},
        {"type": "image_url", "image_url": {"url": "a.jpg", "image_wh": [10, 10]}}]}]},
                    "2 <IMG_CONTEXT> placeholder(s) but 1 image(s)"),
    "missing image": ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "<IMG_CONTEXT>"},
        {"type": "image_url", "image_url": {"url": "nowhere.jpg"}}]}]}, "does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_names_file_line_dataset_and_problem(tmp_path, tok, case):
  line, what = BAD_LINES[case]
  path = write(str(tmp_path / "bad.jsonl"), [chat(0), "", chat(1), line, chat(2)])
  with pytest.raises(DataError) as err:
    SFTData(data_cfg(dataset("mine", path)), tok, global_batch_size=1)
  msg = str(err.value)
  assert f"{path}:4" in msg and "dataset 'mine'" in msg and what in msg, msg


def test_skip_bad_samples_counts_and_locates(tmp_path, tok):
  lines = [chat(i) for i in range(6)]
  lines[1], lines[4] = "not json", {"messages": [{"role": "x", "content": "y"}]}
  path = write(str(tmp_path / "bad.jsonl"), lines)
  d = SFTData(data_cfg(dataset("mine", path, 2.0), skip_bad_samples=True), tok,
              global_batch_size=1)
  s = d.stats["datasets"]["mine"]
  assert s["bad_lines"] == 2 and s["bad"] == 4               # each bad line appears twice
  assert s["packed_samples"] == 8
  assert f"{path}:2" in s["bad_locations"][0] and f"{path}:5" in s["bad_locations"][1]


def test_empty_and_missing_datasets(tmp_path, tok):
  empty = write(str(tmp_path / "empty.jsonl"), ["", "  "])
  with pytest.raises(DataError, match="dataset 'e'.*holds no samples"):
    SFTData(data_cfg(dataset("e", empty)), tok, global_batch_size=1)
  with pytest.raises(DataError, match="dataset 'm': anno_path .* does not exist"):
    SFTData(data_cfg(dataset("m", str(tmp_path / "nope.jsonl"))), tok, global_batch_size=1)
  os.makedirs(tmp_path / "dir")
  with pytest.raises(DataError, match="holds no \\*.jsonl"):
    SFTData(data_cfg(dataset("f", str(tmp_path / "dir"))), tok, global_batch_size=1)


def test_truncation_is_counted_per_dataset(tmp_path, tok, caplog):
  long = {"messages": [{"role": "user", "content": "word " * 100},
                       {"role": "assistant", "content": "ok"}]}
  a = write(str(tmp_path / "a.jsonl"), [long, chat(1)])
  b = write(str(tmp_path / "b.jsonl"), [long])
  cfg = data_cfg(dataset("a", a, sample_max_length=50), dataset("b", b))
  d = SFTData(cfg, tok, global_batch_size=1)
  assert d.stats["datasets"]["a"]["truncated"] == 1
  assert d.stats["datasets"]["b"]["truncated"] == 0          # b uses data.sample_max_length
  # chat(1): <|im_start|> user \n question ␣ 1 <|im_end|> \n <|im_start|> assistant \n
  #          answer ␣ 1 <|im_end|> \n  = 16 tokens
  assert d.stats["datasets"]["a"]["tokens"] == 50 + 16
  # The cut sample lost its answer; chat(1) trains "answer 1<|im_end|>" (4 tokens).
  assert d.stats["datasets"]["a"]["loss_tokens"] == 4
  assert "dataset 'a': 1 sample(s) longer than 50 tokens were truncated" in caplog.text

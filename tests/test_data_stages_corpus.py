"""The corpus stage (jaxtune.data.corpus) against naive re-implementations and hand counts:
sample_ratio per file, mixing and host shares, locating lines, and tokenizing each line once."""

import json

import numpy as np
import pytest

from jaxtune.data import corpus, encoding, sources
from jaxtune.data.cache import TokenCache
from jaxtune.data.sources import DatasetSpec
from jaxtune.data.tokenizer import TokenEncoder, build_qwen_tokenizer
from test_data_pipeline import TOK_DIR


def spec(name, ratio=1.0):
  return DatasetSpec(name=name, anno_path=f"/{name}", sample_ratio=ratio)


def naive_occurrences(specs, file_lines, seed, share):
  """Per file: the integer part of the ratio repeats every line, the remainder is a subset
  drawn with (seed, dataset, 1, file); then one shuffle with (seed, 0); then every hosts-th."""
  ds, line = [], []
  for d, s in enumerate(specs):
    base = 0
    for f, n in enumerate(file_lines[d]):
      target = int(n * s.sample_ratio)
      whole, rest = divmod(target, n)
      picked = list(range(n)) * whole
      if rest:
        picked += sorted(corpus.rng(seed, d, 1, f).choice(n, size=rest, replace=False).tolist())
      ds += [d] * len(picked)
      line += [base + p for p in picked]
      base += n
  order = corpus.rng(seed, 0).permutation(len(ds))
  if share is not None:
    order = order[share[0]::share[1]]
  return np.array(ds)[order], np.array(line)[order]


@pytest.mark.parametrize("share", [None, (0, 2), (1, 2), (2, 3)])
def test_occurrences_match_the_naive_rule(share):
  specs = [spec("a", 0.5), spec("b", 2.5), spec("c", 1.0)]
  file_lines = [[3, 5, 7], [4], [2, 6]]
  got = corpus.occurrences(specs, file_lines, 11, share)
  want = naive_occurrences(specs, file_lines, 11, share)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


def test_ratio_applies_per_file_and_hosts_partition_the_mix():
  # docs/data.md: a folder of 3, 5 and 7 lines at ratio 0.5 gives 1 + 2 + 3 = 6 samples.
  ds, _ = corpus.occurrences([spec("a", 0.5)], [[3, 5, 7]], 0, None)
  assert len(ds) == 6
  whole = corpus.occurrences([spec("a", 2.0), spec("b")], [[4], [3]], 5, None)
  parts = [corpus.occurrences([spec("a", 2.0), spec("b")], [[4], [3]], 5, (h, 3))
           for h in range(3)]
  key = lambda d, l: sorted(zip(d.tolist(), l.tolist()))
  assert key(*whole) == sorted(sum((key(*p) for p in parts), []))
  assert key(*whole) == sorted([(0, i) for i in range(4)] * 2 + [(1, i) for i in range(3)])
  with pytest.raises(sources.DataError, match="leaves none"):
    corpus.occurrences([spec("tiny", 0.1)], [[3]], 0, None)


class _Src:
  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n


def test_locate_numbers_files_across_datasets():
  files = [[_Src(3), _Src(2)], [_Src(4)]]
  u_ds = np.array([0, 0, 0, 1, 1])
  u_line = np.array([0, 3, 4, 0, 3])
  u_file, u_local = corpus.locate(files, u_ds, u_line)
  assert u_file.tolist() == [0, 1, 1, 2, 2] and u_local.tolist() == [0, 0, 1, 0, 3]


def test_read_tokenizes_each_line_once_with_the_encoders_ids(tmp_path):
  enc = TokenEncoder(build_qwen_tokenizer(TOK_DIR))
  lines = [{"messages": [{"role": "user", "content": f"q{i} " * (i + 1)},
                         {"role": "assistant", "content": f"a{i}"}]} for i in range(5)]
  lines.append("not json")
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
  specs = [DatasetSpec(name="d", anno_path=str(path), sample_ratio=2.0)]
  opts = [s.parse_options() for s in specs]
  c = corpus.read(specs, opts, enc, TokenCache(None, enc), 1, 3, None)
  assert len(c.occ_ds) == 12 and len(c.u_ds) == 6               # each line read once
  assert sorted(c.occ_line.tolist()) == sorted(list(range(6)) * 2)
  assert [u for u, _ in c.bad] == [5] and c.bad[0][1].startswith(f"{path}:6 (dataset 'd')")
  assert c.lengths[5] == 0
  job = encoding.EncodeJob("qwen3", opts[0])
  src = sources.SourceFile.read(str(path))
  for u in range(5):   # naive: the line encoded on its own
    one = encoding.encode_lines(enc, job, str(path),
                                np.array([[src.starts[u], src.ends[u]]]))
    ids = np.asarray(c.tokens[c.starts[u]:c.starts[u] + c.lengths[u]])
    np.testing.assert_array_equal(ids, one.tokens)
    assert c.loss[u] == one.loss[0] and c.n_image[u] == 0
  assert c.where(2, specs) == f"{path}:3 (dataset 'd')"

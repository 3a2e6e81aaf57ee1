"""XTuner's data rules, checked against hand-computed values: steps per epoch rounded up,
hard packing that splits long samples, sample_ratio per file, length-grouped batches."""

import collections
import json
import os
import random
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from jaxtune.config import dataset
from jaxtune.data import SFTData, encoding, packing
from jaxtune.data.tokenizer import TokenEncoder, build_qwen_tokenizer
from data_section import data_section

TOK_DIR = os.path.join(tempfile.gettempdir(), "jaxtune-tests", "qwen3-tokenizer")


@pytest.fixture(scope="module")
def tok():
  return build_qwen_tokenizer(TOK_DIR)


@pytest.fixture(scope="module")
def enc(tok):
  return TokenEncoder(tok)


def chat(i, words=3):
  return {"messages": [{"role": "user", "content": f"[q{i}] " + "word " * words},
                       {"role": "assistant", "content": f"answer {i}"}]}


def write(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for line in lines:
      f.write(json.dumps(line) + "\n")
  return path


def cfg(*datasets, **kw):
  out = dict(datasets=list(datasets), sample_max_length=256, pack_max_length=256,
             pack_level="none", num_workers=1, cache_dir=None, seed=5)
  out.update(kw)
  return data_section(**out)


def tags(batch, enc):
  """The [qN] tag of the sample in each row (pack_level none: one sample per row)."""
  out = []
  for ids in batch["input_ids"]:
    text = enc.decode(ids[ids != enc.added["<|endoftext|>"]])
    out.append(text.split("[q", 1)[1].split("]", 1)[0])
  return out


# ------------------------------------------------------------------ 1. round_up
@pytest.mark.parametrize("samples,batch,steps_up,steps_down", [(10, 4, 3, 2), (3, 4, 1, 0),
                                                               (8, 4, 2, 2), (9, 2, 5, 4)])
def test_steps_per_epoch_round_up_and_top_up_from_the_epochs_start(tmp_path, enc, samples,
                                                                   batch, steps_up, steps_down):
  path = write(str(tmp_path / "a.jsonl"), [chat(i) for i in range(samples)])
  data = SFTData(cfg(dataset("a", path)), enc, global_batch_size=batch)
  assert data.steps_per_epoch == steps_up == -(-samples // batch)          # ceil
  assert data.stats["packs_repeated_per_epoch"] == steps_up * batch - samples
  for epoch in (0, 1):
    rows = [t for b in data.batches(epoch) for t in tags(b, enc)]
    assert len(rows) == steps_up * batch
    # The epoch's order once, then topped up by wrapping to its start (XTuner's
    # `(indices * k)[:total_size]`).
    assert sorted(rows[:samples], key=int) == [str(i) for i in range(samples)]
    assert rows[samples:] == (rows[:samples] * batch)[:steps_up * batch - samples]
  if steps_down == 0:
    with pytest.raises(Exception, match="no full batch"):
      SFTData(cfg(dataset("a", path), round_up=False), enc, global_batch_size=batch)
    return
  floor = SFTData(cfg(dataset("a", path), round_up=False), enc, global_batch_size=batch)
  assert floor.steps_per_epoch == steps_down == samples // batch
  assert floor.stats["packs_dropped_per_epoch"] == samples - steps_down * batch


@pytest.mark.slow
def test_inspection_cli_counts_rounded_up_steps(tmp_path, tok):
  path = write(str(tmp_path / "a.jsonl"), [chat(i) for i in range(10)])
  recipe = tmp_path / "recipe.py"
  recipe.write_text(f"""
from jaxtune.config import base_config, dataset
def get_config(arg=None):
  c = base_config()
  c.tokenizer_path = {tok!r}
  c.data.datasets = [dataset("a", {path!r})]
  c.data.pack_level = "none"
  c.data.sample_max_length = 256
  c.data.pack_max_length = 256
  c.global_batch_size = 4
  c.epoch_num = 1
  return c
""")
  run = lambda *a: subprocess.run([sys.executable, "-m", "jaxtune.data", f"--config={recipe}",
                                   *a], capture_output=True, text=True, check=True).stdout
  assert json.loads(run("--json"))["steps_per_epoch"] == 3
  assert "3 optimizer steps per epoch (round_up" in run()
  assert json.loads(run("--json", "--config.data.round_up=False"))["steps_per_epoch"] == 2


# ------------------------------------------------------------------ 5. hard packing splits
def test_hard_packing_keeps_every_token_of_a_long_document(tmp_path, enc):
  text = " ".join(f"w{i}" for i in range(200))
  ids = enc.encode(text)
  assert len(ids) > 4 * 64 + 1
  path = write(str(tmp_path / "doc.jsonl"), [{"content": text}])
  data = SFTData(cfg(dataset("doc", path), pack_level="hard", pack_max_length=64,
                     sample_max_length=16), enc, global_batch_size=1)
  st = data.stats["datasets"]["doc"]
  assert st["truncated"] == 0 and st["tokens"] == len(ids) + 1      # + the document end token
  packs = (len(ids) + 1) // 64
  assert data.stats["packs"] == packs
  rows = [data.batch(0, 0, order=np.array([p])) for p in range(packs)]
  stream = np.concatenate([r["input_ids"][0] for r in rows])
  assert stream.tolist() == ids[:packs * 64]                        # every token, in order
  for p, r in enumerate(rows):
    assert r["segment_ids"][0].tolist() == [1] * 64                 # one piece per row
    assert r["positions"][0].tolist() == list(range(64))            # restarting at each cut
    # Inside the piece the next token is the target; the cut itself has none.
    assert r["labels"][0][:-1].tolist() == ids[p * 64 + 1:(p + 1) * 64]
    assert r["labels"][0][-1] == -100


def test_hard_packing_splits_chats_and_keeps_labels_consistent_at_cuts(tmp_path, enc):
  lines = [chat(i, words=20 + 15 * i) for i in range(4)]
  path = write(str(tmp_path / "chats.jsonl"), lines)
  full = SFTData(cfg(dataset("c", path), pack_level="none", pack_max_length=512,
                     sample_max_length=512), enc, global_batch_size=1)
  # Each chat's ids and labels, whole (pack_level none, nothing cut).
  whole = {}
  for b in full.batches(0):
    at = b["segment_ids"][0] == 1
    whole[tags(b, enc)[0]] = (b["input_ids"][0][at], b["labels"][0][at])
  assert max(len(v[0]) for v in whole.values()) > 48
  data = SFTData(cfg(dataset("c", path), pack_level="hard", pack_max_length=48,
                     sample_max_length=16), enc, global_batch_size=1)
  total = sum(len(v[0]) for v in whole.values())
  assert sum(d["tokens"] for d in data.stats["datasets"].values()) == total
  assert data.stats["packs"] == total // 48 and data.stats["pack_efficiency"] == 1.0
  pieces = []
  for p in range(data.stats["packs"]):
    r = data.batch(0, 0, order=np.array([p]))
    seg = r["segment_ids"][0]
    for s in range(1, seg.max() + 1):
      at = seg == s
      pieces.append((r["input_ids"][0][at], r["labels"][0][at]))
  stream = np.concatenate([ids for ids, _ in pieces])
  # The chats laid end to end in the shuffled order, cut only at the tail.
  order = []
  pos = 0
  while pos < len(stream):
    found = re.search(r"\[q(\d+)\]", enc.decode(stream[pos:pos + 12]))
    if found is None:        # the dropped tail begins within the last few tokens
      break
    order.append(found.group(1))
    pos += len(whole[order[-1]][0])
  expect = np.concatenate([whole[t][0] for t in order])[:len(stream)]
  assert np.array_equal(stream, expect) and len(stream) == total // 48 * 48
  # Labels: each piece's are the whole sample's labels at its positions, except its last
  # token (its target lies across the cut or in the next sample): -100.
  labels_whole = np.concatenate([whole[t][1] for t in order])[:len(stream)]
  pos = 0
  for ids, labels in pieces:
    n = len(ids)
    assert labels[:-1].tolist() == labels_whole[pos:pos + n - 1].tolist()
    assert labels[-1] == -100
    pos += n
  assert len(pieces) > len(order)                                   # some chats were split


# ------------------------------------------------------------------ 7. sample_ratio per file
@pytest.mark.parametrize("ratio,per_file", [(0.5, (1, 2, 3)), (1.5, (4, 7, 10)),
                                            (0.2, (0, 1, 1))])
def test_folder_sample_ratio_applies_to_each_file(tmp_path, enc, ratio, per_file):
  sizes, lines = (3, 5, 7), {}
  start = 0
  for f, n in enumerate(sizes):
    write(str(tmp_path / "folder" / f"part{f}.jsonl"), [chat(start + i) for i in range(n)])
    lines[f] = [str(start + i) for i in range(n)]
    start += n
  data = SFTData(cfg(dataset("d", str(tmp_path / "folder"), ratio)), enc, global_batch_size=1,
                 data_parallel=1)
  # XTuner: int(n_f * ratio) per file (6, 21, 2), not int(15 * ratio) (7, 22, 3) for the folder.
  assert data.stats["datasets"]["d"]["samples"] == sum(per_file)
  seen = collections.Counter(t for b in data.batches(0) for t in tags(b, enc))
  for f, n in enumerate(sizes):
    counts = [seen[t] for t in lines[f]]
    assert sum(counts) == per_file[f] == int(n * ratio)
    whole = int(ratio)
    assert sorted(set(counts)) <= [whole, whole + 1]                # repeats, then a subset


# ------------------------------------------------------------------ 6. group_by_length
def xtuner_length_grouped(flops, batch, group, perm, shuffles):
  """XTuner's get_length_grouped_indices, transcribed, with its two random sources given."""
  mult = min(len(flops) // (batch * 4), 50) or 1
  size = mult * batch
  out = []
  for k, i in enumerate(range(0, len(flops), size)):
    mega = sorted(perm[i:i + size].tolist(), key=lambda j: flops[j], reverse=True)
    grouped = [mega[j:j + group] for j in range(0, len(mega), group)]
    for g in shuffles[k](len(grouped)):
      out.extend(grouped[g])
  return out


@pytest.mark.parametrize("n,batch,group", [(1000, 16, 4), (37, 8, 8), (500, 8, 2)])
def test_length_grouped_order_is_xtuners_rule(n, batch, group):
  flops = np.random.default_rng(1).integers(0, 50, n).astype(float)   # many ties
  got = packing.length_grouped_order(flops, batch, group, np.random.default_rng(7))
  rng = np.random.default_rng(7)
  perm = rng.permutation(n)
  ref = xtuner_length_grouped(flops, batch, group, perm, collections.defaultdict(
      lambda: rng.permutation))
  assert got.tolist() == ref
  assert sorted(got.tolist()) == list(range(n))


def rank_flops(data, batch):
  """[micro-steps, ranks] attention FLOPs (sum of squared segment lengths), with the trainer's
  layout: micro-batch m takes rows k * A + m; rank of row k * A + m is k // micro_batch_size."""
  seg = batch["segment_ids"]
  per_row = np.array([sum(int((row == s).sum()) ** 2 for s in range(1, row.max() + 1))
                      for row in seg], float)
  a = data.micro_steps
  return per_row.reshape(-1, a).T   # [A, G]


def test_group_by_length_balances_the_ranks_of_each_micro_batch(tmp_path, enc):
  rng = random.Random(0)
  lines = [chat(i, words=int(rng.lognormvariate(3, 1.2)) % 400 + 1) for i in range(600)]
  path = write(str(tmp_path / "mix.jsonl"), lines)
  base = cfg(dataset("m", path), pack_level="soft", pack_max_length=512, sample_max_length=512)

  def spread(group_by_length):
    c = data_section(**base.to_dict())
    c.group_by_length = group_by_length
    data = SFTData(c, enc, global_batch_size=16, data_parallel=4)
    assert data.micro_steps == 4 and data.group_rows == 4
    out, seen = [], collections.Counter()
    for batch in data.batches(0):
      f = rank_flops(data, batch)
      out.extend((f.max(1) - f.min(1)) / f.mean(1))
      seen.update(map(tuple, batch["input_ids"][:, :8].tolist()))
    assert sum(seen.values()) == data.steps_per_epoch * 16
    return float(np.mean(out)), data
  grouped, data = spread(True)
  plain, _ = spread(False)
  assert grouped < 0.6 * plain      # deterministic data: 0.49 vs 0.92
  # Every pack once per epoch (then the top-up), in both epochs, grouped differently.
  o0, o1 = data.epoch_order(0), data.epoch_order(1)
  n = data.plan.num_packs
  assert sorted(np.unique(o0).tolist()) == list(range(n)) and len(o0) == data.steps_per_epoch * 16
  assert not np.array_equal(o0, o1)
  # Resume mid-epoch gives the same batches.
  full = list(data.batches(1))
  tail = list(data.batches(1, start_step=2))
  assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(tail, full[2:]))

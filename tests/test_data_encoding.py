"""The fast paths of the data pipeline against the plain ones they replace.

encode_lines splices each role's constant template ids around the message text (tiktoken); the
reference renders whole pieces and encodes them with the HF tokenizer. Line indexing and row
building are checked against straightforward Python.
"""

import json
import os
import tempfile
import threading

import numpy as np
import pytest

from jaxtune.data import encoding, packing, sources, templates
from jaxtune.data.tokenizer import TokenEncoder, build_qwen_tokenizer

TOK_DIR = os.path.join(tempfile.gettempdir(), "jaxtune-tests", "qwen3-tokenizer")


@pytest.fixture(scope="module")
def fast():
  return TokenEncoder(build_qwen_tokenizer(TOK_DIR))


@pytest.fixture(scope="module")
def hf():
  return TokenEncoder(build_qwen_tokenizer(TOK_DIR), allow_tiktoken=False)


def msg(role, content, **kw):
  return dict(role=role, content=content, **kw)


LINES = [
    {"messages": [msg("user", "Hi"), msg("assistant", "Hello")]},
    [msg("system", "Be brief."), msg("user", "2+2?"), msg("assistant", "4"),
     msg("user", "and 3+3?"), msg("assistant", "6")],
    # Text at the splice points: leading/trailing whitespace and newlines, empty text.
    {"messages": [msg("user", "\n\n  indented"), msg("assistant", " lead space\n")]},
    {"messages": [msg("user", ""), msg("assistant", "")]},
    {"messages": [msg("user", "\t tab"), msg("assistant", "\r\nwindows\r\n")]},
    # Special tokens and added tokens inside the text.
    {"messages": [msg("user", "say <|im_end|> now"), msg("assistant", "<think>\nhm\n</think>ok")]},
    {"messages": [msg("user", "<|im_start|>assistant\n"), msg("assistant", "<|endoftext|>")]},
    # Non-ASCII, and text that NFC normalisation changes.
    {"messages": [msg("user", "café naïve 日本語"),
                  msg("assistant", "e\u0301 vs \u00e9 ✓")]},
    # Loss overrides, extra keys, tool turns, tools, tool calls.
    {"messages": [msg("user", "Hi", loss=True), msg("assistant", "Hello", loss=False),
                  msg("user", "x", name="bob"), msg("assistant", "y")]},
    {"messages": [msg("user", "weather?"),
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"function": {"name": "get", "arguments": {"city": "Paris"}}}]},
                  msg("tool", "sunny"), msg("assistant", "It is sunny.")],
     "tools": [{"name": "get", "parameters": {}}]},
    {"messages": [msg("user", "a"), msg("assistant", "b")], "tools": []},
    # Pretraining lines.
    {"content": "Plain text for pretraining."},
    {"text": "  starts with spaces\n"},
    {"messages": [msg("pretrain", "doc one"), msg("pretrain", "doc two")]},
    # Bad lines: each must give the same error as the plain path.
    {"messages": [msg("robot", "hi")]},
    {"messages": [{"role": ["user"], "content": "unhashable role"}]},
    {"messages": [msg("user", "hi", loss="yes")]},
    {"messages": [msg("user", "<IMG_CONTEXT> without an image")]},
    {"messages": []},
    {"messages": None},
    {"id": 3},
]


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
  path = tmp_path_factory.mktemp("enc") / "lines.jsonl"
  with open(path, "w", encoding="utf-8") as f:
    for line in LINES:
      f.write(json.dumps(line, ensure_ascii=False) + "\n")
    f.write("{not json\n")
  return str(path)


def samples(chunk):
  starts = np.cumsum(chunk.lengths) - chunk.lengths
  return [chunk.tokens[s:s + n] for s, n in zip(starts, chunk.lengths)]


@pytest.mark.parametrize("template", ["qwen3", "intern-s1"])
def test_spliced_encoding_matches_whole_pieces_through_hf(fast, hf, jsonl, template):
  assert templates.splice_table(templates.get_template(template), fast) is not None
  assert templates.splice_table(templates.get_template(template), hf) is None
  src = sources.SourceFile.read(jsonl)
  spans = np.stack([src.starts, src.ends], 1)
  job = encoding.EncodeJob(template, sources.ParseOptions())
  got = encoding.encode_lines(fast, job, jsonl, spans)
  ref = encoding.encode_lines(hf, job, jsonl, spans)
  assert got.bad == ref.bad and len(got.bad) == 8
  np.testing.assert_array_equal(got.lengths, ref.lengths)
  np.testing.assert_array_equal(got.loss, ref.loss)
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  # And the reference is the template module's own tokenize(), line by line.
  tpl = templates.get_template(template)
  for line, ids in zip(LINES, samples(got)):
    try:
      messages, tools = sources.parse_sample(line, sources.ParseOptions())
    except ValueError:
      assert len(ids) == 0
      continue
    want, mask = templates.tokenize(messages, tpl, hf, tools)
    assert (ids & encoding.ID_MASK).tolist() == want
    assert (ids >= encoding.TRAINED_BIT).tolist() == mask.tolist()
    assert int(mask[1:].sum()) == int(got.loss[LINES.index(line)])


def test_bad_line_in_the_middle_leaves_no_partial_pieces(fast, tmp_path):
  path = tmp_path / "mixed.jsonl"
  good = {"messages": [msg("user", "Hi"), msg("assistant", "Hello")]}
  with open(path, "w") as f:
    for line in (good, {"messages": [msg("user", "ok"), msg("nobody", "x")]}, good):
      f.write(json.dumps(line) + "\n")
  src = sources.SourceFile.read(str(path))
  chunk = encoding.encode_lines(fast, encoding.EncodeJob("qwen3", sources.ParseOptions()),
                                str(path), np.stack([src.starts, src.ends], 1))
  assert [k for k, _ in chunk.bad] == [1]
  first, _, third = np.split(chunk.tokens, np.cumsum(chunk.lengths)[:-1])
  np.testing.assert_array_equal(first, third)


def test_worker_results_come_back_identical(fast, jsonl):
  """Both processes append their ids to one store file, in whatever order they finish; the
  store is then mapped and each line found through its start. The file is removed."""
  src = sources.SourceFile.read(jsonl)
  job = encoding.EncodeJob("qwen3", sources.ParseOptions())
  tasks = encoding.split_tasks(job, jsonl, np.stack([src.starts, src.ends], 1), 5) * 300
  with encoding.EncoderPool(fast, 2) as pool:
    pool.start()
    path = pool._store  # pylint: disable=protected-access
    assert path is not None and os.path.isfile(path)
    chunks = pool.run(tasks)
    store = pool.mapped_store()
  assert not os.path.exists(path)
  wants = [encoding.encode_lines(fast, t.job, t.path, t.spans) for t in tasks]
  assert all(c.stored_at is not None for c, w in zip(chunks, wants) if w.tokens.nbytes)
  offsets = np.array([c.stored_at for c in chunks if c.stored_at is not None])
  assert (np.diff(offsets) < 0).any(), "the store should not be in line order here"
  tokens, starts = encoding.join_tokens(chunks, store)
  assert tokens is store                                   # nothing copied
  got = [tokens[s:s + n] for s, n in zip(starts, np.concatenate([c.lengths for c in chunks]))]
  want = [x for w in wants for x in np.split(w.tokens, np.cumsum(w.lengths)[:-1])]
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  for chunk, w in zip(chunks, wants):
    np.testing.assert_array_equal(chunk.lengths, w.lengths)
    np.testing.assert_array_equal(chunk.loss, w.loss)
    assert chunk.bad == w.bad


def test_join_tokens_copies_in_line_order_when_chunks_are_mixed(fast, jsonl):
  """A chunk kept in memory (a worker failed mid-way) among stored ones: all ids are copied,
  in line order, into one array."""
  src = sources.SourceFile.read(jsonl)
  job = encoding.EncodeJob("qwen3", sources.ParseOptions())
  tasks = encoding.split_tasks(job, jsonl, np.stack([src.starts, src.ends], 1), 3)
  chunks = [encoding.encode_lines(fast, t.job, t.path, t.spans) for t in tasks]
  want = np.concatenate([c.tokens for c in chunks])
  fd, path = tempfile.mkstemp()
  os.close(fd)
  for chunk in reversed(chunks[1:]):           # stored out of order, the first one not at all
    encoding.store_chunk(chunk, path)
  encoding._forget_store(path)  # pylint: disable=protected-access
  tokens, starts = encoding.join_tokens(chunks, encoding.map_store(path))
  np.testing.assert_array_equal(tokens, want)
  # After a short write that broke the 4-byte alignment (simulated: 3 stray bytes), chunks stay
  # in memory and the store still maps.
  with open(path, "wb") as f:
    f.write(b"xyz")
  late = encoding.store_chunk(encoding.encode_lines(fast, tasks[0].job, tasks[0].path,
                                                    tasks[0].spans), path)
  encoding._forget_store(path)  # pylint: disable=protected-access
  assert late.stored_at is None and late.tokens.nbytes
  assert len(encoding.map_store(path)) == len(late.tokens)   # (3 + 4n bytes) // 4
  # A store that cannot be written (here: its folder is gone) leaves the ids in the chunk.
  kept = encoding.store_chunk(encoding.encode_lines(fast, tasks[0].job, tasks[0].path,
                                                    tasks[0].spans), path + ".d/store")
  assert kept.stored_at is None and kept.tokens.nbytes
  np.testing.assert_array_equal(starts, np.cumsum([n for c in chunks for n in c.lengths])
                                - np.concatenate([c.lengths for c in chunks]))


@pytest.mark.parametrize("kind", ["long", "short", "blank", "empty"])
def test_line_index_matches_splitting(tmp_path, kind):
  rng = np.random.default_rng(1)
  width = {"long": 3000, "short": 20, "blank": 40, "empty": 0}[kind]
  lines = [json.dumps({"t": "x" * int(rng.integers(1, width + 2))}) for _ in range(50)] \
      if width else []
  if kind == "blank":
    lines = [l if i % 3 else "   \t" for i, l in enumerate(lines)] + ["", ""]
  data = "\n".join(lines).encode()
  path = tmp_path / "f.jsonl"
  path.write_bytes(data)
  src = sources.SourceFile.read(str(path))
  want = [(i + 1, l) for i, l in enumerate(data.split(b"\n")) if l.strip()]
  assert src.lineno.tolist() == [n for n, _ in want]
  assert [src.line(i) for i in range(len(src))] == [l for _, l in want]


def reference_rows(plan, packs, tokens, starts, pack_len, pad_id):
  """build_rows as it was written first: one row at a time."""
  out = {"input_ids": np.full((len(packs), pack_len), pad_id, np.int32),
         "labels": np.full((len(packs), pack_len), packing.IGNORE, np.int32),
         "segment_ids": np.zeros((len(packs), pack_len), np.int32),
         "positions": np.zeros((len(packs), pack_len), np.int32)}
  for r, p in enumerate(packs):
    lo, hi = plan.bounds[p], plan.bounds[p + 1]
    col = 0
    for k, s in enumerate(range(lo, hi)):
      n = int(plan.length[s])
      raw = tokens[starts[plan.sample[s]] + plan.offset[s]:][:n]
      ids = (raw & encoding.ID_MASK).astype(np.int32)
      labels = np.where(raw[1:] >= encoding.TRAINED_BIT, ids[1:], packing.IGNORE)
      out["input_ids"][r, col:col + n] = ids
      out["labels"][r, col:col + n - 1] = labels
      out["segment_ids"][r, col:col + n] = k + 1
      out["positions"][r, col:col + n] = np.arange(n)
      col += n
  return out


@pytest.mark.parametrize("level", ["soft", "hard", "none"])
@pytest.mark.parametrize("mean", [3, 40, 300])   # short spans take the gather path
def test_rows_match_the_per_row_reference(level, mean):
  rng = np.random.default_rng(mean)
  pack_len = 512
  lens = np.minimum(rng.geometric(1 / mean, 400), pack_len).astype(np.int64)
  starts = np.cumsum(lens) - lens
  tokens = rng.integers(0, 1000, int(lens.sum())).astype(np.uint32)
  tokens[rng.random(len(tokens)) < 0.6] |= encoding.TRAINED_BIT
  plan = packing.make_plan(level, lens, pack_len)
  packs = rng.permutation(plan.num_packs)[:16]
  got = packing.build_rows(plan, packs, tokens, starts, pack_len, pad_id=7)
  want = reference_rows(plan, packs, tokens, starts, pack_len, pad_id=7)
  for key, value in want.items():
    assert got[key].dtype == np.int32 and got[key].shape == value.shape
    np.testing.assert_array_equal(got[key], value, err_msg=key)

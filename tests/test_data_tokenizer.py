"""The offline Qwen3 tokenizer: official ids, special tokens, and the fast encoder's parity."""

import json
import os
import tempfile
import time

import pytest

from jaxtune.data.tokenizer import (QWEN3_ADDED_TOKENS, TokenEncoder, build_qwen_tokenizer,
                                    load_tokenizer)

TOK_DIR = os.path.join(tempfile.gettempdir(), "jaxtune-tests", "qwen3-tokenizer")


@pytest.fixture(scope="module")
def tok_dir():
  return build_qwen_tokenizer(TOK_DIR)


@pytest.fixture(scope="module")
def hf(tok_dir):
  return load_tokenizer(tok_dir)


def test_hello_world_has_the_official_ids(hf, tok_dir):
  assert hf.encode("Hello world", add_special_tokens=False) == [9707, 1879]
  assert TokenEncoder(tok_dir).encode("Hello world") == [9707, 1879]


def test_special_tokens_sit_at_their_official_ids(hf):
  expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
              "<|vision_pad|>": 151654, "<tool_call>": 151657, "<think>": 151667,
              "</think>": 151668}
  for token, i in expected.items():
    assert hf.encode(token, add_special_tokens=False) == [i], token
    assert hf.convert_ids_to_tokens(i) == token
  assert [t[0] for t in QWEN3_ADDED_TOKENS] == list(range(151643, 151669))
  assert len(hf) == 151669
  # Qwen3 (instruct) sets eos to <|im_end|> and pads with <|endoftext|>; there is no bos.
  assert hf.eos_token_id == 151645 and hf.pad_token_id == 151643 and hf.bos_token is None
  # Special tokens inside text are matched, as in a chat rendered with the template.
  assert hf.encode("<|im_start|>user\nHi<|im_end|>\n", add_special_tokens=False) == [
      151644, 872, 198, 13048, 151645, 198]


TEXTS = [
    "Hello world", "  leading spaces and trailing   ", "line1\n\nline2\r\n\tTabbed",
    "Numbers 1234567 and 3.14159, dates 2024-05-01.", "I'm sure they'll say we've it's",
    "def f(x):\n    return x ** 2  # square\n", "中文分词测试：你好，世界！", "日本語のテキスト",
    "emoji 😀👍🏽 and symbols ∑∫√", "café naïve résumé", "cafe\u0301 (decomposed)",
    "Ångström \u212b sign", "<|im_start|>assistant\nok<|im_end|>\n<|endoftext|>",
    "<think>\nreasoning\n</think>\n\nanswer", "mixed<|im_end|>\u0301tail", "   \n\n   \n",
    "URL https://example.com/a?b=c&d=e#frag", "a" * 300, "\u00a0nbsp\u2003em space",
]


def test_fast_encoder_matches_the_hf_tokenizer(hf, tok_dir):
  enc = TokenEncoder(tok_dir)
  assert enc.backend == "tiktoken"
  for text in TEXTS:
    assert enc.encode(text) == hf.encode(text, add_special_tokens=False), repr(text)
  for text in TEXTS[:12]:
    assert hf.decode(hf.encode(text, add_special_tokens=False)) == \
        hf.decode(enc.encode(text)), repr(text)


def test_hf_fallback_encoder_gives_the_same_ids(tok_dir):
  fast, slow = TokenEncoder(tok_dir), TokenEncoder(tok_dir, allow_tiktoken=False)
  assert slow.backend == "hf"
  for text in TEXTS[:6]:
    assert slow.encode(text) == fast.encode(text)


def test_build_is_idempotent(tok_dir):
  mtime = os.path.getmtime(os.path.join(tok_dir, "tokenizer.json"))
  t0 = time.perf_counter()
  assert build_qwen_tokenizer(tok_dir) == tok_dir
  assert time.perf_counter() - t0 < 0.5
  assert os.path.getmtime(os.path.join(tok_dir, "tokenizer.json")) == mtime
  with open(os.path.join(tok_dir, "tokenizer.json")) as f:
    spec = json.load(f)
  # One merge per non-byte token, as in Qwen's own tokenizer.json.
  assert len(spec["model"]["merges"]) == 151643 - 256


def test_chat_template_in_config_renders_like_training(hf):
  text = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                add_generation_prompt=True)
  assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"

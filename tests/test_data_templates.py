"""Chat templates and loss masks against hand-written strings and ids (XTUNER_FACTS.md)."""

import os
import tempfile

import numpy as np
import pytest

from jaxtune.data import sources
from jaxtune.data.templates import (Message, get_template, render, render_text, tokenize)
from jaxtune.data.tokenizer import TokenEncoder, build_qwen_tokenizer, load_tokenizer

TOK_DIR = os.path.join(tempfile.gettempdir(), "jaxtune-tests", "qwen3-tokenizer")
IM_START, IM_END = 151644, 151645
USER, ASSISTANT, SYSTEM, NL = 872, 77091, 8948, 198

CHAT = [Message("system", "You are a bot."), Message("user", "Hi"),
        Message("assistant", "Hello"), Message("user", "2+2?"), Message("assistant", "4")]
QWEN3_TEXT = ("<|im_start|>system\nYou are a bot.<|im_end|>\n"
              "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
              "Hello<|im_end|>\n"
              "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
              "4<|im_end|>\n")


@pytest.fixture(scope="module")
def enc():
  return TokenEncoder(build_qwen_tokenizer(TOK_DIR))


@pytest.fixture(scope="module")
def hf():
  return load_tokenizer(build_qwen_tokenizer(TOK_DIR))


def trained_ids(ids, mask):
  return [i for i, m in zip(ids, mask) if m]


def test_qwen3_renders_xtuners_strings():
  assert render_text(CHAT, get_template("qwen3")) == QWEN3_TEXT
  pieces = render(CHAT, get_template("qwen3"))
  assert [p.text for p in pieces] == [
      "<|im_start|>system\nYou are a bot.<|im_end|>\n",
      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Hello<|im_end|>", "\n",
      "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", "4<|im_end|>", "\n"]
  assert [p.trained for p in pieces] == [False, False, True, False, False, True, False]


def test_qwen3_ids_and_mask_by_hand(enc):
  ids, mask = tokenize([Message("user", "Hi"), Message("assistant", "Hello")],
                       get_template("qwen3"), enc)
  assert ids == [IM_START, USER, NL, 13048, IM_END, NL, IM_START, ASSISTANT, NL,
                 9707, IM_END, NL]
  assert mask.tolist() == [False] * 9 + [True, True, False]


def test_qwen3_two_turn_chat_trains_exactly_the_answers(enc, hf):
  ids, mask = tokenize(CHAT, get_template("qwen3"), enc)
  # Each hand-written piece encoded on its own, then concatenated.
  pieces = ["<|im_start|>system\nYou are a bot.<|im_end|>\n",
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Hello<|im_end|>", "\n",
            "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", "4<|im_end|>", "\n"]
  expected = [i for p in pieces for i in hf.encode(p, add_special_tokens=False)]
  assert ids == expected
  assert trained_ids(ids, mask) == [9707, IM_END, 19, IM_END]
  assert hf.decode(ids) == QWEN3_TEXT
  assert mask.dtype == np.bool_ and len(mask) == len(ids)


def test_per_message_loss_override(enc):
  chat = [Message("user", "Hi", loss=True), Message("assistant", "Hello", loss=False),
          Message("user", "2+2?"), Message("assistant", "4")]
  ids, mask = tokenize(chat, get_template("qwen3"), enc)
  user_piece = [IM_START, USER, NL, 13048, IM_END, NL, IM_START, ASSISTANT, NL]
  assert ids[:9] == user_piece and mask[:9].all()
  assert not mask[9:12].any()            # "Hello<|im_end|>" and the separator
  assert trained_ids(ids, mask) == user_piece + [19, IM_END]
  assert not mask[-1]                    # the separator is never trained


def test_intern_s1_adds_its_default_system_prompt(enc, hf):
  tpl = get_template("intern-s1")
  text = render_text([Message("user", "Hi"), Message("assistant", "Hello")], tpl)
  assert text == ("<|im_start|>system\n你是书生大模型，英文名是Intern-S1，是由上海人工智能实验室开发的"
                  "多模态大语言模型。<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                  "<|im_start|>assistant\nHello<|im_end|>\n")
  # An explicit system prompt replaces it; the strings are otherwise qwen3's.
  assert render_text(CHAT, tpl) == QWEN3_TEXT
  ids, mask = tokenize([Message("user", "Hi"), Message("assistant", "Hello")], tpl, enc)
  assert trained_ids(ids, mask) == [9707, IM_END]


def test_pretrain_and_tool_roles(enc):
  tpl = get_template("qwen3")
  ids, mask = tokenize([Message("pretrain", "Hello world")], tpl, enc)
  assert ids == [9707, 1879, 151643] and mask.all()
  chat = [Message("user", "Weather?"), Message("assistant", "<tool_call>x</tool_call>"),
          Message("tool", "sunny"), Message("assistant", "Sunny.")]
  text = render_text(chat, tpl)
  assert text == ("<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n"
                  "<tool_call>x</tool_call><|im_end|>\n"
                  "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
                  "<|im_start|>assistant\nSunny.<|im_end|>\n")
  ids, mask = tokenize(chat, tpl, enc)
  assert enc.decode(trained_ids(ids, mask)) == "<tool_call>x</tool_call><|im_end|>Sunny.<|im_end|>"


def test_openai_tool_calls_and_tools_prompt(enc):
  obj = {"tools": [{"type": "function", "function": {"name": "f"}}], "messages": [
      {"role": "user", "content": "call f"},
      {"role": "assistant", "content": None,
       "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]}]}
  messages, tools = sources.parse_sample(obj, sources.ParseOptions())
  text = render_text(messages, get_template("qwen3"), tools)
  assert text.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions")
  assert '\n{"type": "function", "function": {"name": "f"}}\n</tools>' in text
  assert text.endswith('<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": '
                       '{"x": 1}}\n</tool_call><|im_end|>\n')


def test_image_placeholders_expand_for_intern_s1():
  class FakeEncoder:  # the Qwen3 tokenizer has no <IMG_CONTEXT>; Intern-S1's does
    added = {"<IMG_CONTEXT>": 152957, "<img>": 152955, "</img>": 152956}

    def token_id(self, t):
      return self.added[t]

    def encode(self, text):
      return [ord(c) for c in text]

  obj = [{"role": "user", "content": [
      {"type": "image_url", "image_url": {"url": "a.jpg", "image_wh": [375, 500]}},
      {"type": "text", "text": "<IMG_CONTEXT>\nWhat?"}]}, {"role": "assistant", "content": "A"}]
  messages, _ = sources.parse_sample(obj, sources.ParseOptions())
  assert messages[0].image_tokens == (3328,)      # 3x4 grid + thumbnail = 13 tiles x 256
  ids, mask = tokenize(messages, get_template("intern-s1"), FakeEncoder())
  assert ids.count(152957) == 3328
  first = ids.index(152955)
  assert ids[first + 3329] == 152956 and not mask[first:first + 3330].any()

"""Chat templates and loss masks against hand-written strings and ids (XTUNER_FACTS.md)."""

import os
import tempfile

import numpy as np
import pytest

from jaxtune.data import sources
from jaxtune.data.templates import (Message, get_template, jinja, render, render_text, tokenize)
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
  # A pretraining sample ends with the tokenizer's eos_token (XTuner's PretrainTokenizeFunction
  # appends tokenizer.eos_token): <|im_end|> in Qwen3's tokenizer_config.json.
  ids, mask = tokenize([Message("pretrain", "Hello world")], tpl, enc)
  assert enc.eos_token == "<|im_end|>"
  assert ids == [9707, 1879, IM_END] and mask.all()
  # A pretrain message inside a chat is its text alone (XTuner's ChatMsg), no end-of-text.
  ids, _ = tokenize([Message("pretrain", "Hello world"), Message("user", "Hi")], tpl, enc)
  assert ids[:3] == [9707, 1879, IM_START]
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
  # XTuner's tool_prompt starts with "\n\n", also when it is the whole system prompt.
  assert text.startswith("<|im_start|>system\n\n\n# Tools\n\nYou may call one or more functions")
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


def _parsed_text(obj, template="qwen3"):
  messages, tools = sources.parse_sample(obj, sources.ParseOptions())
  return render_text(messages, get_template(template), tools)


def test_tools_render_as_xtuner_formats_them():
  """xtuner/v1/data_proto/messages/chat.py: `tool_formatter` wraps a bare schema as
  {"type": "function", "function": ...}; the tools prompt is appended to an existing system
  prompt right after its text (the prompt's own leading blank line separates them)."""
  schema = {"name": "f", "parameters": {"type": "object"}}
  text = _parsed_text({"tools": [schema], "messages": [
      {"role": "system", "content": "Be brief."}, {"role": "user", "content": "go"}]})
  want = ('<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to '
          'assist with the user query.\n\nYou are provided with function signatures within '
          '<tools></tools> XML tags:\n<tools>\n{"type": "function", "function": {"name": "f", '
          '"parameters": {"type": "object"}}}\n</tools>\n\nFor each function call, return a json '
          'object with function name and arguments within <tool_call></tool_call> XML tags:\n'
          '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
          '</tool_call><|im_end|>\n<|im_start|>user\ngo<|im_end|>\n<|im_start|>assistant\n')
  assert text == want


def test_tool_call_arguments_are_reserialised_and_joined_as_xtuner_does():
  """`function_formatter`: json.loads(arguments) then json.dumps with the name; a newline
  before the calls unless the text is empty or already ends with a blank line."""
  call = {"type": "function", "function": {"name": "get", "arguments": '{"city":"北京","n":2}'}}
  body = '<tool_call>\n{"name": "get", "arguments": {"city": "北京", "n": 2}}\n</tool_call>'
  for content, joined in [("", body), ("Let me look.", "Let me look.\n" + body),
                          ("Let me look.\n\n", "Let me look.\n\n" + body)]:
    text = _parsed_text({"messages": [{"role": "user", "content": "weather?"},
                                      {"role": "assistant", "content": content,
                                       "tool_calls": [call]}]})
    assert text.endswith("<|im_start|>assistant\n" + joined + "<|im_end|>\n"), content
  with pytest.raises(ValueError, match="not JSON"):
    _parsed_text({"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get", "arguments": "{oops"}}]}]})


def test_developer_role_and_dialogs_key():
  """XTuner's qwen3 template renders `developer` like a system turn (untrained); intern-s1 has
  no developer role (an error, as in XTuner); `{"dialogs": [...]}` reads like `messages`."""
  obj = {"dialogs": [{"role": "developer", "content": "Rules."},
                     {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
  assert _parsed_text(obj) == ("<|im_start|>system\nRules.<|im_end|>\n<|im_start|>user\nHi"
                               "<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n")
  messages, _ = sources.parse_sample(obj, sources.ParseOptions())
  pieces = render(messages, get_template("qwen3"))
  assert [p.trained for p in pieces] == [False, False, True, False]
  with pytest.raises(ValueError, match="no 'developer' role"):
    _parsed_text(obj, "intern-s1")


def test_exported_jinja_template_renders_exactly_the_training_text():
  """One source of truth: the tokenizer's chat template is generated from the training
  template and renders every role as training does (jinja2, as transformers runs it)."""
  import jinja2  # pylint: disable=import-outside-toplevel
  chat = [Message("system", "S"), Message("user", "Hi"), Message("assistant", "Hello"),
          Message("developer", "D"), Message("user", "Weather?"),
          Message("assistant", "<tool_call>x</tool_call>"), Message("tool", "sunny"),
          Message("assistant", "Sunny.")]
  for name in ("qwen3", "intern-s1"):
    tpl = get_template(name)
    msgs = [m for m in chat if m.role in tpl.wraps()]
    program = jinja2.Environment().from_string(jinja(tpl))
    rendered = program.render(messages=[dict(role=m.role, content=m.text) for m in msgs],
                              add_generation_prompt=False)
    assert rendered == render_text(msgs, tpl), name
    prompt = program.render(messages=[dict(role=m.role, content=m.text) for m in msgs[:-1]],
                            add_generation_prompt=True)
    assert prompt == render_text(msgs[:-1], tpl), name  # ends with the assistant header

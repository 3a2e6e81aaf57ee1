"""Chat templates and the loss mask, as XTuner v1 renders them.

Each message is rendered by the template into one piece of text, encoded on its own (no special
tokens added) and the pieces are concatenated. A piece is trained or not as a whole:

  qwen3      system     `<|im_start|>system\\n{system}<|im_end|>\\n`                      untrained
             developer  `<|im_start|>system\\n{developer}<|im_end|>\\n`                   untrained
             user       `<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n`   untrained
             assistant  `{assistant}<|im_end|>`                                          trained
             separator  `\\n` after every assistant turn                                  untrained
             tool       `<|im_start|>user\\n<tool_response>\\n{tool}\\n</tool_response>`
                        `<|im_end|>\\n<|im_start|>assistant\\n` (Qwen3's tool turn)        untrained
             pretrain   `{text}`                                                         trained
  intern-s1  the same without the developer role (as XTuner's), plus a default system prompt
             when the first message is not a system one, and each `<IMG_CONTEXT>` placeholder
             expanded to `<img>` + `<IMG_CONTEXT>` x N + `</img>` (N = 256 per image tile).

A message's own `loss` field overrides its piece's default (never the separator's). A
pretraining sample (only `pretrain` messages, or a `{"content": ...}` line) ends with the
tokenizer's end-of-text token, trained, as XTuner's `PretrainTokenizeFunction` appends
`tokenizer.eos_token`. Tools (`tools` of a line) join the system prompt as XTuner's
`tool_prompt` renders them.

`plan` is the one place these rules live: `render` (and so `tokenize`), the encoder's fast path
(jaxtune.data.encoding) and the exported tokenizer's Jinja chat template (`jinja`) all follow it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, NamedTuple, Sequence

import numpy as np

IMG_CONTEXT = "<IMG_CONTEXT>"
ROLES = ("system", "developer", "user", "assistant", "tool", "pretrain")


class Message(NamedTuple):
  """One validated message. `image_tokens`: <IMG_CONTEXT> count for each image, in order."""
  role: str
  text: str
  loss: bool | None = None
  image_tokens: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  name: str
  system: tuple[str, str]     # (prefix, suffix) around the text
  user: tuple[str, str]
  assistant: tuple[str, str]
  tool: tuple[str, str]
  pretrain: tuple[str, str]
  sep: str
  developer: tuple[str, str] | None = None
  default_system: str | None = None
  image_start: str | None = None
  image_end: str | None = None

  def fingerprint(self) -> str:
    """Changes whenever anything that shapes the rendered text changes (cache key)."""
    return hashlib.sha256(repr(self).encode()).hexdigest()[:16]

  def wrap(self, role: str, text: str) -> str:
    prefix, suffix = getattr(self, role)
    return prefix + text + suffix

  def wraps(self) -> dict[str, tuple[str, str, bool]]:
    """role -> (prefix, suffix, trained by default), for the roles this template has."""
    table = self.__dict__.get("_wraps")
    if table is None:
      table = {r: (*getattr(self, r), r in ("assistant", "pretrain")) for r in ROLES
               if getattr(self, r) is not None}
      object.__setattr__(self, "_wraps", table)  # frozen dataclass: cache by hand
    return table


_CHATML = dict(
    system=("<|im_start|>system\n", "<|im_end|>\n"),
    user=("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
    assistant=("", "<|im_end|>"),
    tool=("<|im_start|>user\n<tool_response>\n",
          "\n</tool_response><|im_end|>\n<|im_start|>assistant\n"),
    pretrain=("", ""),
    sep="\n",
)

TEMPLATES: dict[str, ChatTemplate] = {
    "qwen3": ChatTemplate(name="qwen3", **_CHATML,
                          developer=("<|im_start|>system\n", "<|im_end|>\n")),
    "intern-s1": ChatTemplate(
        name="intern-s1", **_CHATML,
        default_system="你是书生大模型，英文名是Intern-S1，是由上海人工智能实验室开发的多模态大语言模型。",
        image_start="<img>", image_end="</img>"),
}


def get_template(name: str) -> ChatTemplate:
  if name not in TEMPLATES:
    raise ValueError(f"unknown chat_template '{name}'; choose one of {sorted(TEMPLATES)}")
  return TEMPLATES[name]


# XTuner's `tool_prompt` of its qwen3 template (Qwen3's official wording), leading "\n\n"
# included: it is appended to the system prompt, or is the whole system prompt when there is none.
_TOOLS_HEAD = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user "
               "query.\n\nYou are provided with function signatures within <tools></tools> XML "
               "tags:\n<tools>")
_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name "
               "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
               '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def tools_prompt(tools: Sequence[Any]) -> str:
  """XTuner's `tool_formatter`: each schema wrapped as {"type": "function", "function": ...}
  unless it already is one, one JSON line each."""
  wrapped = (t if isinstance(t, dict) and t.get("type") == "function"
             else {"type": "function", "function": t} for t in tools)
  return _TOOLS_HEAD + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in wrapped) + \
      _TOOLS_TAIL


class Piece(NamedTuple):
  """A rendered piece: text to encode, or (for image tokens) ids given directly."""
  text: str
  trained: bool
  image_tokens: tuple[int, ...] = ()  # when set, `text` holds <IMG_CONTEXT> placeholders


class Planned(NamedTuple):
  """One piece of a sample: `role`'s wrap around `text` (role None: `text` as it is)."""
  role: str | None
  text: str
  trained: bool
  message: int | None   # index of the message it renders; None for an inserted piece


def plan(messages: Sequence[Any], template: ChatTemplate, tools: Sequence[Any] | None = None,
         eos: str | None = None) -> list[Planned]:
  """The pieces of one sample in order: the template's rules, in one place.

  messages: (role, text, loss) triples or `Message`s. eos: the tokenizer's end-of-text token,
  appended (trained) to a pretraining sample. XTuner's order (`process_message`): the default
  system prompt first, then the tools prompt appended to the (maybe default) system prompt.
  """
  wraps = template.wraps()
  chat = False
  for m in messages:
    if m[0] not in wraps:
      raise ValueError(f"chat_template '{template.name}' has no '{m[0]}' role (as in XTuner); "
                       f"its roles: {list(wraps)}")
    chat = chat or m[0] != "pretrain"
  out = [Planned(m[0], m[1], wraps[m[0]][2] if m[2] is None else m[2], i)
         for i, m in enumerate(messages)]
  if chat and template.default_system is not None and messages and messages[0][0] != "system":
    out.insert(0, Planned("system", template.default_system, False, None))
  if tools:
    if out and out[0].role == "system":
      out[0] = out[0]._replace(text=out[0].text + tools_prompt(tools))
    else:
      out.insert(0, Planned("system", tools_prompt(tools), False, None))
  pieces = []
  for p in out:
    pieces.append(p)
    if p.role == "assistant":
      pieces.append(Planned(None, template.sep, False, None))
  if not chat and eos:
    pieces.append(Planned(None, eos, True, None))
  return pieces


def render(messages: Sequence[Message], template: ChatTemplate,
           tools: Sequence[Any] | None = None, eos: str | None = None) -> list[Piece]:
  """The pieces of one sample, in order, each with its trained flag."""
  wraps = template.wraps()
  pieces = []
  for p in plan(messages, template, tools, eos):
    text = p.text if p.role is None else wraps[p.role][0] + p.text + wraps[p.role][1]
    images = messages[p.message].image_tokens if p.message is not None else ()
    pieces.append(Piece(text, p.trained, images))
  return pieces


def jinja(template: ChatTemplate) -> str:
  """The Jinja chat template of an exported tokenizer, from the same rules as training: the
  rendered prompt of a chat is exactly `render_text`'s (with `add_generation_prompt` the
  trailing assistant header). Tools and images are not rendered by it."""
  lit = lambda text: json.dumps(text, ensure_ascii=False)
  wraps = template.wraps()
  # The assistant header ends the user (and tool) wrap in training; at the end of a prompt it
  # is written only when a generation prompt is asked for.
  header = "<|im_start|>assistant\n"
  out = []
  if template.default_system is not None:
    out.append("{%- if messages[0].role != 'system' %}"
               f"{{{{- {lit(wraps['system'][0] + template.default_system + wraps['system'][1])} }}}}"
               "{%- endif %}")
  out.append("{%- for message in messages %}")
  for k, (role, (prefix, suffix, _)) in enumerate(wraps.items()):
    if role == "pretrain":
      continue
    out.append(("{%- if" if k == 0 else "{%- elif") + f" message.role == {lit(role)} %}}")
    if role == "assistant":
      out.append(f"{{{{- message.content + {lit(suffix + template.sep)} }}}}")
    elif suffix.endswith(header):
      out.append(f"{{{{- {lit(prefix)} + message.content + {lit(suffix[:-len(header)])} }}}}"
                 f"{{%- if not loop.last %}}{{{{- {lit(header)} }}}}{{%- endif %}}")
    else:
      out.append(f"{{{{- {lit(prefix)} + message.content + {lit(suffix)} }}}}")
  out.append("{%- endif %}{%- endfor %}")
  out.append("{%- if add_generation_prompt and messages[-1].role != 'assistant' %}"
             f"{{{{- {lit(header)} }}}}{{%- endif %}}")
  return "".join(out)


class Splice(NamedTuple):
  """A role's piece encoded as `head + encode(pre + text + post) + tail` (ids as uint32 bytes)."""
  head: bytes
  pre: str
  post: str
  tail: bytes
  fixed: int       # tokens in head + tail
  trained: bool


# Texts on which every splice must reproduce the whole piece's ids (whitespace at the edges,
# a special token, non-ASCII), else the template is rendered whole.
_PROBES = ("", "x", " x ", "\n\nx\n", "\tx", "x<|im_end|>y", "<|endoftext|>", "é\u0301")


def splice_table(template: ChatTemplate, encoder) -> dict[str, Splice] | None:
  """Each role's constant ids, split off the prefix at its last special token and off the
  suffix at its first one.

  The encoder encodes the text between special tokens independently, so those parts encode to
  the same ids whatever the message: they are encoded once here and spliced around each
  message's encoded text, which saves encoding them per message. None (render whole pieces)
  when the encoder cannot tell where special tokens are or a probe text's ids differ.
  """
  key = ("splice", template)
  if key not in encoder.derived:
    pattern = getattr(encoder, "special_pattern", None)
    table = {} if pattern is not None else None
    for role, (prefix, suffix, trained) in template.wraps().items() if table is not None else ():
      splice = _splice(prefix, suffix, trained, pattern, encoder)
      if splice is None:
        table = None
        break
      table[role] = splice
    encoder.derived[key] = table
  return encoder.derived[key]


def _splice(prefix: str, suffix: str, trained: bool, pattern, encoder) -> Splice | None:
  ids = lambda text: bytes(encoder.encode_bytes(text))
  cut = max((m.end() for m in pattern.finditer(prefix)), default=0)
  first = pattern.search(suffix)
  cut2 = first.start() if first else len(suffix)
  head, tail = ids(prefix[:cut]), ids(suffix[cut2:])
  splice = Splice(head, prefix[cut:], suffix[:cut2], tail, (len(head) + len(tail)) >> 2, trained)
  for probe in _PROBES:
    if ids(prefix + probe + suffix) != head + ids(splice.pre + probe + splice.post) + tail:
      return None
  return splice


def render_text(messages: Sequence[Message], template: ChatTemplate,
                tools: Sequence[Any] | None = None, eos: str | None = None) -> str:
  return "".join(p.text for p in render(messages, template, tools, eos))


def encode(pieces: Sequence[Piece], template: ChatTemplate, encoder) -> tuple[list[int],
                                                                               np.ndarray]:
  """Token ids and the per-token trained mask (labels before shifting) of rendered pieces."""
  ids: list[int] = []
  lengths, flags = [], []
  for piece in pieces:
    start = len(ids)
    if piece.image_tokens:
      _encode_with_images(piece, template, encoder, ids)
    else:
      ids.extend(encoder.encode(piece.text))
    lengths.append(len(ids) - start)
    flags.append(piece.trained)
  return ids, np.repeat(np.asarray(flags, dtype=bool), lengths)


def _encode_with_images(piece: Piece, template: ChatTemplate, encoder, ids: list[int]) -> None:
  """Encodes text around each placeholder and inserts <img> <IMG_CONTEXT> x N </img> ids."""
  if template.image_start is None:
    raise ValueError(f"chat_template '{template.name}' has no image tokens; use 'intern-s1' "
                     "for samples with images")
  context = encoder.token_id(IMG_CONTEXT)
  start = encoder.token_id(template.image_start)
  end = encoder.token_id(template.image_end)
  parts = piece.text.split(IMG_CONTEXT)
  for i, part in enumerate(parts):
    if part:
      ids.extend(encoder.encode(part))
    if i < len(piece.image_tokens):
      ids.append(start)
      ids.extend([context] * piece.image_tokens[i])
      ids.append(end)


def tokenize(messages: Sequence[Message], template: ChatTemplate, encoder,
             tools: Sequence[Any] | None = None) -> tuple[list[int], np.ndarray]:
  return encode(render(messages, template, tools, getattr(encoder, "eos_token", None)), template,
                encoder)

"""The encoder of a tokenizer directory, whatever its layout (jaxtune.data.tokenizer_files)."""

from __future__ import annotations

from jaxtune.data.intern_s1_tokenizer import InternS1Encoder
from jaxtune.data.tokenizer import TokenEncoder
from jaxtune.data.tokenizer_files import read_tokenizer_files


def open_encoder(path: str, **kwargs) -> TokenEncoder:
  """A TokenEncoder for the directory `path`, or for Intern-S1's scientific tokenizer an
  InternS1Encoder (the same interface, its rules). kwargs go to the encoder."""
  files = read_tokenizer_files(path)
  if files.layout == "intern-s1":
    return InternS1Encoder(path, files=files, **kwargs)
  return TokenEncoder(path, files=files, **kwargs)

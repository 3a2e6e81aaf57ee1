"""Checks of the data against the model before anything trains, and the end of a failed start.

Token ids. An embedding lookup with an id at or past the model's vocabulary does not fail on
an accelerator: it reads NaN (or another row), so every step's loss is NaN, every update is
skipped, and nothing names the cause. So before training:
  - `check_tokenizer`: the tokenizer's largest id (its BPE vocabulary, added tokens and, for
    Intern-S1, the SentencePiece ranges at their offsets) must be below the model's vocabulary
    size; this runs before the data is tokenized, so a wrong pairing fails in seconds;
  - `check_data`: so must the largest id in the packed samples (what the rows are built from,
    after any sample_transform). Both are a ConfigError: exit code 2, naming both numbers, the
    tokenizer and the checkpoint.

A failed start. `set_aside_failed_start` renames a run directory that ended with an error
before writing any checkpoint or export to `<name>-failed`: it holds the error (train.log)
but nothing to resume from, and must not look like a run.
"""

from __future__ import annotations

import json
import logging
import os
from typing import NamedTuple

from ml_collections import ConfigDict

from jaxtune.config import ConfigError
from jaxtune.train.checkpoint import complete_steps

log = logging.getLogger("jaxtune")

FAILED_SUFFIX = "-failed"


class Vocabulary(NamedTuple):
  """What the start-up check found (the non-finite guard names it when steps fail)."""
  size: int                 # the model's vocabulary size
  key: str                  # the recipe key it comes from
  tokenizer_max: int        # the tokenizer's largest id
  data_max: int | None      # the largest id in the packed data (None: not checked yet)

  def describe(self) -> str:
    data = "" if self.data_max is None else f"{self.data_max} in the data, "
    return (f"largest id {data}{self.tokenizer_max} in the tokenizer; {self.key} = "
            f"{self.size}")


def model_vocab_size(model_cfg: ConfigDict) -> tuple[int, str] | None:
  """(vocabulary size, its key) of a model recipe: model.vocab_size, or a wrapped language
  model's model.text.vocab_size (Intern-S1); None when the model has neither."""
  if "vocab_size" in model_cfg:
    return int(model_cfg.vocab_size), "model.vocab_size"
  text = model_cfg.get("text")
  if isinstance(text, ConfigDict) and "vocab_size" in text:
    return int(text.vocab_size), "model.text.vocab_size"
  return None


def _checkpoint_of(cfg: ConfigDict) -> str:
  parts = [f"{key}={cfg.get(key)}" for key in ("load_from", "resume_from") if cfg.get(key)]
  return ", ".join(parts) or "none (load_from is unset: a newly initialised model)"


def _too_large(cfg: ConfigDict, what: str, largest: int, size: int, key: str,
               extra: str = "") -> ConfigError:
  return ConfigError(
      f"{what} is {largest}, but the model's vocabulary has {size} ids ({key}={size}): ids "
      f"{size} and above have no embedding row, and a step that meets one has a NaN loss. "
      "Tokenizer: "
      f"tokenizer_path={cfg.tokenizer_path}; checkpoint: {_checkpoint_of(cfg)}.{extra} Use "
      f"the model's own tokenizer, or a model whose {key} is at least {largest + 1}.")


def check_tokenizer(cfg: ConfigDict, encoder) -> Vocabulary | None:
  """ConfigError unless every id of the tokenizer is below the model's vocabulary size."""
  found = model_vocab_size(cfg.model)
  if found is None:
    return None
  size, key = found
  largest = encoder.max_id
  if largest >= size:
    raise _too_large(cfg, "the tokenizer's largest token id (added tokens included)", largest,
                     size, key)
  return Vocabulary(size, key, largest, None)


def check_data(cfg: ConfigDict, vocab: Vocabulary | None, data) -> Vocabulary | None:
  """ConfigError unless every id of the packed data is below the model's vocabulary size;
  `vocab` is what `check_tokenizer` found. Returns it with the data's largest id; logs one
  line."""
  if vocab is None:
    return None
  largest = data.max_token_id()
  if largest >= vocab.size:
    raise _too_large(cfg, "the largest token id in the training data", largest, vocab.size,
                     vocab.key, f" (The tokenizer's largest id is {vocab.tokenizer_max}: the "
                     "ids come from data.sample_transform or a token cache of another "
                     "tokenizer.)" if largest > vocab.tokenizer_max else "")
  vocab = vocab._replace(data_max=largest)
  log.info("token ids: %s", vocab.describe())
  return vocab


def set_aside_failed_start(run_dir: str | None) -> str | None:
  """Renames `run_dir` to `<run_dir>-failed` when it is a new run's directory that ended in an
  error before any checkpoint or HF export was written; returns its path (renamed or not).

  A directory with a complete checkpoint, quarantined checkpoints, an export, or earlier starts
  (run_info.json's previous_starts: a resumed run) is left as it is. Never raises.
  """
  if not run_dir or not os.path.isdir(run_dir):
    return run_dir
  try:
    if complete_steps(os.path.join(run_dir, "checkpoints")):
      return run_dir
    names = os.listdir(run_dir)
    if "checkpoints-skipped" in names or any(n.startswith("hf-") for n in names):
      return run_dir
    if _previous_starts(os.path.join(run_dir, "run_info.json")):
      return run_dir
    target, suffix = run_dir.rstrip(os.sep) + FAILED_SUFFIX, 1
    while os.path.exists(target):
      target, suffix = f"{run_dir.rstrip(os.sep)}{FAILED_SUFFIX}-{suffix}", suffix + 1
    os.rename(run_dir, target)
    return target
  except OSError:   # read-only, gone, ...: the directory stays where it is
    return run_dir


def _previous_starts(path: str) -> bool:
  try:
    with open(path, encoding="utf-8") as f:
      return bool(json.load(f).get("previous_starts"))
  except (OSError, ValueError, AttributeError):
    return False

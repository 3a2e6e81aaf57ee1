"""Shared set-up for the trainer tests: a byte-level tokenizer, synthetic chats, a tiny recipe.

A 259-token byte-level tokenizer and a 2-layer, 32-wide Qwen3 make one optimizer step take
milliseconds on the CPU, so a whole run (data, compile, steps, checkpoints, export) takes a
few seconds. The code paths are the real ones: TokenEncoder, the qwen3 chat template, soft
packing, the chunked loss, Orbax, the HF export.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from jaxtune.config import base_config, dataset
from jaxtune.data.tokenizer import QWEN_PATTERN
from jaxtune.models import presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB = 320  # 256 bytes + 3 special tokens, rounded up
CONTRACT_FIELDS = ("step", "epoch", "loss", "loss_tokens", "tokens", "lr", "grad_norm",
                   "step_time", "tokens_per_sec", "tokens_per_sec_per_device", "mfu")
EXACT_FIELDS = ("step", "epoch", "loss", "loss_tokens", "tokens", "lr", "grad_norm", "skipped",
                "consumed_tokens")


def _byte_chars() -> list[str]:
  """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = [], 0
  for b in range(256):
    if b in printable:
      chars.append(chr(b))
    else:
      chars.append(chr(256 + extra))
      extra += 1
  return chars


def write_byte_tokenizer(directory: str) -> str:
  """A byte-level BPE without merges: one token per byte, specials at 256, 257, 258."""
  os.makedirs(directory, exist_ok=True)
  byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                "use_regex": False}
  spec = {
      "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
      "added_tokens": [dict(id=256 + i, content=c, single_word=False, lstrip=False,
                            rstrip=False, normalized=False, special=True)
                       for i, c in enumerate(SPECIAL)],
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
          {"type": "Split", "pattern": {"Regex": QWEN_PATTERN}, "behavior": "Isolated",
           "invert": False}, byte_level]},
      "post_processor": byte_level, "decoder": byte_level,
      "model": {"type": "BPE", "dropout": None, "unk_token": None,
                "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False,
                "byte_fallback": False, "ignore_merges": False,
                "vocab": {c: i for i, c in enumerate(_byte_chars())}, "merges": []},
  }
  with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
    json.dump(spec, f)
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>"}, f)
  return directory


def write_chats(path: str, n: int, seed: int, marker: str | None = None,
                marked: tuple[int, ...] = ()) -> str:
  """n short arithmetic chats; the samples in `marked` carry `marker` in their answer."""
  rng = np.random.default_rng(seed)
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      a, b = (int(x) for x in rng.integers(0, 100, 2))
      answer = f"{a} + {b} = {a + b}." + (f" {marker}" if i in marked else "")
      f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                       {"role": "assistant", "content": answer}]}) + "\n")
  return path


def tiny_config(root: str, **overrides):
  """The tiny recipe writing under `root`; `overrides` are top-level keys."""
  os.makedirs(root, exist_ok=True)
  c = base_config()
  c.model = presets.qwen3_tiny(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                               head_dim=8, tie_word_embeddings=False)
  c.tokenizer_path = write_byte_tokenizer(os.path.join(root, "tokenizer"))
  c.data.datasets = [dataset("chats", write_chats(os.path.join(root, "train.jsonl"), 96, 0))]
  c.data.sample_max_length = 64
  c.data.pack_max_length = 128
  c.data.num_workers = 1
  c.global_batch_size = 4
  c.total_steps = 6
  c.optim.lr = 3e-3
  c.lr.warmup_ratio = 2.0
  c.loss.chunk_size = 128
  c.compute_dtype = "float32"
  c.remat = "none"
  c.work_dir = os.path.join(root, "work")
  c.progress_bar = False
  c.checkpoint_interval = 2
  c.checkpoint_maxkeep = 2
  for key, value in overrides.items():
    c[key] = value
  return c


def read_metrics(run_dir: str) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def exact(records: list[dict]) -> list[dict]:
  """The fields that must not depend on timing or on an interruption."""
  return [{k: r[k] for k in EXACT_FIELDS} for r in records]


_COMPILE_CACHE: dict = {}


def use_compile_cache(tmp_path_factory) -> str:
  """Turns on JAX's persistent compilation cache for the rest of the session (idempotent).

  Every tiny run compiles the same programs; from the cache a run takes ~2 s instead of ~10.
  Subprocesses started with `subprocess_env()` share it. Results are unchanged: a cache hit
  is the executable the same HLO compiled to.
  """
  if not _COMPILE_CACHE:
    import jax  # pylint: disable=import-outside-toplevel
    directory = str(tmp_path_factory.mktemp("jax-compile-cache"))
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _COMPILE_CACHE["dir"] = directory
  return _COMPILE_CACHE["dir"]


def subprocess_env() -> dict:
  """The environment of a subprocess run: the same 4 simulated CPU devices as in-process."""
  cache = ({"JAX_COMPILATION_CACHE_DIR": _COMPILE_CACHE["dir"],
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"} if _COMPILE_CACHE else {})
  return {**os.environ, **cache, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false",
          "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
          "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).strip(
              os.pathsep),
          "PYTHONUNBUFFERED": "1"}


def python() -> str:
  return sys.executable


_REFERENCE: dict = {}


def reference_run(tmp_path_factory):
  """(config, summary) of one uninterrupted tiny run, shared by every test module.

  6 steps, a checkpoint every 2 (2 kept), an HF export every 2 (2 kept), TensorBoard on, a
  profiler trace of steps 3-4. Runs once per test session.
  """
  if not _REFERENCE:
    from jaxtune.train.trainer import Trainer  # pylint: disable=import-outside-toplevel
    use_compile_cache(tmp_path_factory)
    root = str(tmp_path_factory.mktemp("reference"))
    cfg = tiny_config(root, hf_interval=2, hf_max_keep=2, tensorboard=True,
                      profile_steps=(3, 4))
    _REFERENCE.update(cfg=cfg, summary=Trainer(cfg).fit())
  return _REFERENCE["cfg"], _REFERENCE["summary"]


def resumed_config(reference_cfg, work_dir: str, **overrides):
  """The reference recipe writing to `work_dir`, without the extras that only cost time."""
  cfg = reference_cfg.copy_and_resolve_references()
  cfg.work_dir = work_dir
  cfg.hf_interval, cfg.tensorboard, cfg.profile_steps = -1, False, ()
  for key, value in overrides.items():
    cfg[key] = value
  return cfg

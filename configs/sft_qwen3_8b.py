"""Qwen3-8B SFT, as in XTuner's Trainer tutorial.

  python -m jaxtune.main --config=configs/sft_qwen3_8b.py:/data/sft.jsonl \
      --config.load_from=/path/to/Qwen3-8B --config.tokenizer_path=/path/to/Qwen3-8B

The part after ':' is the dataset (a .jsonl file or a folder of them); edit the recipe for a
mix of several with sample ratios.

`load_from`'s config.json must match the preset (a mismatch is an error naming the field).
On 8 GPUs the default mesh (fsdp=-1) shards parameters and optimizer state over all of them;
global_batch_size 16 with 8 ranks gives 2 accumulation steps of one 16k-token row each.
"""

from jaxtune.config import base_config, dataset
from jaxtune.models import presets


def get_config(arg=None):
  c = base_config()
  c.model = presets.qwen3_8b()
  c.data.datasets = [dataset("sft", arg or "data/sft.jsonl")]
  c.data.sample_max_length = 8192
  c.data.pack_max_length = 16384
  c.optim.lr = 1e-5
  c.lr.lr_type = "cosine"
  c.lr.warmup_ratio = 0.03
  c.loss.mode = "chunk"
  c.loss.chunk_size = 1024
  c.global_batch_size = 16
  c.epoch_num = 1
  c.checkpoint_interval = 500
  c.hf_interval = 1000
  c.work_dir = "work_dirs/sft_qwen3_8b"
  return c

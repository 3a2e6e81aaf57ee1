"""Qwen3-8B long-context SFT: 131,072-token rows on one 8-GPU node.

  python -m jaxtune.main --config=configs/sft_qwen3_8b_128k.py:/data/long.jsonl \
      --config.load_from=/path/to/Qwen3-8B --config.tokenizer_path=/path/to/Qwen3-8B

Each packed row's tokens are split over the 8 GPUs (`mesh.sequence=8`, Ulysses attention:
ops/attention.py), and parameters, gradients and optimizer state are sharded over them too.
YaRN (factor 4 over Qwen3's 32,768 trained positions) is Qwen3's documented way to 131,072
tokens; the recipe's `rope_scaling` overrides load_from's config.json and the HF export writes
it back. Plan it first: `python -m jaxtune.plan --config=configs/sft_qwen3_8b_128k.py
--devices=8` (docs/benchmarks.md, "Long context").
"""

from jaxtune.config import base_config, dataset
from jaxtune.models import presets


def get_config(arg=None):
  c = base_config()
  c.model = presets.qwen3_8b(
      max_position_embeddings=131072,
      rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768))
  c.data.datasets = [dataset("long", arg or "data/long.jsonl")]
  c.data.sample_max_length = 131072
  c.data.pack_max_length = 131072
  c.mesh.update(dict(data=1, fsdp=1, tensor=1, expert=1, sequence=8))
  c.optim.lr = 1e-5
  c.lr.lr_type = "cosine"
  c.lr.warmup_ratio = 0.03
  c.loss.mode = "chunk"
  c.loss.chunk_size = 1024
  c.remat = "full"
  c.global_batch_size = 8  # 8 accumulated rows of 131,072 tokens: ~1 M tokens a step
  c.epoch_num = 1
  c.checkpoint_interval = 200
  c.hf_interval = 1000
  c.work_dir = "work_dirs/sft_qwen3_8b_128k"
  return c

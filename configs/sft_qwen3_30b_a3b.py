"""Qwen3-30B-A3B (MoE: 128 experts, top-8) SFT, with the dense recipes' settings.

  python -m jaxtune.main --config=configs/sft_qwen3_30b_a3b.py:/data/sft.jsonl \
      --config.load_from=/path/to/Qwen3-30B-A3B --config.tokenizer_path=/path/to/Qwen3-30B-A3B

The part after ':' is the dataset (a .jsonl file or a folder of them). The architecture is the
official preset; `c.model = presets.from_hf(c.load_from)` reads it from the checkpoint instead.

Mesh: experts split over `expert` (8 here, one expert group per 8-GPU node), everything else
over `fsdp` (-1: the remaining devices); both also split the batch, so global_batch_size 16
is one 16k-token row per GPU per step on 16 GPUs (two per GPU on 8). The balancing loss is
XTuner's, coefficient 0.001 (`model.router_aux_loss_coef`), logged as `aux_loss`.
"""

from jaxtune.config import base_config, dataset
from jaxtune.models import presets


def get_config(arg=None):
  c = base_config()
  c.model = presets.qwen3_30b_a3b()
  c.data.datasets = [dataset("sft", arg or "data/sft.jsonl")]
  c.data.sample_max_length = 8192
  c.data.pack_max_length = 16384
  c.optim.lr = 1e-5
  c.lr.lr_type = "cosine"
  c.lr.warmup_ratio = 0.03
  c.loss.mode = "chunk"
  c.loss.chunk_size = 1024
  c.mesh.expert = 8
  c.mesh.fsdp = -1
  c.global_batch_size = 16
  c.epoch_num = 1
  c.checkpoint_interval = 500
  c.hf_interval = 1000
  c.work_dir = "work_dirs/sft_qwen3_30b_a3b"
  return c

"""HF checkpoints in and out: safetensors streamed one tensor at a time, names from each
model family's table (`jaxtune.models.<family>.hf_weight_map`)."""

from jaxtune.hf.export import export_hf, read_hf_dtype
from jaxtune.hf.load import load_hf_weights

__all__ = ["export_hf", "load_hf_weights", "read_hf_dtype"]

"""Data: JSONL -> chat template + loss mask -> tokens -> packed, shuffled, sharded batches."""

from jaxtune.data.pipeline import DataIterator, SFTData
from jaxtune.data.sources import DataError
from jaxtune.data.encoders import open_encoder
from jaxtune.data.tokenizer import TokenEncoder, build_qwen_tokenizer, load_tokenizer

__all__ = ["DataError", "DataIterator", "SFTData", "TokenEncoder", "build_qwen_tokenizer",
           "load_tokenizer", "open_encoder"]

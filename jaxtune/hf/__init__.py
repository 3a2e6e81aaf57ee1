"""HF checkpoints in and out: safetensors streamed one tensor at a time, names from the name
table of the family the caller passes (`jaxtune.models.<family>.hf_weight_map`).

Below `jaxtune.models`: nothing here imports a model. `files` reads checkpoint directories
(config.json, safetensors headers, dtype), `weights` holds the table rows (`HFWeight`,
`Transform`), `load` and `export` walk a table. `jaxtune.models.load_hf_weights` /
`export_hf` bind them to the registered family of a model config.
"""

from jaxtune.hf.export import export_hf
from jaxtune.hf.files import read_hf_config, read_hf_dtype
from jaxtune.hf.load import load_hf_weights
from jaxtune.hf.weights import HFFamily, HFWeight, Transform

__all__ = ["HFFamily", "HFWeight", "Transform", "export_hf", "load_hf_weights", "read_hf_config",
           "read_hf_dtype"]

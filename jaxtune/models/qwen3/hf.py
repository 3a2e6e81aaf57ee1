"""Qwen3's HF side: the tensor-name table (`hf_weight_map`), the `config.json` an export writes
(`hf_config`) and the preset read from one (`config_from_hf`). The row builders are shared
with Qwen3-MoE and, through it, Intern-S1's text model.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from jaxtune.hf.weights import HFWeight
from jaxtune.models.layers import INIT_STD
from jaxtune.models.qwen3 import presets
from jaxtune.ops.rope import ROPE_TYPES, normalize_rope_scaling


def attention_table(layer: str, ours: str) -> list[HFWeight]:
  """The per-layer attention and norm rows, shared with Qwen3-MoE."""
  return [
      HFWeight(layer + "input_layernorm.weight", ours + "input_layernorm.weight"),
      HFWeight(layer + "self_attn.q_proj.weight", ours + "self_attn.q_proj.kernel", True),
      HFWeight(layer + "self_attn.k_proj.weight", ours + "self_attn.k_proj.kernel", True),
      HFWeight(layer + "self_attn.v_proj.weight", ours + "self_attn.v_proj.kernel", True),
      HFWeight(layer + "self_attn.o_proj.weight", ours + "self_attn.o_proj.kernel", True),
      HFWeight(layer + "self_attn.q_norm.weight", ours + "self_attn.q_norm.weight"),
      HFWeight(layer + "self_attn.k_norm.weight", ours + "self_attn.k_norm.weight"),
      HFWeight(layer + "post_attention_layernorm.weight", ours + "post_attention_layernorm.weight"),
  ]


def dense_mlp_table(layer: str, ours: str) -> list[HFWeight]:
  return [HFWeight(layer + f"mlp.{name}.weight", ours + f"mlp.{name}.kernel", True)
          for name in ("gate_proj", "up_proj", "down_proj")]


def embedding_rows() -> list[HFWeight]:
  return [HFWeight("model.embed_tokens.weight", "model.embed_tokens.embedding")]


def head_rows(cfg: ConfigDict) -> list[HFWeight]:
  rows = [HFWeight("model.norm.weight", "model.norm.weight")]
  if cfg.tie_word_embeddings:
    # Official tied checkpoints (Qwen3-0.6B/1.7B/4B) still store a copy of the embedding as
    # lm_head.weight; like transformers we accept it and use the embedding.
    return rows + [HFWeight("lm_head.weight", None)]
  return rows + [HFWeight("lm_head.weight", "lm_head.kernel", True)]


def hf_weight_map(cfg: ConfigDict) -> tuple[HFWeight, ...]:
  """HF tensor names <-> our param paths, in HF's file order. Used by load and export."""
  layer, ours = "model.layers.{layer}.", "model.layers."
  return tuple(embedding_rows() + attention_table(layer, ours) + dense_mlp_table(layer, ours)
               + head_rows(cfg))


# Token ids of Qwen3's tokenizer: <|endoftext|> and <|im_end|>, as in the official configs.
_BOS_TOKEN_ID, _EOS_TOKEN_ID = 151643, 151645


def _special_id(cfg: ConfigDict, token_id: int) -> int | None:
  # Tiny test vocabularies cannot hold Qwen's special ids; transformers rejects those.
  return token_id if token_id < cfg.vocab_size else None


def hf_config(cfg: ConfigDict, dtype: str, source: dict | None = None) -> dict:
  """The HF `config.json` of a Qwen3ForCausalLM with this architecture.

  `rope_parameters` is transformers 5's form; the flat `rope_theta` and the legacy
  `rope_scaling` (YaRN's keys, or None as the official files have) keep older readers
  (transformers 4, vLLM) working. transformers 5 reads `rope_scaling` first and takes
  rope_theta from the flat field then, so both forms say the same. `source` (the loaded
  checkpoint's config.json) adds nothing: every field is written from the architecture.
  """
  del source
  num_layers = cfg.num_hidden_layers
  special_id = lambda token_id: _special_id(cfg, token_id)
  scaling = normalize_rope_scaling(cfg.get("rope_scaling"))
  rope_parameters = {"rope_type": "default", **(scaling or {}), "rope_theta": float(cfg.rope_theta)}
  return {
      "architectures": ["Qwen3ForCausalLM"],
      "model_type": "qwen3",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": num_layers,
      "num_attention_heads": cfg.num_attention_heads,
      "num_key_value_heads": cfg.num_key_value_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "initializer_range": INIT_STD,
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_parameters": rope_parameters,
      "rope_theta": float(cfg.rope_theta),
      "rope_scaling": scaling,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "use_sliding_window": False,
      "sliding_window": None,
      "max_window_layers": num_layers,
      "layer_types": ["full_attention"] * num_layers,
      "tie_word_embeddings": bool(cfg.tie_word_embeddings),
      "use_cache": True,
      "bos_token_id": special_id(_BOS_TOKEN_ID),
      "eos_token_id": special_id(_EOS_TOKEN_ID),
      "dtype": dtype,
  }


def rope_theta_of(hf: dict) -> float:
  """rope_theta from transformers 5's `rope_parameters` or the older flat field."""
  params = hf.get("rope_parameters")
  if isinstance(params, dict) and "rope_theta" in params:
    return float(params["rope_theta"])
  return float(hf["rope_theta"])


def check_rope_type(hf: dict, where: str = "config.json") -> None:
  """A RoPE type jaxtune does not implement is a ValueError naming it, raised before
  transformers reads the config (which raises a bare KeyError for some)."""
  # transformers 5 reads `rope_scaling` (the legacy key) before `rope_parameters`.
  for key in ("rope_scaling", "rope_parameters"):
    params = hf.get(key)
    if not params or not isinstance(params, dict):
      continue
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"{where} {key} has rope_type {rope_type!r}, which jaxtune does not "
                       f"implement; it reads {list(ROPE_TYPES)} ('yarn': factor, "
                       f"original_max_position_embeddings, ...)")
    if rope_type == "yarn" and "factor" not in params:
      raise ValueError(f"{where} {key}: rope_type 'yarn' needs 'factor'")
    return


def rope_scaling_of(hf: dict) -> dict | None:
  """`model.rope_scaling` from transformers' standardized `rope_parameters` (None: plain)."""
  try:
    return normalize_rope_scaling(hf.get("rope_parameters"))
  except ValueError as e:
    raise ValueError(f"config.json rope_parameters: {e}") from None


def fields_from_hf(hf: dict, model_type: str, fields) -> dict:
  """`fields` of an HF config, with transformers' own defaults for those config.json omits
  (its config class fills them, as `from_pretrained` would)."""
  import transformers  # pylint: disable=import-outside-toplevel
  check_rope_type(hf)
  full = transformers.AutoConfig.for_model(
      model_type, **{k: v for k, v in hf.items() if k != "model_type"})
  out = {}
  for name in fields:
    if name == "rope_theta":
      out[name] = rope_theta_of(full.to_dict())
    elif name == "rope_scaling":
      out[name] = rope_scaling_of(full.to_dict())
    else:
      value = getattr(full, name)
      out[name] = tuple(value) if isinstance(value, list) else value
  return out


def config_from_hf(hf: dict, hf_dir: str | None = None) -> ConfigDict:
  del hf_dir  # the names of a text model's tensors do not vary
  names = [k for k in presets.qwen3_0_6b().keys() if k != "type"]
  return presets.qwen3_0_6b(**fields_from_hf(hf, "qwen3", names))

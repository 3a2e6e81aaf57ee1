"""Qwen3-MoE's HF side: the tensor-name table (Qwen3's attention rows, the router and the
per-expert rows of the sparse layers, Qwen3's MLP rows of the dense ones), the `config.json`
an export writes and the preset read from one.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from jaxtune.hf.weights import HFWeight
from jaxtune.models.qwen3 import hf as qwen3_hf
from jaxtune.models.qwen3_moe import presets
from jaxtune.models.qwen3_moe.model import dense_layer_ids, sparse_layer_ids


def hf_weight_map(cfg: ConfigDict) -> tuple[HFWeight, ...]:
  """HF tensor names <-> our param paths, in HF's file order. Used by load and export."""
  layer = "model.layers.{layer}."
  sparse = (("layer", sparse_layer_ids(cfg)),)
  rows = qwen3_hf.attention_table(layer, "model.layers.") + [
      HFWeight(layer + "mlp.gate.weight", "model.layers.mlp.gate.kernel", True)] + [
          HFWeight(layer + "mlp.experts.{expert}." + f"{name}.weight",
                   f"model.layers.mlp.experts.{name}", True)
          for name in ("gate_proj", "up_proj", "down_proj")]
  table = [row._replace(ids=sparse) for row in rows]
  dense = dense_layer_ids(cfg)
  if dense:
    rows = (qwen3_hf.attention_table(layer, "model.dense_layers.")
            + qwen3_hf.dense_mlp_table(layer, "model.dense_layers."))
    table += [row._replace(ids=(("layer", dense),)) for row in rows]
  return tuple(qwen3_hf.embedding_rows() + table + qwen3_hf.head_rows(cfg))


def hf_config(cfg: ConfigDict, dtype: str, source: dict | None = None) -> dict:
  """The HF `config.json` of a Qwen3MoeForCausalLM with this architecture."""
  out = qwen3_hf.hf_config(cfg, dtype, source)
  out.update(
      architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
      moe_intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.num_experts,
      num_experts_per_tok=cfg.num_experts_per_tok, norm_topk_prob=bool(cfg.norm_topk_prob),
      decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers),
      router_aux_loss_coef=float(cfg.router_aux_loss_coef), output_router_logits=False)
  out.pop("layer_types", None)  # Qwen3MoeConfig has no per-layer attention types
  return out


def config_from_hf(hf: dict, hf_dir: str | None = None) -> ConfigDict:
  del hf_dir  # the names of a text model's tensors do not vary
  names = [k for k in presets.qwen3_30b_a3b().keys() if k not in ("type", "router_z_loss_coef")]
  return presets.qwen3_30b_a3b(**qwen3_hf.fields_from_hf(hf, "qwen3_moe", names))

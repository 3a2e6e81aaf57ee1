"""Rotary position embeddings, the "rotate half" form of HF Llama/Qwen3, driven by positions.

Packed rows restart positions at 0 for every sample, so RoPE takes the positions array
rather than assuming `arange(T)`.

RoPE scaling (`model.rope_scaling`): None is plain RoPE (HF's rope_type "default"); a dict with
rope_type "yarn" is YaRN as transformers computes it (`modeling_rope_utils.
_compute_yarn_parameters`): Qwen3's documented way to 131,072 tokens is factor 4 over
original_max_position_embeddings 32,768. HF's other types (linear, dynamic, longrope, llama3,
...) are not implemented and are rejected by `normalize_rope_scaling`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "yarn")
# The keys of a yarn `rope_scaling` (HF's `rope_parameters` less rope_theta, its own field).
YARN_KEYS = ("rope_type", "factor", "original_max_position_embeddings", "attention_factor",
             "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
  """[H/2] float32: theta ** (-2i / H), computed as HF does (float32 exponent)."""
  exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)


def normalize_rope_scaling(scaling: Any) -> dict | None:
  """`model.rope_scaling` in its one form: None for plain RoPE, else a dict of YARN_KEYS.

  Takes HF's `rope_parameters` or legacy `rope_scaling` dicts too ("type" for "rope_type",
  rope_theta dropped, None values dropped). A type other than ROPE_TYPES, an unknown key or a
  bad value is a ValueError saying what to change.
  """
  if scaling is None:
    return None
  if not hasattr(scaling, "items"):
    raise ValueError(f"must be None (plain RoPE) or a dict with a rope_type, got {scaling!r}")
  given = {k: v for k, v in scaling.items() if v is not None and k != "rope_theta"}
  legacy_type = given.pop("type", "default")  # transformers 4's name for rope_type
  rope_type = given.pop("rope_type", legacy_type)
  if rope_type == "default":
    return None
  if rope_type != "yarn":
    raise ValueError(f"rope_type {rope_type!r} is not implemented: jaxtune implements only "
                     f"'default' (plain RoPE: rope_scaling None) and 'yarn'")
  unknown = sorted(set(given) - set(YARN_KEYS))
  if unknown:
    raise ValueError(f"unknown yarn keys {unknown}; known: {list(YARN_KEYS)}")
  if "factor" not in given:
    raise ValueError("yarn needs 'factor' (the context multiple, e.g. 4.0 for 32,768 -> 131,072)")
  out = {"rope_type": "yarn"}
  for key in YARN_KEYS[1:]:
    if key not in given:
      continue
    value = given[key]
    if key == "truncate":
      if not isinstance(value, bool):
        raise ValueError(f"yarn 'truncate' must be True or False, got {value!r}")
    elif key == "original_max_position_embeddings":
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"yarn 'original_max_position_embeddings' must be a positive int, got "
                         f"{value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"yarn {key!r} must be a number, got {value!r}")
    else:
      value = float(value)
    out[key] = value
  if out["factor"] < 1.0:
    raise ValueError(f"yarn 'factor' must be >= 1 (how many times the original context), got "
                     f"{out['factor']}")
  return out


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  """HF's `yarn_get_mscale`: 0.1 * mscale * ln(scale) + 1 (1 when not scaling up)."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_frequencies(head_dim: int, theta: float, scaling: dict,
                     max_position_embeddings: int | None) -> tuple[np.ndarray, float]:
  """YaRN's [H/2] float32 inverse frequencies and the factor cos and sin are scaled by,
  operation for operation as transformers' `_compute_yarn_parameters` (float32 tables)."""
  factor = scaling["factor"]
  original = scaling.get("original_max_position_embeddings") or max_position_embeddings
  if original is None:
    raise ValueError("yarn needs original_max_position_embeddings (or max_position_embeddings)")
  attention_factor = scaling.get("attention_factor")
  if attention_factor is None:
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
      attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    else:
      attention_factor = _yarn_mscale(factor)
  beta_fast = scaling.get("beta_fast") or 32  # HF's `or`: 0 means the default too
  beta_slow = scaling.get("beta_slow") or 1

  def correction_dim(rotations: float) -> float:
    # The dimension whose wavelength makes `rotations` turns over the original context.
    return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if scaling.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001  # HF's guard against a zero-width ramp
  ramp_h2 = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  pos_freqs_h2 = np.float32(theta) ** (np.arange(0, head_dim, 2).astype(np.float32)
                                       / np.float32(head_dim))
  extrapolation_h2 = 1.0 / pos_freqs_h2
  interpolation_h2 = 1.0 / (factor * pos_freqs_h2)
  # 1 below `low` (high frequencies kept), 0 above `high` (low frequencies interpolated).
  extrapolation_factor_h2 = 1 - ramp_h2
  inv_freq_h2 = (interpolation_h2 * (1 - extrapolation_factor_h2)
                 + extrapolation_h2 * extrapolation_factor_h2)
  return inv_freq_h2.astype(np.float32), float(attention_factor)


def rope_frequencies(head_dim: int, theta: float, scaling: Any = None,
                     max_position_embeddings: int | None = None) -> tuple[np.ndarray, float]:
  """[H/2] float32 inverse frequencies and the attention factor (1.0 but for yarn) that cos
  and sin are multiplied by, for `model.rope_scaling` = scaling."""
  scaling = normalize_rope_scaling(scaling)
  if scaling is None:
    return inverse_frequencies(head_dim, theta), 1.0
  return yarn_frequencies(head_dim, theta, scaling, max_position_embeddings)


def rope_cos_sin(positions_bt: jax.Array, head_dim: int, theta: float, scaling: Any = None,
                 max_position_embeddings: int | None = None) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables [B, T, H] in float32 for the given token positions; `scaling` is
  `model.rope_scaling` (None: plain RoPE)."""
  inv_freq_h2, attention_factor = rope_frequencies(head_dim, theta, scaling,
                                                   max_position_embeddings)
  freqs_bth2 = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_h2)
  angles_bth = jnp.concatenate([freqs_bth2, freqs_bth2], axis=-1)
  cos_bth, sin_bth = jnp.cos(angles_bth), jnp.sin(angles_bth)
  if attention_factor != 1.0:  # yarn: HF scales the tables, so q.k grows by its square
    cos_bth, sin_bth = cos_bth * attention_factor, sin_bth * attention_factor
  return cos_bth, sin_bth


def _rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
  """Rotates every head of x by its token's angle; float32 inside, x's dtype out."""
  x_f32 = x_btnh.astype(jnp.float32)
  cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]  # broadcast over heads
  return (x_f32 * cos + _rotate_half(x_f32) * sin).astype(x_btnh.dtype)

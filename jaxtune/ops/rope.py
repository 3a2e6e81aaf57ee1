"""Rotary position embeddings, the "rotate half" form of HF Llama/Qwen3, driven by positions.

Packed rows restart positions at 0 for every sample, so RoPE takes the positions array
rather than assuming `arange(T)`.
"""

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
  """[H/2] float32: theta ** (-2i / H), computed as HF does (float32 exponent)."""
  exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)


def rope_cos_sin(positions_bt: jax.Array, head_dim: int,
                 theta: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables [B, T, H] in float32 for the given token positions."""
  inv_freq = jnp.asarray(inverse_frequencies(head_dim, theta))
  freqs_bth2 = positions_bt.astype(jnp.float32)[..., None] * inv_freq
  angles_bth = jnp.concatenate([freqs_bth2, freqs_bth2], axis=-1)
  return jnp.cos(angles_bth), jnp.sin(angles_bth)


def _rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
  """Rotates every head of x by its token's angle; float32 inside, x's dtype out."""
  x_f32 = x_btnh.astype(jnp.float32)
  cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]  # broadcast over heads
  return (x_f32 * cos + _rotate_half(x_f32) * sin).astype(x_btnh.dtype)

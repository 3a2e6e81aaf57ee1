"""RMSNorm and LayerNorm, computed in float32 whatever the input dtype (as HF's norms do)."""

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float,
             out_dtype: jnp.dtype | None = None) -> jax.Array:
  """`weight * x / sqrt(mean(x**2) + eps)` over the last axis.

  The statistics and the scaling run in float32 so a bf16 residual stream does not lose
  precision in the normaliser; the result is cast to `out_dtype` (default: x's dtype).
  """
  out_dtype = out_dtype or x.dtype
  x_f32 = x.astype(jnp.float32)
  variance = jnp.mean(jnp.square(x_f32), axis=-1, keepdims=True)
  normed = x_f32 * jax.lax.rsqrt(variance + eps)
  return (normed * weight.astype(jnp.float32)).astype(out_dtype)


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float,
               out_dtype: jnp.dtype | None = None) -> jax.Array:
  """torch's `nn.LayerNorm` over the last axis: biased variance, then `weight * x + bias`;
  statistics and the affine step in float32, the result cast to `out_dtype` (default x's)."""
  out_dtype = out_dtype or x.dtype
  x_f32 = x.astype(jnp.float32)
  mean = jnp.mean(x_f32, axis=-1, keepdims=True)
  centred = x_f32 - mean
  variance = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
  normed = centred * jax.lax.rsqrt(variance + eps)
  return (normed * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(out_dtype)

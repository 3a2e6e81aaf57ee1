"""RMSNorm and LayerNorm, computed in float32 whatever the input dtype (as HF's norms do)."""

import functools

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float,
             out_dtype: jnp.dtype | None = None) -> jax.Array:
  """`weight * x / sqrt(mean(x**2) + eps)` over the last axis.

  The statistics and the scaling run in float32 so a bf16 residual stream does not lose
  precision in the normaliser; the result is cast to `out_dtype` (default: x's dtype).
  Gradients are those of this formula, but the backward recomputes it from x and the weight
  instead of keeping its float32 intermediates (at 16k tokens and D = 4096 each is 256 MiB a
  norm), which is what autodiff would save.
  """
  return _rms_norm(x, weight, float(eps), jnp.dtype(out_dtype or x.dtype))


def _rms_norm_formula(x, weight, eps, out_dtype):
  x_f32 = x.astype(jnp.float32)
  variance = jnp.mean(jnp.square(x_f32), axis=-1, keepdims=True)
  normed = x_f32 * jax.lax.rsqrt(variance + eps)
  return (normed * weight.astype(jnp.float32)).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms_norm(x, weight, eps, out_dtype):
  return _rms_norm_formula(x, weight, eps, out_dtype)


def _rms_norm_fwd(x, weight, eps, out_dtype):
  return _rms_norm_formula(x, weight, eps, out_dtype), (x, weight)


def _rms_norm_bwd(eps, out_dtype, residuals, g):
  # The barrier keeps XLA from moving the recomputation back into the forward pass (where
  # its float32 results would be held until the backward, as without the custom VJP).
  x, weight = jax.lax.optimization_barrier(residuals)
  _, vjp = jax.vjp(lambda x, w: _rms_norm_formula(x, w, eps, out_dtype), x, weight)
  return vjp(g)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


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

"""torch's bicubic resize (`F.interpolate(mode="bicubic", align_corners=False)`, no
antialias), written out: `jax.image.resize`'s cubic is a different filter (Keys a = -0.5,
other edge handling), so a checkpoint's resized position embeddings would not match.

The resize is separable: one [out, in] matrix per axis, built on the host in float64.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

# torch's bicubic kernel constant (`upsample_bicubic2d`, as in OpenCV).
BICUBIC_A = -0.75


def _cubic_coefficients(t: float) -> tuple[float, float, float, float]:
  """torch's `get_cubic_upsample_coefficients`: weights of taps idx-1 .. idx+2 at offset t."""
  a = BICUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return far(t + 1), near(t), near(1 - t), far(2 - t)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] float32 matrix of torch's 1-D bicubic resize (align_corners=False, no
  antialias): taps outside the input clamp to its edge, so their weight adds to the border."""
  scale = in_size / out_size
  matrix = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    real = scale * (i + 0.5) - 0.5  # not clamped at 0 for cubic, as in torch
    index = min(math.floor(real), in_size - 1)
    t = min(max(real - index, 0.0), 1.0)
    for tap, weight in enumerate(_cubic_coefficients(t)):
      matrix[i, min(max(index - 1 + tap, 0), in_size - 1)] += weight
  return matrix.astype(np.float32)


def bicubic_resize(x_hwd: jax.Array, rows: int, cols: int) -> jax.Array:
  """[h, w, d] -> [rows, cols, d] float32, torch's bicubic resize of each channel."""
  height, width, _ = x_hwd.shape
  return jnp.einsum("rh,cw,hwd->rcd", bicubic_matrix(height, rows), bicubic_matrix(width, cols),
                    x_hwd.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)

"""Layer code every family shares: stacking layers on a leading axis and scanning over them,
what a scanned layer keeps for the backward pass (`remat`), the weight init, and the norm
modules with HF's param names.

Shape letters: B batch, T tokens, D hidden, L layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.ops import flash_attention
from jaxtune.ops.norms import layer_norm, rms_norm

# HF's `initializer_range` of every family here: random init draws weights from N(0, 0.02).
INIT_STD = 0.02
# The logical axes of the residual stream [B, T, D] and of per-token arrays [B, T].
BTD = ("activation_batch", "activation_length", "activation_embed")
BT = BTD[:2]
# The name every attention block gives its kernel's output (see `remat_policy`).
ATTENTION_OUT = "attention_out"


def weight_init(logical_axes: tuple[str | None, ...], units: tuple[int, ...] | None = None):
  """Normal(0.02) init whose param carries its logical axis names for `parallel.sharding`
  (and, for a dim of whole heads, the head size as its `shard_units`)."""
  metadata = {} if units is None else dict(shard_units=units)
  return nnx.with_partitioning(nnx.initializers.normal(INIT_STD), logical_axes, **metadata)


class RMSNorm(nnx.Module):
  """`weight * x / rms(x)` over the last axis; statistics in float32 (HF's Qwen3RMSNorm and
  InternVLVisionRMSNorm)."""

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32,
               compute_dtype=jnp.bfloat16):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
    self.eps = eps
    self.compute_dtype = compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.weight[...], self.eps, out_dtype=self.compute_dtype)


class LayerNorm(nnx.Module):
  """torch's `nn.LayerNorm` (biased variance, weight and bias) with HF's param names;
  statistics in float32."""

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32,
               compute_dtype=jnp.bfloat16):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",))
    self.eps = eps
    self.compute_dtype = compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.weight[...], self.bias[...], self.eps, out_dtype=self.compute_dtype)


def stack_layers(make_layer, num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
  """`num_layers` layers as one module whose params gain a leading "layers" axis.

  One layer's params are created L times under vmap (the axis is named so sharding rules can
  map it) and each layer draws its own random init.
  """
  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(layer_rngs: nnx.Rngs) -> nnx.Module:
    return make_layer(layer_rngs)
  return make(rngs)


def scan_layers(stack: nnx.Module, x_btd: jax.Array, *args, remat: str,
                start: int = 0, stop: int | None = None, name: str = "layer"):
  """Runs layers [start, stop) of a stacked module over `x_btd`: a `jax.lax.scan`, so one
  layer is traced and compiled once. A layer returns x or (x, per-layer outputs); the
  per-layer outputs come back stacked along a leading axis (None when there are none).
  `remat` names what each layer keeps for its backward pass (`remat_policy`); `name` is the
  layer's scope in profiles and HLO (`jax.named_scope`).
  """
  graphdef, state = nnx.split(stack)
  if start or stop is not None:
    state = jax.tree.map(lambda a: a[start:stop], state)

  def layer_step(carry_btd, layer_state):
    with jax.named_scope(name):
      out = nnx.merge(graphdef, layer_state)(carry_btd, *args)
    return out if isinstance(out, tuple) else (out, None)

  if remat != "none":
    layer_step = jax.checkpoint(layer_step, prevent_cse=False, policy=remat_policy(remat))
  return jax.lax.scan(layer_step, x_btd, state)


# `remat` (config key): what each scanned layer keeps for the backward pass; the rest of the
# layer is recomputed there. Every family runs its layers through `scan_layers`, so this is
# the one place that maps the names to policies.
REMAT = ("none", "full", "dots", "save_attention", "offload")


def remat_policy(remat: str):
  """The `jax.checkpoint` policy of a `remat` name (None: "full", keep nothing).

    full            the layer's input only (the scan's carry): least memory, one extra forward.
    dots            `dots_with_no_batch_dims_saveable`: the outputs of the weight matmuls
                    (q/k/v/o projections, gate/up/down), not the batched einsums inside
                    attention, which for attention='xla' are [B, N, T, T] score tensors
                    (`dots_saveable` would keep those and lose most of what remat saves).
                    Norms, RoPE, SwiGLU and the attention kernel are recomputed.
    save_attention  the attention output (`ATTENTION_OUT`) and, for the blockwise kernel, its
                    own residuals (output and logsumexp): no attention forward is recomputed.
    offload         what "dots" keeps, moved to pinned host memory in the forward pass and
                    back in the backward pass: device memory near "full", compute near "dots".
  The other kernels' custom backward passes (cuDNN) need residuals that carry no name, so
  every policy but "none" recomputes their forward.
  """
  policies = jax.checkpoint_policies
  if remat == "full":
    return None
  if remat == "dots":
    return policies.dots_with_no_batch_dims_saveable
  if remat == "save_attention":
    return policies.save_only_these_names(ATTENTION_OUT, *flash_attention.RESIDUAL_NAMES)
  if remat == "offload":
    return policies.offload_dot_with_no_batch_dims("device", "pinned_host")
  raise ValueError(f"remat {remat!r} has no checkpoint policy; choose from {REMAT}")


def check_remat(remat: str) -> None:
  """A clear error for an unknown name, or for "offload" where there is no host memory space
  to offload to (then "full" uses as little device memory, recomputing instead)."""
  if remat not in REMAT:
    raise ValueError(f"remat must be one of {list(REMAT)}, got {remat!r}")
  if remat == "offload" and not _has_pinned_host():
    raise ValueError(f"remat='offload' needs a 'pinned_host' memory space, which the "
                     f"{jax.default_backend()} backend does not have; use remat='full' (as "
                     "little device memory, recomputing instead) or 'dots'")


@functools.cache
def _has_pinned_host() -> bool:
  try:
    jax.local_devices()[0].memory("pinned_host")
  except Exception:  # pylint: disable=broad-except  (backends differ in what they raise)
    return False
  return True

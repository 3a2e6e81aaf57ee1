"""The device mesh: five named axes, always all present (size 1 when unused)."""

from collections.abc import Sequence

import jax
import numpy as np

# data: pure data parallel (replicated params); fsdp: data parallel with params sharded over
# it; tensor: Megatron-style split of heads / MLP / vocab; expert: MoE experts; sequence: the
# tokens of each packed row (context parallelism, ops/attention.py), params sharded over it
# as over fsdp. Which axes split the batch is the logical-axis rules' call
# (sharding.batch_axes). The last axes get the closest devices (jax.make_mesh): sequence's
# all-to-alls run in every layer.
AXES = ("data", "fsdp", "tensor", "expert", "sequence")


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """A mesh over `devices` (default: all) with axis sizes `sizes` (missing axes = 1).

  Axis types are Auto on purpose: jaxtune states shardings at the jit boundary (params,
  optimizer state, batch) plus a few `with_sharding_constraint`s, and lets XLA's sharding
  propagation place everything in between. Explicit axes would make sharding part of every
  array's type and require annotating each einsum in the model.
  """
  unknown = set(sizes) - set(AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; jaxtune's axes are {AXES}")
  shape = tuple(int(sizes.get(axis, 1)) for axis in AXES)
  devices = list(jax.devices() if devices is None else devices)
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh {dict(zip(AXES, shape))} needs {int(np.prod(shape))} devices, "
                     f"got {len(devices)}")
  axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
  # jax.make_mesh orders devices by the physical topology (NVLink islands, hosts).
  return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)

"""Parallelism: the device mesh and the one table mapping logical axes to mesh axes."""

from jaxtune.parallel.mesh import AXES, BATCH_AXES, make_mesh
from jaxtune.parallel.sharding import (LOGICAL_AXIS_RULES, batch_sharding, logical_to_mesh,
                                       logical_to_spec, param_shardings, shard_activation)

__all__ = ["AXES", "BATCH_AXES", "LOGICAL_AXIS_RULES", "batch_sharding", "logical_to_mesh", "logical_to_spec",
           "make_mesh", "param_shardings", "shard_activation"]

"""Parallelism: the device mesh and the one table mapping logical axes to mesh axes."""

from jaxtune.parallel.mesh import AXES, make_mesh
from jaxtune.parallel.sharding import (DEFAULT_RULES, ShardAxes, axis_rules,
                                       batch_axes, batch_sharding, current_rules,
                                       logical_shard_map, logical_to_spec,
                                       merge_rules, param_shardings, shard_activation)

__all__ = ["AXES", "DEFAULT_RULES", "ShardAxes", "axis_rules", "batch_axes",
           "batch_sharding", "current_rules", "logical_shard_map",
           "logical_to_spec", "make_mesh", "merge_rules", "param_shardings", "shard_activation"]

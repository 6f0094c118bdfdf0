"""Meshes, logical-axis rules and shardings (the only place that knows mesh axis names)."""

from emoqwen_jax.parallel.mesh import MESH_AXES, make_mesh, mesh_shape
from emoqwen_jax.parallel.rules import (DEFAULT_RULES, batch_sharding, check_divisibility, param_shardings, pure_param_shardings,
                                     shard_batch,                                      shard_model)

__all__ = ["DEFAULT_RULES", "MESH_AXES", "batch_sharding", "check_divisibility", "make_mesh", "mesh_shape",
           "param_shardings", "pure_param_shardings", "shard_batch", "shard_model"]

"""Meshes (``mesh.MESH_AXES`` names the axes), logical-axis rules and shardings of parameters and inputs.

The logical -> mesh rules are the run config's ``mesh.rules`` (``rules.DEFAULT_RULES`` without a run config);
model code names logical axes only (the MoE layer's expert axis is the one exception, see ``model/moe.py``)."""

from emoqwen_jax.parallel.mesh import MESH_AXES, make_mesh, mesh_shape
from emoqwen_jax.parallel.rules import (
                                        DEFAULT_RULES,
                                        batch_sharding,
                                        batch_shardings,
                                        check_divisibility,
                                        param_shardings,
                                        pure_param_shardings,
                                        shard_batch,
                                        shard_model,
)

__all__ = ["DEFAULT_RULES", "MESH_AXES", "batch_sharding", "batch_shardings", "check_divisibility", "make_mesh",
           "mesh_shape", "param_shardings", "pure_param_shardings", "shard_batch", "shard_model"]

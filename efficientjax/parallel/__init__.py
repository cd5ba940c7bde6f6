"""Meshes, logical-axis rules and multi-process start-up."""

from efficientjax.parallel.mesh import (LOGICAL_AXIS_RULES, MESH_AXES, activate, batch_sharding,
                                        logical_to_sharding, make_mesh, maybe_initialize_distributed,
                                        mesh_shape, replicated)

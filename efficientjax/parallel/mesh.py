"""The device mesh and the one table that maps logical axis names onto it."""

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from efficientjax.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')

# Logical name -> mesh axes. Flax assigns each mesh axis at most once per array, left to
# right, so an activation [batch, length, embed] shards batch over (data, fsdp, expert) and
# leaves embed whole, while a weight [embed, mlp] shards embed over fsdp (ZeRO-3 style) and mlp
# over tensor (Megatron style). The batch is split over `expert` too: outside the experts those
# devices are data-parallel, and the expert-parallel dispatch (efficientjax.moe.expert_parallel)
# exchanges each device's own tokens, so none may hold another's copy.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ('batch', ('data', 'fsdp', 'expert')),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('expert', 'expert'),
    ('embed', 'fsdp'),
    ('length', None),
    ('head_dim', None),
    ('latent', None),
    ('norm', None),
    ('layers', None),
    ('branch', None),  # NSA's three attention branches (a gate per head and branch)
    ('block_offset', None),  # a token's offset inside an NSA compression block
    ('kv_length', None),  # the keys' length beside the queries' (a bias [b, h, tq, tk])
    ('positions', None),  # rows of a learned absolute-position table
    ('position_buckets', None),  # T5's relative-distance buckets
)


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves the config's mesh sizes (one may be -1: the devices the others leave)."""
  sizes = {a: int(axes[a]) for a in MESH_AXES}
  free = [a for a, n in sizes.items() if n == -1]
  for a, n in sizes.items():
    if n == 0 or n < -1:
      raise ConfigError(f'mesh.{a}', f'must be a positive device count or -1, got {n}')
  if len(free) > 1:
    raise ConfigError(f'mesh.{free[1]}', f'only one mesh axis may be -1, got {", ".join(free)}')
  fixed = math.prod(n for n in sizes.values() if n != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f'mesh.{free[0]}', f'the other axes use {fixed} devices, which does not '
                        f'divide the {num_devices} available; change the mesh sizes')
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError('mesh', f'the axes multiply to {fixed} devices but {num_devices} are '
                      'available; set one axis to -1 or make the product match')
  return sizes


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(axes, len(devices))
  # Auto axes: GSPMD propagates shardings from the logical constraints, as flax expects.
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, devices=devices,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_sharding(logical_specs, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """A pytree of logical PartitionSpecs -> NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch-major arrays: the leading dim over (data, fsdp, expert), the rest replicated."""
  spec = nn.logical_to_mesh_axes(('batch',) + ('length',) * (ndim - 1), LOGICAL_AXIS_RULES)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activate(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Iterator[None]:
  """The context under which the model must be traced for its sharding constraints to apply."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def maybe_initialize_distributed() -> bool:
  """Starts multi-process JAX when the environment describes a multi-process job.

  `jax.distributed.initialize()` finds the coordinator itself on SLURM, Open MPI and
  Kubernetes, or from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
  """
  env = os.environ
  multi = (env.get('JAX_COORDINATOR_ADDRESS') or int(env.get('JAX_NUM_PROCESSES', '1')) > 1
           or int(env.get('SLURM_NTASKS', '1')) > 1 or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1)
  if not multi:
    return False
  jax.distributed.initialize()
  return True

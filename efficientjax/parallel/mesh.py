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
  """Starts multi-process JAX when the environment describes a multi-process job; True if so.

  Must run before anything asks JAX for devices. SLURM (`srun`, one task per GPU: SLURM_LOCALID
  picks the task's GPU) and Open MPI are found by `jax.distributed.initialize()` itself;
  JAX_LOCAL_DEVICE_IDS (e.g. `0,1,2,3`, for one task per node) overrides the GPUs a process
  drives. Elsewhere JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID describe the job; jax reads only the first of them, so this passes the others.
  EFFICIENTJAX_HEARTBEAT_TIMEOUT_S (default 100, jax's): how long a process may be silent
  before the job counts it dead and ends every process.
  """
  env = os.environ
  num = int(env['JAX_NUM_PROCESSES']) if env.get('JAX_NUM_PROCESSES') else None
  pid = int(env['JAX_PROCESS_ID']) if env.get('JAX_PROCESS_ID') else None
  multi = (env.get('JAX_COORDINATOR_ADDRESS') or (num or 1) > 1
           or int(env.get('SLURM_NTASKS', '1')) > 1
           or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1)
  if not multi:
    return False
  if not env.get('JAX_CPU_COLLECTIVES_IMPLEMENTATION'):
    # A CPU backend's collectives across processes (the CPU-only job, or the host side of a GPU
    # one): gloo over TCP needs nothing but the coordinator. It is jax 0.10's default; named here
    # so a changed default cannot leave CPU processes without cross-process collectives.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  # A process blocked in a collective whose peer died (XLA's CPU collectives can wait for ever)
  # is ended only when the coordinator counts the peer dead, after this many silent seconds.
  heartbeat_s = int(env.get('EFFICIENTJAX_HEARTBEAT_TIMEOUT_S') or 100)
  jax.distributed.initialize(num_processes=num, process_id=pid,
                             heartbeat_timeout_seconds=heartbeat_s)
  return True

"""Mesh construction, the logical-axis rules and multi-process start-up."""

import flax.linen as nn
import jax
import pytest
from jax.sharding import PartitionSpec as P

from efficientjax import parallel
from efficientjax.errors import ConfigError


def test_mesh_shape_fills_the_free_axis():
  axes = {'data': 2, 'fsdp': -1, 'tensor': 2, 'expert': 1}
  assert parallel.mesh_shape(axes, 8) == {'data': 2, 'fsdp': 2, 'tensor': 2, 'expert': 1}
  with pytest.raises(ConfigError, match='does not divide the 6'):
    parallel.mesh_shape({'data': 4, 'fsdp': -1, 'tensor': 1, 'expert': 1}, 6)


def test_make_mesh_uses_auto_axes_in_config_order():
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 4, 'tensor': 1, 'expert': 1})
  assert mesh.axis_names == parallel.MESH_AXES
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1, 'expert': 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize('names, spec', [
    (('batch', 'length', 'embed'), P(('data', 'fsdp', 'expert'), None, None)),  # batch only
    (('embed', 'mlp'), P('fsdp', 'tensor')),                          # weights: ZeRO-3 + Megatron
    (('layers', 'embed', 'heads', 'head_dim'), P(None, 'fsdp', 'tensor', None)),
    (('batch', 'length', 'vocab'), P(('data', 'fsdp', 'expert'), None, 'tensor')),
    (('expert', 'embed', 'mlp'), P('expert', 'fsdp', 'tensor')),     # expert weights
    (('norm',), P(None)),
])
def test_logical_rules(names, spec):
  assert nn.logical_to_mesh_axes(names, parallel.LOGICAL_AXIS_RULES) == spec


def test_distributed_start_only_when_the_environment_asks(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **k: calls.append(1))
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'SLURM_NTASKS',
              'OMPI_COMM_WORLD_SIZE'):
    monkeypatch.delenv(var, raising=False)
  assert not parallel.maybe_initialize_distributed() and not calls
  monkeypatch.setenv('SLURM_NTASKS', '1')  # a one-task SLURM job is not multi-process
  assert not parallel.maybe_initialize_distributed() and not calls
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  assert parallel.maybe_initialize_distributed() and calls == [1]

"""Training: it learns, it shards without changing the numbers (the step's gradients and the
optimizer: test_optimizer.py; resumption: test_kill_resume.py)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientjax import parallel
from efficientjax.model import ModelConfig, Transformer
from efficientjax.train.optimizer import decay_mask, make_optimizer
from efficientjax.train.state import init_state, state_shardings
from efficientjax.train.step import make_train_step
from tests.helpers import smoke_config


def test_loss_falls_when_overfitting_one_batch():
  c = smoke_config(**{'train.learning_rate': 1e-2, 'train.steps': 40, 'train.warmup_steps': 2})
  model = Transformer(ModelConfig.from_config(c['model'], tokenizer_vocab_size=257))
  tx = make_optimizer(c['train'])
  mesh = parallel.make_mesh(c['mesh'], jax.devices()[:1])
  _, shardings = state_shardings(model, tx, mesh, 32)
  state = init_state(model, tx, mesh, 32, 0, shardings)
  batch = jax.random.randint(jax.random.key(1), (4, 33), 0, 257)
  step = jax.jit(make_train_step(model, tx, grad_accum_steps=1))
  losses = []
  for _ in range(40):
    state, m = step(state, batch)
    losses.append(float(m['loss']))
  assert losses[0] > 5.0  # ~log(384) at init
  assert losses[-1] < 0.25 * losses[0], losses


def test_weight_decay_skips_norms_and_biases():
  params = {'blocks': {'attn_norm': {'scale': jnp.ones((2, 4))}, 'q': {'kernel': jnp.ones((2, 4)),
                                                                        'bias': jnp.ones((2,))}},
            'final_norm': {'scale': jnp.ones(4)}}
  mask = decay_mask(params)
  assert mask == {'blocks': {'attn_norm': {'scale': False}, 'q': {'kernel': True, 'bias': False}},
                  'final_norm': {'scale': False}}


def _first_losses(mesh_axes, devices, steps=2):
  c = smoke_config(**{'mesh.data': mesh_axes[0], 'mesh.fsdp': mesh_axes[1],
                      'train.global_batch_size': 8, 'model.num_heads': 4})
  model = Transformer(ModelConfig.from_config(c['model'], tokenizer_vocab_size=257))
  tx = make_optimizer(c['train'])
  mesh = parallel.make_mesh(c['mesh'], devices)
  _, shardings = state_shardings(model, tx, mesh, 32)
  state = init_state(model, tx, mesh, 32, 0, shardings)
  rng = np.random.default_rng(0)
  batch_sh = parallel.batch_sharding(mesh)
  step = jax.jit(make_train_step(model, tx, 2), in_shardings=(shardings, batch_sh),
                 out_shardings=(shardings, parallel.replicated(mesh)))
  losses = []
  with parallel.activate(mesh):
    for _ in range(steps):
      batch = jax.device_put(rng.integers(0, 257, (8, 33), dtype=np.int32), batch_sh)
      state, m = step(state, batch)
      losses.append(float(m['loss']))
  kernel = state.params['blocks']['mlp']['up']['kernel']
  return losses, kernel.sharding.spec


@pytest.mark.parametrize('mesh_axes', [(1, 8), (2, 4)], ids=['fsdp8', 'data2xfsdp4'])
def test_sharded_step_matches_one_device(mesh_axes):
  assert jax.device_count() == 8, 'conftest sets 8 host devices'
  ref, _ = _first_losses((1, 1), jax.devices()[:1])
  got, spec = _first_losses(mesh_axes, jax.devices())
  assert spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor')  # [layers, embed, mlp]
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)

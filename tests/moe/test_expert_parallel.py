"""Expert parallelism (efficientjax.moe.expert_parallel) on 8 fake CPU devices equals one device.

The references are `dispatch.dropless` and the whole model / training step run on a single
device. Forward values and gradients agree within 1e-5 relative to the largest entry (fp32,
only float summation order differs); expert loads and the aux-free routing bias are compared
exactly. Routing is skewed on purpose: some experts receive nothing, one takes a share of the
assignments far above its fair one.

The 'ragged' exchange runs here with `ragged_all_to_all_reference` in place of
jax.lax.ragged_all_to_all, which XLA:CPU cannot run; the real op is only lowered.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from efficientjax import parallel
from efficientjax.model import ModelConfig, MoEConfig, Transformer, auxiliary_loss
from efficientjax.moe import DISPATCH, expert_parallel, route
from efficientjax.train.optimizer import make_optimizer
from efficientjax.train.state import init_state, state_shardings
from efficientjax.train.step import make_train_step
from tests.helpers import smoke_config

MESHES = {
    'expert8': {'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 8},
    'data2xexpert4': {'data': 2, 'fsdp': 1, 'tensor': 1, 'expert': 4},
    'fsdp2xtensor2xexpert2': {'data': 1, 'fsdp': 2, 'tensor': 2, 'expert': 2},
}
E, K = 8, 2
# Selection bias (softmax probabilities lie in [0, 1]): expert 0 is in every token's top-2,
# experts 5-7 in none.
SKEW = np.array([2.0, 0, 0, 0, 0, -2.0, -2.0, -2.0], np.float32)


def _close(got, want, tol=1e-5):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = np.abs(want).max() + 1e-12
  assert np.abs(got - want).max() <= tol * scale, (np.abs(got - want).max(), scale)


def _mesh(name):
  assert jax.device_count() == 8, 'conftest sets 8 host devices'
  return parallel.make_mesh(MESHES[name])


def test_reference_follows_the_ragged_all_to_all_docstring():
  """jax.lax.ragged_all_to_all's own example (jax 0.10 docstring), on a 2-device axis."""
  mesh = jax.make_mesh((2,), ('x',), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Explicit,))
  args = [np.array(a, np.float32 if i < 2 else np.int32) for i, a in enumerate([
      [[1, 2, 2], [3, 4, 0]], [[0] * 4] * 2, [[0, 1], [0, 1]], [[1, 2], [1, 1]],
      [[0, 0], [1, 2]], [[1, 1], [2, 1]]])]
  fn = jax.shard_map(
      lambda *a: expert_parallel.ragged_all_to_all_reference(*(v[0] for v in a),
                                                             axis_name='x')[None],
      mesh=mesh, in_specs=(P('x'),) * 6, out_specs=P('x'))
  with jax.set_mesh(mesh):
    out = jax.jit(fn)(*(jax.device_put(a, jax.NamedSharding(mesh, P('x'))) for a in args))
  np.testing.assert_array_equal(out, [[1, 3, 0, 0], [2, 2, 4, 0]])


T, D, F = 60, 16, 32  # 60 tokens do not split over 8 devices: the filler-token path


def _dispatch_inputs(seed=0):
  rng = np.random.default_rng(seed)
  shapes = {'gate': (E, D, F), 'up': (E, D, F), 'down': (E, F, D)}
  w = {n: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), jnp.float32)
       for n, s in shapes.items()}
  logits = rng.standard_normal((T, E)).astype(np.float32)
  logits[:, 3] += 4.0       # expert 3 in (nearly) every top-2
  logits[:, [5, 6]] -= 30.0  # experts 5, 6 empty
  return (jnp.asarray(rng.standard_normal((T, D)), jnp.float32), w, jnp.asarray(logits),
          jnp.asarray(rng.standard_normal((T, D)), jnp.float32))


def _dispatch_grads(fn, cfg, x, w, logits, probe):
  def loss(x, w, logits):
    y, stats = fn(x, w, route(logits, cfg), cfg, dtype=jnp.float32)
    return jnp.sum(y * probe), (y, stats)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, w, logits)


@pytest.mark.parametrize('mesh_name', ['expert8', 'fsdp2xtensor2xexpert2'])
def test_exchanges_equal_one_device_dropless(mesh_name):
  cfg = MoEConfig(num_experts=E, top_k=K, grouped_matmul='ragged_dot')
  inputs = _dispatch_inputs()
  (_, (want, _)), want_grads = _dispatch_grads(DISPATCH.get('dropless'), cfg, *inputs)
  load = np.bincount(np.asarray(route(inputs[2], cfg).experts).ravel(), minlength=E)
  assert load[5] == load[6] == 0 and load[3] > 0.4 * T, load
  with parallel.activate(_mesh(mesh_name)):
    for exchange in expert_parallel.EXCHANGES:
      fn = functools.partial(expert_parallel.dropless_expert_parallel, exchange=exchange,
                             ragged_all_to_all=expert_parallel.ragged_all_to_all_reference)
      (_, (y, stats)), grads = _dispatch_grads(fn, cfg, *inputs)
      assert float(stats['dropped_fraction']) == 0.0
      _close(y, want)
      for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        _close(got, ref)


def test_real_ragged_all_to_all_lowers():
  """The real op: lowered (forward and backward) but not compiled: XLA:CPU has no kernel for
  it, so its run on a GPU/TPU mesh is unverified by this suite."""
  cfg = MoEConfig(num_experts=E, top_k=K, grouped_matmul='ragged_dot')
  x, w, logits, _ = _dispatch_inputs()

  def loss(x, w):
    y, _ = expert_parallel.dropless_expert_parallel(x, w, route(logits, cfg), cfg,
                                                    dtype=jnp.float32, exchange='ragged')
    return jnp.sum(y)
  with parallel.activate(_mesh('expert8')):
    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w).as_text()
  assert text.count('ragged_all_to_all') >= 4  # two exchanges forward, two transposed


def _train_config(mesh_axes):
  c = smoke_config(**{'model.ffn': 'moe', 'model.moe.grouped_matmul': 'ragged_dot',
                      'model.moe.aux_free': True, 'model.moe.bias_update_rate': 0.01,
                      'model.moe.z_loss_coef': 1e-3, 'model.moe.num_shared_experts': 1,
                      'model.moe.expert_dim': 32, 'model.init_std': 0.2,
                      'train.global_batch_size': 16})
  c['mesh'].update(mesh_axes)
  return c


SEQ_LEN = 16
SKEWED_STATE = {'moe_state': {'blocks': {'mlp': {'bias': np.tile(SKEW, (2, 1))}}}}


def _batches(steps=2):
  rng = np.random.default_rng(0)
  return [rng.integers(0, 257, (16, SEQ_LEN + 1), dtype=np.int32) for _ in range(steps)]


@functools.lru_cache(maxsize=None)
def _train(mesh_name):
  """Two steps of make_train_step (AdamW, clipping, 2 micro-batches) from one shared start;
  mesh_name None: one device. -> (model, start params, per-step metrics, end model state)."""
  axes = {'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 1} if mesh_name is None else MESHES[
      mesh_name]
  c = _train_config(axes)
  model = Transformer(ModelConfig.from_config(c['model'], tokenizer_vocab_size=257))
  tx = make_optimizer(c['train'])
  one = parallel.make_mesh(_train_config({})['mesh'], jax.devices()[:1])
  mesh = one if mesh_name is None else parallel.make_mesh(c['mesh'])
  _, shardings = state_shardings(model, tx, mesh, SEQ_LEN)
  if mesh_name is None:
    state = init_state(model, tx, one, SEQ_LEN, 0, shardings)
    # Placed as the step returns it: from host arrays, the second step would compile again.
    state = state.replace(model_state=jax.device_put(SKEWED_STATE, shardings.model_state))
  else:  # the one-device start, laid out on the mesh (init under it is checked by tracing)
    with parallel.activate(mesh):
      jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, SEQ_LEN), jnp.int32)),
                     jax.random.key(0))
    state = jax.device_put(jax.device_get(_train(None)[1]), shardings)
  start = jax.device_get(state)
  batch_sh = parallel.batch_sharding(mesh)
  step = jax.jit(make_train_step(model, tx, 2), in_shardings=(shardings, batch_sh),
                 out_shardings=(shardings, parallel.replicated(mesh)))
  metrics = []
  with parallel.activate(mesh):
    for batch in _batches():
      state, m = step(state, jax.device_put(batch, batch_sh))
      metrics.append(jax.device_get(m))
  return model, start, metrics, jax.device_get(state.model_state)


def test_train_steps_equal_one_device():
  _, _, want, want_state = _train(None)
  _, _, got, got_state = _train('data2xexpert4')
  for g, w in zip(got, want):
    load = w['moe_stats']['blocks']['mlp']['load']  # [layers, experts], summed over micro-batches
    assert (load[:, 5:] == 0).all() and (load[:, 0] == load.sum(axis=1) // 2).all(), load
    np.testing.assert_array_equal(g['moe_stats']['blocks']['mlp']['load'], load)
    for key in ('loss', 'aux_loss', 'grad_norm'):
      _close(g[key], w[key])
    jax.tree.map(_close, g['moe_stats'], w['moe_stats'])
  jax.tree.map(np.testing.assert_array_equal, got_state, want_state)


def _model_grads(model):
  def loss(params, model_state, batch):
    logits, reported = model.apply({'params': params, **model_state}, batch[:, :-1],
                                   mutable=['losses', 'moe_stats'])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    return ce + auxiliary_loss(reported['losses']), (logits, reported['moe_stats'])
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_moe_transformer_logits_and_gradients_equal_one_device():
  model, start, _, _ = _train(None)
  batch = _batches()[0][:8]
  (want_loss, (want_logits, want_stats)), want_grads = _model_grads(model)(
      start.params, SKEWED_STATE, batch)

  mesh = _mesh('expert8')
  _, shardings = state_shardings(model, optax.sgd(1.0), mesh, SEQ_LEN)
  params = jax.device_put(start.params, shardings.params)
  assert params['blocks']['mlp']['gate'].sharding.spec == P(None, 'expert', 'fsdp', 'tensor')
  batch = jax.device_put(batch, parallel.batch_sharding(mesh))
  with parallel.activate(mesh):
    lowered = _model_grads(model).lower(params, SKEWED_STATE, batch)
    assert 'all_to_all' in lowered.as_text()  # the MoE block took the expert-parallel path
    (got_loss, (logits, stats)), grads = lowered.compile()(params, SKEWED_STATE, batch)
  _close(got_loss, want_loss)
  _close(logits, want_logits)
  np.testing.assert_array_equal(stats['blocks']['mlp']['load'], want_stats['blocks']['mlp']['load'])
  jax.tree.map(_close, grads, want_grads)

"""The optimizer state in host memory (train.offload_optimizer) and in bfloat16
(train.opt_state_dtype): where the state lives, and what the updates are.

CPUs have the memory kinds a GPU has (`device`, `pinned_host`), so the placement and the
arithmetic are checked here; what offloading saves on a GPU is a pending GPU check.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from efficientjax import parallel
from efficientjax.data import get_tokenizer
from efficientjax.train.loop import Recipe, train
from efficientjax.train.optimizer import make_optimizer
from tests.helpers import smoke_config

ONE = dict(devices=jax.devices()[:1], progress=False)


def _kinds(tree):
  return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


def test_offloaded_moments_live_in_host_memory_before_and_after_each_step():
  config = smoke_config(**{'train.offload_optimizer': True, 'model.num_layers': 1})
  recipe = Recipe(config)
  model_cfg = recipe.model_config(get_tokenizer('byte'))
  mesh = parallel.make_mesh(config['mesh'], jax.devices()[:2])
  recipe.setup(model_cfg, mesh)
  state = recipe.fresh_state(lambda _: None)
  adam = state.opt_state[-1][0]  # clip's state, then AdamW's chain: ScaleByAdamState first
  assert _kinds(adam.mu) == _kinds(adam.nu) == {'pinned_host'}
  assert _kinds(adam.count) == {'device'}  # the step reads the counters for the learning rate
  assert _kinds(state.params) == {'device'}
  batch_sh = parallel.batch_sharding(mesh)
  with parallel.activate(mesh):
    step = jax.jit(recipe.train_step(recipe.model, recipe.tx),
                   in_shardings=(recipe.shardings, batch_sh), donate_argnums=0,
                   out_shardings=(recipe.shardings, parallel.replicated(mesh)))
    tokens = np.random.default_rng(0).integers(0, 256, (4, 65), dtype=np.int32)
    state, _ = step(state, jax.device_put(tokens, batch_sh))
  adam = state.opt_state[-1][0]
  assert _kinds(adam.mu) == _kinds(adam.nu) == {'pinned_host'}
  assert float(jnp.abs(jax.device_put(adam.mu['lm_head']['kernel'],
                                      jax.devices()[0])).sum()) > 0  # updated, not left as zeros


def test_offloaded_training_equals_the_default_and_resumes_from_its_checkpoints(tmp_path):
  base = smoke_config(**{'train.checkpoint_every': 3, 'train.eval_every': 0})
  default = train(base, str(tmp_path / 'default'), **ONE)
  offload = {**base, 'train': {**base['train'], 'offload_optimizer': True}}
  train(offload, str(tmp_path / 'offload'), stop_after_step=3, **ONE)
  resumed = train(offload, str(tmp_path / 'offload'), **ONE)  # restores the host-memory moments
  assert resumed.start_step == 3
  # Bitwise: the same arithmetic, only where the moments wait between steps differs.
  assert resumed.losses == {s: l for s, l in default.losses.items() if s > 3}
  assert resumed.eval_losses[6] == default.eval_losses[6]


def test_bfloat16_moments_are_stored_rounded_and_the_update_is_float32_adamw():
  train_cfg = dict(grad_clip_norm=0.0, learning_rate=1e-2, warmup_steps=0, steps=10,
                   min_lr_ratio=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                   opt_state_dtype='bfloat16')
  tx = make_optimizer(train_cfg)
  rng = np.random.default_rng(0)
  w = rng.normal(size=(8, 16)).astype(np.float32)
  params = {'kernel': jnp.asarray(w)}
  state = tx.init(params)
  m = np.zeros((8, 16), np.float64)
  v = np.zeros((8, 16), np.float64)
  p = w.astype(np.float64)
  bf16 = lambda x: np.asarray(np.asarray(x, np.float32).astype(ml_dtypes.bfloat16), np.float64)
  for t in range(1, 4):
    g = rng.normal(size=(8, 16)).astype(np.float32)
    updates, state = tx.update({'kernel': jnp.asarray(g)}, state, params)
    params = {'kernel': params['kernel'] + updates['kernel']}
    # AdamW in float64 from the stored (bfloat16) moments; the new moments feed this update
    # unrounded and are stored rounded.
    m_new = 0.9 * m + 0.1 * g
    v_new = 0.95 * v + 0.05 * g.astype(np.float64) ** 2
    lr = 1e-2
    p = p - lr * (m_new / (1 - 0.9 ** t) / (np.sqrt(v_new / (1 - 0.95 ** t)) + 1e-8) + 0.1 * p)
    m, v = bf16(m_new), bf16(v_new)
    adam = state[-1][0]
    assert adam.mu['kernel'].dtype == adam.nu['kernel'].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(adam.mu['kernel'], np.float64), m)
    np.testing.assert_array_equal(np.asarray(adam.nu['kernel'], np.float64), v)
    np.testing.assert_allclose(np.asarray(params['kernel']), p, rtol=2e-5, atol=2e-6)
  f32 = make_optimizer({**train_cfg, 'opt_state_dtype': 'float32'}).init(params)
  nbytes = lambda s: sum(x.nbytes for x in jax.tree.leaves(s))
  assert nbytes(state) - 8 < nbytes(f32) / 2 + 8  # half, but for the int32 counters


def test_the_runs_state_takes_the_configured_moment_dtype():
  for dtype in ('float32', 'bfloat16'):
    config = smoke_config(**{'train.opt_state_dtype': dtype})
    recipe = Recipe(config)
    recipe.setup(recipe.model_config(get_tokenizer('byte')),
                 parallel.make_mesh(config['mesh'], jax.devices()[:1]))
    adam = recipe.abstract.opt_state[-1][0]
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(dtype)}

"""The optimizer and the train step a run builds, against references written here or in optax.

Each test would pass against a bug that Adam hides if it looked at loss or parameters alone
(Adam and clipping cancel a uniform scale of the gradients), so the gradients are read out
exactly through a transformation that stores them, and the optimizer is checked leaf by leaf
against a hand-written schedule, a hand-written decay rule and optax's own transforms.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efficientjax import parallel
from efficientjax.model import ModelConfig, Transformer
from efficientjax.train.loop import evaluate
from efficientjax.train.optimizer import learning_rate_schedule, make_optimizer
from efficientjax.train.state import TrainState
from efficientjax.train.step import make_eval_step, make_train_step
from tests.helpers import smoke_config

SEQ = 16


def _model(**overrides):
  # One layer: compiling is most of these tests' time, and one layer shows every kind of leaf.
  c = smoke_config(**{'model.num_layers': 1, **overrides})
  return c, Transformer(ModelConfig.from_config(c['model'], tokenizer_vocab_size=257))


def _state(model, tx, seed=0):
  """A train state with random params on init's shapes (norm gains around 1), built without
  compiling the real init (tested in tests/train/test_train.py and tests/test_model.py)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    mean = 1.0 if 'scale' in jax.tree_util.keystr(path) else 0.0
    return jnp.asarray(rng.normal(mean, 0.1, s.shape), s.dtype)
  params = jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes['params']))
  model_state = {k: nn.unbox(v) for k, v in shapes.items() if k == 'moe_state'}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jnp.zeros((2,), jnp.uint32),
                    model_state=jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), model_state))


def _keep_gradients() -> optax.GradientTransformation:
  """An 'optimizer' that applies nothing and keeps the last gradients as its state, so a test
  reads exactly the gradients the step computed (no lr-times-gradient round trip)."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _plain_loss(model, params, batch):
  """Next-token cross-entropy, mean over every position of the batch, written out here."""
  logits = model.apply({'params': params}, batch[:, :-1]).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1).mean()


def _global_norm(tree) -> float:
  return math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2))
                       for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize('accum', [1, 4])
def test_step_gradients_loss_and_grad_norm_equal_the_whole_batch_ones(accum):
  """Micro-batch gradients are averaged, not summed: the step's gradients, loss and logged
  grad_norm equal those of the mean loss over the whole batch, computed independently."""
  _, model = _model()
  tx = _keep_gradients()
  state = _state(model, tx)
  batch = jax.random.randint(jax.random.key(7), (8, SEQ + 1), 0, 257)
  new, metrics = jax.jit(make_train_step(model, tx, accum))(state, batch)

  loss, grads = jax.jit(jax.value_and_grad(lambda p, b: _plain_loss(model, p, b)))(
      state.params, batch)
  # fp32 throughout; summing 4 micro-batch means vs one mean differs by rounding only.
  np.testing.assert_allclose(float(metrics['loss']), float(loss), rtol=1e-6)
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7),
               new.opt_state, grads)
  np.testing.assert_allclose(float(metrics['grad_norm']), _global_norm(grads), rtol=1e-5)
  assert bool(metrics['finite'])


def _hand_schedule(t, *, peak, warmup, steps, min_ratio):
  """Linear warm-up from 0 to `peak` over `warmup` updates, then a cosine to peak·min_ratio at
  `steps` (the README's and configs/base.py's description), written out independently; in jnp
  so that optax can trace it as a reference optimizer's schedule."""
  warmup = min(warmup, steps - 1)
  t = jnp.asarray(t, jnp.float32)
  end = peak * min_ratio
  progress = jnp.clip((t - warmup) / (steps - warmup), 0.0, 1.0)
  cosine = end + (peak - end) * 0.5 * (1 + jnp.cos(math.pi * progress))
  return jnp.where(t < warmup, peak * t / max(warmup, 1), cosine)


@pytest.mark.parametrize('warmup, steps', [(3, 10), (0, 5), (8, 4)], ids=['warm3', 'nowarm',
                                                                       'warmup_past_end'])
def test_learning_rate_schedule_is_warmup_then_cosine_to_the_floor(warmup, steps):
  train = smoke_config(**{'train.learning_rate': 2e-3, 'train.warmup_steps': warmup,
                          'train.steps': steps, 'train.min_lr_ratio': 0.1})['train']
  schedule = learning_rate_schedule(train)
  for t in range(steps + 1):
    want = _hand_schedule(t, peak=2e-3, warmup=warmup, steps=steps, min_ratio=0.1)
    assert float(schedule(t)) == pytest.approx(float(want), rel=1e-5, abs=1e-12), t
  assert float(schedule(steps)) == pytest.approx(2e-4, rel=1e-5)  # ends at the floor


def _is_norm_gain_or_bias(path) -> bool:
  """Independent of the optimizer's own mask: a leaf under a module named *norm, or a bias."""
  keys = [getattr(k, 'key', '') for k in path]
  return keys[-1] == 'bias' or any(str(k).endswith('norm') for k in keys[:-1])


def test_the_runs_optimizer_decays_kernels_and_never_norm_gains_or_biases():
  """make_optimizer, as the run builds it, with zero gradients: AdamW's update is then the
  decoupled decay alone, -lr_t·wd·p, on every leaf but norm gains and biases."""
  overrides = {'train.learning_rate': 0.05, 'train.weight_decay': 0.5, 'train.warmup_steps': 2,
               'train.steps': 10, 'model.qkv_bias': True}
  c, model = _model(**overrides)
  tx = make_optimizer(c['train'])
  params = _state(model, tx).params
  kinds = jax.tree_util.tree_map_with_path(lambda p, _: _is_norm_gain_or_bias(p), params)
  assert 0 < sum(jax.tree.leaves(kinds)) < len(jax.tree.leaves(kinds))  # both kinds present
  zeros = jax.tree.map(jnp.zeros_like, params)
  opt_state, p = tx.init(params), params
  update = jax.jit(tx.update)
  shrink = 1.0
  for t in range(3):  # lr 0, then half the peak, then the peak
    updates, opt_state = update(zeros, opt_state, p)
    p = optax.apply_updates(p, updates)
    shrink *= 1 - 0.5 * float(_hand_schedule(t, peak=0.05, warmup=2, steps=10, min_ratio=0.1))

  def check(path, before, after):
    if _is_norm_gain_or_bias(path):
      np.testing.assert_array_equal(after, before, err_msg=jax.tree_util.keystr(path))
    else:
      np.testing.assert_allclose(after, before * shrink, rtol=1e-6,
                                 err_msg=jax.tree_util.keystr(path))
  jax.tree_util.tree_map_with_path(check, params, p)
  assert shrink < 0.97  # the decay is large enough for the check above to see


@pytest.mark.parametrize('clip', [1.0, 0.0], ids=['clip1', 'unclipped'])
def test_the_runs_optimizer_is_optax_clip_then_adamw(clip):
  """Over steps whose gradient norms straddle the clip threshold, make_optimizer's parameters
  follow optax's own clip_by_global_norm + adamw (b1, b2, eps, decay and its mask as
  configured, written here), and differ from the other clipping setting: clipping changes
  Adam's moments when the gradient scale varies from step to step."""
  overrides = {'train.learning_rate': 1e-2, 'train.weight_decay': 0.1, 'train.warmup_steps': 1,
               'train.steps': 6, 'train.b1': 0.8, 'train.b2': 0.9, 'train.eps': 1e-6,
               'train.grad_clip_norm': clip, 'model.qkv_bias': True}
  c, model = _model(**overrides)
  params = _state(model, make_optimizer(c['train'])).params
  schedule = lambda t: _hand_schedule(t, peak=1e-2, warmup=1, steps=6, min_ratio=0.1)
  mask = lambda ps: jax.tree_util.tree_map_with_path(
      lambda p, _: not _is_norm_gain_or_bias(p), ps)

  def reference(clip_norm):
    adamw = optax.adamw(schedule, b1=0.8, b2=0.9, eps=1e-6, weight_decay=0.1, mask=mask)
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm else adamw

  def run(tx):
    rng = np.random.default_rng(3)
    p, s = params, tx.init(params)
    update = jax.jit(tx.update)
    for scale in (30.0, 0.01, 5.0, 0.1):  # global norms far above and below 1
      g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), p)
      norm = _global_norm(g)
      g = jax.tree.map(lambda x: x * (scale / norm), g)
      u, s = update(g, s, p)
      p = optax.apply_updates(p, u)
    return p

  got = run(make_optimizer(c['train']))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               got, run(reference(clip)))
  other = run(reference(0.0 if clip else 1.0))
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(got), jax.tree.leaves(other))) > 1e-4


def test_the_step_logs_the_learning_rate_its_update_used():
  """metrics['learning_rate'] of step t (0-based) is the schedule at t, the rate the optimizer
  applies at its t-th update (checked against optax above)."""
  c, model = _model(**{'train.warmup_steps': 3, 'train.steps': 8})
  tx = make_optimizer(c['train'])
  step = jax.jit(make_train_step(model, tx, 1, learning_rate_schedule(c['train'])))
  state = _state(model, tx)
  batch = jax.random.randint(jax.random.key(1), (4, SEQ + 1), 0, 257)
  for t in range(4):
    state, metrics = step(state, batch)
    want = _hand_schedule(t, peak=c['train']['learning_rate'], warmup=3, steps=8, min_ratio=0.1)
    assert float(metrics['learning_rate']) == pytest.approx(float(want), rel=1e-6, abs=1e-12)


def test_evaluation_is_the_mean_over_every_held_out_token():
  """evaluate() combines batches by summed loss and token count: the mean over all tokens,
  computed here in one plain pass over the concatenated batches."""
  _, model = _model()
  state = _state(model, _keep_gradients())
  batches = [np.asarray(jax.random.randint(jax.random.key(k), (2, SEQ + 1), 0, 257))
             for k in range(3)]
  mesh = parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 1}, jax.devices()[:1])
  got = evaluate(jax.jit(make_eval_step(model)), state, batches, parallel.batch_sharding(mesh))
  want = jax.jit(lambda p, b: _plain_loss(model, p, b))(state.params, jnp.concatenate(batches))
  assert got == pytest.approx(float(want), rel=1e-6)


def test_moe_accumulation_averages_losses_and_gradients_and_sums_the_expert_load():
  """With MoE balancing losses (nonlinear in the batch, so computed per micro-batch), the
  accumulated step equals the mean over its micro-batches (rows i, i+k, ...) of each one's
  cross-entropy, auxiliary loss and gradients, computed here one micro-batch at a time; the
  expert load is a token count, summed: every token assigned top_k times per layer."""
  _, model = _model(**{'model.ffn': 'moe', 'model.moe.num_experts': 4, 'model.moe.top_k': 2,
                       'model.moe.z_loss_coef': 1e-3})
  tx = _keep_gradients()
  state = _state(model, tx)
  batch = jax.random.randint(jax.random.key(5), (8, SEQ + 1), 0, 257)
  k = 2
  new, metrics = jax.jit(make_train_step(model, tx, k))(state, batch)

  def micro_loss(params, micro):
    logits, reported = model.apply({'params': params}, micro[:, :-1], mutable=['losses'])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, micro[:, 1:, None], axis=-1).mean()
    aux = sum(jnp.sum(x) for x in jax.tree.leaves(reported['losses']))
    return ce + aux, (ce, aux)
  grad_fn = jax.jit(jax.value_and_grad(micro_loss, has_aux=True))
  parts = [grad_fn(state.params, batch[i::k]) for i in range(k)]
  ce = np.mean([float(p[0][1][0]) for p in parts])
  aux = np.mean([float(p[0][1][1]) for p in parts])
  grads = jax.tree.map(lambda *g: sum(g) / k, *[p[1] for p in parts])
  assert aux > 0  # the balancing losses are in play
  np.testing.assert_allclose(float(metrics['loss']), ce, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['aux_loss']), aux, rtol=1e-5)
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7),
               new.opt_state, grads)
  loads = [x for p, x in jax.tree_util.tree_leaves_with_path(metrics['moe_stats'])
           if getattr(p[-1], 'key', None) == 'load']
  assert loads
  for load in loads:  # [layers, experts] under the scan
    np.testing.assert_array_equal(np.asarray(load).reshape(-1, 4).sum(-1), 8 * SEQ * 2)

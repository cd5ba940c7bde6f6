"""The fine-tuning step, optimizer and loop, against references written here.

- The loss is the mean cross-entropy of answer tokens over the whole global batch: equal to the
  model run on each example alone (its own row, positions from 0), whatever else is packed
  beside it and whatever the prompt tokens' targets are, with and without micro-batches.
- Gradients reach the trainable tree only; `freeze` changes only its chosen layers.
- LoRA+'s learning rates reach the optimizer: B (and the 1-D DoRA magnitude) move at
  lora_plus_ratio × A's first-step size, by Adam's first-step rule written out here.
- A LoRA run's checkpoints hold the adapters, not the base; a restart rebuilds the base and
  goes on bit-exactly as an uninterrupted run.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efficientjax.model import ModelConfig, Transformer
from efficientjax.nn.linear import ADAPTERS, AdapterSettings
from efficientjax.peft import METHODS, FinetuneConfig
from efficientjax.train.optimizer import make_optimizer
from efficientjax.train.state import TrainState
from efficientjax.train.step import make_train_step
from tests.helpers import short_chats, smoke_config

SEQ, VOCAB = 24, 64


def _cfg(**kw) -> ModelConfig:
  return ModelConfig(vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=48, attention='gqa', **kw)


def _base_params(cfg: ModelConfig, seed: int = 0):
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(seed)
  draw = lambda p, s: jnp.asarray(rng.normal(1.0 if 'scale' in jax.tree_util.keystr(p) else 0.0,
                                             0.2, s.shape), s.dtype)
  return jax.tree_util.tree_map_with_path(draw, jax.tree.map(lambda b: b.value if hasattr(
      b, 'value') else b, shapes['params'], is_leaf=lambda b: hasattr(b, 'value')))


def _keep_gradients() -> optax.GradientTransformation:
  """Applies nothing and keeps the last gradients as its state (tests/train/test_optimizer.py)."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _method(name: str, cfg: ModelConfig, **ft):
  ft = FinetuneConfig(method=name, rank=4, alpha=8.0, **ft)
  method = METHODS.get(name)(cfg, ft)
  return method, dataclasses.replace(cfg, adapter=method.settings())


def _examples(rng, n):
  """n (tokens, answer mask) examples, each with a prompt and an answer; two lengths only, so
  that the reference runs them as two batches."""
  out = []
  for i in range(n):
    length = (6, 9)[i % 2]
    prompt = int(rng.integers(2, length - 1))
    out.append((rng.integers(0, VOCAB, length), np.arange(length) >= prompt))
  return out


def _pack(examples, multiple=2):
  """Examples packed in order into rows of SEQ + 1 (the data module's layout, written out
  here), with empty (all-padding) rows up to a multiple of `multiple` rows."""
  rows, row, col, seg = [], None, SEQ + 1, 0
  for tokens, answer in examples:
    if col + len(tokens) > SEQ + 1:
      row = {k: np.zeros(SEQ + 1, np.int32)
             for k in ('tokens', 'segment_ids', 'positions', 'loss_mask')}
      rows.append(row)
      col, seg = 0, 0
    seg += 1
    sl = slice(col, col + len(tokens))
    row['tokens'][sl] = tokens
    row['segment_ids'][sl] = seg
    row['positions'][sl] = np.arange(len(tokens))
    mask = answer.copy()
    mask[0] = False  # a segment's first token has nothing before it to be predicted from
    row['loss_mask'][sl] = mask
    col += len(tokens)
  while len(rows) % multiple:
    rows.append({k: np.zeros(SEQ + 1, np.int32) for k in rows[0]})
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def _reference_loss(model, variables, examples):
  """Each example alone in its own row (examples of one length batched together): the mean CE
  over every answer target of all of them."""
  total, count = 0.0, 0
  for length in sorted({len(t) for t, _ in examples}):
    tokens = jnp.asarray(np.stack([t for t, _ in examples if len(t) == length]))
    answer = np.stack([a for t, a in examples if len(t) == length])
    logits = model.apply(variables, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    ce = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    total += jnp.sum(jnp.where(answer[:, 1:], ce, 0.0))
    count += int(answer[:, 1:].sum())
  return total / count


@pytest.mark.parametrize('accum', [1, 2])
def test_step_loss_and_gradients_are_the_answer_tokens_of_each_example_alone(accum):
  cfg = _cfg()
  method, cfg = _method('lora', cfg, target_modules='q_proj,v_proj,down_proj')
  model = Transformer(cfg)
  trainable, frozen = method.prepare(_base_params(cfg), jax.random.key(1))
  # B starts at zero; give it values so every adapter's gradient is informative.
  trainable = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape),
                           trainable)
  examples = _examples(np.random.default_rng(0), 10)
  batch = _pack(examples)
  tx = _keep_gradients()
  state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                     opt_state=tx.init(trainable), rng=jnp.zeros((2,), jnp.uint32),
                     frozen=frozen)
  step = jax.jit(make_train_step(model, tx, accum, variables=method.variables))
  new, metrics = step(state, batch)

  def reference(tr):
    params, adapters = method.variables(tr, frozen)
    return _reference_loss(model, {'params': params, ADAPTERS: adapters}, examples)
  loss, grads = jax.jit(jax.value_and_grad(reference))(trainable)  # one program: eager is slow
  np.testing.assert_allclose(float(metrics['loss']), float(loss), rtol=1e-5)
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7),
               new.opt_state, grads)
  assert jax.tree.structure(new.opt_state) == jax.tree.structure(trainable)  # nothing else

  # Packed neighbours are invisible: with every other example's tokens rewritten (and their
  # targets not counted), the loss is example 0's alone.
  only_first = dict(batch)
  seg, row = batch['segment_ids'], 0
  others = (seg != 1) | (jnp.arange(seg.shape[0])[:, None] != row)
  only_first['tokens'] = jnp.where(others, (batch['tokens'] * 7 + 3) % VOCAB, batch['tokens'])
  only_first['loss_mask'] = jnp.where(others, 0, batch['loss_mask'])
  _, metrics_first = step(state, only_first)
  want_first = jax.jit(lambda tr: _reference_loss(
      model, dict(zip(('params', ADAPTERS), method.variables(tr, frozen))), examples[:1]))(
          trainable)
  np.testing.assert_allclose(float(metrics_first['loss']), float(want_first), rtol=1e-5)


def test_freeze_changes_only_the_chosen_layers_after_a_real_step():
  cfg = _cfg()
  method, cfg = _method('freeze', cfg, freeze_layers=1, freeze_modules='mlp')
  base = _base_params(cfg)
  trainable, frozen = method.prepare(base, jax.random.key(0))
  c = smoke_config(**{'train.learning_rate': 1e-2, 'train.warmup_steps': 0,
                      'train.steps': 10})['train']
  tx = make_optimizer(c)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                     opt_state=tx.init(trainable), rng=jnp.zeros((2,), jnp.uint32),
                     frozen=frozen)
  batch = jax.random.randint(jax.random.key(3), (4, SEQ + 1), 0, VOCAB)
  new, _ = jax.jit(make_train_step(Transformer(cfg), tx, 1, variables=method.variables))(
      state, batch)
  before = method.variables(trainable, frozen)[0]
  after = method.variables(new.params, new.frozen)[0]
  flat_b = jax.tree_util.tree_leaves_with_path(before)
  flat_a = dict(jax.tree_util.tree_leaves_with_path(after))
  moved = set()
  for path, b in flat_b:
    a = flat_a[path]
    name = jax.tree_util.keystr(path)
    per_layer = [not np.array_equal(a[i], b[i]) for i in range(2)] if 'blocks' in name else [
        not np.array_equal(a, b)]
    if any(per_layer):
      moved.add(name)
      # only the last layer's (index 1) MLP moved
      assert 'blocks' in name and "'mlp'" in name and per_layer == [False, True], name
  assert moved == {"['blocks']['mlp']['down']['kernel']", "['blocks']['mlp']['gate']['kernel']",
                   "['blocks']['mlp']['up']['kernel']"}


def test_lora_plus_learning_rates_reach_the_optimizer():
  """Adam's first step moves each element by lr·g/(|g|+eps) ≈ ±lr: B's and the magnitude's
  by lora_plus_ratio × lr, A's by lr (weight decay 0 here, clipping off)."""
  cfg = _cfg()
  ratio, lr = 16.0, 1e-3
  for name in ('lora_plus',):
    ft = FinetuneConfig(method=name, rank=4, alpha=8.0, lora_plus_ratio=ratio,
                        target_modules='q_proj,down_proj')
    method = METHODS.get(name)(cfg, ft)
    trainable, _ = method.prepare(_base_params(cfg), jax.random.key(0))
    c = smoke_config(**{'train.learning_rate': lr, 'train.warmup_steps': 0,
                        'train.steps': 10, 'train.weight_decay': 0.0,
                        'train.grad_clip_norm': 0.0, 'train.eps': 1e-30})['train']
    tx = make_optimizer(c, method.lr_multipliers(trainable))
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, x.dtype), trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
      leaf = path[-1].key
      want = -lr * (ratio if leaf == 'lora_b' else 1.0)
      np.testing.assert_allclose(np.asarray(u), want, rtol=1e-5, err_msg=leaf)


def test_a_records_model_config_rebuilds_the_adapted_model():
  """A record keeps ModelConfig.to_dict(); from_config must give back the adapter settings."""
  _, cfg = _method('dora', _cfg(), dropout=0.1)
  rebuilt = ModelConfig.from_config(cfg.to_dict())
  assert isinstance(rebuilt.adapter, AdapterSettings) and rebuilt.adapter == cfg.adapter
  assert ModelConfig.from_config(_cfg().to_dict()).adapter is None


def test_a_restart_rebuilds_the_base_and_goes_on_as_one_run(tmp_path):
  """Checkpoints hold the adapters and their optimizer state, never the frozen base: a run
  stopped after its checkpoint at step 2 and restarted equals an uninterrupted one, step by
  step and in its held-out loss (CPU runs are bitwise reproducible)."""
  from configs import finetune_lora  # pylint: disable=g-import-not-at-top
  from efficientjax.train.finetune import finetune  # pylint: disable=g-import-not-at-top
  c = finetune_lora.get_config('smoke')
  # Short examples in short rows: what is under test is the checkpoint, not the data.
  c.data.corpus, c.data.seq_len = short_chats(tmp_path / 'data'), 64
  c.train.steps, c.train.warmup_steps, c.train.checkpoint_every = 4, 1, 2
  c.train.eval_every = 0
  c.finetune.export = 'none'
  config = c.to_dict()
  one = dict(devices=jax.devices()[:1], progress=False)
  whole = finetune(config, str(tmp_path / 'whole'), **one)
  finetune(config, str(tmp_path / 'cut'), stop_after_step=2, **one)
  step2 = tmp_path / 'cut' / 'checkpoints' / '2'
  stored = sum(f.stat().st_size for f in step2.rglob('*') if f.is_file())
  assert stored < whole.finetune['frozen_bytes']  # adapters + moments, not the base
  resumed = finetune(config, str(tmp_path / 'cut'), **one)
  assert resumed.start_step == 2
  assert {s: whole.losses[s] for s in (3, 4)} == resumed.losses
  assert resumed.final_eval_loss == whole.final_eval_loss

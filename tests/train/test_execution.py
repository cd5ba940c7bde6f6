"""execution = jit | eager: the same steps, fused or op by op, give the same numbers.

Pretraining (quickstart:smoke, shortened) and greedy inference run twice each through the
runner the CLI calls (experiments/{pretrain,inference}.py), once per mode; pretraining on a
mesh of two devices (FSDP), as eager runs sharded steps too. LoRA's own train and eval steps
are compared directly (the loop around them is pretraining's). Spies on the step's forward
pass and on the engine's sampler tell whether the step ran op by op (real arrays, jit
disabled: once per step, evaluation batch, prefill or decode) or was traced for a compile
(jit), so an eager run that silently ran the compiled step fails here, as does a record that
does not say which mode ran.

Tolerances: op by op, XLA compiles each primitive alone, where the fused step may reassociate
or contract (a*b+c into an FMA) inside a fusion; on the CPU at these sizes the two agree to
the bit or within a few float32 ulps, so losses are compared at rtol 1e-5 (about 80 ulps of
a loss near 5) and greedy tokens exactly.
"""

import functools
import json

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import finetune_lora, infer_bf16
from efficientjax import parallel
from efficientjax.data import get_tokenizer
from efficientjax.metrics.record import read_records, validate_record
from efficientjax.train import step as step_lib
from efficientjax.train.execution import EagerStep
from efficientjax.train.finetune import FinetuneRecipe
from efficientjax.train.loop import train
from experiments import inference, validate
from experiments.pretrain import run_training
from tests.helpers import short_chats, smoke_config, with_overrides
from tests.metrics.test_tensorboard import read_scalars

MODES = ('jit', 'eager')
DEVICES = 2  # pretraining's mesh: fsdp over two devices
# Every projection 64 x 64 (MHA, an MLP as wide as the model): eager compiles each primitive
# once per shape, so fewer shapes make the eager runs' compiles (most of their time) fewer,
# and the LoRA test finds most of them compiled by the pretraining test before it.
SQUARE = {'model.attention': 'mha', 'model.num_kv_heads': None, 'model.mlp_dim': 64}
RTOL = 1e-5


def _op_by_op(array) -> bool:
  """Called on real arrays with jit disabled: the caller runs op by op, every jax.jit inside
  it (the layers' scan, library functions) included. A tracer means it is being traced for a
  compile; real arrays with jit enabled, that its inner jits still compile fused programs."""
  return not isinstance(array, jax.core.Tracer) and bool(jax.config.jax_disable_jit)


@pytest.fixture
def forward_calls(monkeypatch):
  """For every call of the steps' forward pass: whether it ran op by op (`_op_by_op`)."""
  calls = []
  real = step_lib.forward

  def spy(model, params, model_state, batch, *args, **kwargs):
    calls.append(_op_by_op(batch['tokens'] if isinstance(batch, dict) else batch))
    return real(model, params, model_state, batch, *args, **kwargs)
  monkeypatch.setattr(step_lib, 'forward', spy)
  return calls


def _short(c):
  """Three steps, an evaluation before and after (one batch each), no checkpoints."""
  c.update({'train': {**c['train'], 'steps': 3, 'warmup_steps': 1, 'timing_warmup_steps': 1,
                      'eval_every': 0, 'eval_batches': 1, 'checkpoint_every': 0}})
  return c


def _train_both(tmp_path, config, forward_calls):
  """{mode: (record, its op-by-op forward calls)} of one run per mode."""
  out = {}
  for mode in MODES:
    config['execution'] = mode
    assert validate.check(config, num_devices=DEVICES) == []
    start = len(forward_calls)
    train_fn = functools.partial(train, devices=jax.devices()[:DEVICES], progress=False)
    path = run_training(ConfigDict(config), str(tmp_path / mode), train_fn)
    (record,) = read_records(path)
    out[mode] = (record, sum(forward_calls[start:]))
  return out


def _losses(workdir):
  with open(workdir / 'train_log.jsonl') as f:
    return [json.loads(line)['loss'] for line in f]


def _check_pair(runs, tmp_path, steps, eval_calls):
  (jit, jit_eager_calls), (eager, eager_calls) = runs['jit'], runs['eager']
  # The jitted run only ever traced its steps; the eager one ran every train step and every
  # evaluation batch op by op, once each.
  assert jit_eager_calls == 0
  assert eager_calls == steps + eval_calls
  for mode, (record, _) in runs.items():
    validate_record(record)
    assert record['config']['execution'] == mode
    assert record['execution']['mode'] == mode
    # Both timings, each in its own record: the report's eager-vs-jit ratio divides them.
    assert record['metrics']['latency']['step_ms']['count'] == steps - 1  # after 1 warm-up
    assert record['metrics']['latency']['step_ms']['p50'] > 0
    assert record['metrics']['throughput']['tokens_per_s'] > 0
  # One config but for its execution: the pair hash matches, the config hash does not.
  assert jit['execution']['pair_hash'] == eager['execution']['pair_hash']
  assert jit['config_hash'] != eager['config_hash']
  got, want = _losses(tmp_path / 'eager'), _losses(tmp_path / 'jit')
  assert len(got) == len(want) == steps
  assert got == pytest.approx(want, rel=RTOL, abs=0)
  for key in ('initial_eval_loss', 'eval_loss'):
    assert eager['quality'][key] == pytest.approx(jit['quality'][key], rel=RTOL, abs=0), key


def test_pretraining_eager_matches_jit(tmp_path, forward_calls):
  config = _short(smoke_config(**SQUARE))
  runs = _train_both(tmp_path, config, forward_calls)
  _check_pair(runs, tmp_path, steps=3, eval_calls=2)


def test_lora_steps_eager_match_jit(tmp_path, forward_calls):
  """LoRA's own train and eval steps (its trainable and frozen trees, its variables), from one
  state on the same batches: jitted against op by op (the loop around them is the one the
  pretraining runs above compare)."""
  c = finetune_lora.get_config('smoke')
  # Short examples in short rows: the method is what this checks, not the data.
  c.data.corpus, c.data.seq_len = short_chats(tmp_path / 'data'), 64
  config = with_overrides(c.to_dict(), SQUARE)
  assert validate.check(config, num_devices=DEVICES) == []
  recipe = FinetuneRecipe(config)
  tokenizer = get_tokenizer(config['data']['tokenizer'], eos_token=config['data']['eos_token'])
  mesh = parallel.make_mesh(config['mesh'], jax.devices()[:DEVICES])
  recipe.setup(recipe.model_config(tokenizer), mesh)
  data = recipe.data(tokenizer)
  batch_sh = jax.tree.map(lambda a: parallel.batch_sharding(mesh, a.ndim),
                          recipe.abstract_batch(sharding=None))
  batches = [jax.device_put(data.train.next(), batch_sh) for _ in range(2)]
  held_out = jax.device_put(data.eval_batches()[0], batch_sh)
  state = recipe.fresh_state(lambda _: None)
  out_sh = (recipe.shardings, parallel.replicated(mesh))
  steps = {'jit': (jax.jit(recipe.train_step(recipe.model, recipe.tx), out_shardings=out_sh),
                   jax.jit(recipe.eval_step())),
           'eager': (EagerStep(recipe.train_step(recipe.model, recipe.tx), out_sh),
                     EagerStep(recipe.eval_step()))}
  got = {}
  with parallel.activate(mesh):
    for mode, (train_step, eval_step) in steps.items():
      start = len(forward_calls)
      s, numbers = state, []
      for b in batches:
        s, metrics = train_step(s, b)
        numbers += [float(metrics['loss']), float(metrics['grad_norm'])]
      total, count = eval_step(s, held_out)
      got[mode] = numbers + [float(total) / float(count)]
      eager_calls = sum(forward_calls[start:])
      assert eager_calls == (3 if mode == 'eager' else 0), (mode, eager_calls)
  assert got['eager'] == pytest.approx(got['jit'], rel=RTOL, abs=0)
  assert got['jit'][0] != got['jit'][2]  # the first step's update changed the second's loss


def test_greedy_inference_eager_decodes_the_same_tokens(tmp_path, monkeypatch):
  from efficientjax.infer import sampling  # pylint: disable=g-import-not-at-top
  op_by_op = []
  real = sampling.sample

  def spy(logits, *args, **kwargs):
    op_by_op.append(_op_by_op(logits))
    return real(logits, *args, **kwargs)
  monkeypatch.setattr(sampling, 'sample', spy)
  records = {}
  for mode in MODES:
    c = infer_bf16.get_config('smoke')
    c.execution = mode
    c.inference.temperature = 0.0  # greedy: the tokens are a function of the logits alone
    assert validate.check(c.to_dict(), num_devices=1) == []
    start = len(op_by_op)
    (records[mode],) = read_records(inference.run(c, str(tmp_path / mode)))
    records[mode]['op_by_op_samples'] = sum(op_by_op[start:])
  jit, eager = records['jit'], records['eager']
  assert jit['op_by_op_samples'] == 0
  # Every prefill (its last chunk samples) and decode step, warm-up and served, ran op by op.
  served = eager['metrics']['throughput']
  assert eager['op_by_op_samples'] > served['requests'] + eager['metrics']['latency'][
      'decode_step_ms']['count']
  for mode, record in records.items():
    record.pop('op_by_op_samples')
    validate_record(record)
    assert record['execution']['mode'] == record['config']['execution'] == mode
    assert record['metrics']['latency']['decode_step_ms']['p50'] > 0
    assert record['metrics']['latency']['ttft_ms']['p50'] > 0
  assert jit['execution']['pair_hash'] == eager['execution']['pair_hash']
  # The eager run's curves (tests/metrics/test_tensorboard.py checks pretraining's): one point
  # per request and per decode step, the same numbers as the record's summaries.
  curves = read_scalars(eager['tensorboard_dir'])
  latency = eager['metrics']['latency']
  ttft = curves['request/ttft_ms']
  assert sorted(ttft) == list(range(served['requests']))
  assert np.mean(list(ttft.values())) == pytest.approx(latency['ttft_ms']['mean'], rel=1e-6)
  assert len(curves['decode/step_ms']) == latency['decode_step_ms']['count']
  assert np.median(list(curves['decode/step_ms'].values())) == pytest.approx(
      latency['decode_step_ms']['p50'], rel=1e-6)
  assert curves['eval/loss'] == {0: pytest.approx(eager['quality']['eval_loss'], rel=1e-6)}
  tokens = {mode: [r['tokens'] for r in rec['inference']['requests']]
            for mode, rec in records.items()}
  assert tokens['eager'] == tokens['jit']
  assert sum(len(t) for t in tokens['jit']) > len(tokens['jit'])  # decode steps, not prefill alone


def test_eager_is_refused_across_processes():
  """Tried: two processes' eager steps hung (experiments/validate.py says how); one process's
  eight devices run it (the pretraining pair above runs two)."""
  config = smoke_config(**{'execution': 'eager', 'train.global_batch_size': 8})
  (error,) = validate.check(config, num_devices=8, process_count=2)
  assert error.field == 'execution' and error.fix == {'execution': 'jit'}
  assert validate.check(config, num_devices=8, process_count=1) == []
  assert validate.check({**config, 'execution': 'jit'}, num_devices=8, process_count=2) == []


def test_eager_training_must_leave_its_compiling_step_untimed():
  config = smoke_config(**{'execution': 'eager', 'train.timing_warmup_steps': 0})
  (error,) = validate.check(config, num_devices=1)
  assert error.field == 'train.timing_warmup_steps' and 'compiles' in error.message
  assert validate.check(with_overrides(config, error.fix), num_devices=1) == []
  assert validate.check({**config, 'execution': 'jit'}, num_devices=1) == []

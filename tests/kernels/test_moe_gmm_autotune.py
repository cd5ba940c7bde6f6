"""kernels/moe_gmm/autotune: picks the fastest tiling, skips failing ones, caches per shape.

Timings come from a fake timer (seconds looked up per candidate) except in the tests of the
default timer, which time a real small matmul on the CPU.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.moe_gmm import autotune

A = dict(block_m=64, block_n=64, num_warps=4)
B = dict(block_m=128, block_n=64, num_warps=8)
C = dict(block_m=128, block_n=128, num_warps=8)
KEY = (512, 256, 384, 8, 'bfloat16', 'triton')


@pytest.fixture(autouse=True)
def fresh_memory(monkeypatch, tmp_path):
  autotune.clear_memory_cache()
  # Never touch the user's real cache, whatever a test passes as cache_path.
  monkeypatch.setenv('EFFICIENTJAX_CACHE_DIR', str(tmp_path / 'env_cache'))
  yield
  autotune.clear_memory_cache()


def _name(candidate):
  return json.dumps(candidate, sort_keys=True)


class Kernel:
  """A stand-in for a kernel: counts builds and calls; seconds per candidate from a table."""

  def __init__(self, seconds, build_fails=(), call_fails=()):
    self.seconds = {_name(c): s for c, s in seconds}
    self.build_fails = [_name(c) for c in build_fails]
    self.call_fails = [_name(c) for c in call_fails]
    self.builds = []

  def build(self, candidate):
    name = _name(dict(candidate))
    self.builds.append(name)
    if name in self.build_fails:
      raise ValueError(f'shared memory exceeded by {name}')

    def thunk():
      if name in self.call_fails:
        raise RuntimeError('compile failed: ' + 'x' * 1000)
      return np.float32(1.0)

    thunk.name = name
    return thunk

  def timer(self, thunk, repeats):
    assert repeats == 5
    return self.seconds[thunk.name]


def _tune(kernel, candidates, key=KEY, op='gmm', cache_path=None):
  return autotune.tune(op, key, candidates, kernel.build, repeats=5, cache_path=cache_path,
                       timer=kernel.timer)


def test_picks_the_fastest_and_reports_the_failures():
  kernel = Kernel([(A, 3e-3), (B, 1e-3), (C, 2e-3)], build_fails=[A], call_fails=[C])
  best = _tune(kernel, [A, B, C])
  assert best == B and isinstance(best, dict)
  report = autotune.last_report('gmm', KEY)
  name = _name
  assert report['best'] == B and report['source'] == 'tuned'
  assert report['seconds'] == {name(A): None, name(B): 1e-3, name(C): None}
  assert report['errors'][name(A)].startswith('ValueError: shared memory exceeded')
  assert report['errors'][name(C)].startswith('RuntimeError: compile failed')
  assert len(report['errors'][name(C)]) < 250  # truncated, not the whole compiler log
  assert name(B) not in report['errors']
  assert autotune.last_report('tgmm', KEY) is None


def test_a_tie_goes_to_the_default():
  assert _tune(Kernel([(A, 1e-3), (B, 1e-3)]), [A, B]) == A


def test_every_candidate_failing_raises_with_each_error():
  kernel = Kernel([], build_fails=[A], call_fails=[B])
  with pytest.raises(RuntimeError) as raised:
    _tune(kernel, [A, B])
  message = str(raised.value)
  assert 'gmm' in message and repr(KEY) in message
  assert 'shared memory exceeded' in message and 'compile failed' in message


def test_memory_cache_skips_building_and_keys_on_op_and_shape():
  kernel = Kernel([(A, 2e-3), (B, 1e-3)])
  assert _tune(kernel, [A, B]) == B
  assert len(kernel.builds) == 2
  assert _tune(kernel, [A, B]) == B
  assert len(kernel.builds) == 2  # cached: nothing built
  _tune(kernel, [A, B], key=KEY[:-1] + ('xla',))
  assert len(kernel.builds) == 4
  _tune(kernel, [A, B], op='tgmm')
  assert len(kernel.builds) == 6


def test_file_cache_serves_a_second_process(tmp_path):
  path = str(tmp_path / 'deep' / 'dir' / 'tune.json')  # the directory is created
  assert _tune(Kernel([(A, 2e-3), (B, 1e-3)]), [A, B], cache_path=path) == B
  autotune.clear_memory_cache()  # a new process
  kernel = Kernel([(A, 2e-3), (B, 1e-3)])
  assert _tune(kernel, [A, B], cache_path=path) == B
  assert kernel.builds == []
  assert autotune.last_report('gmm', KEY)['source'] == 'file'
  entry, = json.load(open(path)).values()
  assert entry['best'] == B and set(entry) == {'best', 'seconds', 'errors', 'when'}
  assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith('.tmp')]


def test_a_cached_best_no_longer_offered_is_retuned(tmp_path):
  path = str(tmp_path / 'tune.json')
  assert _tune(Kernel([(A, 2e-3), (B, 1e-3)]), [A, B], cache_path=path) == B
  autotune.clear_memory_cache()
  kernel = Kernel([(A, 2e-3), (C, 3e-3)])
  assert _tune(kernel, [A, C], cache_path=path) == A
  assert len(kernel.builds) == 2
  entry, = json.load(open(path)).values()
  assert entry['best'] == A
  # The same holds within one process: a new candidate list is not answered from memory.
  kernel = Kernel([(B, 2e-3), (C, 1e-3)])
  assert _tune(kernel, [B, C], cache_path=path) == C and len(kernel.builds) == 2


def test_other_entries_in_the_file_survive(tmp_path):
  path = tmp_path / 'tune.json'
  unrelated = {'["gmm", [1, 2], "H100", "gpu", "0.0"]': {'best': C, 'seconds': {}, 'errors': {},
                                                          'when': '2025-01-01T00:00:00+00:00'}}
  path.write_text(json.dumps(unrelated))
  _tune(Kernel([(A, 2e-3), (B, 1e-3)]), [A, B], cache_path=str(path))
  _tune(Kernel([(A, 1e-3), (B, 2e-3)]), [A, B], op='tgmm', cache_path=str(path))
  data = json.loads(path.read_text())
  assert len(data) == 3
  assert {k: data[k] for k in unrelated} == unrelated


def test_a_corrupt_file_warns_and_is_rewritten_valid(tmp_path):
  path = tmp_path / 'tune.json'
  path.write_text('{"half written": ')
  kernel = Kernel([(A, 2e-3), (B, 1e-3)])
  with pytest.warns(UserWarning, match='tune.json'):
    assert _tune(kernel, [A, B], cache_path=str(path)) == B
  assert len(kernel.builds) == 2
  entry, = json.loads(path.read_text()).values()
  assert entry['best'] == B
  # Moved aside, not destroyed.
  assert (tmp_path / 'tune.json.corrupt').read_text() == '{"half written": '


def test_the_cache_dir_env_var_is_honoured(tmp_path, monkeypatch):
  monkeypatch.setenv('EFFICIENTJAX_CACHE_DIR', str(tmp_path / 'mine'))
  _tune(Kernel([(A, 2e-3), (B, 1e-3)]), [A, B], cache_path='default')
  data = json.loads((tmp_path / 'mine' / 'moe_gmm_autotune.json').read_text())
  key, = data
  # The device, backend and jax version are part of the key.
  assert json.loads(key) == ['gmm', list(KEY), jax.devices()[0].device_kind,
                             jax.default_backend(), jax.__version__]


def test_default_timer_times_a_real_matmul():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 64)), jnp.float32)
  dot = jax.jit(jnp.dot)
  seconds = autotune.seconds_per_call(lambda: dot(x, x), 5)
  assert isinstance(seconds, float) and math.isfinite(seconds) and seconds > 0

  def build(candidate):
    y = x[:, :candidate['cols']]
    return lambda: dot(x, y)

  candidates = [dict(cols=64), dict(cols=32)]
  best = autotune.tune('dot', (64,), candidates, build, repeats=5, cache_path=None)
  assert best in candidates
  assert all(s > 0 for s in autotune.last_report('dot', (64,))['seconds'].values())


def test_tuning_inside_a_jit_trace_runs_concretely():
  # ops.py tunes at trace time: the candidates must run on concrete arrays, not be staged.
  outputs = []

  def build(candidate):
    x = jnp.full((32, 32), candidate['scale'], jnp.float32)

    def thunk():
      outputs.append(x @ x)
      return outputs[-1]

    return thunk

  @jax.jit
  def step(v):
    best = autotune.tune('dot', ('in_jit',), [dict(scale=1.0), dict(scale=2.0)], build,
                         repeats=2, cache_path=None)
    return v * best['scale']

  assert float(step(jnp.float32(3.0))) in (3.0, 6.0)
  assert outputs and not any(isinstance(o, jax.core.Tracer) for o in outputs)


def test_a_thunk_returning_a_tracer_is_an_error_not_a_skipped_tiling():
  @jax.jit
  def step(v):
    autotune.tune('dot', ('leak',), [A], lambda c: lambda: v * 2, repeats=2, cache_path=None)
    return v

  with pytest.raises(TypeError, match='concrete arrays'):
    step(jnp.float32(1.0))


def test_an_unwritable_cache_warns_and_keeps_the_result_in_memory(tmp_path):
  (tmp_path / 'a_file').write_text('')
  path = str(tmp_path / 'a_file' / 'tune.json')  # its "directory" is a file: cannot be made
  kernel = Kernel([(A, 2e-3), (B, 1e-3)])
  with pytest.warns(UserWarning, match='could not write'):
    assert _tune(kernel, [A, B], cache_path=path) == B
  assert _tune(kernel, [A, B], cache_path=path) == B and len(kernel.builds) == 2

"""What the background memory/power sampler costs a training step.

Times the quickstart's train step (or `--config`'s) in alternating blocks with the sampler
off and on (at metrics.sample_interval_s, and at 10x that rate to make any cost visible), and
reports the median step time of each and the sampler's own time spent sampling.

  python -m experiments.bench_sampler [--config=configs/quickstart.py] [--out=FILE.json]
"""

import json
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from efficientjax import parallel
from efficientjax.metrics.energy import make_energy_meter
from efficientjax.metrics.record import environment
from efficientjax.metrics.sampler import Sampler
from efficientjax.model import ModelConfig, Transformer
from efficientjax.train.optimizer import make_optimizer
from efficientjax.train.state import init_state, state_shardings
from efficientjax.train.step import make_train_step

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/quickstart.py', 'run config')
_OUT = flags.DEFINE_string('out', None, 'write the results here as JSON')
_BLOCKS = flags.DEFINE_integer('blocks', 6, 'alternating off/on blocks per setting')
_STEPS = flags.DEFINE_integer('steps_per_block', 10, 'steps per block')


def main(argv):
  del argv
  c = _CONFIG.value.to_dict()
  model = Transformer(ModelConfig.from_config(c['model'], tokenizer_vocab_size=257))
  tx = make_optimizer(c['train'])
  mesh = parallel.make_mesh(c['mesh'])
  seq, batch = c['data']['seq_len'], c['train']['global_batch_size']
  _, shardings = state_shardings(model, tx, mesh, seq)
  state = init_state(model, tx, mesh, seq, 0, shardings)
  batch_sh = parallel.batch_sharding(mesh)
  with parallel.activate(mesh):
    step = jax.jit(make_train_step(model, tx, 1), in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  rng = np.random.default_rng(0)
  data = jax.device_put(rng.integers(0, 257, (batch, seq + 1), dtype=np.int32), batch_sh)
  for _ in range(3):  # compile and warm up
    state, m = step(state, data)
  jax.block_until_ready(m)
  meter = make_energy_meter(jax.default_backend(), jax.local_devices())

  def block(sampler):
    nonlocal state
    times = []
    if sampler:
      sampler.start()
    for _ in range(_STEPS.value):
      t = time.perf_counter()
      state, m = step(state, data)
      float(m['loss'])
      times.append(time.perf_counter() - t)
    if sampler:
      sampler.stop()
    return times

  base_interval = c['metrics']['sample_interval_s']
  results = {'env': environment(dict(mesh.shape)), 'steps_per_block': _STEPS.value,
             'blocks': _BLOCKS.value, 'settings': {}}
  for interval in (base_interval, base_interval / 10):
    off, on, overhead, window = [], [], 0.0, 0.0
    for _ in range(_BLOCKS.value):
      off += block(None)
      sampler = Sampler(interval, devices=jax.local_devices(), energy_meter=meter)
      t = time.perf_counter()
      on += block(sampler)
      window += time.perf_counter() - t
      overhead += sampler.summary()['overhead_s']
    med_off, med_on = statistics.median(off), statistics.median(on)
    results['settings'][f'interval_{interval:g}s'] = {
        'step_ms_median_off': med_off * 1e3, 'step_ms_median_on': med_on * 1e3,
        'step_time_change_pct': (med_on / med_off - 1) * 100,
        'sampling_time_share_pct': overhead / window * 100,
    }
  print(json.dumps(results['settings'], indent=1))
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  app.run(main)

"""What checkpoint integrity costs: per save, the manifest (size + CRC-32 of every file, written
on orbax's finalising thread); per restore, checking it and checking the values are finite;
each beside the whole synchronous save / restore it is part of. The train state is a real one
(params + AdamW state, float32) of the quickstart model and of a ~100 MB-of-params widening of
it, saved and restored `--repeats` times in a fresh directory; medians. Files are read back
from the page cache (as right after a save, or a restart on the same machine); a restore from
cold storage reads each file twice, once to check it and once in tensorstore.

  python -m experiments.bench_checkpoint [--repeats=5] [--out=FILE.json]
"""

import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from configs import quickstart
from efficientjax import parallel
from efficientjax.model import ModelConfig, Transformer
from efficientjax.train import checkpoint
from efficientjax.train.optimizer import make_optimizer
from efficientjax.train.state import init_state, state_shardings

_REPEATS = flags.DEFINE_integer('repeats', 5, 'saves and restores per size')
_OUT = flags.DEFINE_string('out', None, 'write results here as JSON')

SIZES = {
    'quickstart': {},
    # 6 x (4 x 512^2 + 3 x 512 x 2048) + 2 x 384 x 512 params: ~25.6M, ~102 MB in float32.
    'params_100mb': {'embed_dim': 512, 'num_layers': 6, 'num_heads': 8, 'mlp_dim': 2048},
}


def bench(name: str, model_overrides: dict, repeats: int) -> dict:
  c = quickstart.get_config().to_dict()
  c['model'].update(model_overrides)
  seq_len = c['data']['seq_len']
  model = Transformer(ModelConfig.from_config(c['model'], tokenizer_vocab_size=257,
                                              seq_len=seq_len))
  tx = make_optimizer(c['train'])
  mesh = parallel.make_mesh(c['mesh'], jax.devices()[:1])
  abstract, shardings = state_shardings(model, tx, mesh, seq_len)
  state = init_state(model, tx, mesh, seq_len, 0, shardings)
  # A trained run's moments, not init's zeros (which compress to nothing).
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state.opt_state))))
  state = state.replace(opt_state=jax.tree.map(
      lambda x: jax.device_put(jax.random.normal(next(keys), x.shape, x.dtype), x.sharding)
      if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim else x, state.opt_state))
  params_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = checkpoint.Checkpointer(tmp, keep=2, async_save=False)
    for i in range(repeats + 1):  # the first of each is a warm-up (jit of the finite check)
      t = time.perf_counter()
      ckpt.save(i, state, {'data': {}})
      save_s = time.perf_counter() - t
      directory = os.path.join(ckpt.directory, str(i))
      t = time.perf_counter()
      checkpoint.verify_manifest(directory)
      verify_s = time.perf_counter() - t
      t = time.perf_counter()
      restored, _ = ckpt.restore(i, abstract, shardings)
      jax.block_until_ready(restored)
      restore_s = time.perf_counter() - t  # includes a second verify_manifest
      t = time.perf_counter()
      checkpoint.check_finite(restored)
      finite_s = time.perf_counter() - t
      checkpoint_bytes = sum(os.path.getsize(os.path.join(r, f))
                             for r, _, fs in os.walk(directory) for f in fs)
      if i:
        rows.append({'save_s': save_s, 'manifest_s': ckpt.manifest_s, 'restore_s': restore_s,
                     'verify_s': verify_s, 'finite_s': finite_s})
    ckpt.close()
  med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
  return {
      'size': name, 'params_bytes': params_bytes, 'checkpoint_bytes': checkpoint_bytes,
      **{f'{k}_median': v for k, v in med.items()},
      'manifest_pct_of_save': 100 * med['manifest_s'] / med['save_s'],
      'checks_pct_of_restore': 100 * (med['verify_s'] + med['finite_s']) / med['restore_s'],
      'repeats': repeats, 'device': jax.devices()[0].device_kind, 'cpus': os.cpu_count(),
  }


def main(argv):
  del argv
  results = [bench(name, over, _REPEATS.value) for name, over in SIZES.items()]
  for r in results:
    print(f"{r['size']}: params {r['params_bytes'] / 1e6:.1f} MB, checkpoint "
          f"{r['checkpoint_bytes'] / 1e6:.1f} MB | save {r['save_s_median']:.3f} s, of which "
          f"manifest {r['manifest_s_median']:.3f} s ({r['manifest_pct_of_save']:.1f}%) | "
          f"restore {r['restore_s_median']:.3f} s, of which verify {r['verify_s_median']:.3f} s "
          f"+ finite {r['finite_s_median']:.3f} s ({r['checks_pct_of_restore']:.1f}%)")
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  app.run(main)

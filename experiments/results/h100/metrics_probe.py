"""Probe of what the metrics issue measures, on the GPU: compiler cost/memory analyses of the
real train step, NVML energy/power counters and their update period, memory_stats keys, and
profiler traces (xplane.pb) of a few steps, with a summary of their planes and kernel names.

  python experiments/results/h100/metrics_probe.py $OUT   (from the project root)
"""

import collections
import glob
import json
import os
import sys
import tarfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import llama_1b, quickstart
from efficientjax import parallel
from efficientjax.model import ModelConfig, Transformer
from efficientjax.train.optimizer import make_optimizer
from efficientjax.train.state import init_state, state_shardings
from efficientjax.train.step import make_train_step

out = sys.argv[1] if len(sys.argv) > 1 else '/tmp/probe'
os.makedirs(out, exist_ok=True)
R = {'device_kind': jax.devices()[0].device_kind, 'backend': jax.default_backend()}


def save():
  with open(os.path.join(out, 'metrics_probe.json'), 'w') as f:
    json.dump(R, f, indent=1, default=str)


def probe_step(name, c, steps=6):
  model_cfg = ModelConfig.from_config(c['model'], tokenizer_vocab_size=257)
  model = Transformer(model_cfg)
  tx = make_optimizer(c['train'])
  mesh = parallel.make_mesh(c['mesh'])
  seq, batch = c['data']['seq_len'], c['train']['global_batch_size']
  abstract, sh = state_shardings(model, tx, mesh, seq)
  state = init_state(model, tx, mesh, seq, 0, sh)
  bsh = parallel.batch_sharding(mesh)
  ab = jax.ShapeDtypeStruct((batch, seq + 1), np.int32, sharding=bsh)
  with parallel.activate(mesh):
    compiled = jax.jit(make_train_step(model, tx, 1), in_shardings=(sh, bsh), donate_argnums=0,
                       out_shardings=(sh, parallel.replicated(mesh))).lower(abstract, ab).compile()
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, list) else ca
  ma = compiled.memory_analysis()
  r = {'params': int(sum(x.size for x in jax.tree.leaves(state.params))),
       'cost_analysis': {k: float(v) for k, v in ca.items() if 'flops' in k or 'bytes accessed' == k
                         or k in ('transcendentals', 'optimal_seconds')},
       'memory_analysis': {k: getattr(ma, k) for k in dir(ma) if k.endswith('_in_bytes')}}
  rng = np.random.default_rng(0)
  batches = [jax.device_put(rng.integers(0, 257, (batch, seq + 1), dtype=np.int32), bsh)
             for _ in range(steps)]
  for b in batches[:2]:
    state, m = compiled(state, b)
  jax.block_until_ready(m['loss'])
  tdir = os.path.join(out, f'trace_{name}')
  t0 = time.perf_counter()
  with jax.profiler.trace(tdir):
    for b in batches[2:]:
      state, m = compiled(state, b)
    jax.block_until_ready(m['loss'])
  r['traced_wall_s'] = time.perf_counter() - t0
  r['traced_steps'] = steps - 2
  r['memory_stats'] = jax.devices()[0].memory_stats()
  files = glob.glob(f'{tdir}/**/*', recursive=True)
  r['trace_files'] = {os.path.relpath(f, tdir): os.path.getsize(f) for f in files if os.path.isfile(f)}
  pb = [f for f in files if f.endswith('.xplane.pb')]
  if pb:
    from jax.profiler import ProfileData
    pd = ProfileData.from_file(pb[0])
    planes = {}
    for plane in pd.planes:
      lines = {}
      for line in plane.lines:
        evs = list(line.events)
        names = collections.Counter(e.name for e in evs)
        dur = collections.Counter()
        for e in evs:
          dur[e.name] += e.duration_ns
        stats = {}
        if evs:
          try:
            stats = {k: str(v)[:80] for k, v in list(evs[0].stats)[:12]}
          except Exception as ex:  # noqa
            stats = {'error': repr(ex)}
        lines[line.name] = {'events': len(evs), 'total_ns': float(sum(e.duration_ns for e in evs)),
                            'top_by_time': [(n, float(d)) for n, d in dur.most_common(40)],
                            'distinct': len(names), 'first_event_stats': stats}
      planes[plane.name] = lines
    r['planes'] = planes
  R[name] = r
  save()


c = quickstart.get_config().to_dict()
probe_step('quickstart', c)
c = llama_1b.get_config().to_dict()
c['model']['num_layers'] = 4
probe_step('llama_1b_4layers_bf16', c)

# NVML: energy counter (mJ), power (mW), utilisation; how often the energy counter moves.
try:
  import pynvml
  pynvml.nvmlInit()
  h = pynvml.nvmlDeviceGetHandleByIndex(0)
  nv = {'name': pynvml.nvmlDeviceGetName(h), 'driver': pynvml.nvmlSystemGetDriverVersion()}
  a = jnp.ones((8192, 8192), jnp.bfloat16)
  f = jax.jit(lambda x: (x @ x).astype(jnp.bfloat16))
  f(a).block_until_ready()
  e0, t0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h), time.perf_counter()
  changes, last, power, util = [], e0, [], []
  while time.perf_counter() - t0 < 3.0:
    for _ in range(5):
      a = f(a)
    a.block_until_ready()
    e = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    if e != last:
      changes.append(time.perf_counter() - t0)
      last = e
    power.append(pynvml.nvmlDeviceGetPowerUsage(h))
    util.append(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
  e1, t1 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h), time.perf_counter()
  nv.update({'energy_mj_delta': e1 - e0, 'window_s': t1 - t0, 'avg_power_w_from_energy': (e1 - e0) / 1e3 / (t1 - t0),
             'power_mw_samples': power[:50], 'util_samples': util[:50],
             'energy_counter_change_times_s': changes[:60], 'n_changes': len(changes)})
  try:
    nv['power_limit_mw'] = pynvml.nvmlDeviceGetEnforcedPowerLimit(h)
  except Exception as ex:  # noqa
    nv['power_limit_error'] = repr(ex)
  try:
    nv['module_power'] = str(pynvml.nvmlDeviceGetFieldValues(h, [pynvml.NVML_FI_DEV_POWER_INSTANT]))
  except Exception as ex:  # noqa
    nv['field_error'] = repr(ex)
  R['nvml'] = nv
except Exception as ex:  # noqa
  R['nvml_error'] = repr(ex)
save()
with tarfile.open(os.path.join(out, 'traces.tar.gz'), 'w:gz') as t:
  for d in glob.glob(os.path.join(out, 'trace_*')):
    t.add(d, arcname=os.path.basename(d))
print(json.dumps({k: (v if not isinstance(v, dict) or k == 'nvml' else {kk: vv for kk, vv in v.items() if kk != 'planes'}) for k, v in R.items()}, indent=1, default=str)[:6000])

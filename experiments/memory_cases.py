"""The cases experiments/bench_memory.py measures (and tests/metrics/test_memory.py holds to
15%): small models whose training step is mostly activations, and how one is measured.

Kept apart from the benchmark's command-line flags, so that tests import them beside other
modules' flags.
"""

import gc
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from efficientjax import parallel
from efficientjax.data import get_tokenizer
from efficientjax.metrics import memory
from efficientjax.train.fit import memory_plan
from efficientjax.train.loop import Recipe, _memory_analysis, compile_train_step

# name -> overrides of a small model (2 layers, width 256, 8 x 256 tokens): big enough that
# activations are most of the step, small enough to compile in seconds.
SMALL = {'model.embed_dim': 256, 'model.num_layers': 2, 'model.num_heads': 4,
         'model.mlp_dim': 768, 'model.vocab_size': None, 'model.dtype': 'float32',
         'data.seq_len': 256, 'train.global_batch_size': 8}
_MLA = {'model.attention': 'mla', 'model.mla.kv_lora_rank': 64, 'model.mla.q_lora_rank': 96,
        'model.mla.qk_nope_head_dim': 32, 'model.mla.qk_rope_head_dim': 16,
        'model.mla.v_head_dim': 32}
_MOE = {'model.ffn': 'moe', 'model.moe.num_experts': 4, 'model.moe.top_k': 2,
        'model.mlp_dim': 384}
CASES = {
    'mha_none': {},
    'mha_full': {'model.remat': 'full'},
    'mha_dots_saveable': {'model.remat': 'dots_saveable'},
    'gqa_bf16_full': {'model.attention': 'gqa', 'model.num_kv_heads': 2, 'model.remat': 'full',
                      'model.dtype': 'bfloat16'},
    'mla_full': {**_MLA, 'model.remat': 'full'},
    'mla_none': _MLA,
    'moe_dropless_none': _MOE,
    'moe_capacity_full': {**_MOE, 'model.moe.dispatch': 'capacity', 'model.remat': 'full'},
    'mha_accum2_offload': {'train.grad_accum_steps': 2, 'train.offload_optimizer': True},
    'nsa_full': {'model.attention': 'nsa', 'model.remat': 'full', 'model.nsa.window': 64,
                 'model.nsa.num_selected': 4},
}



def config_of(overrides: dict) -> dict:
  c = base.get_config().to_dict()
  for path, value in {**SMALL, **overrides}.items():
    *parents, key = path.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[key] = value
  c['train']['checkpoint_every'] = 0
  return c


def measure(config: dict) -> dict:
  """One case: the plan before anything is allocated, then the measured peak of one step."""
  recipe = Recipe(config)
  model_cfg = recipe.model_config(get_tokenizer('byte'))
  mesh = parallel.make_mesh(config['mesh'], jax.devices()[:1])
  recipe.setup(model_cfg, mesh)
  batch_sh = parallel.batch_sharding(mesh)
  with parallel.activate(mesh):
    t0 = time.perf_counter()
    step, abstract_batch = compile_train_step(recipe, batch_sh)
    compile_s = time.perf_counter() - t0
    plan = memory_plan(recipe, _memory_analysis(step), abstract_batch)
    # The state's values do not change its bytes: zeros, from a program compiled before the
    # window (an init compiled inside it would count the compiler's own memory).
    make_state = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                              recipe.abstract),
                         out_shardings=recipe.shardings).lower().compile()
  rng = np.random.default_rng(0)
  tokens = jax.device_put(
      rng.integers(0, model_cfg.vocab_size, abstract_batch.shape, dtype=np.int32), batch_sh)
  gc.collect()
  peak = memory.StepPeak(jax.local_devices()[:1])
  peak.start()
  state = make_state()
  state, metrics = step(state, tokens)
  jax.block_until_ready((state, metrics))
  measured = peak.stop()
  del state, metrics
  gc.collect()
  row = {**plan.record(), **measured, 'compile_s': compile_s}
  est, comp, meas = (row['estimate']['device_bytes'], row['compiler_bytes'],
                     row['measured_peak_bytes'])
  row['estimate_over_compiler'] = est / comp if comp else None
  row['estimate_over_measured'] = est / meas if meas else None
  return row

"""`kind = 'inference'`: serve a workload with a model at one precision and measure it.

In order: the weights (`model.init`, or random), the workload (every request checked against
the engine's length before any costly step), the precision (`efficientjax.quant`; a quantised
model is saved under `<workdir>/quantized/<hash of its settings>/` and read back by a rerun with
the same model and settings rather than calibrated again), quality (held-out perplexity of
this precision and of bf16 on the same tokens; lm-eval multiple-choice tasks if given), then
the workload through the engine inside the measurement window (memory and power sampled,
energy counted), after a warm-up that compiles every shape the engine uses.

Serving runs on one device (the first): sharded serving belongs with the memory-and-scale work.
The record says so (`env.mesh_shape`).
"""

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efficientjax import quant
from efficientjax.attention import cache as kv_cache
from efficientjax.data import build_data, get_tokenizer
from efficientjax.errors import ConfigError
from efficientjax.infer import workload as workload_lib
from efficientjax.infer.engine import Completion, Engine, EngineStats
from efficientjax.infer.sampling import Sampling
from efficientjax.metrics import memory, tensorboard
from efficientjax.metrics import record as records
from efficientjax.metrics.energy import make_energy_meter
from efficientjax.metrics.memory import StepPeak, gib
from efficientjax.metrics.sampler import Sampler
from efficientjax.metrics.window import MeasurementWindow
from efficientjax.model import ModelConfig, Transformer, as_variables, init_cache
from efficientjax.train import init_from
from efficientjax.train.execution import is_eager
from efficientjax.train.state import PERSISTENT_COLLECTIONS
from efficientjax.train.step import token_losses

QUANTIZED_DIR = 'quantized'


@dataclasses.dataclass
class InferenceResult:
  """What an inference run measured; experiments/inference.py turns it into the record."""
  model_config: ModelConfig
  num_params: int
  init: dict[str, Any] | None
  precision: dict[str, Any]            # name, method, compute dtype, what was quantised
  weight_bytes: int                    # as stored at this precision
  baseline_weight_bytes: int           # the same weights in bf16
  kv_cache_bytes: int                  # the engine's whole cache, measured from its arrays
  decode_weight_bytes: int             # of those weights, what a decode step reads
  kv_cache_bytes_per_token: float      # one token's entries over every layer
  data_stats: dict[str, Any]
  quality: dict[str, Any]
  completions: list[Completion]
  stats: EngineStats
  window_s: float | None
  energy: dict[str, Any]
  sampler: dict[str, Any]
  device_kind: str
  workload: dict[str, Any]
  quantize_s: float | None
  # memory_plan: the analytic estimate by phase, the device's limit, the measured peak.
  memory_plan: dict[str, Any] = dataclasses.field(default_factory=dict)
  execution: str = 'jit'               # how prefill and decode ran (the engine's)
  curves_dir: str | None = None        # the TensorBoard event files' folder


def _say(msg: str) -> None:
  print(msg, flush=True)


def model_config(config: dict[str, Any], tokenizer, compute_dtype: Any) -> ModelConfig:
  """The run's model, computing in the precision's dtype."""
  m = dict(config['model'])
  m['dtype'] = jnp.dtype(compute_dtype).name
  return ModelConfig.from_config(m, tokenizer_vocab_size=tokenizer.vocab_size,
                                 seq_len=config['data']['seq_len'])


def load_variables(config: dict[str, Any], cfg: ModelConfig
                   ) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """model.init's variables on the first device, or random ones from the seed: params, and
  the model state a MoE model routes with (`moe_state`) where it has one."""
  spec = config['model'].get('init')
  device = jax.devices()[0]
  if spec:
    source = init_from.source(spec)
    return jax.device_put(init_from.load(source, cfg), device), source.record()
  model = Transformer(cfg)

  def init(key):
    variables = model.init(key, jnp.zeros((1, 8), jnp.int32))
    return {k: v for k, v in variables.items() if k in ('params',) + PERSISTENT_COLLECTIONS}

  init = jax.jit(init, out_shardings=jax.sharding.SingleDeviceSharding(device))
  return init(jax.random.key(config['seed'])), None


def held_out_loss(cfg: ModelConfig, variables: Any, batches: list[np.ndarray]) -> float | None:
  """Mean next-token cross-entropy (nats) over every token of the held-out batches: the
  training step's own loss (`train.step.token_losses`), with whatever `variables` hold beside
  params (a MoE's routing bias)."""
  if not batches:
    return None
  model = Transformer(cfg)
  variables = dict(as_variables(variables))
  params = variables.pop('params')
  nll = jax.jit(lambda p, s, rows: jnp.sum(token_losses(model, p, rows, s)))
  total = sum(float(nll(params, variables, jnp.asarray(b))) for b in batches)
  return total / sum(b[:, 1:].size for b in batches)


def _quantized(config: dict[str, Any], cfg: ModelConfig, params: Any, calibration: Callable,
               workdir: str, say: Callable[[str], None]
               ) -> tuple[Any, dict[str, Any], float | None]:
  """The precision's params: read from `<workdir>/quantized/<settings hash>/` when a run of
  this workdir already quantised this model at these settings, else quantised (and
  calibrated) now and saved there. Other settings get their own folder; nothing is replaced."""
  inf = config['inference']
  settings = {'precision': inf['precision'], 'method': inf['quant_method'],
              'group_size': inf['group_size'], 'symmetric': inf['symmetric'],
              'quantize_lm_head': inf['quantize_lm_head'],
              'calibration_samples': inf['calibration_samples'],
              'model': config['model'], 'data': config['data'], 'seed': config['seed']}
  path = os.path.join(os.path.abspath(workdir), QUANTIZED_DIR, records.config_hash(settings)[:16])
  if os.path.isdir(path):
    try:
      loaded, meta = quant.load(path)
    except Exception as e:  # pylint: disable=broad-except
      # A damaged copy is set aside (never deleted) and the weights quantised again.
      aside = f'{path}.set_aside-{time.strftime("%Y%m%d-%H%M%S")}'
      os.rename(path, aside)
      say(f'{path} could not be read ({type(e).__name__}: {e}); moved to {aside}, quantising '
          'again')
    else:
      say(f'precision: {inf["precision"]} weights read from {path} (not calibrated again)')
      return jax.device_put(loaded, jax.devices()[0]), meta['report'], None
  start = time.perf_counter()
  entry = quant.PRECISIONS.get(inf['precision'])
  # Only the calibrated methods read data, and only precisions that quantise take them.
  needs_data = entry.kind is not None and inf['quant_method'] != 'rtn'
  # Calibration statistics from the weights as loaded, at full precision (not the serving
  # dtype), as AWQ's and GPTQ's references collect them.
  float_cfg = dataclasses.replace(cfg, dtype=jnp.dtype(jnp.float32))
  qparams, report = quant.quantize(
      float_cfg, params, precision=inf['precision'], method=inf['quant_method'],
      group_size=inf['group_size'], symmetric=inf['symmetric'],
      calibration=calibration() if needs_data else None,
      quantize_lm_head=inf['quantize_lm_head'])
  qparams = jax.block_until_ready(qparams)
  seconds = time.perf_counter() - start
  if jax.process_index() == 0 and entry.kind is not None:  # a cast is not worth keeping
    quant.save(path, qparams, {'settings': settings, 'report': report})
  return qparams, report, seconds


def prompt_source(config: dict[str, Any]) -> str:
  return config['inference']['prompts'] or config['data']['corpus']


def build_requests(config: dict[str, Any], tokenizer) -> list[workload_lib.Request]:
  """The run's requests (efficientjax.infer.workload), every one with the run's sampling."""
  inf, d = config['inference'], config['data']
  prompts = prompt_source(config)
  return workload_lib.build_workload(
      prompts=prompts, tokenizer=tokenizer, num_requests=inf['num_requests'],
      output_lengths=inf['output_lengths'],
      input_lengths=None if prompts.startswith('jsonl:') else inf['input_lengths'],
      scenario=inf['scenario'], rate_per_s=inf['rate_per_s'], seed=config['seed'],
      sampling=Sampling(temperature=inf['temperature'], top_k=inf['top_k'], top_p=inf['top_p']),
      eval_fraction=d['eval_fraction'], max_documents=d['max_documents'])


def run(config: dict[str, Any], workdir: str, say: Callable[[str], None] = _say
        ) -> InferenceResult:
  inf, d = config['inference'], config['data']
  tokenizer = get_tokenizer(d['tokenizer'], eos_token=d['eos_token'])
  compute_dtype = quant.compute_dtype(inf['precision'])
  cfg = model_config(config, tokenizer, compute_dtype)
  # The workload before any costly step, so that a request the engine cannot hold stops the
  # run now (lengths drawn from a normal, or a jsonl line's own max_new_tokens, have no bound
  # validation could check).
  requests = build_requests(config, tokenizer)
  too_long = [r for r in requests if len(r.prompt) + r.max_new_tokens > inf['max_len']]
  if too_long:
    r = max(too_long, key=lambda r: len(r.prompt) + r.max_new_tokens)
    need = len(r.prompt) + r.max_new_tokens
    raise ConfigError('inference.max_len', f'{len(too_long)} of {len(requests)} requests do not '
                      f'fit {inf["max_len"]} tokens (the longest: {len(r.prompt)} prompt + '
                      f'{r.max_new_tokens} output); raise it to {need} or shorten the lengths',
                      {'inference.max_len': need})
  plan = memory_plan(config, cfg)
  if plan['limit_bytes'] is not None and plan['device_bytes'] > plan['limit_bytes']:
    raise _does_not_fit(config, plan)
  say(f'memory (analytic): {gib(plan["device_bytes"])} at most on the device (weights '
      f'{gib(plan["served_weights_bytes"])}, KV cache {gib(plan["kv_cache_bytes"])}); limit '
      f'{gib(plan["limit_bytes"])} ({plan["limit_source"]})')
  # From before the weights exist to the end of serving: what the plan predicts.
  peak = StepPeak(jax.devices()[:1])
  peak.start()
  variables, init = load_variables(config, cfg)
  params = variables.pop('params')  # the rest (moe_state) serves as it is, at every precision
  num_params = sum(a.size for a in jax.tree.leaves(params))
  say(f'model: {num_params:,} parameters, ' + (f"from {init['source']}" if init else
                                              f'random (seed {config["seed"]})'))

  data = build_data(corpus=d['corpus'], tokenizer=tokenizer, seq_len=d['seq_len'],
                    global_batch_size=inf['num_slots'], seed=config['seed'],
                    eval_fraction=d['eval_fraction'], eval_batches=inf['eval_batches'],
                    max_documents=d['max_documents'])

  def calibration() -> np.ndarray:
    rows = []
    while sum(len(r) for r in rows) < inf['calibration_samples']:
      rows.append(data.train.next())
    return np.concatenate(rows)[:inf['calibration_samples'], :-1]

  workload = {'prompts': prompt_source(config), 'scenario': inf['scenario'],
              **workload_lib.workload_stats(requests)}

  baseline = {'params': quant.quantize(cfg, params, precision='bf16')[0], **variables}
  baseline_bytes = quant.weight_bytes(baseline['params'])
  qparams, report, quantize_s = _quantized(config, cfg, params, calibration, workdir, say)
  del params
  weight_bytes = quant.weight_bytes(qparams)
  served = {'params': qparams, **variables}
  say(f'precision: {inf["precision"]} ({inf["quant_method"]}): {weight_bytes:,} weight bytes, '
      f'bf16 {baseline_bytes:,}')

  eval_batches = data.eval_batches()
  eval_loss = held_out_loss(cfg, served, eval_batches)
  bf16_cfg = dataclasses.replace(cfg, dtype=jnp.dtype(jnp.bfloat16))
  baseline_loss = (eval_loss if inf['precision'] == 'bf16'
                   else held_out_loss(bf16_cfg, baseline, eval_batches))
  del baseline
  quality = {'eval_loss': eval_loss, 'eval_perplexity': _exp(eval_loss),
             'baseline_precision': 'bf16', 'baseline_eval_loss': baseline_loss,
             'baseline_eval_perplexity': _exp(baseline_loss),
             'eval_tokens': int(sum(b[:, 1:].size for b in eval_batches))}
  quality['quality_ratio'] = (quality['baseline_eval_perplexity'] / quality['eval_perplexity']
                              if eval_loss is not None and baseline_loss is not None else None)
  say(f'held-out perplexity: {quality["eval_perplexity"]:.4g} '
      f'(bf16: {quality["baseline_eval_perplexity"]:.4g})')
  tasks = [t.strip() for t in inf['eval_tasks'].split(',') if t.strip()]
  if tasks:
    from efficientjax.data import mc_tasks  # pylint: disable=g-import-not-at-top
    from efficientjax.infer import multiple_choice  # pylint: disable=g-import-not-at-top
    quality['tasks'] = {}
    for task in tasks:
      if task in mc_tasks.OFFLINE_TASKS:  # written for this run, from its held-out split
        task = mc_tasks.OFFLINE_TASKS[task](os.path.join(workdir, 'tasks'),
                                            eval_fraction=d['eval_fraction'])
      scores = multiple_choice.evaluate(cfg, served, tokenizer, task, limit=inf['eval_limit'])
      quality['tasks'][scores['task']] = scores
      say(f'task {scores["task"]}: acc {scores["acc"]:.4f}, acc_norm {scores["acc_norm"]:.4f} '
          f'({scores["n"]} documents)')

  stop_ids = tokenizer.eos_ids if inf['stop_at_eos'] else ()
  engine = Engine(cfg, served, num_slots=inf['num_slots'], max_len=inf['max_len'],
                  prefill_chunk=inf['prefill_chunk'], cache_dtype=inf['kv_cache_dtype'],
                  stop_ids=stop_ids, execution='eager' if is_eager(config) else 'jit')
  compile_s = engine.warmup()
  say(f'engine: {inf["num_slots"]} slots × {engine.cache_len} tokens, compiled in '
      f'{compile_s:.1f} s ({engine.execution}); serving {len(requests)} requests '
      f'({inf["scenario"]})')

  meter = make_energy_meter(jax.default_backend(), jax.local_devices()[:1])
  sampler = Sampler(config['metrics']['sample_interval_s'], devices=jax.local_devices()[:1],
                    energy_meter=meter)
  window = MeasurementWindow(meter, sampler)
  window.open(engine.cache)
  completions = engine.serve(requests)
  window.close(engine.cache)
  plan.update(peak.stop())
  cache_bytes = kv_cache.nbytes(engine.cache)
  result = InferenceResult(
      model_config=cfg, num_params=num_params, init=init,
      precision={'name': inf['precision'], 'method': inf['quant_method'],
                 'compute_dtype': jnp.dtype(compute_dtype).name, **report},
      weight_bytes=weight_bytes, baseline_weight_bytes=baseline_bytes,
      kv_cache_bytes=cache_bytes,
      decode_weight_bytes=engine.decode_bytes_per_step() - cache_bytes,
      kv_cache_bytes_per_token=cache_bytes / (inf['num_slots'] * engine.cache_len),
      data_stats=data.stats, quality=quality, completions=completions, stats=engine.stats,
      window_s=window.seconds, energy=window.energy(), sampler=sampler.summary(),
      device_kind=jax.devices()[0].device_kind, workload=workload, quantize_s=quantize_s,
      memory_plan=plan, execution=engine.execution, curves_dir=tensorboard.run_dir(workdir))
  # Written after the window, from what it measured: nothing is added to the served steps.
  curves = tensorboard.Curves(result.curves_dir)
  tensorboard.write_inference(curves, result)
  curves.close()
  return result


def memory_plan(config: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
  """The analytic estimate of the run's device memory (metrics.memory.inference_estimate),
  from abstract shapes before anything is loaded, and the device's memory."""
  inf = config['inference']
  model = Transformer(cfg)
  source = jax.eval_shape(
      lambda k: nn.unbox(model.init(k, jnp.zeros((1, 8), jnp.int32))['params']),
      jax.random.key(0))
  settings = dict(method='rtn', group_size=inf['group_size'], symmetric=inf['symmetric'],
                  quantize_lm_head=inf['quantize_lm_head'])  # AWQ/GPTQ store the same shapes
  served = jax.eval_shape(
      lambda p: quant.quantize(cfg, p, precision=inf['precision'], **settings)[0], source)
  if inf['quant_method'] == 'awq' and quant.PRECISIONS.get(inf['precision']).kind:
    # AWQ also keeps each quantised kernel's float32 input-channel scale (`act_scale`).
    kernels = [k for k in jax.tree.leaves(served, is_leaf=lambda x: isinstance(
        x, quant.QuantizedKernel)) if isinstance(k, quant.QuantizedKernel)]
    served = (served, [jax.ShapeDtypeStruct(
        k.values.shape[:-2] + (k.in_features,), jnp.float32)  # values: [..., in, out]
        for k in kernels])
  baseline = (None if inf['precision'] == 'bf16' else jax.eval_shape(
      lambda p: quant.quantize(cfg, p, precision='bf16')[0], source))
  chunk = min(inf['prefill_chunk'], inf['max_len'])
  cache_len = -(-inf['max_len'] // chunk) * chunk  # the engine's (room for a chunk's padding)
  cache = jax.eval_shape(lambda: init_cache(cfg, inf['num_slots'], cache_len,
                                            jnp.dtype(inf['kv_cache_dtype'] or cfg.dtype)))
  plan = memory.inference_estimate(
      source=source, served=served, baseline=baseline, cache=cache, num_slots=inf['num_slots'],
      seq_len=config['data']['seq_len'], prefill_chunk=chunk, vocab_size=cfg.vocab_size)
  limit, where = memory.device_memory_bytes(jax.devices()[0])
  return {**plan, 'limit_bytes': limit, 'limit_source': where}


def _does_not_fit(config: dict[str, Any], plan: dict[str, Any]) -> ConfigError:
  inf = config['inference']
  phases = ', '.join(f'{k[:-len("_bytes")]} {gib(plan[k])}'
                     for k in ('quantize_bytes', 'evaluate_bytes', 'serve_bytes'))
  advice = []
  if plan['serve_bytes'] == plan['device_bytes']:
    advice.append(f'fewer slots or a shorter cache (inference.num_slots={inf["num_slots"]}, '
                  f'inference.max_len={inf["max_len"]}; the cache is {gib(plan["kv_cache_bytes"])})')
    if inf['kv_cache_dtype'] != 'int8':
      advice.append('inference.kv_cache_dtype=int8 (about half the cache)')
  if plan['evaluate_bytes'] == plan['device_bytes']:
    advice.append(f'a shorter data.seq_len or fewer slots for the held-out evaluation (its '
                  f'logits are {gib(plan["eval_logits_bytes"])})')
  if plan['quantize_bytes'] == plan['device_bytes'] or inf['precision'] in ('bf16', 'fp16'):
    advice.append('a smaller precision (inference.precision=int8 or int4) or a smaller model')
  return ConfigError('inference', f'the run needs {gib(plan["device_bytes"])} (analytic: '
                     f'{phases}) but {gib(plan["limit_bytes"])} is available '
                     f'({plan["limit_source"]}); try ' + '; '.join(advice))


def _exp(loss: float | None) -> float | None:
  return math.exp(loss) if loss is not None else None



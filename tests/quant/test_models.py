"""Whole models: quantise, run, count bytes, calibrate, save and load.

- Every attention variant (tests/attention/variants.py) quantised to int4 and to int8 or fp8
  runs forward with its layers scanned (the containers go through nn.scan) and its logits stay
  within a stated distance of the float model's (relative to the logits' spread: int8 < 1%,
  fp8 < 3%, int4 in groups of 4 < 8%; measured 0.4%, 1.2%, 3%), but not equal to them; MLA's
  absorbed decode (which reads kv_b's kernel) with a quantised kv_b equals the quantised
  model's forward pass; at the serving compute dtype (bf16) the logits stay close too.
- Bytes: weight_bytes of the bf16 model is 2 bytes a param; of int8 and int4 models exactly
  2·(params left in bf16) + Σ over quantised kernels of in·out (int8) or in·out/2 (int4), plus
  2 bytes per bf16 scale (one per output for int8, one per output and group for int4), plus one
  byte per zero point (int4 with zero points); the quantised kernels alone come to
  (1 + 2/in)/2 ≈ 1/2 and (1/2 + 2/g)/2 ≈ 1/4 of their bf16 bytes. The runtime's own allocation
  sizes (on_device_size_in_bytes) agree.
- Calibration: the Hessian and mean |x| collected for q are 2·XᵀX/N and mean|X| of the
  attention norm's output (captured independently with capture_intermediates), and k, v share
  them; on the calibration set GPTQ's layer-output error is below RTN's for every Linear and
  AWQ's never above it, and lower in total.
- Report: MoE routed experts and routers are left (bf16) with their reason, shared experts and
  dense layers quantised, lm_head only when asked; bf16 / fp16 cast every float param.
- Config errors name the inference.* field before any work (a group size that does not divide
  an input width, with a fix that works; fp8 with AWQ; AWQ without data; int8 with zero points;
  an unknown precision).
- save / load round-trips containers (zero points, AWQ scales, fp8) and meta bit-exactly.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientjax import quant
from efficientjax.errors import ConfigError
from efficientjax.model import MoEConfig, ModelConfig, Transformer, unscan_params
from efficientjax.quant import calibration as calib
from tests.attention.variants import BASE, TINY
from tests.helpers import jitted_forward, jitted_init, prefill_then_decode

TOKENS = jax.random.randint(jax.random.key(1), (2, 24), 0, BASE.vocab_size)


@functools.cache
def _params(cfg):
  # Jitted (much faster than op by op, even with its compile), once per config.
  return nn.unbox(jitted_init(cfg)(jax.random.key(0), TOKENS[:, :8])['params'])


@functools.cache
def _reference(cfg):
  return _forward(cfg)(_params(cfg), TOKENS)


def _forward(cfg):
  return lambda p, t: jitted_forward(cfg)({'params': p}, t)


def _distance(logits, reference):
  """‖a − b‖ / ‖b − mean b‖ (per position's mean over the vocabulary)."""
  centred = reference - reference.mean(-1, keepdims=True)
  return float(jnp.linalg.norm(logits - reference) / jnp.linalg.norm(centred))


BOUND = {'int8': 0.01, 'fp8': 0.03, 'int4': 0.08}


@pytest.mark.parametrize('variant,other', [('mha', 'int8'), ('gqa', 'fp8'), ('mqa', 'int8'),
                                           ('mla', 'fp8'), ('nsa', 'int8')])
def test_quantized_variants_approach_the_float_model(variant, other):
  cfg = TINY[variant]
  params = _params(cfg)
  reference = _reference(cfg)
  for precision in ('int4', other):
    q, report = quant.quantize(cfg, params, precision=precision, group_size=4,
                               symmetric=precision != 'int4')
    assert report['quantized'] and all(p.startswith('blocks/') for p in report['quantized'])
    logits = _forward(cfg)(q, TOKENS)
    assert 1e-4 < _distance(logits, reference) < BOUND[precision], precision
    if variant == 'mla' and precision == 'int4':
      assert quant.is_quantized(q['blocks']['attn']['kv_b']['kernel'])
      decoded = prefill_then_decode(cfg, q, TOKENS[:, :12], prefill=8)
      np.testing.assert_allclose(decoded, logits[:, :12], rtol=1e-4, atol=1e-5)


def test_serving_dtype():
  cfg = TINY['gqa']
  params = _params(cfg)
  q, _ = quant.quantize(cfg, params, precision='int4', group_size=8)
  serve = dataclasses.replace(cfg, dtype=jnp.dtype(quant.compute_dtype('int4')))
  assert serve.dtype == jnp.bfloat16
  logits = _forward(serve)(q, TOKENS)
  assert _distance(logits, _reference(cfg)) < 0.1


def test_unscanned_model_gets_the_same_containers():
  cfg = TINY['mha']
  params = _params(cfg)
  scanned, _ = quant.quantize(cfg, params, precision='int4', group_size=8)
  flat_cfg = dataclasses.replace(cfg, scan_layers=False)
  flat, _ = quant.quantize(flat_cfg, unscan_params(params, cfg), precision='int4', group_size=8)
  a, b = unscan_params(scanned, cfg), flat
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


# ---------------------------------------------------------------------------------------------
# Bytes.

BYTES_CFG = dataclasses.replace(BASE, attention='gqa', embed_dim=64, num_kv_heads=2, head_dim=16,
                                mlp_dim=128)


def _kernels(cfg):
  """(in, out) of every kernel the stacks quantise, per layer."""
  e, h, kv, d, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  return [(e, h * d), (e, kv * d), (e, kv * d), (h * d, e), (e, f), (e, f), (f, e)]


@pytest.mark.parametrize('precision,group,symmetric', [('int8', None, True), ('int4', 32, True),
                                                       ('int4', 64, False)])
def test_weight_bytes_follow_the_formula(precision, group, symmetric):
  cfg = BYTES_CFG
  params = _params(cfg)
  n_params = sum(a.size for a in jax.tree.leaves(params))
  bf16, _ = quant.quantize(cfg, params, precision='bf16')
  assert quant.weight_bytes(bf16) == 2 * n_params
  q, report = quant.quantize(cfg, params, precision=precision, group_size=group or 128,
                             symmetric=symmetric)
  kernels = _kernels(cfg) * cfg.num_layers
  n_quantized = sum(i * o for i, o in kernels)
  if precision == 'int8':
    stored = sum(i * o + 2 * o for i, o in kernels)
  else:
    zero = 0 if symmetric else 1
    stored = sum(i * o // 2 + (2 + zero) * (i // group) * o for i, o in kernels)
  assert quant.weight_bytes(q) == 2 * (n_params - n_quantized) + stored
  assert report['weight_bytes_after'] == quant.weight_bytes(q)
  # The quantised kernels alone: ≈ 1/2 (int8) or ≈ 1/4 plus scales (int4) of bf16.
  containers = [x for x in jax.tree.leaves(q, is_leaf=quant.is_quantized) if quant.is_quantized(x)]
  assert len(containers) == 7
  measured = sum(x.on_device_size_in_bytes() for k in containers for x in jax.tree.leaves(k))
  assert measured == stored
  low, high = (0.5, 0.52) if precision == 'int8' else (0.25, 0.29)
  assert low < stored / (2 * n_quantized) < high


# ---------------------------------------------------------------------------------------------
# Calibration.


def _calibration(cfg):
  return np.asarray(jax.random.randint(jax.random.key(3), (8, 24), 0, cfg.vocab_size))


def test_statistics_are_those_of_the_layer_inputs():
  cfg = TINY['mha']
  params = _params(cfg)
  tokens = _calibration(cfg)
  sites = calib.discover(cfg, params)
  stats = calib.collect(cfg, params, tokens, sites, hessian=True, activations=True, batch_size=3)
  flat_cfg = dataclasses.replace(cfg, scan_layers=False)
  capture = jax.jit(lambda p, t: Transformer(flat_cfg).apply(
      {'params': p}, t, capture_intermediates=True, mutable=['intermediates'])[1])
  state = capture(unscan_params(params, cfg), jnp.asarray(tokens))
  x = np.asarray(state['intermediates']['block_1']['attn_norm']['__call__'][0], np.float64)
  x = x.reshape(-1, cfg.embed_dim)
  s = stats[('block_1', 'attn', 'q')]
  assert s.tokens == tokens.size
  np.testing.assert_allclose(s.hessian, 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(s.x_mean, np.abs(x).mean(0), rtol=1e-5)
  assert stats[('block_1', 'attn', 'k')] is s and stats[('block_1', 'attn', 'v')] is s
  assert stats[('block_1', 'attn', 'o')] is not s


def _layer_errors(cfg, params, quantized, stats):
  """mean over calibration tokens of ‖x·(W − Ŵ)‖², per Linear: tr(Dᵀ H D) / 2."""
  flat_p, flat_q = unscan_params(params, cfg), unscan_params(quantized, cfg)
  out = {}
  for path, s in stats.items():
    w, k = flat_p, flat_q
    for name in path:
      w, k = w[name], k[name]
    if not quant.is_quantized(k['kernel']):  # the lm_head
      continue
    n_in = s.hessian.shape[0]
    d = (np.asarray(w['kernel'], np.float64).reshape(n_in, -1)
         - np.asarray(quant.dequantize(k['kernel'], jnp.float32), np.float64).reshape(n_in, -1))
    out[path] = float(np.trace(d.T @ np.asarray(s.hessian, np.float64) @ d)) / 2
  return out


def test_awq_and_gptq_lower_the_calibration_error():
  cfg = TINY['mha']
  params = _params(cfg)
  tokens = _calibration(cfg)
  stats = calib.collect(cfg, params, tokens, calib.discover(cfg, params), hessian=True,
                        activations=False)
  settings = dict(precision='int4', group_size=8, calibration=tokens)
  errors = {m: _layer_errors(cfg, params, quant.quantize(cfg, params, method=m, **settings)[0],
                             stats) for m in ('rtn', 'awq', 'gptq')}
  rtn, awq, gptq = errors['rtn'], errors['awq'], errors['gptq']
  assert all(gptq[p] < rtn[p] for p in rtn), (gptq, rtn)
  # AWQ's grid includes α = 0 (RTN) and its sample here is every calibration token.
  assert all(awq[p] <= rtn[p] * (1 + 1e-4) for p in rtn), (awq, rtn)
  assert sum(awq.values()) < 0.99 * sum(rtn.values())
  assert sum(gptq.values()) < 0.8 * sum(rtn.values())


# ---------------------------------------------------------------------------------------------
# Report, precisions, errors.


def test_report_of_a_moe_model():
  cfg = dataclasses.replace(BASE, ffn='moe', moe=MoEConfig(
      num_experts=4, top_k=2, expert_dim=16, num_shared_experts=1, shared_expert_dim=24,
      shared_expert_gate=True, first_dense_layers=1, dispatch='dense'))
  params = _params(cfg)
  q, report = quant.quantize(cfg, params, precision='int8', quantize_lm_head=True)
  assert {'dense_blocks/mlp/gate/kernel', 'dense_blocks/attn/q/kernel',
          'blocks/mlp/shared/down/kernel', 'lm_head/kernel'} <= set(report['quantized'])
  left = report['left']
  for name in ('gate', 'up', 'down'):
    assert left[f'blocks/mlp/{name}'] == 'MoE routed experts (raw params, not Linears): bfloat16'
    assert q['blocks']['mlp'][name].dtype == jnp.bfloat16
  assert left['blocks/mlp/router'].startswith('MoE router')
  assert left['blocks/mlp/shared_gate/kernel'].startswith("the shared experts' gate")
  assert left['embed/embedding'] == 'embedding: bfloat16'
  assert _distance(_forward(cfg)(q, TOKENS), _reference(cfg)) < 0.02
  assert quant.skip_reason(('lm_head',)) == 'lm_head (quantize_lm_head=False)'
  assert quant.skip_reason(('lm_head',), quantize_lm_head=True) is None


@pytest.mark.parametrize('precision,dtype', [('bf16', jnp.bfloat16), ('fp16', jnp.float16)])
def test_float_precisions_cast_everything(precision, dtype):
  params = _params(TINY['mha'])
  q, report = quant.quantize(TINY['mha'], params, precision=precision)
  assert report['quantized'] == [] and quant.compute_dtype(precision) == jnp.dtype(dtype).name
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(q)):
    assert b.dtype == dtype
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a).astype(dtype))


def test_config_errors_name_the_field_before_any_work(monkeypatch):
  cfg = TINY['mla']  # input widths 32, 12 (q_b), 16 (kv_b), 24 (o), 48 (down)
  params = _params(cfg)
  tokens = _calibration(cfg)
  monkeypatch.setattr(calib, 'collect', lambda *a, **k: pytest.fail('calibrated before checking'))
  with pytest.raises(ConfigError) as e:
    quant.quantize(cfg, params, precision='int4', method='awq', group_size=16, calibration=tokens)
  assert e.value.field == 'inference.group_size' and 'q_b (12)' in e.value.message
  assert e.value.fix == {'inference.group_size': 4}
  assert [x.field for x in quant.check(cfg, precision='int4', group_size=16)] == [
      'inference.group_size']
  assert quant.check(cfg, precision='int4', group_size=4) == []
  cases = [(dict(precision='fp8', method='awq', calibration=tokens), 'inference.quant_method'),
           (dict(precision='int4', method='gptq', group_size=4), 'inference.quant_method'),
           (dict(precision='int8', symmetric=False), 'inference.symmetric'),
           (dict(precision='int4', group_size=7), 'inference.group_size'),
           (dict(precision='int2'), 'inference.precision'),
           (dict(precision='int4', method='sparsegpt', group_size=4), 'inference.quant_method')]
  for kwargs, field in cases:
    with pytest.raises(ConfigError) as e:
      quant.quantize(cfg, params, **kwargs)
    assert e.value.field == field, kwargs


def test_save_load_round_trips_bit_exactly(tmp_path):
  rng = np.random.default_rng(0)
  w = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  stack = lambda *ks: jax.tree.map(lambda *a: jnp.stack(a), *ks)
  tree = {
      'blocks': {'attn': {'o': {'kernel': stack(*[quant.quantize_kernel(
          w(4, 4, 6), 'int4', in_dims=2, group_size=8, symmetric=False, act_scale=w(16) ** 2 + 1)
          for _ in range(3)])}},  # zero points, AWQ's scale, a layer axis, two input dims
                 'norm': {'scale': w(3, 6).astype(jnp.bfloat16)}},
      'fp8': {'kernel': quant.quantize_kernel(w(8, 5), 'fp8')},
      'int8': {'kernel': quant.quantize_kernel(w(8, 5), 'int8', scale_dtype='float32')},
  }
  meta = {'precision': 'int4', 'model': {'embed_dim': 32}}
  quant.save(str(tmp_path / 'q'), tree, meta)
  loaded, loaded_meta = quant.load(str(tmp_path / 'q'))
  assert loaded_meta == meta
  assert jax.tree.structure(loaded) == jax.tree.structure(tree)  # static fields included
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(loaded)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))

"""Analytic FLOPs against XLA's own count, and MFU's denominator."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from efficientjax import parallel
from efficientjax.metrics import flops, peaks
from efficientjax.model import ModelConfig, Transformer
from efficientjax.train.optimizer import make_optimizer
from efficientjax.train.state import state_shardings
from efficientjax.train.step import make_train_step
from experiments.compare_flops import SHAPES, counts
from tests.helpers import smoke_config


@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_analytic_flops_match_the_compiler_within_5_percent(shape):
  compiler, analytic, _ = counts(shape)
  # XLA computes attention densely: compare with the as-executed count; the remainder is
  # elementwise work (norms, softmax, SiLU, AdamW), a few percent at these sizes.
  executed = analytic['matmul'] + analytic['attention_as_executed']
  assert abs(compiler - executed) / executed < 0.05, (compiler, analytic)
  assert compiler > executed  # elementwise work only adds
  # The model-FLOPs total halves attention for causality.
  assert analytic['total'] == analytic['matmul'] + analytic['attention_as_executed'] / 2


def test_the_real_scanned_step_undercounts_which_is_why_the_twin_exists():
  compiler, _, cfg = counts(SHAPES[0])
  seq, batch = SHAPES[0][-2:]
  cfg = dataclasses.replace(cfg, remat='none')
  tx = make_optimizer(smoke_config()['train'])
  mesh = parallel.make_mesh(smoke_config()['mesh'], jax.devices()[:1])
  abstract, _ = state_shardings(Transformer(cfg), tx, mesh, seq)
  batch_spec = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
  raw = jax.jit(make_train_step(Transformer(cfg), tx, 1)).lower(abstract, batch_spec)
  assert raw.cost_analysis()['flops'] < 0.5 * compiler  # one of four scanned layers counted


def test_analytic_terms_by_hand():
  cfg = ModelConfig(vocab_size=10, embed_dim=8, num_layers=2, num_heads=2, num_kv_heads=1,
                    head_dim=4, mlp_dim=16)
  f = flops.analytic_flops_per_step(cfg, seq_len=5, batch=3)
  per_layer = 8 * 2 * 4 + 2 * 8 * 1 * 4 + 2 * 4 * 8 + 3 * 8 * 16
  assert f['matmul'] == 6 * 15 * (2 * per_layer + 8 * 10)
  assert f['attention_as_executed'] == 3 * 2 * 3 * 2 * (2 * 5 * 5 * 4 * 2)
  # docs/metrics.md: 3 x layers x batch x 2 x 2·T²·d·heads / 2, the causal half counted once.
  assert f['attention'] == 3 * 2 * 3 * 2 * (2 * 5 * 5 * 4 * 2) / 2 == 7200
  assert f['total'] == f['matmul'] + 7200
  # The embedding lookup is free and the head a matmul either way; recomputation under remat
  # is not model FLOPs (MFU, not HFU).
  for same in (dict(tie_embeddings=True), dict(remat='full'), dict(scan_layers=False)):
    assert flops.analytic_flops_per_step(dataclasses.replace(cfg, **same), seq_len=5,
                                         batch=3) == f, same
  # Per optimizer step over the global batch: twice the batch, twice every term.
  doubled = flops.analytic_flops_per_step(cfg, seq_len=5, batch=6)
  assert doubled == {k: 2 * v for k, v in f.items()}


@pytest.mark.parametrize('kind, peak', [
    ('NVIDIA H100 80GB HBM3', 989.4e12), ('NVIDIA H100 PCIe', 756e12), ('NVIDIA H200', 989.4e12),
    ('NVIDIA GH200 480GB', 989.4e12), ('NVIDIA A100-SXM4-80GB', 312e12), ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12), ('TPU v5', 459e12), ('TPU v6 lite', 918e12),
    # The rest of docs/metrics.md's list. NVL and v5e also contain a shorter key ('H100',
    # 'TPU v5') with another peak: the table must try the specific one first.
    ('NVIDIA H100 NVL', 835e12), ('NVIDIA H200 NVL', 835e12), ('TPU v5e', 197e12), ('TPU v5p', 459e12), ('TPU v6e', 918e12),
    ('NVIDIA A100 80GB PCIe', 312e12)])
def test_peak_table(kind, peak):
  assert peaks.peak_flops_per_s(kind) == (peak, pytest.approx(peaks.peak_flops_per_s(kind)[1]))
  assert peaks.peak_flops_per_s(kind)[0] == peak


def test_unknown_peak_is_null_with_reason_unless_configured():
  value, reason = peaks.peak_flops_per_s('cpu')
  assert value is None and 'metrics.peak_flops_per_s' in reason
  assert peaks.peak_flops_per_s('cpu', 1e12) == (1e12, 'config: metrics.peak_flops_per_s')



@pytest.mark.parametrize('kind, peak', [
    # device_kind strings as jax reports them; GH200's two memories differ in name and speed.
    ('NVIDIA GH200 480GB', 4.0e12), ('NVIDIA GH200 120GB', 4.0e12),
    ('NVIDIA GH200 144G HBM3e', 4.9e12), ('NVIDIA H200', 4.8e12), ('NVIDIA H200 NVL', 4.8e12),
    ('NVIDIA H100 80GB HBM3', 3.35e12), ('NVIDIA H100 PCIe', 2.0e12), ('NVIDIA H100 NVL', 3.9e12),
    ('NVIDIA A100-SXM4-80GB', 2.039e12), ('NVIDIA A100 80GB PCIe', 1.935e12),
    ('NVIDIA A100-SXM4-40GB', 1.555e12), ('NVIDIA A100-PCIE-40GB', 1.555e12),
    ('TPU v4', 1.2e12), ('TPU v5 lite', 819e9), ('TPU v5e', 819e9), ('TPU v5', 2.765e12),
    ('TPU v5p', 2.765e12), ('TPU v6 lite', 1.638e12), ('TPU v6e', 1.638e12)])
def test_peak_bandwidth_table(kind, peak):
  value, source = peaks.peak_bandwidth_bytes_per_s(kind)
  assert value == pytest.approx(peak, rel=1e-12) and source.startswith('table: ')


def test_unknown_bandwidth_is_null_with_reason_unless_configured():
  value, reason = peaks.peak_bandwidth_bytes_per_s('cpu')
  assert value is None and 'metrics.peak_bandwidth_bytes_per_s' in reason
  assert peaks.peak_bandwidth_bytes_per_s('cpu', 3e12) == (
      3e12, 'config: metrics.peak_bandwidth_bytes_per_s')
  # An A100 whose memory the name does not give: no guess.
  assert peaks.peak_bandwidth_bytes_per_s('NVIDIA A100')[0] is None

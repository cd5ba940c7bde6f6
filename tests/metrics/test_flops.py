"""Analytic FLOPs against XLA's own count, and MFU's denominator."""

import jax
import jax.numpy as jnp
import pytest

from efficientjax.metrics import flops, peaks
from efficientjax.model import ModelConfig, Transformer
from efficientjax.train.optimizer import make_optimizer
from efficientjax.train.state import state_shardings
from efficientjax import parallel
from efficientjax.train.step import make_train_step
from tests.helpers import smoke_config

def _compiler(cfg, tx, mesh, seq, batch):
  batch_spec = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
  return flops.compiler_flops(cfg, lambda twin: (
      make_train_step(Transformer(twin), tx, 1),
      (state_shardings(Transformer(twin), tx, mesh, seq)[0], batch_spec)))


SHAPES = [  # (layers, embed, heads, kv_heads, mlp, seq, batch)
    (4, 128, 4, 4, 512, 256, 8),
    (3, 256, 8, 2, 768, 128, 4),
    (2, 192, 6, 3, 640, 512, 2),
]


@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_analytic_flops_match_the_compiler_within_5_percent(shape):
  layers, embed, heads, kv, mlp, seq, batch = shape
  cfg = ModelConfig(vocab_size=384, embed_dim=embed, num_layers=layers, num_heads=heads,
                    num_kv_heads=kv, head_dim=embed // heads, mlp_dim=mlp, remat='full')
  tx = make_optimizer(smoke_config()['train'])
  mesh = parallel.make_mesh(smoke_config()['mesh'], jax.devices()[:1])
  compiler = _compiler(cfg, tx, mesh, seq, batch)
  analytic = flops.analytic_flops_per_step(cfg, seq_len=seq, batch=batch)
  # XLA computes attention densely: compare with the as-executed count; the remainder is
  # elementwise work (norms, softmax, SiLU, AdamW), a few percent at these sizes.
  executed = analytic['matmul'] + analytic['attention_as_executed']
  assert abs(compiler - executed) / executed < 0.05, (compiler, analytic)
  assert compiler > executed  # elementwise work only adds
  # The model-FLOPs total halves attention for causality.
  assert analytic['total'] == analytic['matmul'] + analytic['attention_as_executed'] / 2


def test_the_real_scanned_step_undercounts_which_is_why_the_twin_exists():
  layers, embed, heads, kv, mlp, seq, batch = SHAPES[0]
  cfg = ModelConfig(vocab_size=384, embed_dim=embed, num_layers=layers, num_heads=heads,
                    num_kv_heads=kv, head_dim=embed // heads, mlp_dim=mlp)
  tx = make_optimizer(smoke_config()['train'])
  mesh = parallel.make_mesh(smoke_config()['mesh'], jax.devices()[:1])
  abstract, _ = state_shardings(Transformer(cfg), tx, mesh, seq)
  batch_spec = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
  raw = jax.jit(make_train_step(Transformer(cfg), tx, 1)).lower(abstract, batch_spec)
  raw = raw.cost_analysis()['flops']
  twin = _compiler(cfg, tx, mesh, seq, batch)
  assert raw < 0.5 * twin  # the scan body (one layer of four) is counted once


def test_analytic_terms_by_hand():
  cfg = ModelConfig(vocab_size=10, embed_dim=8, num_layers=2, num_heads=2, num_kv_heads=1,
                    head_dim=4, mlp_dim=16)
  f = flops.analytic_flops_per_step(cfg, seq_len=5, batch=3)
  per_layer = 8 * 2 * 4 + 2 * 8 * 1 * 4 + 2 * 4 * 8 + 3 * 8 * 16
  assert f['matmul'] == 6 * 15 * (2 * per_layer + 8 * 10)
  assert f['attention_as_executed'] == 3 * 2 * 3 * 2 * (2 * 5 * 5 * 4 * 2)


@pytest.mark.parametrize('kind, peak', [
    ('NVIDIA H100 80GB HBM3', 989.4e12), ('NVIDIA H100 PCIe', 756e12), ('NVIDIA H200', 989.4e12),
    ('NVIDIA GH200 480GB', 989.4e12), ('NVIDIA A100-SXM4-80GB', 312e12), ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12), ('TPU v5', 459e12), ('TPU v6 lite', 918e12)])
def test_peak_table(kind, peak):
  assert peaks.peak_flops_per_s(kind) == (peak, pytest.approx(peaks.peak_flops_per_s(kind)[1]))
  assert peaks.peak_flops_per_s(kind)[0] == peak


def test_unknown_peak_is_null_with_reason_unless_configured():
  value, reason = peaks.peak_flops_per_s('cpu')
  assert value is None and 'metrics.peak_flops_per_s' in reason
  assert peaks.peak_flops_per_s('cpu', 1e12) == (1e12, 'config: metrics.peak_flops_per_s')


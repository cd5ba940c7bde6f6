"""The fine-tuning FLOP count (efficientjax/train/finetune.py:finetune_flops) against XLA's
count of the real fine-tuning step's unrolled twin, as tests/metrics/test_flops.py does for
pretraining: XLA computes attention densely, so the comparison is with the as-executed terms
plus the adapters; the remainder is elementwise work. What this shows: frozen weights cost no
weight gradient (LoRA's count is ~20% under pretraining's and still matches), a layer below
`freeze`'s lowest trained layer costs its forward only, and the adapters' terms add up."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from efficientjax import parallel
from efficientjax.metrics import flops
from efficientjax.model import ModelConfig, Transformer
from efficientjax.peft import METHODS, FinetuneConfig
from efficientjax.train.finetune import BATCH_FIELDS, _state_shapes, finetune_flops
from efficientjax.train.step import make_train_step
from tests.helpers import smoke_config

LAYERS, EMBED, HEADS, MLP, SEQ, BATCH = 3, 128, 4, 512, 128, 4


@pytest.mark.parametrize('name, fields', [('lora', {}), ('dora', {}),
                                          ('freeze', dict(freeze_layers=1))],
                         ids=['lora', 'dora', 'freeze_last'])
def test_finetune_flops_match_the_compiler_within_5_percent(name, fields):
  base = ModelConfig(vocab_size=384, embed_dim=EMBED, num_layers=LAYERS, num_heads=HEADS,
                     num_kv_heads=HEADS, head_dim=EMBED // HEADS, mlp_dim=MLP)
  ft = FinetuneConfig(method=name, rank=8, **fields)
  method = METHODS.get(name)(base, ft)
  cfg = dataclasses.replace(base, adapter=method.settings())
  train = smoke_config()['train']
  mesh = parallel.make_mesh(smoke_config()['mesh'], jax.devices('cpu')[:1])

  def build(twin):
    twin_method, model = METHODS.get(name)(twin, ft), Transformer(twin)
    tx, abstract, *_ = _state_shapes(model, twin_method, train, mesh, SEQ)
    batch = {k: jax.ShapeDtypeStruct((BATCH, SEQ + 1), jnp.int32) for k in BATCH_FIELDS}
    return make_train_step(model, tx, 1, variables=twin_method.variables), (abstract, batch)

  compiler, reason = flops.compiler_flops(cfg, build)
  assert compiler is not None, reason
  analytic = finetune_flops(cfg, method, seq_len=SEQ, batch=BATCH)
  executed = analytic['matmul'] + analytic['attention_as_executed'] + analytic['adapters']
  assert abs(compiler - executed) / executed < 0.05, (compiler, analytic)
  assert analytic['total'] < analytic['pretraining_total']

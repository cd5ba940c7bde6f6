"""Analytic FLOPs against XLA's count at the three shapes tests/metrics/test_flops.py checks.

  python -m experiments.compare_flops > experiments/results/cpu/compare_flops.txt
"""

import jax
import jax.numpy as jnp

from configs import quickstart
from efficientjax import parallel
from efficientjax.metrics import flops
from efficientjax.model import ModelConfig, Transformer
from efficientjax.train.optimizer import make_optimizer
from efficientjax.train.state import state_shardings
from efficientjax.train.step import make_train_step

SHAPES = [  # (layers, embed, heads, kv_heads, mlp, seq, batch): as in the test
    (4, 128, 4, 4, 512, 256, 8),
    (3, 256, 8, 2, 768, 128, 4),
    (2, 192, 6, 3, 640, 512, 2),
]


def counts(shape: tuple[int, ...]) -> tuple[float | None, dict[str, float], ModelConfig]:
  """(XLA's count, the analytic terms, the model) for one of SHAPES, on one CPU device."""
  layers, embed, heads, kv, mlp, seq, batch = shape
  c = quickstart.get_config('smoke').to_dict()
  tx = make_optimizer(c['train'])
  mesh = parallel.make_mesh(c['mesh'], jax.devices('cpu')[:1])
  # remat is set to show that the count ignores recomputation (the twin drops it).
  cfg = ModelConfig(vocab_size=384, embed_dim=embed, num_layers=layers, num_heads=heads,
                    num_kv_heads=kv, head_dim=embed // heads, mlp_dim=mlp, remat='full')
  spec = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
  xla, _ = flops.compiler_flops(cfg, lambda twin: (
      make_train_step(Transformer(twin), tx, 1),
      (state_shardings(Transformer(twin), tx, mesh, seq)[0], spec)))
  return xla, flops.analytic_flops_per_step(cfg, seq_len=seq, batch=batch), cfg


def main():
  print('shape (L,E,H,KV,M,T,B) | matmul | attention (causal) | attention as executed | '
        'XLA | XLA / (matmul + executed) | XLA / model total')
  for shape in SHAPES:
    xla, a, _ = counts(shape)
    executed = a['matmul'] + a['attention_as_executed']
    print(f'{shape} | {a["matmul"]:.4g} | {a["attention"]:.4g} | '
          f'{a["attention_as_executed"]:.4g} | {xla:.4g} | {xla / executed:.4f} | '
          f'{xla / a["total"]:.4f}')


if __name__ == '__main__':
  main()

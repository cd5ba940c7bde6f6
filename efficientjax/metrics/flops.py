"""FLOPs of a training step, two ways: from the model's shape, and from the compiler.

Analytic ("model FLOPs", as MFU is defined in PaLM, arXiv 2204.02311 App. B): every matmul
2·m·n·k forward, ×3 for forward + backward, attention scores and values with the causal half
counted once, the embedding lookup free, recomputation (remat) not counted.

Compiler: XLA's cost analysis of the same step. Two artefacts make XLA's own number of the
real step misleading, so the count is taken on a twin of the step lowered with unrolled layers
and XLA attention (same math, same shapes):
- a `while` loop's body is counted once, not once per iteration (our layers are an nn.scan);
- custom calls (cuDNN attention, Pallas kernels) count zero.
XLA computes attention densely, so its count matches `attention_as_executed` (both halves),
not the causal-halved model count; elementwise work (norms, softmax, the optimizer) is the
small remainder. docs/metrics.md gives the per-term comparison.
"""

import dataclasses
import jax

from efficientjax.model import ModelConfig


def analytic_flops_per_step(cfg: ModelConfig, *, seq_len: int, batch: int) -> dict[str, float]:
  """Per optimizer step (forward + backward), summed over the global batch."""
  tokens = batch * seq_len
  e, h, kv, d = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  per_layer = (e * h * d        # q
               + 2 * e * kv * d  # k, v
               + h * d * e       # o
               + 3 * e * cfg.mlp_dim)  # gate, up, down (dense SwiGLU)
  head = e * cfg.vocab_size  # the output projection (tied or not, it is a matmul)
  matmul = 3 * 2 * tokens * (cfg.num_layers * per_layer + head)
  # Scores q·k and the weighted sum of v: 2 matmuls of 2·T·T·d per head per sequence.
  attention_full = 3 * cfg.num_layers * batch * 2 * (2 * seq_len * seq_len * d * h)
  return {
      'matmul': float(matmul),
      'attention': float(attention_full / 2),  # causal: only the lower triangle is needed
      'attention_as_executed': float(attention_full),  # what a dense (non-causal-skipping) kernel does
      'total': float(matmul + attention_full / 2),
  }


def compiler_flops(cfg: ModelConfig, build) -> float | None:
  """XLA's FLOP count of the step, taken on an unrolled, XLA-attention twin of `cfg`.

  build(twin_cfg) -> (step_fn, abstract_args): the step and its argument shapes for the twin
  (its params have the twin's per-layer layout).
  """
  twin = dataclasses.replace(cfg, scan_layers=False, attention_impl='xla', remat='none')
  step_fn, args = build(twin)
  analysis = jax.jit(step_fn).lower(*args).cost_analysis()
  if isinstance(analysis, list):  # older jax returns one dict per computation
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) if flops is not None and flops >= 0 else None

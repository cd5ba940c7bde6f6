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

import contextlib
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


def compiler_flops(cfg: ModelConfig, build) -> tuple[float | None, str | None]:
  """(XLA's FLOP count of the step taken on an unrolled, XLA-attention twin of `cfg`, or None
  and the reason).

  build(twin_cfg) -> (step_fn, abstract_args): the step and its argument shapes for the twin
  (its params have the twin's per-layer layout).

  The twin is lowered for the CPU backend, whatever the run's: the count is of the HLO before
  any backend's optimisation (the same arithmetic everywhere), and GPU/TPU plugins do not
  implement cost analysis of a lowered module (`Lowered.cost_analysis()` returns None there).
  """
  twin = dataclasses.replace(cfg, scan_layers=False, attention_impl='xla', remat='none')
  step_fn, args = build(twin)
  try:
    where = jax.default_device(jax.devices('cpu')[0])
  except RuntimeError:  # JAX_PLATFORMS without cpu: try the run's own backend
    where = contextlib.nullcontext()
  with where:
    flops = flops_of(jax.jit(step_fn).lower(*args))
  if flops is None:
    return None, f'XLA gave no cost analysis for the lowered step on {jax.default_backend()}'
  return flops, None


def flops_of(stage) -> float | None:
  """The 'flops' of a Lowered or Compiled stage's cost analysis, or None where XLA has none."""
  analysis = stage.cost_analysis()
  if isinstance(analysis, list):  # older jax returns one dict per computation
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) if flops is not None and flops >= 0 else None

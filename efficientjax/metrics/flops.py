"""FLOPs of a training step, two ways: from the model's shape, and from the compiler.

Analytic ("model FLOPs", as MFU is defined in PaLM, arXiv 2204.02311 App. B): every matmul
2·m·n·k forward, ×3 for forward + backward, attention scores and values with the causal half
counted once, the embedding lookup free, recomputation (remat) not counted.

Compiler: XLA's cost analysis of the same step. Two artefacts make XLA's own number of the
real step misleading, so the count is taken on a twin of the step lowered with unrolled layers
and XLA attention (same math, same shapes):
- a `while` loop's body is counted once, not once per iteration (our layers are an nn.scan);
- custom calls (cuDNN attention, Pallas kernels such as the MoE grouped matmul) count zero.
XLA computes attention densely, so its count matches `attention_as_executed` (both halves),
not the causal-halved model count; elementwise work (norms, softmax, the optimizer) is the
small remainder. docs/metrics.md gives the per-term comparison.
"""

import contextlib
import dataclasses
import jax

from efficientjax.attention import ATTENTION
from efficientjax.model import ModelConfig, layer_stacks
from efficientjax.nn import FFN


def analytic_flops_per_step(cfg: ModelConfig, *, seq_len: int, batch: int) -> dict[str, float]:
  """Per optimizer step (forward + backward), summed over the global batch.

  The attention variant gives its own per-token counts (`flops_per_token`: projections, and the
  attention over the keys each token sees, e.g. half the sequence when causal), so MLA's latent
  projections and NSA's sparse branches are counted as what they are.
  """
  tokens = batch * seq_len
  attn = ATTENTION.get(cfg.attention).flops_per_token(cfg, seq_len)
  # The FFN kind counts its own (an MoE layer: the router and the experts a token uses), per
  # stack of layers: DeepSeek-style models keep their first layers dense.
  ffn = sum(s.num_layers * FFN.get(s.ffn).flops_per_token(cfg) for s in layer_stacks(cfg))
  head = 2.0 * cfg.embed_dim * cfg.vocab_size  # the output projection (tied or not, a matmul)
  per_token = lambda per_layer, extra=0.0: 3 * tokens * (cfg.num_layers * per_layer + extra)
  matmul = per_token(attn['projections'], head + ffn)
  attention = per_token(attn['attention'])
  return {
      'matmul': float(matmul),
      'attention': float(attention),
      'attention_as_executed': float(per_token(attn['attention_as_executed'])),
      'total': float(matmul + attention),
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
  # Kernels become plain XLA in the twin: custom calls count zero, and Pallas GPU kernels cannot
  # be lowered for the CPU where the twin is lowered.
  twin = dataclasses.replace(cfg, scan_layers=False, attention_impl='xla', remat='none',
                             moe=dataclasses.replace(cfg.moe, grouped_matmul='ragged_dot'))
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

"""The scaled-dot-product core every attention variant calls.

`jax.nn.dot_product_attention` takes grouped K/V heads natively (no repeated K/V in memory)
and reaches cuDNN's flash attention on NVIDIA GPUs. Two calling modes:

- training / a whole sequence (`q_positions` None): causal over the sequence itself, optionally
  with a sliding window, through whichever implementation is asked for. A row may pack several
  examples (`segment_ids`): a token then sees only earlier tokens of its own segment;
- against a KV cache (`q_positions`, `k_positions` given): query i sees cache slot s when
  s <= position(i) (and s > position(i) - window). Slots are written at their token's position,
  so slots not yet written lie in the future and are masked by the same comparison. This path
  builds an explicit mask, which only XLA's implementation takes, so it always runs on XLA:
  decoding is memory-bound and reads the cache once either way.
"""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn')


def resolve_implementation(implementation: str, dtype, backend: str | None = None) -> str:
  """What `auto` means on this backend: cuDNN where it can run (GPU, 16-bit), XLA elsewhere."""
  if implementation != 'auto':
    return implementation
  backend = backend or jax.default_backend()
  if backend == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return 'cudnn'
  return 'xla'


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = 'auto',
                          scale: float | None = None, bias: jax.Array | None = None,
                          window: int | None = None, q_positions: jax.Array | None = None,
                          k_positions: jax.Array | None = None,
                          segment_ids: jax.Array | None = None) -> jax.Array:
  """Causal softmax(q·kᵀ·scale + bias)·v.

  Args:
    q: [batch, q_len, heads, qk_dim].
    k: [batch, k_len, kv_heads, qk_dim]; kv_heads divides heads (each K/V head serves a group).
    v: [batch, k_len, kv_heads, v_dim]; v_dim may differ from qk_dim (MLA): v is zero-padded to
      qk_dim for the call, which `jax.nn.dot_product_attention` (cuDNN included) requires, and
      the output sliced back.
    scale: defaults to 1/sqrt(qk_dim).
    bias: added to the logits, broadcastable to [batch, heads, q_len, k_len].
    window: each query sees at most this many keys, itself included (sliding-window attention);
      None sees the whole past.
    q_positions, k_positions: [batch, q_len] and [batch, k_len] absolute positions, for attending
      to a cache (see the module docstring); None for a whole causal sequence.
    segment_ids: [batch, length] int, whole-sequence mode only (q and k the same tokens): the
      example each token belongs to in a packed row (0 for padding, which is treated as one more
      segment: every token sees at least itself, so no softmax row is empty). None: one example
      per row, with no mask built at all.
  Returns:
    [batch, q_len, heads, v_dim].
  """
  qk_dim, v_dim = q.shape[-1], v.shape[-1]
  scale = qk_dim ** -0.5 if scale is None else scale
  out_dtype = q.dtype
  if q.dtype == jnp.float16 and jax.default_backend() == 'cpu':
    # XLA's CPU dot has no fp16 x fp16 -> f32 form, which jax's attention asks for its scores
    # (jax 0.10: 'F16_F16_F32 is not supported'); the CPU computes fp16 attention in f32.
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  if v_dim < qk_dim:
    v = jnp.pad(v, [(0, 0)] * 3 + [(0, qk_dim - v_dim)])
  elif v_dim > qk_dim:
    raise ValueError(f'v head dim {v_dim} exceeds the q/k head dim {qk_dim}')
  if q_positions is None:
    impl = resolve_implementation(implementation, q.dtype)
    if bias is not None and impl == 'cudnn':
      # A bias of another dtype than q's (T5's float32 bias on bf16 activations) runs forward
      # but gets a wrong gradient from jax's cuDNN path (seen: jax 0.11.2, H100): cast it.
      bias = bias.astype(q.dtype)
    # The segment mask goes beside is_causal and the window, which stay as they are. On XLA all
    # three are and-ed into one mask (bit for bit today's result when every id is equal). On
    # cuDNN, jax (0.10.2: nn/functions.py; cudnn/fused_attention_stablehlo.py,
    # `combine_bias_and_mask`) turns a boolean mask into an additive bias in q's dtype (0, or
    # -2^41 in bf16 and -2^15 in fp16) added to `bias`, keeps is_causal and the window as cuDNN's
    # causal mask type and sliding_window_length, and its `check_layout` takes a [B, 1, T, T]
    # bias; with a bias, training needs an even T (`check_is_flash_attention`).
    # tests/attention/test_segments.py checks on CPU, with jax's cuDNN version probe stubbed,
    # that these arguments trace (forward and gradient) and that cuDNN's documented semantics
    # applied to them give XLA's result. UNVERIFIED (no GPU here): that cuDNN compiles and runs
    # this bias with its causal mask and a sliding window, its numbers, and the cost: the
    # [B, 1, T, T] bias is read from memory, and jax always has cuDNN write its gradient (an
    # array of the same size per layer, then dropped). cuDNN's packed layout (segment offsets)
    # avoids both, but jax.nn.dot_product_attention does not expose it.
    mask = None if segment_ids is None else segment_mask(segment_ids)
    out = jax.nn.dot_product_attention(
        q, k, v, bias, mask, is_causal=True, scale=scale, implementation=impl,
        local_window_size=None if window is None else (window - 1, 0))
  else:
    if segment_ids is not None:
      raise ValueError('segment_ids are for whole sequences; attending to a cache takes none '
                       '(a cache holds one sequence per row)')
    mask = causal_mask(q_positions, k_positions, window)
    out = jax.nn.dot_product_attention(q, k, v, bias, mask, scale=scale, implementation='xla')
  return out[..., :v_dim].astype(out_dtype)


def causal_mask(q_positions: jax.Array, k_positions: jax.Array, window: int | None = None
                ) -> jax.Array:
  """[batch, 1, q_len, k_len] boolean: which keys each query may see (for variants that compute
  their own scores, e.g. NSA's branches)."""
  qp, kp = q_positions[:, None, :, None], k_positions[:, None, None, :]
  mask = kp <= qp
  if window is not None:
    mask &= kp > qp - window
  return mask


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """segment_ids [batch, length] -> [batch, 1, length, length] boolean: query i may see key j
  of the same segment (causality and windows are separate masks)."""
  return (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])


def mean_context(seq_len: int, window: int | None = None) -> float:
  """Keys a query attends to, averaged over a causal sequence: seq_len/2 for full attention (the
  PaLM convention of model FLOPs), fewer under a sliding window (the same convention, exact
  otherwise: the mean of min(i + 1, window) less one half)."""
  if window is None or window >= seq_len:
    return seq_len / 2
  full = window * (window + 1) / 2 + (seq_len - window) * window
  return full / seq_len - 0.5

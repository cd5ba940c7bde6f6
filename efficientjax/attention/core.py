"""The scaled-dot-product core every attention variant calls.

`jax.nn.dot_product_attention` takes grouped K/V heads natively (no repeated K/V in memory)
and reaches cuDNN's flash attention on NVIDIA GPUs. Two calling modes:

- training / a whole sequence (`q_positions` None): causal over the sequence itself, optionally
  with a sliding window, through whichever implementation is asked for;
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
                          k_positions: jax.Array | None = None) -> jax.Array:
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
  Returns:
    [batch, q_len, heads, v_dim].
  """
  qk_dim, v_dim = q.shape[-1], v.shape[-1]
  scale = qk_dim ** -0.5 if scale is None else scale
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
    out = jax.nn.dot_product_attention(
        q, k, v, bias, is_causal=True, scale=scale, implementation=impl,
        local_window_size=None if window is None else (window - 1, 0))
  else:
    mask = causal_mask(q_positions, k_positions, window)
    out = jax.nn.dot_product_attention(q, k, v, bias, mask, scale=scale, implementation='xla')
  return out[..., :v_dim]


def causal_mask(q_positions: jax.Array, k_positions: jax.Array, window: int | None = None
                ) -> jax.Array:
  """[batch, 1, q_len, k_len] boolean: which keys each query may see (for variants that compute
  their own scores, e.g. NSA's branches)."""
  qp, kp = q_positions[:, None, :, None], k_positions[:, None, None, :]
  mask = kp <= qp
  if window is not None:
    mask &= kp > qp - window
  return mask


def mean_context(seq_len: int, window: int | None = None) -> float:
  """Keys a query attends to, averaged over a causal sequence: seq_len/2 for full attention (the
  PaLM convention of model FLOPs), fewer under a sliding window (the same convention, exact
  otherwise: the mean of min(i + 1, window) less one half)."""
  if window is None or window >= seq_len:
    return seq_len / 2
  full = window * (window + 1) / 2 + (seq_len - window) * window
  return full / seq_len - 0.5

"""The specification of native sparse attention's three branches, in plain jnp.

NSA (Yuan et al. 2025, arXiv 2502.11089) gives each query three attentions, each over its own
keys and values, mixed per head by learned gates outside this package (Eq. 5):

  cmp  over compressed blocks: block i (keys and values [batch, blocks, kv_heads, head_dim],
       made by the layer from tokens [i·stride, i·stride + block_len)) is visible to a query
       at position p once it is complete, i·stride + block_len - 1 <= p. A query with no
       complete block gets zero from this branch.
  slc  over the tokens of `num_selected` (n) blocks of `select_block_len` (l') tokens, causally,
       chosen per K/V group by the cmp probabilities (Eq. 8-11; see `select_blocks`): the
       query's own block, the initial block and the one before the query's always count among
       the n. The choice is not differentiable.
  win  over the last `window` (w) tokens, the query included.

Shapes: q [batch, q_len, heads, head_dim], head h reading K/V head h // (heads / kv_heads);
token keys and values [batch, k_len, kv_heads, head_dim], key s at position s (a whole
sequence, or a cache); q_positions [batch, q_len] (None: 0..q_len-1, a whole sequence).

Each branch here is a dense masked attention: O(q_len · k_len) work and memory (the selection
mask alone is [batch, kv_heads, q_len, k_len]). It is what the kernels are tested against, and
what `efficientjax/attention/nsa.py` runs when the kernels do not.
"""

import jax
import jax.numpy as jnp
import numpy as np

# Selection scores of the always-selected blocks: far above any importance (a sum of
# probabilities, at most heads_per_group · block_len / stride), ranked current > initial >
# previous.
FORCED_SCORE = 1e30


def num_blocks(length: int, block_len: int, stride: int) -> int:
  """Compressed blocks complete within `length` tokens (block j ends at j·stride + l - 1)."""
  return max(0, (length - block_len) // stride + 1)


def num_select_blocks(k_len: int, select_block_len: int) -> int:
  return -(-k_len // select_block_len)


# ---------------------------------------------------------------------------------------------
# Selection (Eq. 8-11).


def selection_weights(num_cmp: int, num_slc: int, block_len: int, stride: int,
                      select_block_len: int) -> np.ndarray:
  """[num_cmp, num_slc] Eq. 9's weights: the tokens compressed block i and selection block j
  share, in strides (an integer, as stride divides block_len and select_block_len). Eq. 9's
  double sum over (m, n) counts exactly those shared strides; with l = l' = d, p_slc = p_cmp."""
  cmp_start = np.arange(num_cmp)[:, None] * stride
  slc_start = np.arange(num_slc)[None, :] * select_block_len
  shared = (np.minimum(cmp_start + block_len, slc_start + select_block_len)
            - np.maximum(cmp_start, slc_start))
  return (np.maximum(shared, 0) / stride).astype(np.float32)


def block_importance(p_cmp: jax.Array, weights: np.ndarray | jax.Array) -> jax.Array:
  """p_cmp [batch, kv_heads, group, q_len, num_cmp] (the cmp branch's probabilities) ->
  [batch, kv_heads, q_len, num_slc]: Eq. 9 per head, summed over the group's heads (Eq. 10).
  `weights` is [num_cmp, num_slc], or [batch, num_cmp, num_slc] for packed rows."""
  if weights.ndim == 3:
    return jnp.einsum('bkgtc,bcs->bkts', p_cmp.astype(jnp.float32), weights)
  return jnp.einsum('bkgtc,cs->bkts', p_cmp.astype(jnp.float32), weights)


def select_blocks(importance: jax.Array, q_positions: jax.Array, select_block_len: int,
                  num_selected: int) -> jax.Array:
  """importance [batch, kv_heads, q_len, num_slc], q_positions [batch, q_len] -> the selected
  blocks [batch, kv_heads, q_len, min(num_selected, num_slc)], -1 in slots left empty because
  fewer blocks lie at or before the query. Forced blocks first (current, initial, previous),
  then by importance; ties go to the lower block."""
  block = jnp.arange(importance.shape[-1])
  current = (q_positions // select_block_len)[:, None, :, None]
  rank = jnp.select([block == current, block == 0, block == current - 1], [3.0, 2.0, 1.0], 0.0)
  score = jnp.where(rank > 0, FORCED_SCORE * rank, importance)
  score = jnp.where(block <= current, score, -jnp.inf)
  score, idx = jax.lax.top_k(score, min(num_selected, importance.shape[-1]))
  return jnp.where(score > -jnp.inf, idx, -1).astype(jnp.int32)


def selected_token_mask(selected: jax.Array, q_positions: jax.Array, k_positions: jax.Array,
                        select_block_len: int, num_slc: int) -> jax.Array:
  """selected [batch, kv_heads, q_len, n] block ids, k_positions [k_len] -> [batch, kv_heads,
  q_len, k_len]: the keys of the selected blocks, causally (the query's own block is partial)."""
  chosen = jnp.any(selected[..., None] == jnp.arange(num_slc), axis=-2)  # [b, k, t, num_slc]
  causal = k_positions <= q_positions[:, None, :, None]
  return chosen[..., k_positions // select_block_len] & causal


# ---------------------------------------------------------------------------------------------
# One branch's attention.


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis among the `mask`ed entries; a row with none gives zeros, with
  finite gradients (no -inf - -inf)."""
  logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True,
                                      initial=jnp.finfo(logits.dtype).min))
  e = jnp.where(mask, jnp.exp(logits - top), 0.0)
  total = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
           bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Grouped masked attention, scores and softmax in float32 (or wider).

  Args:
    q: [batch, q_len, heads, dim]; head h reads K/V head h // (heads / kv_heads).
    k, v: [batch, k_len, kv_heads, dim].
    mask: boolean, broadcastable to [batch, kv_heads, q_len, k_len].
    bias: float [batch, heads, q_len, k_len] added to the scaled scores, or None.
  Returns:
    out [batch, q_len, heads, dim] and the probabilities [batch, kv_heads, group, q_len, k_len].
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, h // kv, d)
  score_dtype = jnp.promote_types(q.dtype, jnp.float32)  # float64 stays (gradient checks)
  logits = jnp.einsum('btkgd,bskd->bkgts', qg, k, preferred_element_type=score_dtype) * d ** -0.5
  if bias is not None:
    logits = logits + bias.reshape(b, kv, h // kv, t, -1)
  probs = masked_softmax(logits, mask[:, :, None])
  out = jnp.einsum('bkgts,bskd->btkgd', probs.astype(v.dtype), v)
  return out.reshape(b, t, h, d), probs


# ---------------------------------------------------------------------------------------------
# The three branches.


def _positions(q: jax.Array, q_positions: jax.Array | None) -> jax.Array:
  if q_positions is None:
    return jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
  return jnp.asarray(q_positions, jnp.int32)


def compressed_attention(q, k_blocks, v_blocks, q_positions=None, *, block_len: int, stride: int,
                         bias=None) -> tuple[jax.Array, jax.Array]:
  """The cmp branch: (out [batch, q_len, heads, dim], probabilities [batch, kv_heads, group,
  q_len, blocks]). `bias` [batch, heads, q_len, blocks] is added to the scaled scores."""
  q_positions = _positions(q, q_positions)
  block_ends = jnp.arange(k_blocks.shape[1]) * stride + block_len - 1
  mask = block_ends[None, None, None, :] <= q_positions[:, None, :, None]
  return attend(q, k_blocks, v_blocks, mask, bias)


def select(p_cmp: jax.Array, q_positions: jax.Array, k_len: int, *, block_len: int,
           stride: int, select_block_len: int, num_selected: int) -> jax.Array:
  """The slc branch's blocks from the cmp branch's probabilities: [batch, kv_heads, q_len,
  min(num_selected, blocks of k_len)] block ids, -1 in empty slots (see `select_blocks`)."""
  num_slc = num_select_blocks(k_len, select_block_len)
  weights = selection_weights(p_cmp.shape[-1], num_slc, block_len, stride, select_block_len)
  importance = block_importance(jax.lax.stop_gradient(p_cmp), weights)
  return select_blocks(importance, q_positions, select_block_len, num_selected)


def selected_attention(q, k, v, selected, q_positions=None, *, select_block_len: int,
                       bias=None) -> jax.Array:
  """The slc branch: each query over its group's `selected` blocks' tokens, causally."""
  q_positions = _positions(q, q_positions)
  k_positions = jnp.arange(k.shape[1])
  mask = selected_token_mask(selected, q_positions, k_positions, select_block_len,
                             num_select_blocks(k.shape[1], select_block_len))
  return attend(q, k, v, mask, bias)[0]


def window_attention(q, k, v, q_positions=None, *, window: int, bias=None) -> jax.Array:
  """The win branch: each query over keys at positions (p - window, p]."""
  q_positions = _positions(q, q_positions)[:, None, :, None]
  k_positions = jnp.arange(k.shape[1])
  mask = (k_positions <= q_positions) & (k_positions > q_positions - window)
  return attend(q, k, v, mask, bias)[0]


def nsa_attention(q, k_blocks, v_blocks, k_slc, v_slc, k_win, v_win, q_positions=None, *,
                  block_len: int, stride: int, select_block_len: int, num_selected: int,
                  window: int, token_bias=None, block_bias=None,
                  return_selected: bool = False):
  """The three branches' outputs (cmp, slc, win), each [batch, q_len, heads, head_dim] (and the
  selected blocks, with return_selected). Biases [batch, heads, q_len, keys] are added to the
  scaled scores: `block_bias` to cmp's, `token_bias` to slc's and win's."""
  q_positions = _positions(q, q_positions)
  out_cmp, p_cmp = compressed_attention(q, k_blocks, v_blocks, q_positions, block_len=block_len,
                                        stride=stride, bias=block_bias)
  selected = select(p_cmp, q_positions, k_slc.shape[1], block_len=block_len, stride=stride,
                    select_block_len=select_block_len, num_selected=num_selected)
  out_slc = selected_attention(q, k_slc, v_slc, selected, q_positions,
                               select_block_len=select_block_len, bias=token_bias)
  out_win = window_attention(q, k_win, v_win, q_positions, window=window, bias=token_bias)
  outs = (out_cmp, out_slc, out_win)
  return (outs, selected) if return_selected else outs

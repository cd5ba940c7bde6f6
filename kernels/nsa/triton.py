"""NSA's kernels in Pallas with the Triton backend.

Layout (made by ops.py). The queries of one K/V head are rows: row r of head k is token
r // gp, query head k·g + r % gp, where g is the group (query heads per K/V head) and gp the
next power of two (the rows a kernel tile holds must be a power of two). `row_pos` [batch,
rows] gives each row's position, -1 for padding rows (heads g..gp-1, tokens past the end):
every mask compares key positions with it, so padding rows see nothing, output zeros and
contribute no gradient. q, do, o: [batch, kv_heads, rows, head_dim]; lse, delta: [batch,
kv_heads, rows]. Keys, values and compressed blocks stay in the model's layout, [batch, keys,
kv_heads, head_dim] (key s at position s, compressed block i at row i), so decoding reads the
cache where it is; a tile reaching past the last key or block is masked.

A tile of rows holds whole tokens (a multiple of gp rows), so a group's query heads share every
K/V block a tile loads: that is how NSA's selection is meant to run (one selection per group,
Eq. 10). The per-token kernels (selected and window attention) hold `tokens_per_program`
tokens' rows, at least 16 (the smallest tensor-core tile): with one token a program, a group
below 16 leaves rows idle (those past gp belong to the next token and are masked); with 16 // gp
tokens a program, the rows are full and the program walks the union of its tokens' blocks.

Kernels, each a grid over (batch, kv_heads, tiles):
  cmp_fwd / cmp_dq / cmp_dkv   flash attention over the compressed blocks, block-causal (a block
                               is visible once complete), online softmax; saves the row
                               log-sum-exp.
  select                       recomputes the cmp probabilities from that log-sum-exp, sums them
                               over the group's heads and into selection blocks (Eq. 9-10) chunk
                               by chunk and keeps a running top-n per token: the [tokens × blocks]
                               score matrix never leaves registers.
  tokens_fwd / tokens_dq       per token: attention over a list of key blocks (its selected
                               blocks, or the blocks its window covers), online softmax.
  tokens_dkv                   per key block: walks the token tiles that can see it, skipping the
                               tiles none of whose tokens selected it (the selected branch), and
                               accumulates dk, dv without atomics.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.nsa.reference import FORCED_SCORE

_NEG = -1e30  # masked scores: finite, so exp(_NEG - _NEG) is 1, never nan
_MIN_DOT = 16  # Triton's smallest dot dimension
_BIG = 2 ** 30


def _dot(a, b, *, trans_a=False, trans_b=False):
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _call(kernel, grid, out_shape, interpret, num_warps, num_stages, name):
  return pl.pallas_call(kernel, grid=grid, out_shape=out_shape, interpret=interpret, name=name,
                        compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                                             num_stages=num_stages))


def _load_rows(ref, b, h, start, size, limit):
  """Rows start.. of a [batch, rows, kv_heads, dim] array for K/V head h, zero past `limit`."""
  inside = (start + jnp.arange(size)) < limit
  return plgpu.load(ref.at[b, pl.ds(start, size), h, :], mask=inside[:, None], other=0)


def _store_rows(ref, b, h, start, value, limit):
  inside = (start + jnp.arange(value.shape[0])) < limit
  plgpu.store(ref.at[b, pl.ds(start, value.shape[0]), h, :], value.astype(ref.dtype),
              mask=inside[:, None])


def _visible_blocks(pos, block_len, stride):
  """How many compressed blocks are complete at position `pos` (a scalar or vector)."""
  return jnp.where(pos >= block_len - 1, (jnp.maximum(pos, block_len - 1) - block_len + 1)
                   // stride + 1, 0)


# ---------------------------------------------------------------------------------------------
# The compressed branch.


def _cmp_scores(q, k, pos, first, *, scale, block_len, stride, num_cmp):
  """Scaled scores of a row tile against compressed blocks first.., and which are visible."""
  blk = first + jnp.arange(k.shape[0])
  s = _dot(q, k, trans_b=True) * scale
  vis = ((blk * stride + block_len - 1)[None, :] <= pos[:, None]) & (blk < num_cmp)[None, :]
  return s, vis


def _cmp_fwd_kernel(q_ref, kb_ref, vb_ref, pos_ref, o_ref, lse_ref, *, scale, block_len, stride,
                    num_cmp, block_r, block_c):
  b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows = pl.ds(pl.multiple_of(i * block_r, block_r), block_r)
  q, pos = q_ref[b, h, rows, :], pos_ref[b, rows]
  tiles = pl.cdiv(jnp.minimum(_visible_blocks(jnp.max(pos), block_len, stride), num_cmp),
                  block_c)

  def body(j, carry):
    acc, m, l = carry
    k = _load_rows(kb_ref, b, h, j * block_c, block_c, num_cmp)
    v = _load_rows(vb_ref, b, h, j * block_c, block_c, num_cmp)
    s, vis = _cmp_scores(q, k, pos, j * block_c, scale=scale, block_len=block_len,
                         stride=stride, num_cmp=num_cmp)
    s = jnp.where(vis, s, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(vis, jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    return (acc * alpha[:, None] + _dot(p.astype(v.dtype), v), m_new,
            l * alpha + jnp.sum(p, axis=1))

  acc, m, l = lax.fori_loop(0, tiles, body, (jnp.zeros(q.shape, jnp.float32),
                                             jnp.full((block_r,), _NEG, jnp.float32),
                                             jnp.zeros((block_r,), jnp.float32)))
  o_ref[b, h, rows, :] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[b, h, rows] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)


def cmp_fwd(q, kb, vb, row_pos, *, tokens, gp, block_len, stride, num_cmp, block_r=64,
            block_c=64, num_warps=4, num_stages=2, interpret=False):
  """(o, lse) of the compressed branch for rows [0, tokens·gp) (block_r divides that)."""
  b, kv, _, d = q.shape
  rows = tokens * gp
  kernel = functools.partial(_cmp_fwd_kernel, scale=d ** -0.5, block_len=block_len,
                             stride=stride, num_cmp=num_cmp, block_r=block_r,
                             block_c=block_c)
  out_shape = (jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((b, kv, q.shape[2]), jnp.float32))
  return _call(kernel, (b, kv, rows // block_r), out_shape, interpret, num_warps, num_stages,
               'nsa_cmp_fwd')(q, kb, vb, row_pos)


def _cmp_dq_kernel(q_ref, kb_ref, vb_ref, pos_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale,
                   block_len, stride, num_cmp, block_r, block_c):
  b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows = pl.ds(pl.multiple_of(i * block_r, block_r), block_r)
  q, pos, do = q_ref[b, h, rows, :], pos_ref[b, rows], do_ref[b, h, rows, :]
  lse, delta = lse_ref[b, h, rows], delta_ref[b, h, rows]
  tiles = pl.cdiv(jnp.minimum(_visible_blocks(jnp.max(pos), block_len, stride), num_cmp),
                  block_c)

  def body(j, dq):
    k = _load_rows(kb_ref, b, h, j * block_c, block_c, num_cmp)
    v = _load_rows(vb_ref, b, h, j * block_c, block_c, num_cmp)
    s, vis = _cmp_scores(q, k, pos, j * block_c, scale=scale, block_len=block_len,
                         stride=stride, num_cmp=num_cmp)
    p = jnp.where(vis, jnp.exp(s - lse[:, None]), 0.0)
    ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, tiles, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[b, h, rows, :] = (dq * scale).astype(dq_ref.dtype)


def _cmp_dkv_kernel(q_ref, kb_ref, vb_ref, pos_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                    *, scale, block_len, stride, num_cmp, block_r, block_c, row_tiles):
  b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  k = _load_rows(kb_ref, b, h, j * block_c, block_c, num_cmp)
  v = _load_rows(vb_ref, b, h, j * block_c, block_c, num_cmp)
  first_end = j * block_c * stride + block_len - 1  # the tile's first block completes here

  def body(i, carry):
    rows = pl.ds(pl.multiple_of(i * block_r, block_r), block_r)
    pos = pos_ref[b, rows]

    def tile(carry):
      dk, dv = carry
      q, do = q_ref[b, h, rows, :], do_ref[b, h, rows, :]
      lse, delta = lse_ref[b, h, rows], delta_ref[b, h, rows]
      s, vis = _cmp_scores(q, k, pos, j * block_c, scale=scale, block_len=block_len,
                           stride=stride, num_cmp=num_cmp)
      p = jnp.where(vis, jnp.exp(s - lse[:, None]), 0.0)
      ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
      return (dk + _dot(ds.astype(q.dtype), q, trans_a=True),
              dv + _dot(p.astype(do.dtype), do, trans_a=True))

    # Rows before the tile's first block completes see none of it.
    return lax.cond(jnp.max(pos) >= first_end, tile, lambda c: c, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, row_tiles, body, (zeros, zeros))
  _store_rows(dk_ref, b, h, j * block_c, dk * scale, num_cmp)
  _store_rows(dv_ref, b, h, j * block_c, dv, num_cmp)


def cmp_bwd(q, kb, vb, row_pos, do, lse, delta, *, tokens, gp, block_len, stride, num_cmp,
            block_r=64, block_c=64, num_warps=4, num_stages=2, interpret=False):
  """(dq, dkb, dvb), dkb and dvb in kb's layout."""
  b, kv, _, d = q.shape
  rows = tokens * gp
  static = dict(scale=d ** -0.5, block_len=block_len, stride=stride, num_cmp=num_cmp,
                block_r=block_r, block_c=block_c)
  args = (q, kb, vb, row_pos, do, lse, delta)
  dq = _call(functools.partial(_cmp_dq_kernel, **static), (b, kv, rows // block_r),
             jax.ShapeDtypeStruct(q.shape, q.dtype), interpret, num_warps, num_stages,
             'nsa_cmp_dq')(*args)
  block_tiles = pl.cdiv(kb.shape[1], block_c)
  dk, dv = _call(functools.partial(_cmp_dkv_kernel, row_tiles=rows // block_r, **static),
                 (b, kv, block_tiles),
                 (jax.ShapeDtypeStruct(kb.shape, kb.dtype), jax.ShapeDtypeStruct(vb.shape,
                                                                                 vb.dtype)),
                 interpret, num_warps, num_stages, 'nsa_cmp_dkv')(*args)
  return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Block scores and top-n, fused.


def _select_kernel(q_ref, kb_ref, pos_ref, lse_ref, sel_ref, *, scale, block_len, stride,
                   select_block_len, num_selected, num_cmp, back, gp, block_t, chunk):
  b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  block_r = block_t * gp
  rows = pl.ds(pl.multiple_of(i * block_r, block_r), block_r)
  q, pos, lse = q_ref[b, h, rows, :], pos_ref[b, rows], lse_ref[b, h, rows]
  token_pos = jnp.max(pos.reshape(block_t, gp), axis=1)  # padding heads are -1
  current = jnp.where(token_pos >= 0, token_pos // select_block_len, -1)
  per_slc = select_block_len // stride  # compressed blocks starting in a selection block
  width = chunk * per_slc
  n_pad = sel_ref.shape[-1]
  slot = jnp.arange(n_pad)[None, :]

  def token_probs(k, first, before=None):
    """Σ over the group's heads of cmp's probabilities of blocks first.. [block_t, blocks]
    (only of blocks before `before`, if given)."""
    s, vis = _cmp_scores(q, k, pos, first, scale=scale, block_len=block_len, stride=stride,
                         num_cmp=num_cmp)
    if before is not None:
      vis &= (first + jnp.arange(k.shape[0]) < before)[None, :]
    p = jnp.where(vis, jnp.exp(s - lse[:, None]), 0.0)
    return jnp.sum(p.reshape(block_t, gp, k.shape[0]), axis=1)

  def weights(first, count, slc):
    """Eq. 9's [count, chunk] weights of compressed blocks first.. for selection blocks slc."""
    start = (first + jnp.arange(count))[:, None] * stride
    slc_start = slc[None, :] * select_block_len
    shared = (jnp.minimum(start + block_len, slc_start + select_block_len)
              - jnp.maximum(start, slc_start))
    return jnp.maximum(shared, 0).astype(jnp.float32) / stride

  def body(c, top):
    top_score, top_block = top
    slc = c * chunk + jnp.arange(chunk)
    first = c * width  # the first compressed block starting in this chunk
    k = _load_rows(kb_ref, b, h, first, width, num_cmp)
    importance = _dot(token_probs(k, first), weights(first, width, slc))
    if back:  # blocks starting before the chunk whose tokens reach into it
      # (clamped at block 0, where the blocks read again are the chunk's own: not counted)
      start = jnp.maximum(first - back, 0)
      k = _load_rows(kb_ref, b, h, start, back, num_cmp)
      importance += _dot(token_probs(k, start, before=first), weights(start, back, slc))
    cur = current[:, None]
    rank = jnp.where(slc == cur, 3.0, jnp.where(slc == 0, 2.0,
                                                jnp.where(slc == cur - 1, 1.0, 0.0)))
    score = jnp.where(rank > 0, FORCED_SCORE * rank, importance)
    score = jnp.where(slc[None, :] <= cur, score, -jnp.inf)

    def insert(_, carry):
      # The chunk's best (lowest block on ties) replaces the set's worst (the highest block
      # among equal worst scores) if strictly better: chunks come in block order, so ties keep
      # the lower block, as top_k does.
      score, top_score, top_block = carry
      best = jnp.max(score, axis=1)
      block = jnp.min(jnp.where(score == best[:, None], slc[None, :], _BIG), axis=1)
      worst = jnp.min(top_score, axis=1)
      evict = jnp.max(jnp.where(top_score == worst[:, None], top_block, -_BIG), axis=1)
      replace = (best > worst)[:, None] & (top_block == evict[:, None])
      return (jnp.where(slc[None, :] == block[:, None], -jnp.inf, score),
              jnp.where(replace, best[:, None], top_score),
              jnp.where(replace, block[:, None], top_block))

    _, top_score, top_block = lax.fori_loop(0, num_selected, insert,
                                            (score, top_score, top_block))
    return top_score, top_block

  # Empty slots hold -inf and distinct negative blocks (so one is filled at a time); the slots
  # past num_selected hold +inf and are never evicted.
  top_score = jnp.broadcast_to(jnp.where(slot < num_selected, -jnp.inf, jnp.inf),
                               (block_t, n_pad)).astype(jnp.float32)
  top_block = jnp.broadcast_to(-1 - slot, (block_t, n_pad)).astype(jnp.int32)
  chunks = (jnp.max(current) + chunk) // chunk
  _, top_block = lax.fori_loop(0, chunks, body, (top_score, top_block))
  sel_ref[b, h, pl.ds(pl.multiple_of(i * block_t, block_t), block_t), :] = jnp.where(
      top_block >= 0, top_block, -1)


def select(q, kb, row_pos, lse, *, tokens, gp, block_len, stride, select_block_len,
           num_selected, num_cmp, back, block_t=16, chunk=16, num_warps=4, num_stages=2,
           interpret=False):
  """Each token's selected blocks (per K/V head): [batch, kv_heads, tokens, n_pad] block ids
  in no particular order, -1 in empty slots and in slots past num_selected. `back`: how many
  compressed blocks before a chunk to read for the ones reaching into it; 0 when none reaches
  past the selection block it starts in (block_len = stride), else at least
  block_len // stride - 1."""
  b, kv, _, d = q.shape
  n_pad = max(2, pl.next_power_of_2(num_selected))
  kernel = functools.partial(_select_kernel, scale=d ** -0.5, block_len=block_len,
                             stride=stride, select_block_len=select_block_len,
                             num_selected=num_selected, num_cmp=num_cmp, back=back, gp=gp,
                             block_t=block_t, chunk=chunk)
  return _call(kernel, (b, kv, tokens // block_t),
               jax.ShapeDtypeStruct((b, kv, tokens, n_pad), jnp.int32), interpret, num_warps,
               num_stages, 'nsa_select')(q, kb, row_pos, lse)


# ---------------------------------------------------------------------------------------------
# Token-sparse attention: the selected and window branches.


class _TokenTile:
  """A per-token program's rows and key blocks: `tokens_per_program` (tp) consecutive tokens,
  each its gp rows, padded to at least 16 rows (the rows past tp·gp belong to the next
  program's tokens and are masked).

  The key blocks are the union of the tokens' lists: in the selected branch each token's
  selection (a block another of the tile's tokens listed first is skipped, -1 entries too), in
  the window branch the blocks from the first token's window start to the last token's
  position. A row takes part in a block only if its own token attends to it (the rows
  `block` returns)."""

  def __init__(self, pos_ref, sel_ref, b, h, *, gp, tp, block_k, window):
    self.b, self.h, self.gp, self.tp, self.window, self.block_k = b, h, gp, tp, window, block_k
    self.first_token = pl.program_id(2) * tp
    self.num_rows = max(tp * gp, _MIN_DOT)
    self.rows = pl.ds(self.first_token * gp, self.num_rows)
    row = jnp.arange(self.num_rows)
    self.mine = row < tp * gp
    self.pos = jnp.where(self.mine, pos_ref[b, self.rows], -1)  # padding rows are -1
    self.valid = self.pos >= 0
    self.sel_ref = sel_ref
    if window is None:
      self.n = sel_ref.shape[-1]
      self.count = tp * self.n
      if tp > 1:  # each row's token's selection list, for the per-row test of a block
        self.row_sel = sel_ref[b, h, self.first_token + jnp.minimum(row // gp, tp - 1), :]
        self.tile_sel = sel_ref[b, h, pl.ds(self.first_token, tp), :]
    else:
      lo = jnp.min(jnp.where(self.valid, self.pos - window + 1, _BIG))
      self.first_block = jnp.maximum(lo, 0) // block_k
      last = jnp.max(self.pos) // block_k
      self.count = jnp.where(jnp.max(self.pos) >= 0, last - self.first_block + 1, 0)

  def block(self, c):
    """The c-th candidate block: (block, whether to skip it (None: never), which rows attend
    to it)."""
    if self.window is not None:
      return self.first_block + c, None, self.valid
    if self.tp == 1:  # one token: its own list, no duplicates, every valid row takes part
      blk = self.sel_ref[self.b, self.h, self.first_token, c]
      return blk, blk < 0, self.valid
    token = lax.div(c, self.n)  # jnp's % on the loop index does not lower to Triton
    slot = c - token * self.n
    blk = self.sel_ref[self.b, self.h, self.first_token + token, slot]
    earlier = jnp.max(jnp.where((self.tile_sel == blk)
                                & (jnp.arange(self.tp)[:, None] < token), 1, 0))
    rows = self.valid & (jnp.max(jnp.where(self.row_sel == blk, 1, 0), axis=1) > 0)
    return blk, (blk < 0) | (earlier > 0), rows

  def mask(self, kpos, rows):
    """[rows, keys]: causal, within the window if any."""
    mask = rows[:, None] & (kpos[None, :] <= self.pos[:, None])
    if self.window is not None:
      mask &= kpos[None, :] > self.pos[:, None] - self.window
    return mask


def _tokens_fwd_kernel(q_ref, k_ref, v_ref, pos_ref, *refs, scale, gp, tp, block_k, window):
  if window is None:
    sel_ref, o_ref, lse_ref = refs
  else:
    (o_ref, lse_ref), sel_ref = refs, None
  b, h = pl.program_id(0), pl.program_id(1)
  tile = _TokenTile(pos_ref, sel_ref, b, h, gp=gp, tp=tp, block_k=block_k, window=window)
  q = q_ref[b, h, tile.rows, :]

  def body(c, carry):
    blk, skip, rows = tile.block(c)

    def attend(carry):
      acc, m, l = carry
      start = jnp.maximum(blk, 0) * block_k
      keys = _load_rows(k_ref, b, h, start, block_k, k_ref.shape[1])
      values = _load_rows(v_ref, b, h, start, block_k, v_ref.shape[1])
      mask = tile.mask(start + jnp.arange(block_k), rows)
      s = jnp.where(mask, _dot(q, keys, trans_b=True) * scale, _NEG)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
      alpha = jnp.exp(m - m_new)
      return (acc * alpha[:, None] + _dot(p.astype(values.dtype), values), m_new,
              l * alpha + jnp.sum(p, axis=1))

    return attend(carry) if skip is None else lax.cond(skip, lambda c: c, attend, carry)

  n = tile.num_rows
  acc, m, l = lax.fori_loop(0, tile.count, body, (jnp.zeros(q.shape, jnp.float32),
                                                  jnp.full((n,), _NEG, jnp.float32),
                                                  jnp.zeros((n,), jnp.float32)))
  plgpu.store(o_ref.at[b, h, tile.rows, :],
              (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype),
              mask=tile.mine[:, None])
  plgpu.store(lse_ref.at[b, h, tile.rows],
              jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf), mask=tile.mine)


def token_rows(gp, tokens_per_program=1):
  """The rows a per-token program holds (16 at least: spare rows after the last token)."""
  return max(gp * tokens_per_program, _MIN_DOT)


def tokens_fwd(q, k, v, row_pos, selected=None, *, tokens, gp, block_k, window=None,
               tokens_per_program=1, num_warps=4, num_stages=2, interpret=False):
  """Per token over its key blocks: the selected branch (selected [batch, kv_heads, tokens,
  n_pad], block_k = select_block_len) or the window branch (window, any block_k), for
  `tokens_per_program` tokens a program (1: the group's rows padded to 16; 16 // gp: whole
  16-row tiles of several tokens, over the union of their blocks). q has at least token_rows
  - gp spare rows past tokens·gp; tokens_per_program divides tokens. (o, lse), rows layout."""
  b, kv, rows, d = q.shape
  kernel = functools.partial(_tokens_fwd_kernel, scale=d ** -0.5, gp=gp, tp=tokens_per_program,
                             block_k=block_k, window=window)
  args = (q, k, v, row_pos) + (() if window is not None else (selected,))
  out_shape = (jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((b, kv, rows), jnp.float32))
  name = 'nsa_slc_fwd' if window is None else 'nsa_win_fwd'
  return _call(kernel, (b, kv, tokens // tokens_per_program), out_shape, interpret, num_warps,
               num_stages, name)(*args)


def _tokens_dq_kernel(q_ref, k_ref, v_ref, pos_ref, do_ref, lse_ref, delta_ref, *refs, scale,
                      gp, tp, block_k, window):
  if window is None:
    sel_ref, dq_ref = refs
  else:
    (dq_ref,), sel_ref = refs, None
  b, h = pl.program_id(0), pl.program_id(1)
  tile = _TokenTile(pos_ref, sel_ref, b, h, gp=gp, tp=tp, block_k=block_k, window=window)
  q, do = q_ref[b, h, tile.rows, :], do_ref[b, h, tile.rows, :]
  lse, delta = lse_ref[b, h, tile.rows], delta_ref[b, h, tile.rows]

  def body(c, dq):
    blk, skip, rows = tile.block(c)

    def grad(dq):
      start = jnp.maximum(blk, 0) * block_k
      keys = _load_rows(k_ref, b, h, start, block_k, k_ref.shape[1])
      values = _load_rows(v_ref, b, h, start, block_k, v_ref.shape[1])
      mask = tile.mask(start + jnp.arange(block_k), rows)
      p = jnp.where(mask, jnp.exp(_dot(q, keys, trans_b=True) * scale - lse[:, None]), 0.0)
      ds = p * (_dot(do, values, trans_b=True) - delta[:, None])
      return dq + _dot(ds.astype(keys.dtype), keys)

    return grad(dq) if skip is None else lax.cond(skip, lambda d: d, grad, dq)

  dq = lax.fori_loop(0, tile.count, body, jnp.zeros(q.shape, jnp.float32))
  plgpu.store(dq_ref.at[b, h, tile.rows, :], (dq * scale).astype(dq_ref.dtype),
              mask=tile.mine[:, None])


def _tokens_dkv_kernel(q_ref, k_ref, v_ref, pos_ref, do_ref, lse_ref, delta_ref, *refs, scale,
                       gp, block_k, window, block_t, tokens):
  if window is None:
    sel_ref, dk_ref, dv_ref = refs
  else:
    (dk_ref, dv_ref), sel_ref = refs, None
  b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  keys = _load_rows(k_ref, b, h, j * block_k, block_k, k_ref.shape[1])
  values = _load_rows(v_ref, b, h, j * block_k, block_k, v_ref.shape[1])
  kpos = j * block_k + jnp.arange(block_k)
  block_r = block_t * gp
  # A whole sequence: token t is at position t. Tokens before the block cannot see it, nor, in
  # the window branch, tokens `window` or more past its last key.
  first_tile = j * block_k // block_t
  last = tokens if window is None else jnp.minimum(tokens, (j + 1) * block_k + window - 1)
  end_tile = pl.cdiv(last, block_t)

  def body(i, carry):
    if window is None:  # the tokens of this tile that selected block j
      sel = sel_ref[b, h, pl.ds(pl.multiple_of(i * block_t, block_t), block_t), :]
      hit = jnp.max(jnp.where(sel == j, 1, 0), axis=1)
    else:
      hit = jnp.ones((block_t,), jnp.int32)

    def tile(carry):
      dk, dv = carry
      rows = pl.ds(pl.multiple_of(i * block_r, block_r), block_r)
      q, do, pos = q_ref[b, h, rows, :], do_ref[b, h, rows, :], pos_ref[b, rows]
      lse, delta = lse_ref[b, h, rows], delta_ref[b, h, rows]
      hit_rows = jnp.broadcast_to(hit[:, None], (block_t, gp)).reshape(block_r)
      mask = (hit_rows > 0)[:, None] & (kpos[None, :] <= pos[:, None])
      if window is not None:
        mask &= kpos[None, :] > pos[:, None] - window
      p = jnp.where(mask, jnp.exp(_dot(q, keys, trans_b=True) * scale - lse[:, None]), 0.0)
      ds = p * (_dot(do, values, trans_b=True) - delta[:, None])
      return (dk + _dot(ds.astype(q.dtype), q, trans_a=True),
              dv + _dot(p.astype(do.dtype), do, trans_a=True))

    return lax.cond(jnp.max(hit) > 0, tile, lambda c: c, carry)

  zeros = jnp.zeros(keys.shape, jnp.float32)
  dk, dv = lax.fori_loop(first_tile, end_tile, body, (zeros, zeros))
  _store_rows(dk_ref, b, h, j * block_k, dk * scale, k_ref.shape[1])
  _store_rows(dv_ref, b, h, j * block_k, dv, v_ref.shape[1])


def tokens_bwd(q, k, v, row_pos, do, lse, delta, selected=None, *, gp, block_k, window=None,
               tokens, block_t=16, tokens_per_program=1, num_warps=4, num_stages=2,
               interpret=False):
  """(dq, dk, dv) of `tokens_fwd` over a whole sequence (token t at position t)."""
  b, kv, rows, d = q.shape
  extra = () if window is not None else (selected,)
  args = (q, k, v, row_pos, do, lse, delta) + extra
  kernel = functools.partial(_tokens_dq_kernel, scale=d ** -0.5, gp=gp, tp=tokens_per_program,
                             block_k=block_k, window=window)
  name = 'nsa_slc' if window is None else 'nsa_win'
  dq = _call(kernel, (b, kv, tokens // tokens_per_program),
             jax.ShapeDtypeStruct(q.shape, q.dtype), interpret, num_warps, num_stages,
             name + '_dq')(*args)
  kernel = functools.partial(_tokens_dkv_kernel, scale=d ** -0.5, gp=gp, block_k=block_k,
                             window=window, block_t=block_t, tokens=tokens)
  dk, dv = _call(kernel, (b, kv, pl.cdiv(k.shape[1], block_k)),
                 (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape,
                                                                               v.dtype)),
                 interpret, num_warps, num_stages, name + '_dkv')(*args)
  return dq, dk, dv

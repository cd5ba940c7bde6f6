"""The public NSA attention: `nsa_attention`, the three branches' outputs, differentiable over
whole sequences, with an `implementation` choice.

implementation:
  None         'triton' on an NVIDIA GPU when the shapes are supported (`unsupported` says why
               not), else 'reference'; with interpret=True, 'triton' in Pallas' interpreter.
  'triton'     the Pallas-Triton kernels (triton.py): an NVIDIA GPU, or anywhere with
               interpret=True. Not yet timed on a GPU: see kernels/nsa/__init__.py.
  'reference'  reference.py: each branch as a dense masked attention, O(q_len · k_len).

The kernels read the queries in a layout of their own (triton.py's docstring): regrouped per
K/V head, the group padded to a power of two. This module makes it and undoes it (a copy of the
queries and of each output; keys, values and caches are read where they are), and holds the
custom VJP.

Differentiation needs a whole sequence (q_positions=None: token t at position t, keys of the
same length). With explicit q_positions (decoding or chunked prefill over a cache) the kernels
run forward only.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.nsa import reference
from kernels.nsa import triton as triton_impl

IMPLEMENTATIONS = ('triton', 'reference')
# block_r: rows (tokens × padded group) per compressed-branch tile; block_c: compressed blocks
# per step; select_block_t / chunk: tokens per selection tile and selection blocks scored per
# step; window_block: keys per window-branch step; dkv_block_t: tokens per step of the key-
# gradient kernels; tokens_per_program: tokens a selected/window-branch program holds (1: a
# group's rows padded to 16; 16 // padded group: 16 rows of several tokens over the union of
# their blocks, for groups below 16; 'pack' picks that). Not tuned: no GPU has run them yet.
DEFAULT_TILING = dict(block_r=64, block_c=64, select_block_t=16, chunk=16, window_block=64,
                      dkv_block_t=16, tokens_per_program=1, num_warps=4, num_stages=2)
_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Spec:
  """The static part of a call: NSA's sizes, the tiling and the interpreter flag."""
  block_len: int
  stride: int
  select_block_len: int
  num_selected: int
  window: int
  group: int
  tiling: tuple
  interpret: bool

  @property
  def tiles(self) -> dict:
    return dict(self.tiling)

  @property
  def gp(self) -> int:  # the group padded to a power of two
    return pl.next_power_of_2(self.group)

  @property
  def back(self) -> int:
    """The selection kernel's look-back: compressed blocks before a chunk it reads for the ones
    that start there and reach into the chunk (block_len // stride - 1 of them; a tile of 16 at
    least, Triton's smallest dot)."""
    spill = self.block_len // self.stride - 1
    return 0 if spill == 0 else max(16, pl.next_power_of_2(spill))

  @property
  def tokens_per_program(self) -> int:
    tp = self.tiles['tokens_per_program']
    return max(1, 16 // self.gp) if tp == 'pack' else tp

  def token_multiple(self) -> int:
    t = self.tiles
    return max(max(1, t['block_r'] // self.gp), t['select_block_t'], t['dkv_block_t'],
               self.tokens_per_program)


def unsupported(q, k_blocks, k_slc, *, select_block_len: int, stride: int, window_block: int = 64,
                interpret: bool = False) -> str | None:
  """Why the Triton kernels cannot run these operands compiled (None if they can): Triton tiles
  are powers of two, dots at least 16 wide."""
  d = q.shape[-1]
  if jnp.dtype(q.dtype) not in map(jnp.dtype, _DTYPES):
    return f'dtype {q.dtype} (supported: bfloat16, float16, float32)'
  if len({jnp.dtype(q.dtype), jnp.dtype(k_blocks.dtype), jnp.dtype(k_slc.dtype)}) != 1:
    return 'queries, keys and compressed blocks of different dtypes'
  if interpret:
    return None
  def pow2(x):
    return x >= 16 and x & (x - 1) == 0
  if not pow2(d):
    return f'head_dim {d} (a power of two, at least 16)'
  if not pow2(select_block_len):
    return f'select_block_len {select_block_len} (a power of two, at least 16)'
  per = select_block_len // stride
  if per & (per - 1):
    return f'select_block_len / stride = {per} (a power of two)'
  if not pow2(window_block):
    return f'window_block {window_block} (a power of two, at least 16)'
  return None


def default_implementation(q, k_blocks, k_slc, *, select_block_len: int, stride: int,
                           window_block: int = 64, interpret: bool = False) -> str:
  """What implementation=None runs for these operands (arrays or jax.ShapeDtypeStructs) on
  this process's backend: 'triton' or 'reference'."""
  if interpret:
    return 'triton'
  on_gpu = jax.default_backend() == 'gpu' and 'NVIDIA' in jax.devices()[0].device_kind.upper()
  if on_gpu and unsupported(q, k_blocks, k_slc, select_block_len=select_block_len,
                            stride=stride, window_block=window_block) is None:
    return 'triton'
  return 'reference'


def nsa_attention(q, k_blocks, v_blocks, k_slc, v_slc, k_win, v_win, q_positions=None, *,
                  block_len: int, stride: int, select_block_len: int, num_selected: int,
                  window: int, implementation: str | None = None, interpret: bool = False,
                  tiling: dict | None = None, return_selected: bool = False):
  """NSA's three branch outputs (cmp, slc, win), each [batch, q_len, heads, head_dim]; shapes
  and semantics as reference.nsa_attention. With return_selected, also the selected blocks
  [batch, kv_heads, q_len, n] (the kernels' in no particular order, -1 in empty slots)."""
  sizes = dict(block_len=block_len, stride=stride, select_block_len=select_block_len,
               num_selected=num_selected, window=window)
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f'nsa_attention: unknown implementation {implementation!r}; valid: None, '
                     + ', '.join(map(repr, IMPLEMENTATIONS)))
  tiling = _checked_tiling(tiling)
  check = dict(select_block_len=select_block_len, stride=stride,
               window_block=tiling['window_block'], interpret=interpret)
  impl = implementation or default_implementation(q, k_blocks, k_slc, **check)
  if impl == 'reference':
    return reference.nsa_attention(q, k_blocks, v_blocks, k_slc, v_slc, k_win, v_win,
                                   q_positions, return_selected=return_selected, **sizes)
  why = unsupported(q, k_blocks, k_slc, **check)
  if why is not None:
    raise ValueError(f"nsa_attention: implementation 'triton' cannot run {why}; use "
                     "implementation=None (the reference here) or 'reference'")
  spec = Spec(group=q.shape[2] // k_slc.shape[2], tiling=tuple(sorted(tiling.items())),
              interpret=bool(interpret), **sizes)
  args = (q, k_blocks, v_blocks, k_slc, v_slc, k_win, v_win)
  if q_positions is None:
    outs, selected = _whole_sequence(spec, *args)
  else:
    outs, selected = _positioned(spec, jnp.asarray(q_positions, jnp.int32), *args)
  if return_selected:
    n = min(num_selected, reference.num_select_blocks(k_slc.shape[1], select_block_len))
    return outs, _selected_out(selected, q.shape[1], n)
  return outs


def _checked_tiling(tiling: dict | None) -> dict:
  """DEFAULT_TILING with `tiling`'s overrides, each a tile extent that is a power of two."""
  unknown = set(tiling or {}) - set(DEFAULT_TILING)
  if unknown:
    raise ValueError(f'nsa_attention: unknown tiling keys {sorted(unknown)}; valid: '
                     f'{sorted(DEFAULT_TILING)}')
  tiling = {**DEFAULT_TILING, **(tiling or {})}
  for key, value in tiling.items():
    if key in ('num_warps', 'num_stages') or (key == 'tokens_per_program' and value == 'pack'):
      continue
    if not isinstance(value, int) or value < 1 or value & (value - 1):
      raise ValueError(f'nsa_attention: tiling {key}={value!r} must be a power of two (Triton '
                       "tiles are)" + (", or 'pack'" if key == 'tokens_per_program' else ''))
  return tiling


def _selected_out(selected, q_len, n):
  """The kernel's slots, the real ones first: an unordered set per token, -1 padded to n."""
  ordered = -jnp.sort(-selected[:, :, :q_len, :], axis=-1)  # ids descending, -1 last
  return ordered[..., :n]


# ---------------------------------------------------------------------------------------------
# Layout.


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class _Layout:
  batch: int
  q_len: int
  tokens: int  # q_len padded
  kv: int
  group: int
  gp: int
  spare: int  # rows past tokens·gp for the per-token kernels' 16-row tiles
  dim: int

  def rows(self, x):
    """[batch, q_len, heads, dim] -> [batch, kv, tokens·gp + spare, dim]."""
    b, t, kv, g, gp = self.batch, self.q_len, self.kv, self.group, self.gp
    x = x.reshape(b, t, kv, g, self.dim)
    x = jnp.pad(x, ((0, 0), (0, self.tokens - t), (0, 0), (0, gp - g), (0, 0)))
    x = jnp.transpose(x, (0, 2, 1, 3, 4)).reshape(b, kv, self.tokens * gp, self.dim)
    return jnp.pad(x, ((0, 0), (0, 0), (0, self.spare), (0, 0)))

  def unrows(self, x):
    b, t, kv, g, gp = self.batch, self.q_len, self.kv, self.group, self.gp
    x = x[:, :, :self.tokens * gp].reshape(b, kv, self.tokens, gp, self.dim)[:, :, :t, :g]
    return jnp.transpose(x, (0, 2, 1, 3, 4)).reshape(b, t, kv * g, self.dim)

  def row_positions(self, q_positions):
    """Each row's position, -1 for padding rows: [batch, tokens·gp + spare]."""
    pos = jnp.pad(q_positions, ((0, 0), (0, self.tokens - self.q_len)), constant_values=-1)
    pos = jnp.where(jnp.arange(self.gp) < self.group, pos[:, :, None], -1)
    return jnp.pad(pos.reshape(self.batch, -1), ((0, 0), (0, self.spare)), constant_values=-1)


def _layout(spec: Spec, q) -> _Layout:
  b, t, h, d = q.shape
  gp = spec.gp
  return _Layout(batch=b, q_len=t, tokens=_round_up(t, spec.token_multiple()), kv=h // spec.group,
                 group=spec.group, gp=gp,
                 spare=triton_impl.token_rows(gp, spec.tokens_per_program) - gp, dim=d)


# ---------------------------------------------------------------------------------------------
# The kernels, forward and backward.


def _forward(spec: Spec, q_positions, q, k_blocks, v_blocks, k_slc, v_slc, k_win, v_win):
  t = spec.tiles
  lay = _layout(spec, q)
  num_cmp = k_blocks.shape[1]
  qr, pos = lay.rows(q), lay.row_positions(q_positions)
  common = dict(tokens=lay.tokens, gp=lay.gp, interpret=spec.interpret,
                num_warps=t['num_warps'], num_stages=t['num_stages'])
  o_cmp, lse_cmp = triton_impl.cmp_fwd(
      qr, k_blocks, v_blocks, pos, block_len=spec.block_len, stride=spec.stride,
      num_cmp=num_cmp, block_r=max(t['block_r'], lay.gp), block_c=t['block_c'], **common)
  selected = triton_impl.select(
      qr, k_blocks, pos, lse_cmp, block_len=spec.block_len, stride=spec.stride,
      select_block_len=spec.select_block_len, num_selected=spec.num_selected, num_cmp=num_cmp,
      back=spec.back, block_t=t['select_block_t'], chunk=t['chunk'], **common)
  tokens = dict(tokens_per_program=spec.tokens_per_program, **common)
  o_slc, lse_slc = triton_impl.tokens_fwd(qr, k_slc, v_slc, pos, selected,
                                          block_k=spec.select_block_len, **tokens)
  o_win, lse_win = triton_impl.tokens_fwd(qr, k_win, v_win, pos, block_k=t['window_block'],
                                          window=spec.window, **tokens)
  outs = tuple(lay.unrows(o) for o in (o_cmp, o_slc, o_win))
  residuals = (qr, pos, k_blocks, v_blocks, k_slc, v_slc, k_win, v_win, selected, o_cmp,
               lse_cmp, o_slc, lse_slc, o_win, lse_win)
  return (outs, selected), residuals


def _backward(spec: Spec, residuals, cotangents):
  t = spec.tiles
  (qr, pos, k_blocks, v_blocks, k_slc, v_slc, k_win, v_win, selected, o_cmp, lse_cmp, o_slc,
   lse_slc, o_win, lse_win) = residuals
  (do_cmp, do_slc, do_win), _ = cotangents
  lay = _layout(spec, do_cmp)  # the outputs' shape is the queries'
  common = dict(tokens=lay.tokens, gp=lay.gp, interpret=spec.interpret,
                num_warps=t['num_warps'], num_stages=t['num_stages'])

  def rows_and_delta(do, o):
    do = lay.rows(do.astype(qr.dtype))
    return do, jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)

  do, delta = rows_and_delta(do_cmp, o_cmp)
  dq_cmp, dkb, dvb = triton_impl.cmp_bwd(
      qr, k_blocks, v_blocks, pos, do, lse_cmp, delta, block_len=spec.block_len,
      stride=spec.stride, num_cmp=k_blocks.shape[1], block_r=max(t['block_r'], lay.gp),
      block_c=t['block_c'], **common)
  do, delta = rows_and_delta(do_slc, o_slc)
  tokens = dict(tokens_per_program=spec.tokens_per_program, block_t=t['dkv_block_t'], **common)
  dq_slc, dks, dvs = triton_impl.tokens_bwd(
      qr, k_slc, v_slc, pos, do, lse_slc, delta, selected, block_k=spec.select_block_len,
      **tokens)
  do, delta = rows_and_delta(do_win, o_win)
  dq_win, dkw, dvw = triton_impl.tokens_bwd(
      qr, k_win, v_win, pos, do, lse_win, delta, block_k=t['window_block'], window=spec.window,
      **tokens)
  dq = (dq_cmp.astype(jnp.float32) + dq_slc.astype(jnp.float32)
        + dq_win.astype(jnp.float32)).astype(qr.dtype)
  return lay.unrows(dq), dkb, dvb, dks, dvs, dkw, dvw


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _whole_sequence(spec, q, k_blocks, v_blocks, k_slc, v_slc, k_win, v_win):
  return _whole_sequence_fwd(spec, q, k_blocks, v_blocks, k_slc, v_slc, k_win, v_win)[0]


def _whole_sequence_fwd(spec, q, k_blocks, v_blocks, k_slc, v_slc, k_win, v_win):
  if k_slc.shape[1] != q.shape[1]:
    raise ValueError(f'nsa_attention: a whole sequence (q_positions=None) needs as many keys as '
                     f'queries, got {k_slc.shape[1]} and {q.shape[1]}')
  positions = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
  return _forward(spec, positions, q, k_blocks, v_blocks, k_slc, v_slc, k_win, v_win)


def _whole_sequence_bwd(spec, residuals, cotangents):
  return _backward(spec, residuals, cotangents)


_whole_sequence.defvjp(_whole_sequence_fwd, _whole_sequence_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _positioned(spec, q_positions, q, k_blocks, v_blocks, k_slc, v_slc, k_win, v_win):
  return _forward(spec, q_positions, q, k_blocks, v_blocks, k_slc, v_slc, k_win, v_win)[0]


def _positioned_fwd(spec, q_positions, *args):
  return _positioned(spec, q_positions, *args), None


def _positioned_bwd(spec, saved, cotangents):
  del spec, saved, cotangents
  raise NotImplementedError('nsa_attention: the kernels differentiate whole sequences only '
                            '(q_positions=None); with explicit q_positions use '
                            "implementation='reference'")


_positioned.defvjp(_positioned_fwd, _positioned_bwd)

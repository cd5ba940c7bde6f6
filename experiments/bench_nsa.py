"""Native sparse attention's kernels (kernels/nsa) against dense attention, at NSA's sizes.

Per shape, bf16, batch 1, NSA's sizes (block 32, stride 16, selection block 64, 16 selected,
window 512), heads as the NSA paper (64 query heads, 4 K/V heads, head_dim 128) or as the
study's 1.5B model (12 and 2):

  dense_cudnn      causal attention of the whole sequence through cuDNN (jax.nn.
                   dot_product_attention, GQA K/V): the baseline. Where cuDNN cannot run (a CPU)
                   `dense_xla` instead, and only where its [T, T] scores fit (--dense_max_len).
  ours             ops.nsa_attention(implementation='triton'): the three branches' outputs of
                   the whole sequence, forward and forward+backward (the gradient of
                   sum(outputs · fixed random cotangents) w.r.t. all seven operands).
  ours_<kernel>    each kernel call ops makes, alone, on the very operands it got inside that
                   run (cmp_fwd, select, slc_fwd, win_fwd, cmp_bwd, slc_bwd, win_bwd): the
                   calls are recorded while jax traces ops, so the rows follow whatever
                   arguments ops passes. The difference from `ours` is ops' copies of the
                   queries and outputs into and out of the kernels' row layout.
  window_cudnn     the window branch alone through cuDNN's sliding-window attention (GPU), beside
                   ours_win_fwd / ours_win_bwd: the choice between it and our window kernel.
  reference        reference.nsa_attention (dense masked, O(T²)) where it fits
                   (--reference_max_len).
  decode_*         one query at position T-1 over a cache of T keys: dense attention of it
                   (cuDNN and XLA; no mask needed) against ours, through ops (the kernels read
                   the caches where they are; the query is copied into the row layout) and as
                   its kernels alone (`decode_ours_kernels`).

Checked before anything is timed; a variant whose check fails is recorded as
'error': 'wrong: ...' and not timed, one that raises records the exception, one that would not
fit records 'skipped':
  forward   ours on the whole sequence, its last --check_queries queries (all with --quick)
            against reference.nsa_attention at those positions over all keys, in float32 from
            the same bf16 values. cmp and win: max |ours - ref| <= tolerance · max |ref|. The
            selection: no duplicate, no future block, and the kernels' set of blocks has the
            same total importance (Eq. 9-10, the reference's) as the reference's top-n to
            --importance_tolerance per token (sets that differ only by near-ties are right);
            slc against the reference's selected attention over the kernels' own selection.
  backward  per head configuration, at --bwd_check_len tokens: all seven gradients of ours
            against the reference's (its selection fixed to the kernels', as NSA does not
            differentiate it), max |ours - ref| <= tolerance · max |ref| each; at every shape,
            dq of the last --check_queries queries at full length (a query's dq depends on its
            own cotangents only). dense_cudnn likewise against float32 attention.
  kernels   each ours_<kernel> row's outputs against those of the same call inside the checked
            run (rows that hold no query are never written, so not compared).

Timing: after two warm-up calls, --rounds rounds of back-to-back calls synchronised once per
round (at least --repeats calls, more while a round is shorter than --min_round_s);
`*_ms` is the median per-call time over rounds, `*_ms_min`/`*_ms_max` the spread. bwd_ms =
fwd_bwd_ms - fwd_ms. Speed-ups are the dense baseline's time over the row's. `goals` holds
the NSA issue's targets where this shape measures them (forward >= 5x and backward >= 4x
faster than dense cuDNN at 64k, >= 2.5x / >= 1.7x at 16k, faster from 8k, decode >= 5x at
64k), null with a reason where it cannot (no cuDNN baseline, a failed row).

  python -m experiments.bench_nsa --out=FILE.json [--quick] [--shapes=1.5b_16k,paper_64k]
      [--families=dense,ours,branches,reference,decode] [--repeats=N] [--rounds=N]
      [--tiling=block_r=128,tokens_per_program=pack]

A shape is <heads>_<tokens>: heads one of HEADS (paper, 1.5b, quick), tokens an integer with an
optional k (x1024), e.g. 1.5b_2k.
"""

import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.errors import rel_err
from kernels.nsa import ops, reference
from kernels.nsa import triton as triton_impl

NSA_SIZES = dict(block_len=32, stride=16, select_block_len=64, num_selected=16, window=512)
# (query heads, K/V heads, head_dim, NSA sizes). The quick sizes are the smallest the compiled
# kernels take (head_dim and select_block_len powers of two >= 16), so --quick on a GPU is a
# compile check too; 128 tokens make 8 selection blocks, of which 5 are chosen (3 forced).
HEADS = {
    'paper': (64, 4, 128, NSA_SIZES),
    '1.5b': (12, 2, 128, NSA_SIZES),
    'quick': (6, 1, 16, dict(block_len=8, stride=4, select_block_len=16, num_selected=5,
                             window=32)),
}
# Most important first: a device call cut short keeps these.
DEFAULT_SHAPES = ['1.5b_16k', 'paper_64k', '1.5b_8k', '1.5b_32k', '1.5b_64k']
QUICK_SHAPES = ['quick_128']
FAMILIES = ('dense', 'ours', 'branches', 'reference', 'decode')
# The kernels ops calls (triton.py's public functions), recorded by `capture`.
KERNELS = ('cmp_fwd', 'select', 'tokens_fwd', 'cmp_bwd', 'tokens_bwd')
# The NSA issue's targets: (tokens, forward speed-up, backward speed-up).
GOALS = ((65536, 5.0, 4.0), (16384, 2.5, 1.7))
DECODE_GOAL = (65536, 5.0)
FASTER_FROM = 8192

_OUT = flags.DEFINE_string('out', None, 'write results here as JSON (after every row)')
_QUICK = flags.DEFINE_bool('quick', False, f'the shapes {QUICK_SHAPES}: a check of the script '
                           'on any backend (interpreted kernels off a GPU)')
_SHAPES = flags.DEFINE_list('shapes', None, f'<heads>_<tokens> (heads: {", ".join(HEADS)}); '
                            f'default {DEFAULT_SHAPES}, with --quick {QUICK_SHAPES}')
_FAMILIES = flags.DEFINE_list('families', list(FAMILIES), f'variant families: {FAMILIES}')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'at least this many timed calls per round')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'timed rounds per variant (median and spread)')
_MIN_ROUND_S = flags.DEFINE_float('min_round_s', 0.05, 'more calls per round for fast calls, '
                                  'up to this many seconds (dispatch would dominate otherwise)')
_CHECK_QUERIES = flags.DEFINE_integer('check_queries', 128, 'last queries checked against the '
                                      'reference at full length (--quick: all)')
_BWD_CHECK_LEN = flags.DEFINE_integer('bwd_check_len', 2048, 'tokens of the gradient check, once '
                                      'per head configuration')
_TOLERANCE = flags.DEFINE_float('tolerance', 2e-2, 'max |ours - ref| / max |ref| per output and '
                                'gradient (bf16 operands and outputs, float32 reference)')
_IMPORTANCE_TOLERANCE = flags.DEFINE_float(
    'importance_tolerance', 1e-3, "per token: |importance of the kernels' selected set - the "
    "reference's| / the reference's")
_REFERENCE_MAX_LEN = flags.DEFINE_integer('reference_max_len', None, 'time the reference up to '
                                          'this length (default 8192 on a GPU, the --quick '
                                          'shapes only elsewhere)')
_DENSE_MAX_LEN = flags.DEFINE_integer('dense_max_len', None, "dense_xla (materialised [T, T] "
                                      "scores) only up to this length (default as "
                                      "--reference_max_len)")
_TILING = flags.DEFINE_list('tiling', None, 'key=value overrides of ops.DEFAULT_TILING')


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  heads_name: str
  tokens: int
  heads: int
  kv_heads: int
  head_dim: int
  sizes: dict
  batch: int = 1

  @property
  def num_blocks(self) -> int:
    return reference.num_blocks(self.tokens, self.sizes['block_len'], self.sizes['stride'])

  @property
  def sizes_items(self) -> tuple:  # hashable, for static jit arguments
    return tuple(sorted(self.sizes.items()))


def parse_shape(name: str) -> Shape:
  heads_name, _, tokens = name.rpartition('_')
  if heads_name not in HEADS:
    raise app.UsageError(f'shape {name!r}: heads {heads_name!r} unknown; valid: {list(HEADS)}')
  try:
    t = int(tokens[:-1]) * 1024 if tokens.endswith('k') else int(tokens)
  except ValueError:
    raise app.UsageError(f'shape {name!r}: tokens {tokens!r} is not N or Nk') from None
  h, kv, d, sizes = HEADS[heads_name]
  return Shape(name, heads_name, t, h, kv, d, sizes)


# ---------------------------------------------------------------------------------------------
# Measuring.


class _Wrong(Exception):
  """A check failed: the variant is not timed."""


class _Skip(Exception):
  """The variant would not fit (or is not meant to run here): recorded, not an error."""


def within(errs) -> bool:
  """Every error within the tolerance (nan is not)."""
  return all(e <= _TOLERANCE.value for e in errs)


def timed(fn, *args) -> dict:
  """Milliseconds per call: median over rounds of back-to-back calls, and the spread."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  single = time.perf_counter() - start
  calls = max(_REPEATS.value, min(1000, math.ceil(_MIN_ROUND_S.value / max(single, 1e-9))))
  per_call = []
  for _ in range(_ROUNDS.value):
    start = time.perf_counter()
    out = None
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - start) / calls * 1e3)
  return {'ms': statistics.median(per_call), 'ms_min': min(per_call), 'ms_max': max(per_call),
          'calls': calls * _ROUNDS.value}


def put_timing(entry: dict, prefix: str, t: dict) -> None:
  entry[f'{prefix}_ms'] = t['ms']
  entry[f'{prefix}_ms_min'] = t['ms_min']
  entry[f'{prefix}_ms_max'] = t['ms_max']
  entry[f'{prefix}_calls'] = t['calls']


# ---------------------------------------------------------------------------------------------
# The kernels' calls inside ops, recorded.


@dataclasses.dataclass(frozen=True)
class KernelCall:
  """One call ops made to a kernel: which, with what keywords, and where its positional operands
  and outputs sit in the captured values."""
  name: str  # cmp_fwd, select, slc_fwd, win_fwd, cmp_bwd, slc_bwd, win_bwd
  kernel: str  # the function in kernels/nsa/triton.py
  kwargs: dict
  operands: tuple  # indices into the captured values
  outputs: tuple  # indices into the captured values (the output's leaves)
  treedef: object

  def fn(self):
    return functools.partial(getattr(triton_impl, self.kernel), **self.kwargs)


def _call_name(kernel: str, kwargs: dict) -> str:
  if kernel.startswith('tokens_'):
    return ('slc_' if kwargs.get('window') is None else 'win_') + kernel.split('_', 1)[1]
  return kernel


def capture(fn, *args, forward_only: bool = False):
  """jit(fn)(*args), recording every kernel call ops makes while jax traces it: (fn's output,
  [KernelCall], the values of all those calls' operands and outputs, each array once).

  A custom_vjp's primal is traced as a jaxpr of its own, whose values cannot leave it; under
  differentiation its forward rule runs in the caller's trace instead. So fn differentiates
  ops (outs_and_grads), or, with forward_only, ops' custom_vjp functions run as their plain
  primal functions while this traces (what a forward-only call computes anyway)."""
  calls = []
  primal = {name: f for name, f in vars(ops).items() if isinstance(f, jax.custom_vjp)}

  def traced(*a):
    values, index = [], {}  # tracers, and id(tracer) -> position

    def at(x):
      if id(x) not in index:
        index[id(x)] = len(values)
        values.append(x)
      return index[id(x)]

    originals = {name: getattr(triton_impl, name) for name in KERNELS}

    def recording(name):
      def call(*operands, **kwargs):
        out = originals[name](*operands, **kwargs)
        leaves, treedef = jax.tree.flatten(out)
        calls.append(KernelCall(_call_name(name, kwargs), name, kwargs,
                                tuple(at(x) for x in operands), tuple(at(x) for x in leaves),
                                treedef))
        return out
      return call

    try:
      for name in KERNELS:
        setattr(triton_impl, name, recording(name))
      if forward_only:
        for name, f in primal.items():
          setattr(ops, name, f.fun)
      out = fn(*a)
    finally:
      for name, f in originals.items():
        setattr(triton_impl, name, f)
      for name, f in primal.items():
        setattr(ops, name, f)
    return out, values

  out, values = jax.jit(traced)(*args)
  if not calls:
    raise RuntimeError('no kernel call was recorded: ops no longer calls kernels/nsa/triton.py '
                       f'through {KERNELS}?')
  return out, calls, values


def replay(calls) -> tuple:
  """A function of the values no recorded call produced (the operands ops laid out) running the
  calls in order, each later call reading earlier outputs: (function, those inputs' indices)."""
  produced = {i for c in calls for i in c.outputs}
  inputs = sorted({i for c in calls for i in c.operands} - produced)

  def run(*xs):
    env = dict(zip(inputs, xs))
    for c in calls:
      out = c.fn()(*(env[i] for i in c.operands))
      env.update(zip(c.outputs, jax.tree.leaves(out)))
    return tuple(env[i] for c in calls for i in c.outputs)

  return run, inputs


def row_positions(call: KernelCall, values):
  """The call's row_pos operand ([batch, rows] int32, -1 where a row holds no query)."""
  for i in call.operands:
    x = values[i]
    if x.ndim == 2 and x.dtype == jnp.int32:
      return x
  raise ValueError(f'{call.name}: no row_pos operand')


def output_err(got, want, pos) -> float:
  """rel_err of one kernel output against the same call's inside ops. Outputs in the rows
  layout (o, dq [b, kv, rows, d]; lse [b, kv, rows]) are compared on rows that hold a query:
  the others are never written. Rows that see no key hold lse = +inf in both."""
  if jnp.issubdtype(got.dtype, jnp.integer):
    return float(jnp.mean(jnp.any(jnp.sort(got, -1) != jnp.sort(want, -1), axis=-1)))
  if got.ndim < 3 or got.shape[2] != pos.shape[1]:
    return rel_err(got, want)  # key gradients: every row written
  mask = pos >= 0
  mask = mask[:, None, :, None] if got.ndim == 4 else mask[:, None, :]
  if not bool(jnp.all(jnp.where(mask & jnp.isinf(want), got == want, True))):
    return float('inf')
  mask &= jnp.isfinite(want)
  return rel_err(jnp.where(mask, got, 0), jnp.where(mask, want, 0))


# ---------------------------------------------------------------------------------------------
# The functions measured, and their references.


def sum_loss(outs, cts):
  return sum(jnp.sum(o.astype(jnp.float32) * c.astype(jnp.float32)) for o, c in zip(outs, cts))


def ours_fn(shape: Shape, interpret: bool, tiling: dict):
  return functools.partial(ops.nsa_attention, implementation='triton', interpret=interpret,
                           tiling=tiling, **shape.sizes)


def outs_and_grads(ours):
  """(outputs, gradients w.r.t. all seven operands given the outputs' cotangents)."""
  def f(*a):
    outs, vjp = jax.vjp(ours, *a[:7])
    return outs, vjp(a[7])
  return f


def dense(q, k, v, impl, *, causal):
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)


def reference_parts(q, k_blocks, v_blocks, k_slc, v_slc, k_win, v_win, positions, selected, *,
                    sizes):
  """The three branches with the selection given (the kernels'): what the gradients and the
  slc output are checked against. NSA does not differentiate the selection, so fixing it
  changes no gradient."""
  o_cmp = reference.compressed_attention(q, k_blocks, v_blocks, positions,
                                         block_len=sizes['block_len'], stride=sizes['stride'])[0]
  o_slc = reference.selected_attention(q, k_slc, v_slc, selected, positions,
                                       select_block_len=sizes['select_block_len'])
  o_win = reference.window_attention(q, k_win, v_win, positions, window=sizes['window'])
  return o_cmp, o_slc, o_win


@functools.partial(jax.jit, static_argnames=('sizes_items',))
def _reference_forward(q, keys, positions, selected, *, sizes_items):
  sizes = dict(sizes_items)
  outs, ref_selected = reference.nsa_attention(q, *keys, positions, return_selected=True,
                                               **sizes)
  o_slc_given = reference.selected_attention(q, keys[2], keys[3], selected, positions,
                                             select_block_len=sizes['select_block_len'])
  _, p_cmp = reference.compressed_attention(q, keys[0], keys[1], positions,
                                            block_len=sizes['block_len'], stride=sizes['stride'])
  num_slc = reference.num_select_blocks(keys[2].shape[1], sizes['select_block_len'])
  weights = reference.selection_weights(p_cmp.shape[-1], num_slc, sizes['block_len'],
                                        sizes['stride'], sizes['select_block_len'])
  importance = reference.block_importance(p_cmp, weights)
  return outs, o_slc_given, ref_selected, importance


@functools.partial(jax.jit, static_argnames=('select_block_len',))
def _selection_stats(selected, ref_selected, importance, positions, *, select_block_len):
  """selected: the kernels' [b, kv, q, n] (ids descending, -1 last); ref_selected the
  reference's. (tokens whose sets differ, duplicates, future blocks, worst importance gap)."""
  ref_sorted = -jnp.sort(-ref_selected, axis=-1)
  mismatch = jnp.sum(jnp.any(selected != ref_sorted, axis=-1))
  duplicates = jnp.sum((selected[..., 1:] == selected[..., :-1]) & (selected[..., 1:] >= 0))
  future = jnp.sum(selected > (positions // select_block_len)[:, None, :, None])

  def total(sel):
    got = jnp.take_along_axis(importance, jnp.maximum(sel, 0), axis=-1)
    return jnp.sum(jnp.where(sel >= 0, got, 0.0), axis=-1)

  diff, want = jnp.abs(total(selected) - total(ref_sorted)), total(ref_sorted)
  gap = jnp.where(diff == 0, 0.0, diff / jnp.maximum(want, 1e-30))
  return mismatch, duplicates, future, jnp.max(gap)


def check_forward(shape: Shape, outs, selected, q_sub, positions, keys_f32) -> dict:
  """outs: ours [b, C, h, d] for the queries at `positions` [b, C]; selected: the kernels'
  [b, kv, C, n]. Against the reference in float32."""
  ref_outs, slc_given, ref_selected, importance = _reference_forward(
      q_sub.astype(jnp.float32), keys_f32, positions, selected, sizes_items=shape.sizes_items)
  errs = {'cmp': rel_err(outs[0], ref_outs[0]), 'slc': rel_err(outs[1], slc_given),
          'win': rel_err(outs[2], ref_outs[2])}
  mismatch, duplicates, future, gap = (
      float(x) for x in _selection_stats(selected, ref_selected, importance, positions,
                                         select_block_len=shape.sizes['select_block_len']))
  passed = {name: err <= _TOLERANCE.value for name, err in errs.items()}
  passed['select'] = duplicates == 0 and future == 0 and gap <= _IMPORTANCE_TOLERANCE.value
  return {
      'queries': int(positions.shape[1]),
      'max_rel_err': errs,
      # Information: slc against the reference's own selection (differs where the sets do).
      'slc_rel_err_vs_reference_selection': rel_err(outs[1], ref_outs[1]),
      'selection': {'tokens_differing_from_reference': int(mismatch),
                    'token_groups': int(np.prod(selected.shape[:3])),
                    'duplicates': int(duplicates), 'future_blocks': int(future),
                    'max_importance_gap': gap},
      'tolerance': _TOLERANCE.value, 'importance_tolerance': _IMPORTANCE_TOLERANCE.value,
      'passed': passed,
  }


def kernel_selection(calls, values, shape: Shape, q_len: int, k_len: int):
  """The select kernel's slots ([b, kv, tokens, n_pad] ids in no order, -1 empty) ->
  [b, kv, q_len, n], ids descending, -1 last."""
  [call] = [c for c in calls if c.name == 'select']
  slots = values[call.outputs[0]]
  n = min(shape.sizes['num_selected'],
          reference.num_select_blocks(k_len, shape.sizes['select_block_len']))
  return (-jnp.sort(-slots[:, :, :q_len], axis=-1))[..., :n]


@jax.jit
def _attend(q, k, v, mask):
  return reference.attend(q, k, v, mask)[0]


@jax.jit
def _dense_reference_grads(q, k, v, ct):
  t = q.shape[1]
  mask = (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None, None]
  return jax.grad(lambda q, k, v: jnp.sum(reference.attend(q, k, v, mask)[0] * ct),
                  argnums=(0, 1, 2))(q, k, v)


@functools.partial(jax.jit, static_argnames=('sizes_items',))
def _reference_grads(args, positions, selected, cts, *, sizes_items):
  sizes = dict(sizes_items)
  loss = lambda *a: sum_loss(reference_parts(*a, positions, selected, sizes=sizes), cts)
  return jax.grad(loss, argnums=tuple(range(7)))(*args)


@functools.partial(jax.jit, static_argnames=('sizes_items',))
def _reference_dq(q, keys, positions, selected, cts, *, sizes_items):
  sizes = dict(sizes_items)
  return jax.grad(lambda q: sum_loss(reference_parts(q, *keys, positions, selected,
                                                     sizes=sizes), cts))(q)


# ---------------------------------------------------------------------------------------------
# One shape.


def make_inputs(shape: Shape):
  """The seven operands and three cotangents, bf16 normal, drawn on the device."""
  b, t, h, kv, d = shape.batch, shape.tokens, shape.heads, shape.kv_heads, shape.head_dim
  keys = jax.random.split(jax.random.key(shape.tokens * 1000 + shape.heads), 10)

  def draw(i, dims):
    return jax.random.normal(keys[i], dims, jnp.bfloat16)

  args = (draw(0, (b, t, h, d)), draw(1, (b, shape.num_blocks, kv, d)),
          draw(2, (b, shape.num_blocks, kv, d)), *(draw(3 + i, (b, t, kv, d)) for i in range(4)))
  cts = tuple(draw(7 + i, (b, t, h, d)) for i in range(3))
  return args, cts


def _fits_dense(shape: Shape, max_len: int | None, flag: str) -> str | None:
  """Why an O(T^2)-memory variant is not run at this shape, or None."""
  if max_len is None:
    return f'off a GPU only with --quick (set --{flag} to run it)'
  if shape.tokens > max_len:
    return f'{shape.tokens} tokens > --{flag}={max_len}: its [T, T] scores would not fit'
  return None


class ShapeRun:
  """The checks and variants of one shape; rows go into `run` as they finish."""

  def __init__(self, shape: Shape, run: dict, write, interpret: bool, tiling: dict,
               families: list, bwd_checks: dict):
    self.shape, self.run, self.write = shape, run, write
    self.interpret, self.tiling, self.families = interpret, tiling, families
    self.bwd_checks = bwd_checks  # per head configuration, shared across shapes
    self.on_gpu = jax.default_backend() == 'gpu'
    self.args, self.cts = make_inputs(shape)
    self.positions = jnp.broadcast_to(jnp.arange(shape.tokens, dtype=jnp.int32),
                                      (shape.batch, shape.tokens))
    c = shape.tokens if _QUICK.value else min(_CHECK_QUERIES.value, shape.tokens)
    self.sub = slice(shape.tokens - c, shape.tokens)
    self.ours = ours_fn(shape, interpret, tiling)
    self.checks = run['checks']
    self.dense_name = None  # the dense baseline that ran
    self.captured = None  # (calls, values) of the checked whole-sequence run

  # -- bookkeeping

  def row(self, name: str, body) -> dict:
    entry = {}
    start = time.perf_counter()
    try:
      body(entry)
    except _Wrong as e:
      entry['error'] = f'wrong: {e}'
    except _Skip as e:
      entry['skipped'] = str(e)
    except Exception as e:  # pylint: disable=broad-except
      entry['error'] = f'{type(e).__name__}: {str(e)[:600]}'
      entry['traceback_tail'] = traceback.format_exc()[-1200:]
    entry['row_s'] = time.perf_counter() - start
    self.add_speedups(name, entry)
    self.run['variants'][name] = entry
    print(self.shape.name, name, {k: (round(v, 4) if isinstance(v, float) else v)
                                  for k, v in entry.items() if k != 'traceback_tail'},
          flush=True)
    self.write()
    return entry

  def check(self, name: str, body, into: dict | None = None) -> None:
    entry = {} if into is None else into
    start = time.perf_counter()
    try:
      body(entry)
    except Exception as e:  # pylint: disable=broad-except
      entry['error'] = f'{type(e).__name__}: {str(e)[:600]}'
      entry['traceback_tail'] = traceback.format_exc()[-1200:]
    entry['check_s'] = time.perf_counter() - start
    self.checks[name] = entry
    print(self.shape.name, 'check', name, {k: v for k, v in entry.items()
                                           if k != 'traceback_tail'}, flush=True)
    self.write()

  def add_speedups(self, name: str, entry: dict) -> None:
    base = self.run['variants'].get(self.dense_name) if self.dense_name else None
    if not base or name.startswith('decode') or name == self.dense_name:
      return
    for key in ('fwd', 'bwd', 'fwd_bwd'):
      if f'{key}_ms' in entry and f'{key}_ms' in base:
        entry[f'{key}_speedup_vs_dense'] = base[f'{key}_ms'] / entry[f'{key}_ms']
    entry['dense_baseline'] = self.dense_name

  def gate(self, name: str, parts=None) -> None:
    """Raises _Wrong unless check `name` ran and passed (only `parts` of it, if given)."""
    check = self.checks.get(name)
    if check is None:
      raise _Wrong(f'check {name!r} did not run')
    if 'error' in check:
      raise _Wrong(f'check {name!r} raised: {check["error"][:200]}')
    passed = check.get('passed', {})
    failed = [k for k in (parts or passed) if not passed.get(k, False)]
    if failed:
      raise _Wrong(f'check {name!r} failed for {failed}')

  def max_len(self, flag_value: int | None) -> int | None:
    """The longest sequence an O(T^2) variant runs at: 8192 on a GPU, the --quick shapes only
    elsewhere (the flag overrides both)."""
    if flag_value is not None:
      return flag_value
    return 8192 if self.on_gpu else (self.shape.tokens if _QUICK.value else None)

  def keys_f32(self):
    return tuple(a.astype(jnp.float32) for a in self.args[1:])

  # -- checks

  def run_checks(self, fwd, fwd_bwd) -> None:
    shape = self.shape
    q_positions = self.positions[:, self.sub]

    def forward(check):
      # The kernels' calls recorded inside a forward+backward run: their selection is checked
      # here, and the ours_<kernel> rows replay them.
      (outs, _), calls, values = capture(outs_and_grads(self.ours), *self.args, self.cts)
      self.captured = calls, values
      selected = kernel_selection(calls, values, shape, shape.tokens, shape.tokens)
      check.update(check_forward(shape, tuple(o[:, self.sub] for o in outs),
                                 selected[:, :, self.sub], self.args[0][:, self.sub],
                                 q_positions, self.keys_f32()))
      check['kernel_calls'] = [c.name for c in calls]
      # The timed function is the same ops call without the backward.
      errs = [rel_err(a, b) for a, b in zip(fwd(*self.args), outs)]
      check['rel_err_timed_vs_checked'] = errs
      check['passed']['timed_same_as_checked'] = within(errs)

    def dq_full(check):
      _, grads = fwd_bwd(*self.args, self.cts)
      calls, values = self.captured
      selected = kernel_selection(calls, values, shape, shape.tokens, shape.tokens)
      cts_sub = tuple(c[:, self.sub].astype(jnp.float32) for c in self.cts)
      want = _reference_dq(self.args[0][:, self.sub].astype(jnp.float32), self.keys_f32(),
                           q_positions, selected[:, :, self.sub], cts_sub,
                           sizes_items=shape.sizes_items)
      check['queries'] = int(q_positions.shape[1])
      check['max_rel_err'] = {'dq': rel_err(grads[0][:, self.sub], want)}
      check['tolerance'] = _TOLERANCE.value
      check['passed'] = {'dq': check['max_rel_err']['dq'] <= _TOLERANCE.value}

    self.check('forward', forward)
    if self.captured is not None:
      self.check('dq_full_length', dq_full)
    key = f'{shape.heads_name} {shape.heads}/{shape.kv_heads}x{shape.head_dim}'
    if key not in self.bwd_checks:
      self.bwd_checks[key] = {}
      self.check('backward', self.backward_check, into=self.bwd_checks[key])
    self.checks['backward'] = self.bwd_checks[key]
    self.write()

  def backward_check(self, check: dict) -> None:
    """All seven gradients at a reduced length against the reference's (and dense cuDNN's
    against float32 attention's)."""
    shape = self.shape
    length = min(shape.tokens, _BWD_CHECK_LEN.value)
    nb = reference.num_blocks(length, shape.sizes['block_len'], shape.sizes['stride'])
    args = (self.args[0][:, :length], self.args[1][:, :nb], self.args[2][:, :nb],
            *(a[:, :length] for a in self.args[3:]))
    cts = tuple(c[:, :length] for c in self.cts)
    check.update(at_shape=shape.name, tokens=length, tolerance=_TOLERANCE.value)
    (_, grads), calls, values = capture(outs_and_grads(self.ours), *args, cts)
    selected = kernel_selection(calls, values, shape, length, length)
    del calls, values
    want = _reference_grads(tuple(a.astype(jnp.float32) for a in args),
                            self.positions[:, :length], selected,
                            tuple(c.astype(jnp.float32) for c in cts),
                            sizes_items=shape.sizes_items)
    names = ('dq', 'dk_blocks', 'dv_blocks', 'dk_slc', 'dv_slc', 'dk_win', 'dv_win')
    check['max_rel_err'] = {n: rel_err(g, w) for n, g, w in zip(names, grads, want)}
    check['passed'] = {n: e <= _TOLERANCE.value for n, e in check['max_rel_err'].items()}
    if self.on_gpu and 'dense' in self.families:
      try:
        got = jax.jit(jax.grad(lambda q, k, v, c: jnp.sum(
            dense(q, k, v, 'cudnn', causal=True).astype(jnp.float32) * c.astype(jnp.float32)),
            argnums=(0, 1, 2)))(args[0], args[3], args[4], cts[0])
        want = _dense_reference_grads(*(x.astype(jnp.float32)
                                        for x in (args[0], args[3], args[4], cts[0])))
        errs = {n: rel_err(g, w) for n, g, w in zip(('dq', 'dk', 'dv'), got, want)}
        check['dense_cudnn'] = {'max_rel_err': errs, 'passed': within(errs.values())}
      except Exception as e:  # pylint: disable=broad-except
        check['dense_cudnn'] = {'error': f'{type(e).__name__}: {str(e)[:400]}'}

  # -- variants

  def bench(self) -> None:
    fwd = jax.jit(self.ours)
    fwd_bwd = jax.jit(jax.value_and_grad(lambda *a: sum_loss(self.ours(*a[:7]), a[7]),
                                         argnums=tuple(range(7))))
    if {'ours', 'branches'} & set(self.families):
      self.run_checks(fwd, fwd_bwd)
    if 'dense' in self.families:
      self.bench_dense()
    if 'ours' in self.families:
      self.row('ours', lambda entry: self.bench_ours(entry, fwd, fwd_bwd))
    if 'branches' in self.families:
      self.bench_kernels()
    self.captured = None  # frees the recorded operands
    if 'reference' in self.families:
      self.row('reference', self.bench_reference)
    if 'decode' in self.families:
      self.bench_decode()
    self.run['goals'] = goals(self.shape, self.run['variants'])
    self.write()

  def bench_dense(self) -> None:
    q, k, v = self.args[0], self.args[3], self.args[4]
    q_positions = self.positions[:, self.sub]

    def body(impl):
      def run(entry):
        if impl == 'xla':
          why = _fits_dense(self.shape, self.max_len(_DENSE_MAX_LEN.value), 'dense_max_len')
          if why:
            raise _Skip(why)
        entry['implementation'] = impl
        fwd = jax.jit(lambda q, k, v: dense(q, k, v, impl, causal=True))
        got = fwd(q, k, v)[:, self.sub]
        mask = (jnp.arange(self.shape.tokens)[None, :] <= q_positions[0][:, None])[None, None]
        want = _attend(q[:, self.sub].astype(jnp.float32), k.astype(jnp.float32),
                       v.astype(jnp.float32), mask)
        entry['max_rel_err'] = rel_err(got, want)
        if not entry['max_rel_err'] <= _TOLERANCE.value:
          raise _Wrong(f'forward rel err {entry["max_rel_err"]:.3g}')
        if impl == 'cudnn':
          entry['backward_check'] = self.checks.get('backward', {}).get('dense_cudnn')
          if entry['backward_check'] and not entry['backward_check'].get('passed'):
            raise _Wrong(f'backward: {entry["backward_check"]}')
        grad = jax.jit(jax.value_and_grad(
            lambda q, k, v, c: jnp.sum(dense(q, k, v, impl, causal=True).astype(jnp.float32)
                                       * c.astype(jnp.float32)), argnums=(0, 1, 2)))
        put_timing(entry, 'fwd', timed(fwd, q, k, v))
        put_timing(entry, 'fwd_bwd', timed(grad, q, k, v, self.cts[0]))
        entry['bwd_ms'] = entry['fwd_bwd_ms'] - entry['fwd_ms']
      return run

    def window(entry):
      # The window branch through cuDNN's sliding window, (w - 1, 0) around each query: what
      # decides between it and ours_win_fwd / ours_win_bwd (kernels/nsa's own window kernel).
      w = self.shape.sizes['window']
      kw, vw = self.args[5], self.args[6]

      def attend(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(w - 1, 0),
                                            implementation='cudnn')

      fwd = jax.jit(attend)
      got = fwd(q, kw, vw)[:, self.sub]
      keys = jnp.arange(self.shape.tokens)[None, :]
      qp = q_positions[0][:, None]
      mask = ((keys <= qp) & (keys > qp - w))[None, None]
      want = _attend(q[:, self.sub].astype(jnp.float32), kw.astype(jnp.float32),
                     vw.astype(jnp.float32), mask)
      entry['max_rel_err'] = rel_err(got, want)
      if not entry['max_rel_err'] <= _TOLERANCE.value:
        raise _Wrong(f'forward rel err {entry["max_rel_err"]:.3g}')
      grad = jax.jit(jax.value_and_grad(
          lambda q, k, v, c: jnp.sum(attend(q, k, v).astype(jnp.float32) * c.astype(jnp.float32)),
          argnums=(0, 1, 2)))
      put_timing(entry, 'fwd', timed(fwd, q, kw, vw))
      put_timing(entry, 'fwd_bwd', timed(grad, q, kw, vw, self.cts[2]))
      entry['bwd_ms'] = entry['fwd_bwd_ms'] - entry['fwd_ms']
      entry['note'] = ('the window branch alone through cuDNN: compare ours_win_fwd and '
                       'ours_win_bwd (its backward is not checked here)')

    if self.on_gpu:
      self.row('window_cudnn', window)
      if 'fwd_ms' in self.row('dense_cudnn', body('cudnn')):
        self.dense_name = 'dense_cudnn'
        return
    if 'fwd_ms' in self.row('dense_xla', body('xla')):
      self.dense_name = 'dense_xla'

  def bench_ours(self, entry, fwd, fwd_bwd) -> None:
    self.gate('forward')
    put_timing(entry, 'fwd', timed(fwd, *self.args))
    self.gate('dq_full_length')
    self.gate('backward')
    put_timing(entry, 'fwd_bwd', timed(fwd_bwd, *self.args, self.cts))
    entry['bwd_ms'] = entry['fwd_bwd_ms'] - entry['fwd_ms']

  def bench_kernels(self) -> None:
    """Each recorded kernel call alone, on the operands it got in the checked run."""
    if self.captured is None:
      self.row('ours_kernels', lambda e: self.gate('forward'))
      return
    calls, values = self.captured
    # What each kernel's output is checked by: the forward branches by their part of the
    # forward check, the selection by its, the backward kernels by the gradient checks.
    gates = {'cmp_fwd': ('forward', ['cmp']), 'select': ('forward', ['select']),
             'slc_fwd': ('forward', ['slc']), 'win_fwd': ('forward', ['win'])}
    seen = set()
    for call in calls:
      name = f'ours_{call.name}'
      while name in seen:
        name += "'"
      seen.add(name)

      def body(entry, call=call):
        if call.name in gates:
          self.gate(*gates[call.name])
        else:
          self.gate('backward')
          self.gate('dq_full_length')
        f = jax.jit(call.fn())
        operands = tuple(values[i] for i in call.operands)
        pos = row_positions(call, values)
        got = jax.tree.leaves(f(*operands))
        errs = [output_err(g, values[i], pos) for g, i in zip(got, call.outputs)]
        entry['rel_err_vs_checked_run'] = errs
        if not within(errs):
          raise _Wrong(f'differs from the same call in the checked run: {errs}')
        put_timing(entry, 'bwd' if call.name.endswith('bwd') else 'fwd', timed(f, *operands))

      self.row(name, body)

  def bench_reference(self, entry) -> None:
    why = _fits_dense(self.shape, self.max_len(_REFERENCE_MAX_LEN.value), 'reference_max_len')
    if why:
      raise _Skip(why)
    f = functools.partial(reference.nsa_attention, **self.shape.sizes)
    entry['check'] = 'the specification ours is checked against'
    put_timing(entry, 'fwd', timed(jax.jit(f), *self.args))
    grad = jax.jit(jax.value_and_grad(lambda *a: sum_loss(f(*a[:7]), a[7]),
                                      argnums=tuple(range(7))))
    put_timing(entry, 'fwd_bwd', timed(grad, *self.args, self.cts))
    entry['bwd_ms'] = entry['fwd_bwd_ms'] - entry['fwd_ms']

  def bench_decode(self) -> None:
    shape = self.shape
    t = shape.tokens
    q1 = self.args[0][:, t - 1:]
    pos1 = jnp.full((shape.batch, 1), t - 1, jnp.int32)
    k, v = self.args[3], self.args[4]
    dense_rows = []

    def dense_row(impl):
      def body(entry):
        entry['implementation'] = impl
        f = jax.jit(lambda q, k, v: dense(q, k, v, impl, causal=False))
        want = _attend(q1.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                       jnp.ones((1, 1, 1, t), bool))
        entry['max_rel_err'] = rel_err(f(q1, k, v), want)
        if not entry['max_rel_err'] <= _TOLERANCE.value:
          raise _Wrong(f'rel err {entry["max_rel_err"]:.3g}')
        put_timing(entry, 'fwd', timed(f, q1, k, v))
        dense_rows.append(f'decode_dense_{impl}')
      return body

    for impl in (('cudnn', 'xla') if self.on_gpu else ('xla',)):
      self.row(f'decode_dense_{impl}', dense_row(impl))

    def speedup(entry):
      done = [(self.run['variants'][n]['fwd_ms'], n) for n in dense_rows]
      if done:
        ms, name = min(done)
        entry['speedup_vs_dense'] = ms / entry['fwd_ms']
        entry['dense_baseline'] = name

    ours = self.ours
    state = {}

    def ours_row(entry):
      f = jax.jit(lambda q, p, *keys: ours(q, *keys, p))
      outs, calls, values = capture(lambda q, p, *keys: ours(q, *keys, p), q1, pos1,
                                    *self.args[1:], forward_only=True)
      state['captured'] = calls, values
      check = check_forward(shape, outs, kernel_selection(calls, values, shape, 1, t), q1, pos1,
                            self.keys_f32())
      errs = [rel_err(a, b) for a, b in zip(f(q1, pos1, *self.args[1:]), outs)]
      check['rel_err_timed_vs_checked'] = errs
      check['passed']['timed_same_as_checked'] = within(errs)
      entry['check'] = check
      failed = [p for p, ok in check['passed'].items() if not ok]
      if failed:
        raise _Wrong(f'decode check failed for {failed}')
      put_timing(entry, 'fwd', timed(f, q1, pos1, *self.args[1:]))
      entry['note'] = ("ops.nsa_attention with q_positions: the caches read in place, the query "
                       "and outputs copied to and from the kernels' row layout")
      speedup(entry)

    entry = self.row('decode_ours', ours_row)

    def kernels_row(e):
      if 'error' in entry or 'captured' not in state:
        raise _Wrong(f'decode_ours: {entry.get("error", "did not run")[:200]}')
      calls, values = state.pop('captured')
      run, inputs = replay(calls)
      f = jax.jit(run)
      operands = tuple(values[i] for i in inputs)
      got = f(*operands)
      pos = row_positions(calls[0], values)
      errs = [output_err(g, values[i], pos)
              for g, i in zip(got, (i for c in calls for i in c.outputs))]
      e['rel_err_vs_decode_ours'] = errs
      if not within(errs):
        raise _Wrong(f'differs from decode_ours: {errs}')
      put_timing(e, 'fwd', timed(f, *operands))
      e['kernel_calls'] = [c.name for c in calls]
      e['note'] = "the kernels alone, the query already in the kernels' row layout"
      speedup(e)

    self.row('decode_ours_kernels', kernels_row)


def goals(shape: Shape, variants: dict) -> dict:
  """The NSA issue's targets this shape measures: {name: {target, measured, met}}, measured and
  met null with a reason where this run cannot say."""
  ours, decode, out = variants.get('ours', {}), variants.get('decode_ours', {}), {}
  on_gpu = jax.default_backend() == 'gpu'
  no_dense = None if 'fwd_ms' in variants.get('dense_cudnn', {}) else \
      'no dense cuDNN baseline on this run (the goals are against cuDNN on a GPU)'
  no_decode = None if on_gpu and any('fwd_ms' in variants.get(f'decode_dense_{i}', {})
                                     for i in ('cudnn', 'xla')) else \
      'no dense decode baseline on a GPU on this run'

  def goal(name, target, measured, missing, row_name, strict=False):
    if missing:
      out[name] = {'target': target, 'measured': None, 'met': None, 'reason': missing}
    elif measured is None:
      out[name] = {'target': target, 'measured': None, 'met': None,
                   'reason': f'{row_name} did not run or was wrong (see its row)'}
    else:
      out[name] = {'target': target, 'measured': measured,
                   'met': measured > target if strict else measured >= target}

  for tokens, fwd, bwd in GOALS:
    if shape.tokens == tokens:
      k = f'{tokens // 1024}k'
      goal(f'fwd_{fwd}x_at_{k}', fwd, ours.get('fwd_speedup_vs_dense'), no_dense, 'ours')
      goal(f'bwd_{bwd}x_at_{k}', bwd, ours.get('bwd_speedup_vs_dense'), no_dense, 'ours')
  if shape.tokens >= FASTER_FROM:
    goal('fwd_faster_from_8k', 1.0, ours.get('fwd_speedup_vs_dense'), no_dense, 'ours', True)
    goal('bwd_faster_from_8k', 1.0, ours.get('bwd_speedup_vs_dense'), no_dense, 'ours', True)
  if shape.tokens == DECODE_GOAL[0]:
    goal(f'decode_{DECODE_GOAL[1]}x_at_64k', DECODE_GOAL[1], decode.get('speedup_vs_dense'),
         no_decode, 'decode_ours')
  return out


# ---------------------------------------------------------------------------------------------


def _tiling() -> dict:
  tiling = dict(ops.DEFAULT_TILING)
  for item in _TILING.value or ():
    key, _, value = item.partition('=')
    if key not in tiling or not value:
      raise app.UsageError(f'--tiling {item!r}: key=value with key in {sorted(tiling)}')
    tiling[key] = int(value) if value.lstrip('-').isdigit() else value
  return tiling


def main(argv):
  del argv
  names = _SHAPES.value or (QUICK_SHAPES if _QUICK.value else DEFAULT_SHAPES)
  shapes = [parse_shape(n) for n in names]
  families = list(_FAMILIES.value)
  unknown = set(families) - set(FAMILIES)
  if unknown:
    raise app.UsageError(f'unknown --families {sorted(unknown)}; valid: {list(FAMILIES)}')
  tiling = _tiling()
  interpret = jax.default_backend() != 'gpu'
  from efficientjax.metrics.record import environment  # pylint: disable=g-import-not-at-top
  results = {
      'command': ' '.join(['python -m experiments.bench_nsa', *sys.argv[1:]]),
      'env': environment(), 'device_kind': jax.devices()[0].device_kind,
      'interpret': interpret, 'tiling': tiling, 'families': families, 'dtype': 'bfloat16',
      'repeats': _REPEATS.value, 'rounds': _ROUNDS.value, 'min_round_s': _MIN_ROUND_S.value,
      'timing': ('two warm-up calls; per round >= repeats back-to-back calls synchronised once; '
                 '*_ms = median per-call ms over rounds, *_ms_min/max the spread; '
                 'bwd_ms = fwd_bwd_ms - fwd_ms'),
      'tolerance': _TOLERANCE.value, 'importance_tolerance': _IMPORTANCE_TOLERANCE.value,
      'runs': [],
  }
  bwd_checks = {}
  for shape in shapes:
    run = {'shape': shape.name, 'tokens': shape.tokens, 'batch': shape.batch,
           'heads': shape.heads, 'kv_heads': shape.kv_heads, 'head_dim': shape.head_dim,
           **shape.sizes, 'checks': {}, 'variants': {}}
    results['runs'].append(run)
    start = time.perf_counter()
    try:
      ShapeRun(shape, run, lambda: _write(results), interpret, tiling, families,
               bwd_checks).bench()
    except Exception as e:  # pylint: disable=broad-except
      # Inputs that do not fit, say: the next shape still runs.
      run['error'] = f'{type(e).__name__}: {str(e)[:600]}'
      run['traceback_tail'] = traceback.format_exc()[-1200:]
      print(shape.name, run['error'], flush=True)
    run['shape_s'] = time.perf_counter() - start
    _write(results)


def _write(results: dict) -> None:
  if _OUT.value:  # whole or not at all: a run cut mid-write keeps the previous rows
    with open(_OUT.value + '.tmp', 'w') as fh:
      json.dump(results, fh, indent=1, default=_json_default)
    os.replace(_OUT.value + '.tmp', _OUT.value)


def _json_default(x):
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  return str(x)


if __name__ == '__main__':
  app.run(main)

"""Native sparse attention (NSA; Yuan et al. 2025, arXiv 2502.11089): the layer.

Three branches share the queries, each with its own keys and values (§3.3: "independent keys
and values for three branches"), and are mixed per query head by learned sigmoid gates of the
input (Eq. 5: out = sum_c g_c · Attn_c):

  cmp  attends to compressed blocks: a block of `block_len` (l) raw keys (values) starting every
       `stride` (d) tokens is mapped to one key (value) by a learned MLP over the flattened
       block with an intra-block position encoding (Eq. 7). A query sees a block once all its
       tokens are in its past; a query with no complete block gets zero from this branch.
  slc  attends, token by token and causally, to the `num_selected` (n) blocks of
       `select_block_len` (l') tokens that the cmp branch's attention probabilities rank
       highest (Eq. 8-9), summed over the query heads of a K/V group so the group shares one
       selection (Eq. 10-11). The query's own block, the initial block and the block before
       the query's always count among the n (the paper's 1 initial + 2 local blocks); with
       n < 3 they are kept in that order of priority. The choice is not differentiable;
       gradients reach the selected keys and values through the attention itself.
  win  attends to the last `window` (w) tokens, the query included.

The projections, the compression and the gates are here; the three attentions are
kernels/nsa's, picked by `model.nsa.implementation`: `reference` (kernels/nsa/reference.py: each
branch a dense masked attention, O(T²) memory and work per sequence, the selection mask alone
[batch, kv_heads, T, T]; `flops_per_token` reports this as `attention_as_executed`), `triton`
(the Pallas-Triton kernels, O(T·(T/d + n·l' + w)) work, no T² array) or `interpret` (those
kernels in Pallas' interpreter, for tests). `auto` runs the kernels where they can: an NVIDIA GPU
and shapes they support. Packed rows (segment_ids) and a position encoding that adds an
attention bias (relative) always take the reference. Under a mesh the kernels run per shard.

Choices the paper leaves open:
- the compression MLP is Linear(l·head_dim -> head_dim) · SiLU · Linear(head_dim -> head_dim),
  with biases, after adding a learned [l, head_dim] position table; keys and values have one
  each, shared by the K/V heads. `compression='mean'` pools non-overlapping blocks instead
  (l = d = l', no parameters).
- blocks are compressed from un-rotated keys; the compressed key is then rotated (or biased)
  at its block's first position, so a query-block score depends on their distance.
- Eq. 9 is applied with the blocks aligned by the tokens they cover: compressed block i
  (tokens [i·d, i·d + l)) adds p_cmp[i] times (tokens it shares with selection block j) / d to
  block j's importance - the paper's double sum over (m, n), which counts exactly those shared
  strides. With l = l' = d it is p_slc = p_cmp.
- a whole sequence (no cache) is taken to start at position 0, as `Transformer` passes it: its
  blocks are cut at sequence offsets.

Packed rows (`segment_ids`, whole sequences only): each example is attended as if it were alone
in its row, its positions restarting at 0. Its blocks are cut at its own positions (compressed
blocks start where position % d == 0, selection block j holds positions [j·l', (j+1)·l')), a
compressed block exists only if all its l tokens belong to one example at consecutive positions
(none mixes two examples), and every branch masks keys of other segments, so the selection
scores, summed from cmp's probabilities, see only the query's own example's blocks. The
compressed blocks of a row of T tokens fit in T // d slots (an example of n tokens has at most
n // d, as d <= l), compacted in row order. Positions must stay below T (they do when they
restart per example): selection blocks are counted as in a sequence of T tokens.
"""

import functools
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from efficientjax.attention import cache as kv_cache
from efficientjax.attention.core import causal_mask, mean_context, segment_mask
from efficientjax.attention.mha import rope_head_dim_errors
from efficientjax.attention.positions import POSITIONS
from efficientjax.errors import ConfigError
from efficientjax.nn.linear import Linear
from efficientjax.parallel.mesh import LOGICAL_AXIS_RULES
from kernels.nsa import ops as nsa_ops
from kernels.nsa import reference as nsa_reference
# The selection's maths, here for the packed path and for tests that read it from the layer.
from kernels.nsa.reference import (attend, block_importance, num_blocks,  # noqa: F401
                                   select_blocks, selection_weights)

BRANCHES = ('cmp', 'slc', 'win')
COMPRESSIONS = ('mlp', 'mean')
IMPLEMENTATIONS = ('auto', 'reference', 'triton', 'interpret')


@flax.struct.dataclass
class NSACache:
  """One layer's cache. Each branch's raw keys and values [batch, max_len, kv_heads, head_dim],
  written at their positions (cmp's un-rotated, as the compression reads them; slc's and win's
  rotated, as attended), and the compressed keys and values [batch, max_blocks, kv_heads,
  head_dim], block j written by the step that completes it (at position j·d + l - 1)."""
  k_cmp: jax.Array
  v_cmp: jax.Array
  k_slc: jax.Array
  v_slc: jax.Array
  k_win: jax.Array
  v_win: jax.Array
  k_blocks: jax.Array
  v_blocks: jax.Array


# ---------------------------------------------------------------------------------------------
# Compression (Eq. 7).


def block_tokens(x: jax.Array, starts: jax.Array, block_len: int) -> jax.Array:
  """x [batch, length, kv_heads, dim], starts [batch, n] -> the blocks' tokens
  [batch, n, kv_heads, block_len, dim] (a start past the end reads the last tokens)."""
  idx = jnp.clip(starts[..., None] + jnp.arange(block_len), 0, x.shape[1] - 1)
  return jnp.swapaxes(jax.vmap(lambda row, i: row[i])(x, idx), 2, 3)


def packed_block_starts(positions: jax.Array, segment_ids: jax.Array, block_len: int,
                        stride: int) -> tuple[jax.Array, jax.Array]:
  """The compressed blocks of packed rows: positions, segment_ids [batch, length] -> (row
  offsets of their first tokens [batch, length // stride], whether each slot holds a block).

  A block starts at a token whose position is a multiple of `stride` and exists when its
  `block_len` tokens lie in the row, in one segment, at consecutive positions. Within a run of
  consecutive positions of n tokens at most n // stride blocks start (block_len >= stride), so
  length // stride slots hold them all; they are filled in row order, unused ones last.
  """
  positions, segment_ids = jnp.asarray(positions), jnp.asarray(segment_ids)
  length = positions.shape[1]
  offsets = jnp.arange(length)
  idx = jnp.clip(offsets[:, None] + jnp.arange(block_len), 0, length - 1)  # [length, l]
  seg, pos = segment_ids[:, idx], positions[:, idx]  # [batch, length, l]
  whole = ((offsets + block_len <= length) & (positions % stride == 0)
           & jnp.all(seg == seg[..., :1], axis=-1)
           & jnp.all(pos == pos[..., :1] + jnp.arange(block_len), axis=-1))
  slots = length // stride
  starts = jax.vmap(lambda w: jnp.nonzero(w, size=slots, fill_value=0)[0])(whole)
  valid = jnp.arange(slots) < jnp.sum(whole, axis=-1, keepdims=True)
  return starts.astype(jnp.int32), valid


def completed_blocks(positions: jax.Array, num_new: int, block_len: int, stride: int,
                     max_blocks: int) -> jax.Array:
  """The blocks completed by a step of `num_new` tokens at positions[:, 0] onwards:
  [batch, num_new // stride + 1] block ids, `max_blocks` (out of range) where none."""
  first = positions[:, 0]
  # The first block ending at or after `first`: ceil((first - block_len + 1) / stride).
  j0 = jnp.maximum(0, -((block_len - 1 - first) // stride))
  j = j0[:, None] + jnp.arange(num_new // stride + 1)
  done = (j * stride + block_len - 1 <= first[:, None] + num_new - 1) & (j < max_blocks)
  return jnp.where(done, j, max_blocks)


# ---------------------------------------------------------------------------------------------
# Selection (Eq. 8-11).


def packed_selection_weights(block_positions: jax.Array, num_slc: int, block_len: int,
                             stride: int, select_block_len: int) -> jax.Array:
  """`selection_weights` for compressed blocks at any start positions: block_positions
  [batch, num_cmp] -> [batch, num_cmp, num_slc] (packed rows, where a block's place within its
  example is its first token's position)."""
  cmp_start = block_positions[..., None]
  slc_start = jnp.arange(num_slc) * select_block_len
  shared = (jnp.minimum(cmp_start + block_len, slc_start + select_block_len)
            - jnp.maximum(cmp_start, slc_start))
  return (jnp.maximum(shared, 0) / stride).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# The kernels on a mesh.


def _per_shard(kernel, q: jax.Array, kvs: tuple[jax.Array, ...], q_positions: jax.Array | None):
  """kernel(q, *kvs, q_positions) on each device's shard of the batch and of the heads.

  A Pallas kernel is an opaque custom call to XLA's partitioner, which would gather its
  operands and run the whole batch on every device; under a mesh it runs in `jax.shard_map`
  instead, split as the activations are (the logical axes 'batch' and 'heads' / 'kv_heads').
  A dimension the mesh axes do not divide (e.g. one K/V head over tensor=2) stays whole.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(q, *kvs, q_positions)
  rules = nn.get_logical_axis_rules() or LOGICAL_AXIS_RULES
  sizes = dict(mesh.shape)

  def axes(name: str, dim: int):
    spec = nn.logical_to_mesh_axes((name,), rules)[0]
    names = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    names = tuple(a for a in names if a in sizes and sizes[a] > 1)
    return names if names and dim % math.prod(sizes[a] for a in names) == 0 else None

  batch = axes('batch', q.shape[0])
  heads = axes('kv_heads', kvs[-1].shape[2])
  queries = P(batch, None, heads, None)
  in_specs = (queries,) + (P(batch, None, heads, None),) * len(kvs)
  if q_positions is not None:
    in_specs += (P(batch, None),)
  run = jax.shard_map(lambda *a: kernel(*a) if q_positions is not None else kernel(*a, None),
                      mesh=mesh, in_specs=in_specs, out_specs=(queries,) * len(BRANCHES),
                      check_vma=False)
  return run(q, *kvs, *(() if q_positions is None else (q_positions,)))


# ---------------------------------------------------------------------------------------------
# The layer.


class NativeSparseAttention(nn.Module):
  """NSA with any number of K/V heads per branch (GQA groups share their selected blocks)."""
  config: 'efficientjax.model.ModelConfig'  # noqa: F821 (import cycle)

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, cache: NSACache | None = None,
               *, segment_ids: jax.Array | None = None) -> tuple[jax.Array, NSACache | None]:
    """segment_ids [batch, t] (whole sequences only): packed examples, each attended as if alone
    in its row with `positions` restarting at 0 (see the module docstring)."""
    cfg, nsa = self.config, self.config.nsa
    if segment_ids is not None and cache is not None:
      raise ValueError('segment_ids are for whole sequences; decoding with a cache takes none')
    l, d, sl = nsa.block_len, nsa.stride, nsa.select_block_len
    proj = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, adapter=cfg.adapter,
                kernel_init=nn.initializers.normal(cfg.init_std))
    qkv = dict(use_bias=cfg.qkv_bias, **proj)
    q = Linear((cfg.num_heads, cfg.head_dim), ('embed', 'heads', 'head_dim'), name='q', **qkv)(x)
    kvs = {name: Linear((cfg.num_kv_heads, cfg.head_dim), ('embed', 'kv_heads', 'head_dim'),
                        name=name, **qkv)(x)
           for name in ('k_cmp', 'v_cmp', 'k_slc', 'v_slc', 'k_win', 'v_win')}
    gates = nn.sigmoid(Linear((cfg.num_heads, len(BRANCHES)), ('embed', 'heads', 'branch'),
                              use_bias=True, name='gate', **proj)(x))  # [b, t, heads, 3]

    pos = POSITIONS.get(cfg.position)(cfg)
    q = pos.rotate(q, positions)
    for name in ('k_slc', 'k_win'):  # k_cmp is rotated after compression, block by block
      kvs[name] = pos.rotate(kvs[name], positions)
    q = nn.with_logical_constraint(q, ('batch', 'length', 'heads', 'head_dim'))
    kvs = {n: nn.with_logical_constraint(a, ('batch', 'length', 'kv_heads', 'head_dim'))
           for n, a in kvs.items()}
    compress_k, compress_v = self._compressor('k'), self._compressor('v')

    def compress(k_raw, v_raw, starts, start_positions=None):
      # raw [b, len, kv, hd], starts (row offsets) [b, n] -> [b, n, kv, hd], each key rotated at
      # its block's first position (its offset, but in a packed row)
      k_blocks = pos.rotate(compress_k(block_tokens(k_raw, starts, l)),
                            starts if start_positions is None else start_positions)
      return k_blocks, compress_v(block_tokens(v_raw, starts, l))

    batch = x.shape[0]

    def rows(a):  # the same positions for every row
      return jnp.broadcast_to(a, (batch, a.size))

    if segment_ids is not None:
      if nsa.implementation in ('triton', 'interpret'):
        raise ConfigError('model.nsa.implementation', f'{nsa.implementation!r}: the kernels do '
                          'not take packed rows (segment_ids); use auto or reference',
                          {'model.nsa.implementation': 'auto'})
      return self._packed(q, kvs, gates, compress, pos, positions, segment_ids), None
    if cache is None:  # a whole sequence from position 0
      k_positions = jnp.arange(x.shape[1], dtype=jnp.int32)
      q_positions = rows(k_positions)
      block_starts = jnp.arange(num_blocks(x.shape[1], l, d), dtype=jnp.int32) * d
      k_blocks, v_blocks = compress(kvs['k_cmp'], kvs['v_cmp'], rows(block_starts))
    else:
      cache = cache.replace(**{n: kv_cache.write(getattr(cache, n), a, positions)
                               for n, a in kvs.items()})
      max_blocks = cache.k_blocks.shape[1]
      done = completed_blocks(positions, x.shape[1], l, d, max_blocks)
      new_k, new_v = compress(kv_cache.read(cache.k_cmp, cfg.dtype),
                              kv_cache.read(cache.v_cmp, cfg.dtype), done * d)
      cache = cache.replace(k_blocks=kv_cache.write_at(cache.k_blocks, new_k, done),
                            v_blocks=kv_cache.write_at(cache.v_blocks, new_v, done))
      kvs = {n: kv_cache.read(getattr(cache, n), cfg.dtype) for n in kvs}
      k_blocks = kv_cache.read(cache.k_blocks, cfg.dtype)
      v_blocks = kv_cache.read(cache.v_blocks, cfg.dtype)
      q_positions = positions
      k_positions = jnp.arange(cache.k_slc.shape[1], dtype=jnp.int32)
      block_starts = jnp.arange(max_blocks, dtype=jnp.int32) * d
    k_blocks = nn.with_logical_constraint(k_blocks, ('batch', 'length', 'kv_heads', 'head_dim'))
    v_blocks = nn.with_logical_constraint(v_blocks, ('batch', 'length', 'kv_heads', 'head_dim'))

    sizes = dict(block_len=l, stride=d, select_block_len=sl, num_selected=nsa.num_selected,
                 window=nsa.window)
    branch_kv = tuple(kvs[n] for n in ('k_slc', 'v_slc', 'k_win', 'v_win'))
    implementation = self.implementation_used(cfg)
    if implementation != 'reference':
      # The kernels take a whole sequence (positions 0..t-1, differentiable) or, over a cache,
      # the queries' positions (forward only).
      kernel = functools.partial(nsa_ops.nsa_attention, implementation='triton',
                                 interpret=implementation == 'interpret', **sizes)
      outs = _per_shard(kernel, q, (k_blocks, v_blocks) + branch_kv,
                        None if cache is None else q_positions)
      return self._mix(gates, outs), cache

    token_bias = block_bias = None
    if pos.attention_bias is not None:  # one table; compressed keys at their blocks' starts
      position_bias = pos.attention_bias(cfg, name='position_bias')
      token_bias = position_bias(q_positions, rows(k_positions))
      block_bias = position_bias(q_positions, rows(block_starts))
    outs = nsa_reference.nsa_attention(q, k_blocks, v_blocks, *branch_kv, q_positions,
                                       token_bias=token_bias, block_bias=block_bias, **sizes)
    return self._mix(gates, outs), cache

  def _mix(self, gates: jax.Array, outs: tuple[jax.Array, ...]) -> jax.Array:
    """Eq. 5's gated sum of the branches, then the output projection."""
    cfg = self.config
    out = sum(gates[..., i, None] * o for i, o in enumerate(outs))
    out = nn.with_logical_constraint(out.astype(cfg.dtype),
                                     ('batch', 'length', 'heads', 'head_dim'))
    return Linear((cfg.embed_dim,), ('heads', 'head_dim', 'embed'), in_dims=2, name='o',
                  dtype=cfg.dtype, param_dtype=cfg.param_dtype, adapter=cfg.adapter,
                  kernel_init=nn.initializers.normal(cfg.init_std))(out)

  def _packed(self, q, kvs, gates, compress, pos, positions, segment_ids) -> jax.Array:
    """The three branches over rows packing several examples: the whole-sequence computation
    with blocks cut at each example's own positions and every mask within one segment."""
    cfg, nsa = self.config, self.config.nsa
    l, d, sl = nsa.block_len, nsa.stride, nsa.select_block_len
    batch, length = segment_ids.shape
    offsets = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    same = segment_mask(segment_ids)  # [b, 1, t, t]

    starts, valid = packed_block_starts(positions, segment_ids, l, d)  # [b, n] row offsets
    block_positions = jnp.take_along_axis(positions, starts, axis=1)
    k_blocks, v_blocks = compress(kvs['k_cmp'], kvs['v_cmp'], starts, block_positions)
    k_blocks = nn.with_logical_constraint(k_blocks, ('batch', 'length', 'kv_heads', 'head_dim'))
    v_blocks = nn.with_logical_constraint(v_blocks, ('batch', 'length', 'kv_heads', 'head_dim'))

    token_bias = block_bias = None
    if pos.attention_bias is not None:  # positions within each example, as alone
      position_bias = pos.attention_bias(cfg, name='position_bias')
      token_bias = position_bias(positions, positions)
      block_bias = position_bias(positions, block_positions)

    # cmp: the query's own example's blocks, complete at its position.
    block_segment = jnp.take_along_axis(segment_ids, starts, axis=1)
    cmp_mask = ((valid[:, None, :] & (block_segment[:, None, :] == segment_ids[:, :, None])
                 & ((starts + l - 1)[:, None, :] <= offsets[:, :, None])))[:, None]
    out_cmp, p_cmp = attend(q, k_blocks, v_blocks, cmp_mask, block_bias)

    # slc: selection block j of an example holds its positions [j·l', (j+1)·l').
    num_slc = -(-length // sl)  # positions restart within the row, so stay below its length
    weights = packed_selection_weights(block_positions, num_slc, l, d, sl)
    importance = block_importance(jax.lax.stop_gradient(p_cmp), weights)
    selected = select_blocks(importance, positions, sl, nsa.num_selected)
    chosen = jnp.any(selected[..., None] == jnp.arange(num_slc), axis=-2)  # [b, k, t, num_slc]
    key_block = jnp.broadcast_to((positions // sl)[:, None, None, :],
                                 chosen.shape[:3] + (length,))
    slc_mask = (jnp.take_along_axis(chosen, key_block, axis=-1)
                & causal_mask(offsets, offsets) & same)
    out_slc, _ = attend(q, kvs['k_slc'], kvs['v_slc'], slc_mask, token_bias)

    # win: the last `window` tokens of the query's example.
    win_mask = causal_mask(offsets, offsets, nsa.window) & same
    out_win, _ = attend(q, kvs['k_win'], kvs['v_win'], win_mask, token_bias)
    return self._mix(gates, (out_cmp, out_slc, out_win))

  def _compressor(self, name: str):
    """The map from a block's tokens [..., block_len, head_dim] to one [..., head_dim], its
    parameters named `{name}_...` (called inside __call__, so they belong to this layer)."""
    cfg, nsa = self.config, self.config.nsa
    if nsa.compression == 'mean':
      return lambda blocks: jnp.mean(blocks, axis=-2)
    proj = dict(use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, adapter=cfg.adapter,
                kernel_init=nn.initializers.normal(cfg.init_std))
    block_pos = self.param(
        f'{name}_block_pos',
        nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                     ('block_offset', 'head_dim')),
        (nsa.block_len, cfg.head_dim), cfg.param_dtype)
    hidden = Linear((cfg.head_dim,), ('block_offset', 'head_dim', 'latent'), in_dims=2,
                    name=f'{name}_compress_hidden', **proj)
    out = Linear((cfg.head_dim,), ('latent', 'head_dim'), name=f'{name}_compress_out', **proj)
    return lambda blocks: out(nn.silu(hidden(blocks + block_pos.astype(cfg.dtype))))

  @staticmethod
  def check(m, seq_len: int) -> list[ConfigError]:
    """Shapes NSA cannot run: block sizes that do not tile by the stride, `mean` compression
    with blocks of different lengths, and options it does not implement."""
    del seq_len
    n = m['nsa']
    errors = rope_head_dim_errors(m)
    for field in ('block_len', 'stride', 'select_block_len', 'num_selected', 'window'):
      if n[field] < 1:
        errors.append(ConfigError(f'model.nsa.{field}', f'must be at least 1, got {n[field]}'))
    if n['compression'] not in COMPRESSIONS:
      errors.append(ConfigError('model.nsa.compression', f'unknown value {n["compression"]!r}; '
                                f'valid values: {", ".join(COMPRESSIONS)}'))
    if n['implementation'] not in IMPLEMENTATIONS:
      errors.append(ConfigError('model.nsa.implementation', f'unknown value '
                                f'{n["implementation"]!r}; valid values: '
                                f'{", ".join(IMPLEMENTATIONS)}'))
    elif (n['implementation'] in ('triton', 'interpret')
          and m['position'] in POSITIONS
          and POSITIONS.get(m['position']).attention_bias is not None):
      errors.append(ConfigError('model.nsa.implementation', f"the kernels add no attention bias, "
                                f"which position {m['position']!r} needs; use auto or reference",
                                {'model.nsa.implementation': 'auto'}))
    if errors:
      return errors
    l, d, sl = n['block_len'], n['stride'], n['select_block_len']
    if l % d:
      # A stride dividing both block lengths (so the fix leaves select_block_len valid), at most
      # half a block as in the paper (l = 32, d = 16).
      common = math.gcd(l, sl)
      stride = max(x for x in range(1, max(1, l // 2) + 1) if common % x == 0)
      errors.append(ConfigError('model.nsa.stride', f'{d} does not divide model.nsa.block_len='
                                f'{l}; compressed blocks must start a whole number of strides '
                                f'apart within a block (e.g. stride {stride})',
                                {'model.nsa.stride': stride}))
    elif sl % d:
      errors.append(ConfigError('model.nsa.select_block_len', f'{sl} is not a multiple of '
                                f'model.nsa.stride={d}; selection blocks are scored from whole '
                                f'strides of compressed blocks (Eq. 9), e.g. '
                                f'{max(d, sl // d * d)}',
                                {'model.nsa.select_block_len': max(d, sl // d * d)}))
    if n['compression'] == 'mean' and not l == d == sl:
      errors.append(ConfigError('model.nsa.compression', f"'mean' pools non-overlapping blocks "
                                f'that are also the selection blocks, so it needs block_len = '
                                f'stride = select_block_len, got {l}, {d}, {sl}; set them equal '
                                f"or use 'mlp'", {'model.nsa.compression': 'mlp'}))
    heads, kv = m['num_heads'], m['num_kv_heads'] or m['num_heads']
    if heads % kv:
      errors.append(ConfigError('model.num_kv_heads', f'{kv} does not divide model.num_heads='
                                f'{heads}; each K/V head must serve a whole group of query heads'))
    if m.get('sliding_window') is not None:
      errors.append(ConfigError('model.sliding_window', 'NSA has its own window branch '
                                '(model.nsa.window); unset model.sliding_window',
                                {'model.sliding_window': None}))
    if m.get('qk_norm'):
      errors.append(ConfigError('model.qk_norm', 'QK-norm is not implemented for nsa; set '
                                'model.qk_norm=False', {'model.qk_norm': False}))
    return errors

  @staticmethod
  def implementation_used(cfg, packed_rows: bool = False) -> str:
    """What runs the three attentions on this process's backend: 'reference', 'triton' or
    'interpret'. Rows packing several examples (fine-tuning's) always take the reference. The
    layer decides by it, and the record reports it."""
    impl = cfg.nsa.implementation
    if (packed_rows or POSITIONS.get(cfg.position).attention_bias is not None
        or impl == 'reference'):
      return 'reference'
    if impl != 'auto':
      return impl
    kv = cfg.num_kv_heads or cfg.num_heads

    def spec(heads):
      return jax.ShapeDtypeStruct((1, 1, heads, cfg.head_dim), cfg.dtype)

    return nsa_ops.default_implementation(spec(cfg.num_heads), spec(kv), spec(kv),
                                          select_block_len=cfg.nsa.select_block_len,
                                          stride=cfg.nsa.stride)

  @staticmethod
  def init_cache(cfg, batch: int, max_len: int, dtype) -> NSACache:
    raw = kv_cache.zeros((batch, max_len, cfg.num_kv_heads, cfg.head_dim), dtype)
    # At least one block slot, never written (and so never visible) when max_len < block_len.
    max_blocks = max(1, num_blocks(max_len, cfg.nsa.block_len, cfg.nsa.stride))
    blocks = kv_cache.zeros((batch, max_blocks, cfg.num_kv_heads, cfg.head_dim), dtype)
    return NSACache(k_cmp=raw, v_cmp=raw, k_slc=raw, v_slc=raw, k_win=raw, v_win=raw,
                    k_blocks=blocks, v_blocks=blocks)

  @staticmethod
  def cache_values_per_token(cfg) -> float:
    """Values one layer caches per token: a raw key and value per K/V head for each of the three
    branches, plus a compressed key and value per K/V head every `stride` tokens."""
    kv_values = 2 * cfg.num_kv_heads * cfg.head_dim
    return len(BRANCHES) * kv_values + kv_values / cfg.nsa.stride

  @staticmethod
  def flops_per_token(cfg, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one layer, averaged over a causal sequence of `seq_len`.

    `attention` counts the keys each branch attends to (mha's convention: a token-level causal
    branch counts its diagonal half): the complete compressed blocks (~t/d), the selected
    blocks' tokens (n·l', fewer early on) and min(t, w). `attention_as_executed` is what the
    dense reference computes: every compressed block and two full T x T squares, plus the
    selection scores. The kernels (model.nsa.implementation) compute about `attention`, plus
    the selection's second pass over the compressed scores and their padding of a group to 16
    rows; this count does not model them.
    """
    e, h, kv, hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    nsa = cfg.nsa
    l, d, sl, n = nsa.block_len, nsa.stride, nsa.select_block_len, nsa.num_selected
    if nsa.compression == 'mlp':  # keys and values, one block every d tokens
      compression = 2 * 2.0 * kv * (l * hd * hd + hd * hd) / d
    else:
      compression = 2.0 * kv * l * hd / d
    projections = (2.0 * (e * h * hd + 6 * e * kv * hd + h * hd * e + len(BRANCHES) * e * h)
                   + compression)
    t = np.arange(seq_len)
    cmp_keys = np.maximum(0, (t - l + 1) // d + 1).mean()
    slc_keys = (np.minimum(n - 1, t // sl) * sl + t % sl + 1).mean() - 0.5
    win_keys = mean_context(seq_len, nsa.window)
    per_key = 2.0 * 2 * h * hd  # a score (q·k) and a weighted value per head
    num_cmp, num_slc = num_blocks(seq_len, l, d), -(-seq_len // sl)
    return {'projections': projections,
            'attention': per_key * float(cmp_keys + slc_keys + win_keys),
            'attention_as_executed': (per_key * (num_cmp + 2 * seq_len)
                                      + 2.0 * h * num_cmp * num_slc)}

"""Native sparse attention against plain references written from the paper (arXiv 2502.11089).

The references are numpy in float64 with loops over queries, written from the equations and
not from the module's code: Eq. 9 as the paper's double sum over (m, n), the selection as a
sorted list, each branch as a softmax over an explicit list of keys.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientjax.attention import ATTENTION
from efficientjax.attention import nsa as nsa_lib
from efficientjax.attention.core import mean_context
from efficientjax.attention.nsa import NativeSparseAttention
from efficientjax.attention.positions import relative_position_bucket
from efficientjax.errors import ConfigError
from efficientjax.model import ModelConfig, NSAConfig, RelativeConfig

BASE = ModelConfig(vocab_size=11, embed_dim=16, num_layers=1, num_heads=4, num_kv_heads=2,
                   head_dim=8, mlp_dim=16, attention='nsa', qkv_bias=True, rope_theta=100.0,
                   nsa=NSAConfig(block_len=4, stride=2, select_block_len=4, num_selected=4,
                                 window=8))


def _config(position='rope', num_kv_heads=2, **nsa):
  return dataclasses.replace(BASE, position=position, num_kv_heads=num_kv_heads,
                             relative=RelativeConfig(num_buckets=8, max_distance=16),
                             nsa=dataclasses.replace(BASE.nsa, **nsa))


# (config, sequence length): every shape relation the module distinguishes.
CASES = {
    # l = l', several selectable blocks beyond the three forced ones.
    'mlp_rope': (_config(), 32),
    # l' = 2l (Eq. 9 weights 1,2,2,2,1), T5 relative bias on every branch.
    'long_selection_relative': (_config('relative', select_block_len=8), 48),
    # l = 2l' (a compressed block spans two selection blocks), one K/V head for all four.
    'long_block_mqa': (_config(num_kv_heads=1, block_len=8, stride=4, select_block_len=4), 32),
    # Mean pooling, l = d = l', no positions; n = 2 < the three forced blocks: the current and
    # the initial block win.
    'mean_nope_two_selected': (_config('none', compression='mean', block_len=4, stride=4,
                                       num_selected=2, window=6), 32),
}


def _random_params(cfg, seed=0, scale=0.4, length=8):
  """Every parameter (biases and position tables included) drawn normal(scale), so every
  branch contributes at O(1) and a wrong term shows above float32 rounding."""
  module = NativeSparseAttention(cfg)
  x = jnp.zeros((1, length, cfg.embed_dim), cfg.dtype)
  positions = jnp.arange(length)[None]
  # Shapes only (no compilation): every value is drawn below.
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(seed), x, positions)['params'])
  rng = np.random.default_rng(seed)  # numpy: no per-shape compilation of random ops
  return jax.tree.map(lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), shapes)


def _inputs(cfg, batch, length, seed=1):
  x = np.random.default_rng(seed).standard_normal((batch, length, cfg.embed_dim))
  return (jnp.asarray(x, cfg.dtype),
          jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)))


@functools.cache
def _apply_fn(cfg):
  """One jitted apply per config, so tests at the same shapes share its compilations."""
  module = NativeSparseAttention(cfg)
  return jax.jit(lambda p, x, pos, cache=None: module.apply({'params': p}, x, pos, cache))


def _force_gates(params, gates):
  """Gates fixed at (cmp, slc, win) in {0, 1}: a zero kernel and a bias of +/-100."""
  gate = params['gate']
  bias = jnp.broadcast_to(jnp.where(jnp.asarray(gates) > 0, 100.0, -100.0), gate['bias'].shape)
  return {**params, 'gate': {'kernel': jnp.zeros_like(gate['kernel']), 'bias': bias}}


# ---------------------------------------------------------------------------------------------
# The references.


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _linear(p, x):
  y = np.einsum('bte,e...->bt...', x, p['kernel'])
  return y + p['bias'] if 'bias' in p else y


def _rope(cfg, a, positions):
  """a [..., n, heads, dim] at positions [n], half-split pairs (GPT-NeoX / HF Llama)."""
  if cfg.position != 'rope':
    return a
  half = a.shape[-1] // 2
  angle = positions[:, None] * cfg.rope_theta ** (-np.arange(half) / half)
  cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
  a1, a2 = a[..., :half], a[..., half:]
  return np.concatenate([a1 * cos - a2 * sin, a2 * cos + a1 * sin], -1)


def _bias_fn(cfg, p, length):
  """(head, query position, key positions) -> the additive logit bias (T5's table)."""
  if cfg.position != 'relative':
    return lambda h, t, keys: 0.0
  table = p['position_bias']['embedding']
  tokens = np.arange(length)
  buckets = np.asarray(relative_position_bucket(jnp.asarray(tokens[None, :] - tokens[:, None]),
                                                cfg.relative.num_buckets,
                                                cfg.relative.max_distance))  # [query, key]
  return lambda h, t, keys: table[buckets[t, np.asarray(keys, int)], h]


def _softmax_attend(q, k, v, bias):
  s = k @ q / np.sqrt(q.shape[-1]) + bias
  p = np.exp(s - s.max())
  p /= p.sum()
  return p @ v, p


def _reference_nsa(cfg, params, x):
  """NSA written from §3.2-3.3: per query, per head, explicit key lists."""
  p, x = _np(params), np.asarray(x, np.float64)
  nsa = cfg.nsa
  l, d, sl, n, w = nsa.block_len, nsa.stride, nsa.select_block_len, nsa.num_selected, nsa.window
  batch, length, _ = x.shape
  heads, group, dim = cfg.num_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
  tokens = np.arange(length)
  q = _rope(cfg, _linear(p['q'], x), tokens)
  k_cmp, v_cmp = _linear(p['k_cmp'], x), _linear(p['v_cmp'], x)
  k_slc, v_slc = _rope(cfg, _linear(p['k_slc'], x), tokens), _linear(p['v_slc'], x)
  k_win, v_win = _rope(cfg, _linear(p['k_win'], x), tokens), _linear(p['v_win'], x)
  gates = 1 / (1 + np.exp(-_linear(p['gate'], x)))  # [b, t, heads, 3]
  bias = _bias_fn(cfg, p, length)

  def phi(kind, block):  # Eq. 7's map of one block [l, dim] -> [dim]
    if nsa.compression == 'mean':
      return block.mean(0)
    hidden = p[f'{kind}_compress_hidden']
    z = (block + p[f'{kind}_block_pos']).reshape(-1) @ hidden['kernel'].reshape(l * dim, -1)
    z = z + hidden['bias']
    z = z / (1 + np.exp(-z))
    return z @ p[f'{kind}_compress_out']['kernel'] + p[f'{kind}_compress_out']['bias']

  num_cmp = max(0, (length - l) // d + 1)
  starts = np.arange(num_cmp) * d
  ck = np.zeros((batch, num_cmp, cfg.num_kv_heads, dim))
  cv = np.zeros_like(ck)
  for b in range(batch):
    for j in range(num_cmp):
      for g in range(cfg.num_kv_heads):
        ck[b, j, g] = phi('k', k_cmp[b, j * d:j * d + l, g])
        cv[b, j, g] = phi('v', v_cmp[b, j * d:j * d + l, g])
  ck = _rope(cfg, ck, starts)

  out = np.zeros((batch, length, heads, dim))
  for b in range(batch):
    for t in range(length):
      branch = np.zeros((3, heads, dim))
      visible = [j for j in range(num_cmp) if j * d + l - 1 <= t]
      p_cmp = np.zeros((heads, num_cmp))
      for h in range(heads):
        if visible:
          branch[0, h], p_cmp[h, visible] = _softmax_attend(
              q[b, t, h], ck[b, visible, h // group], cv[b, visible, h // group],
              bias(h, t, starts[visible]))
      current = t // sl
      for g in range(cfg.num_kv_heads):
        group_heads = range(g * group, (g + 1) * group)
        importance = []
        for j in range(current + 1):  # Eq. 9, summed over the group's heads (Eq. 10)
          total = 0.0
          for m in range(sl // d):
            for nn_ in range(l // d):
              i = j * (sl // d) + m + nn_ - (l // d - 1)
              if 0 <= i < num_cmp:
                total += p_cmp[list(group_heads), i].sum()
          importance.append(total)
        forced = list(dict.fromkeys(j for j in (current, 0, current - 1) if j >= 0))
        rest = sorted((j for j in range(current + 1) if j not in forced),
                      key=lambda j: (-importance[j], j))
        chosen = (forced + rest)[:n]
        slc_keys = [s for j in chosen for s in range(j * sl, min(j * sl + sl, t + 1))]
        win_keys = list(range(max(0, t - w + 1), t + 1))
        for h in group_heads:
          branch[1, h] = _softmax_attend(q[b, t, h], k_slc[b, slc_keys, g], v_slc[b, slc_keys, g],
                                         bias(h, t, slc_keys))[0]
          branch[2, h] = _softmax_attend(q[b, t, h], k_win[b, win_keys, g], v_win[b, win_keys, g],
                                         bias(h, t, win_keys))[0]
      out[b, t] = np.einsum('hc,chd->hd', gates[b, t], branch)
  return np.einsum('bthd,hde->bte', out, p['o']['kernel'])


def _reference_dense(cfg, params, x, branch, window=None):
  """Plain causal (optionally sliding-window) GQA attention with one branch's keys/values."""
  p, x = _np(params), np.asarray(x, np.float64)
  length = x.shape[1]
  tokens = np.arange(length)
  group = cfg.num_heads // cfg.num_kv_heads
  q = _rope(cfg, _linear(p['q'], x), tokens)
  k = np.repeat(_rope(cfg, _linear(p[f'k_{branch}'], x), tokens), group, axis=2)
  v = np.repeat(_linear(p[f'v_{branch}'], x), group, axis=2)
  allowed = tokens[None, :] <= tokens[:, None]
  if window is not None:
    allowed &= tokens[None, :] > tokens[:, None] - window
  s = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(cfg.head_dim)
  s = np.where(allowed, s, -np.inf)
  probs = np.exp(s - s.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  o = np.einsum('bhqk,bkhd->bqhd', probs, v)
  return np.einsum('bthd,hde->bte', o, p['o']['kernel'])


# ---------------------------------------------------------------------------------------------
# Tests.


def test_registered():
  assert ATTENTION.get('nsa') is NativeSparseAttention


@pytest.mark.parametrize('case', sorted(CASES))
def test_matches_reference(case):
  cfg, length = CASES[case]
  params = _random_params(cfg)
  x, positions = _inputs(cfg, 2, length)
  got, _ = _apply_fn(cfg)(params, x, positions)
  want = _reference_nsa(cfg, params, x)
  assert np.abs(want).max() > 0.5  # every branch at O(1): a missing term cannot hide
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_selection_of_every_block_is_full_causal_attention():
  """n·l' >= T and gates (0, 1, 0): plain causal attention with the slc keys/values."""
  cfg, _ = CASES['mlp_rope']
  length = cfg.nsa.num_selected * cfg.nsa.select_block_len
  params = _force_gates(_random_params(cfg, seed=3), (0, 1, 0))
  x, positions = _inputs(cfg, 2, length, seed=4)
  got, _ = _apply_fn(cfg)(params, x, positions)
  np.testing.assert_allclose(got, _reference_dense(cfg, params, x, 'slc'), atol=1e-5, rtol=1e-5)


def test_window_branch_is_sliding_window_attention():
  cfg, _ = CASES['mlp_rope']
  params = _force_gates(_random_params(cfg, seed=5), (0, 0, 1))
  x, positions = _inputs(cfg, 2, 16, seed=6)  # twice the window
  got, _ = _apply_fn(cfg)(params, x, positions)
  np.testing.assert_allclose(got, _reference_dense(cfg, params, x, 'win', window=cfg.nsa.window),
                             atol=1e-5, rtol=1e-5)


def test_causal():
  """Changing the input after position `cut` changes nothing at or before it, selection
  included (the importance of a block reads only the query's own cmp probabilities)."""
  cfg, length = CASES['mlp_rope']
  params = _random_params(cfg, seed=7)
  x, positions = _inputs(cfg, 2, length, seed=8)
  apply = _apply_fn(cfg)
  for cut in (5, 17):
    changed = x.at[:, cut + 1:].set(_inputs(cfg, 2, length - cut - 1, seed=cut)[0])
    before, after = apply(params, x, positions)[0], apply(params, changed, positions)[0]
    np.testing.assert_allclose(before[:, :cut + 1], after[:, :cut + 1], atol=1e-6, rtol=1e-6)
    assert np.abs(before[:, cut + 1:] - after[:, cut + 1:]).max() > 1e-3


def test_queries_before_the_first_block_get_zero_from_cmp_with_finite_gradients():
  """T < l: no compressed block is complete anywhere, so cmp alone outputs exact zeros, and the
  empty softmax gives finite gradients."""
  cfg = _config(block_len=8, stride=4, select_block_len=8)
  params = _force_gates(_random_params(cfg, seed=9), (1, 0, 0))
  x, positions = _inputs(cfg, 2, 7, seed=10)
  apply = _apply_fn(cfg)
  out, _ = apply(params, x, positions)
  np.testing.assert_array_equal(out, 0.0)
  free = _random_params(cfg, seed=9)  # gates free, so every branch's gradient is live
  grads = jax.jit(jax.grad(lambda p, x: jnp.sum(apply(p, x, positions)[0] ** 2),
                           argnums=(0, 1)))(free, x)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


# Biases added to every key a softmax sees shift all its scores equally: zero gradient.
SHIFT_INVARIANT = ("[0]['k_slc']['bias']", "[0]['k_win']['bias']", "[0]['k_compress_out']['bias']")


def test_gradients_match_finite_differences():
  """Float64 (positions 'none', as RoPE and the T5 table compute in float32): the gradient with
  respect to each parameter and to the input, along a random direction each, against central
  differences of the loss."""
  with jax.enable_x64(True):
    cfg = dataclasses.replace(_config('none', num_selected=3, window=6),
                              dtype=jnp.float64, param_dtype=jnp.float64)
    params = _random_params(cfg, seed=11)
    x, positions = _inputs(cfg, 1, 14, seed=12)
    rng = np.random.default_rng(13)
    weights = jnp.asarray(rng.standard_normal(x.shape))
    apply = _apply_fn(cfg)
    loss = jax.jit(lambda p, x: jnp.sum(apply(p, x, positions)[0] * weights))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    leaves = jax.tree_util.tree_leaves_with_path((params, x))
    grad_leaves = jax.tree.leaves(grads)
    eps = 1e-5
    for i, ((path, leaf), grad) in enumerate(zip(leaves, grad_leaves)):
      direction = jnp.asarray(rng.standard_normal(leaf.shape))

      def shifted(step, i=i, direction=direction):
        flat = [a + step * direction if j == i else a for j, (_, a) in enumerate(leaves)]
        return jax.tree.unflatten(jax.tree.structure((params, x)), flat)
      finite = (loss(*shifted(eps)) - loss(*shifted(-eps))) / (2 * eps)
      analytic = jnp.sum(grad * direction)
      name = jax.tree_util.keystr(path)
      if name not in SHIFT_INVARIANT:  # every other leaf matters
        assert abs(analytic) > 1e-6, name
      np.testing.assert_allclose(analytic, finite, rtol=1e-6, atol=1e-7, err_msg=name)


def _decode(cfg, params, x, chunks, max_len):
  """Feeds x in consecutive chunks (a prefill, then more) against one cache: (all outputs,
  the final cache)."""
  apply = _apply_fn(cfg)
  batch, length, _ = x.shape
  cache = NativeSparseAttention.init_cache(cfg, batch, max_len, jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  out, start = [], 0
  for size in chunks + [1] * (length - sum(chunks)):
    y, cache = apply(params, x[:, start:start + size], positions[:, start:start + size], cache)
    out.append(y)
    start += size
  return jnp.concatenate(out, axis=1), cache


@pytest.mark.parametrize('case', ['mlp_rope', 'long_block_mqa'])
def test_prefill_then_decode_equals_forward(case):
  """A prompt before the first block is complete; a prompt past the first block, then a chunk
  of 6 completing blocks from its second token on (not aligned to the stride); a prompt ending
  mid-block; then one token at a time.
  The cache is longer than the sequence (unwritten slots must stay invisible) and ends with
  exactly the blocks complete within the sequence written."""
  cfg, length = CASES[case]
  l, d = cfg.nsa.block_len, cfg.nsa.stride
  params = _random_params(cfg, seed=14)
  x, positions = _inputs(cfg, 2, length, seed=15)
  want, _ = _apply_fn(cfg)(params, x, positions)
  for chunks in ([1], [l + 2, 6], [9]):
    got, cache = _decode(cfg, params, x, chunks, max_len=length + 5)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=f'chunks {chunks}')
  written = nsa_lib.num_blocks(length, l, d)
  assert cache.k_blocks.shape[1] == nsa_lib.num_blocks(length + 5, l, d) > written
  assert np.abs(cache.v_blocks[:, :written]).min() > 0
  assert np.all(cache.k_blocks[:, written:] == 0) and np.all(cache.v_blocks[:, written:] == 0)


def _with_implementation(cfg, implementation):
  return dataclasses.replace(cfg, nsa=dataclasses.replace(cfg.nsa, implementation=implementation))


@pytest.mark.parametrize('case', ['mlp_rope', 'long_block_mqa', 'mean_nope_two_selected'])
def test_kernels_in_the_layer_match_the_reference(case):
  """model.nsa.implementation='interpret' (kernels/nsa's Triton kernels, in Pallas' interpreter)
  against this file's NumPy reference, forward; its gradients with respect to every parameter
  and the input against the reference implementation's."""
  cfg, length = CASES[case]
  kernels, reference = _with_implementation(cfg, 'interpret'), _with_implementation(cfg,
                                                                                     'reference')
  params = _random_params(cfg, seed=21)
  x, positions = _inputs(cfg, 2, length, seed=22)
  got, _ = _apply_fn(kernels)(params, x, positions)
  np.testing.assert_allclose(got, _reference_nsa(cfg, params, x), atol=1e-5, rtol=1e-5)
  cotangent = jnp.asarray(np.random.default_rng(23).standard_normal(got.shape), got.dtype)

  def grads(c):
    module = NativeSparseAttention(c)
    def loss(p, x):
      return jnp.sum(module.apply({'params': p}, x, positions)[0] * cotangent)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  want = grads(reference)
  # Some gradients are zero but for rounding (a bias shared by every compressed key moves all
  # of a query's cmp scores alike, which its softmax ignores): absolute slack at 1e-6 of the
  # largest gradient.
  scale = max(np.abs(w).max() for w in jax.tree.leaves(want))
  for path, g, w in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(grads(kernels)),
                        jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-6 * scale, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path[0]))


def test_kernels_decode_over_the_cache_as_the_forward():
  """Prefill then one token at a time through the kernels (explicit positions over the cache)
  equals the whole-sequence forward through them."""
  cfg, length = CASES['mlp_rope']
  cfg = _with_implementation(cfg, 'interpret')
  params = _random_params(cfg, seed=14)
  x, positions = _inputs(cfg, 2, length, seed=15)
  want, _ = _apply_fn(cfg)(params, x, positions)
  got, _ = _decode(cfg, params, x, [cfg.nsa.block_len + 2, 6], max_len=length + 5)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('axes', [dict(data=2, fsdp=2, tensor=2, expert=1),
                                  dict(data=1, fsdp=2, tensor=4, expert=1)])
def test_kernels_on_a_mesh_equal_one_device(axes):
  """Under a mesh the kernels run per shard (jax.shard_map over batch and K/V heads): outputs and
  gradients equal one device's. With tensor=4 and 2 K/V heads the heads cannot split and stay
  whole on each device."""
  from efficientjax import parallel  # pylint: disable=g-import-not-at-top
  cfg, length = CASES['mlp_rope']
  cfg = _with_implementation(cfg, 'interpret')
  params = _random_params(cfg, seed=31)
  x, positions = _inputs(cfg, 4, length, seed=32)
  module = NativeSparseAttention(cfg)
  cotangent = jnp.asarray(np.random.default_rng(33).standard_normal(x.shape[:2] + (cfg.embed_dim,)),
                          x.dtype)

  def run(p, x):
    out = module.apply({'params': p}, x, positions)[0]
    return out, jnp.sum(out * cotangent)

  fn = jax.jit(jax.value_and_grad(lambda p, x: run(p, x)[1], argnums=(0, 1)))
  (want_loss, want_grads), want = fn(params, x), jax.jit(run)(params, x)[0]
  mesh = parallel.make_mesh(axes)
  with parallel.activate(mesh):
    lowered = jax.jit(run).lower(params, x).as_text()
    got = jax.jit(run)(params, x)[0]
    got_loss, got_grads = fn(params, x)
  assert 'shard_map' in lowered or 'sdy.manual_computation' in lowered
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, atol=1e-5 * np.abs(w).max() + 1e-7, rtol=1e-4)


def test_implementation_used_is_what_runs():
  """The record's model.attention.implementation: auto resolves to the reference on this CPU
  (the kernels compile for NVIDIA GPUs only); a relative position always takes the reference."""
  cfg, _ = CASES['mlp_rope']
  assert NativeSparseAttention.implementation_used(cfg) == 'reference'  # auto on a CPU
  assert NativeSparseAttention.implementation_used(_with_implementation(cfg, 'interpret')) == (
      'interpret')
  # Fine-tuning's packed rows take the reference whatever is asked for.
  assert NativeSparseAttention.implementation_used(_with_implementation(cfg, 'interpret'),
                                                   packed_rows=True) == 'reference'
  relative, _ = CASES['long_selection_relative']
  assert NativeSparseAttention.implementation_used(_with_implementation(relative, 'auto')) == (
      'reference')


def test_kernels_refuse_packed_rows():
  cfg, length = CASES['mlp_rope']
  cfg = _with_implementation(cfg, 'interpret')
  params = _random_params(cfg)
  x, positions = _inputs(cfg, 1, length)
  segments = jnp.repeat(jnp.arange(2), length // 2)[None]
  with pytest.raises(ConfigError, match='packed rows'):
    NativeSparseAttention(cfg).apply({'params': params}, x, positions, segment_ids=segments)


def test_group_heads_share_their_selection():
  """Eq. 10: a K/V group's heads pick blocks by their summed importance, not each its own.
  Group 0: head 0 favours selection block 1 (0.6 vs 0.4), head 1 block 2 (0 vs 1.0): the sum
  picks block 2 for both. Group 1's heads agree on block 1."""
  l = d = sl = 2
  p_cmp = np.zeros((1, 2, 2, 1, 6))  # [batch, kv_heads, group, one query, blocks]
  p_cmp[0, 0, 0, 0, 1], p_cmp[0, 0, 0, 0, 2] = 0.6, 0.4
  p_cmp[0, 0, 1, 0, 2] = 1.0
  p_cmp[0, 1, :, 0, 1] = 1.0
  weights = nsa_lib.selection_weights(6, 6, l, d, sl)
  query = jnp.array([[11]])  # in block 5: blocks 5, 0 and 4 are forced, one more is chosen
  selected = nsa_lib.select_blocks(nsa_lib.block_importance(jnp.asarray(p_cmp), weights),
                                   query, sl, num_selected=4)
  assert selected.shape == (1, 2, 1, 4)  # one set per K/V group, none per query head
  assert sorted(np.asarray(selected[0, 0, 0]).tolist()) == [0, 2, 4, 5]
  assert sorted(np.asarray(selected[0, 1, 0]).tolist()) == [0, 1, 4, 5]
  alone = nsa_lib.select_blocks(nsa_lib.block_importance(jnp.asarray(p_cmp[:, :1, :1]), weights),
                                query, sl, num_selected=4)
  assert sorted(np.asarray(alone[0, 0, 0]).tolist()) == [0, 1, 4, 5]  # head 0 by itself


def test_selection_leaves_future_blocks_out_and_ranks_the_forced_ones():
  """Importance rising with the block index, which the forced blocks outrank: current, then
  initial, then previous; slots no block at or before the query can fill are -1."""
  importance = jnp.arange(8.0)[None, None, None, :] * jnp.ones((1, 1, 4, 1))
  queries = jnp.array([[0, 5, 9, 29]])  # blocks 0, 1, 2, 7 of length 4

  def select(n):
    return np.asarray(nsa_lib.select_blocks(importance, queries, 4, num_selected=n)[0, 0]).tolist()
  assert select(4) == [[0, -1, -1, -1], [1, 0, -1, -1], [2, 0, 1, -1], [7, 0, 6, 5]]
  assert select(2) == [[0, -1], [1, 0], [2, 0], [7, 0]]
  assert select(1) == [[0], [1], [2], [7]]


def _model_fields(cfg, **changes):
  m = cfg.to_dict()
  nsa = dict(m['nsa'])
  for key, value in changes.items():
    if key.startswith('nsa.'):
      nsa[key[4:]] = value
    else:
      m[key] = value
  m['nsa'] = nsa
  return m


@pytest.mark.parametrize('changes, field, phrase', [
    ({'nsa.block_len': 5}, 'model.nsa.stride', 'does not divide model.nsa.block_len'),
    ({'nsa.select_block_len': 5}, 'model.nsa.select_block_len', 'not a multiple'),
    ({'nsa.compression': 'mean'}, 'model.nsa.compression', 'block_len = stride'),
    ({'nsa.compression': 'conv'}, 'model.nsa.compression', 'unknown value'),
    ({'nsa.num_selected': 0}, 'model.nsa.num_selected', 'at least 1'),
    ({'nsa.window': 0}, 'model.nsa.window', 'at least 1'),
    ({'nsa.stride': 0}, 'model.nsa.stride', 'at least 1'),
    ({'num_kv_heads': 3}, 'model.num_kv_heads', 'does not divide'),
    ({'sliding_window': 16}, 'model.sliding_window', 'model.nsa.window'),
    ({'qk_norm': True}, 'model.qk_norm', 'not implemented'),
    ({'nsa.implementation': 'flash'}, 'model.nsa.implementation', 'unknown value'),
    ({'nsa.implementation': 'triton', 'position': 'relative'}, 'model.nsa.implementation',
     'no attention bias'),
])
def test_check_rejects(changes, field, phrase):
  errors = NativeSparseAttention.check(_model_fields(BASE, **changes), 64)
  assert [e.field for e in errors] == [field], [str(e) for e in errors]
  assert phrase in errors[0].message


def test_check_accepts_the_paper_and_test_shapes():
  assert NativeSparseAttention.check(_model_fields(BASE), 64) == []
  paper = dataclasses.replace(BASE, nsa=NSAConfig())
  assert NativeSparseAttention.check(_model_fields(paper), 4096) == []
  for cfg, _ in CASES.values():
    assert NativeSparseAttention.check(_model_fields(cfg), 64) == []


def test_flops_count_the_keys_each_branch_attends():
  """Against a count over positions: complete compressed blocks, the selected blocks' tokens
  (the forced current block partial), the window; token-level branches in mha's convention
  (mean_context: the diagonal counts half)."""
  cfg = _config(select_block_len=8, num_selected=3, window=8)
  length, (l, d, sl, n, w) = 40, (4, 2, 8, 3, 8)
  cmp = [sum(1 for j in range(length) if j * d + l - 1 <= t) for t in range(length)]
  slc = [min(n - 1, t // sl) * sl + t % sl + 1 for t in range(length)]
  window = [min(t + 1, w) for t in range(length)]
  assert mean_context(length, w) == pytest.approx(np.mean(window) - 0.5)
  keys = np.mean(cmp) + np.mean(slc) - 0.5 + mean_context(length, w)
  flops = NativeSparseAttention.flops_per_token(cfg, length)
  per_key = 4 * cfg.num_heads * cfg.head_dim
  assert flops['attention'] == pytest.approx(per_key * keys)
  num_cmp = nsa_lib.num_blocks(length, l, d)
  assert flops['attention_as_executed'] == pytest.approx(
      per_key * (num_cmp + 2 * length) + 2 * cfg.num_heads * num_cmp * (length // sl))
  e, h, kv, hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  params = _random_params(cfg)
  # Every weight of the layer once per token (a multiply-add each), the compression MLPs once
  # per K/V head and block of d tokens, biases not counted.
  matrices = sum(a.size for path, a in jax.tree_util.tree_leaves_with_path(params)
                 if path[-1].key == 'kernel' and 'compress' not in path[0].key)
  compress = sum(a.size for path, a in jax.tree_util.tree_leaves_with_path(params)
                 if path[-1].key == 'kernel' and 'compress' in path[0].key)
  assert flops['projections'] == pytest.approx(2 * matrices + 2 * kv * compress / d)
  assert e * h * hd + 6 * e * kv * hd + h * hd * e + 3 * e * h == matrices


def test_cache_values_per_token():
  cfg = _config()
  cache = NativeSparseAttention.init_cache(cfg, 1, 1000, jnp.float32)
  counted = sum(a.size for a in jax.tree.leaves(cache)) / 1000
  assert counted == pytest.approx(NativeSparseAttention.cache_values_per_token(cfg), rel=0.01)

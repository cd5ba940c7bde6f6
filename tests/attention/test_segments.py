"""Packed examples (segment ids) never attend to each other, in every attention variant.

A row packs several examples, each with its own segment id (1, 2, ...; 0 marks padding) and
positions restarting at 0. The independent reference is the model run on each example alone: its own row,
from position 0, no segment ids (what follows it in that row is in its future, so causality,
which test_variants.py::test_causal checks, keeps it out). On top of that: changing one segment's
tokens changes no other segment's logits by a single bit, gradients do not cross segments,
padding stays finite, and `segment_ids=None` is the unmasked model. The cuDNN branch cannot run
here; its arguments are traced through jax's cuDNN wrapper and its semantics emulated (see
`test_cudnn_*`, and what stays unverified in core.dot_product_attention).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientjax.attention import ATTENTION
from efficientjax.attention import core
from efficientjax.attention import nsa as nsa_lib
from efficientjax.attention.positions import segment_positions
from efficientjax.model import Transformer
from tests.attention.variants import TINY

LENGTH = 32
# Per row: example lengths, then padding (negative). Examples start at odd offsets (19, 3, 27), so
# a block grid cut at row offsets would straddle two examples; the 19- and 24-token examples have
# 5 and 6 NSA selection blocks (l' = 4), so their later queries choose by importance beyond the 3
# forced blocks, in the second at blocks not aligned with the row's.
LAYOUT = ((19, 9, -4), (3, 24, 5))
CASES = {
    **TINY,
    # Core's window beside the segment mask; the unscanned layer loop, which passes segment ids
    # on its own path (mqa's module is gqa's and mha's, whose scanned form is tested).
    'gqa': dataclasses.replace(TINY['gqa'], sliding_window=5),
    'mqa': dataclasses.replace(TINY['mqa'], scan_layers=False),
    'mha_learned': dataclasses.replace(TINY['mha'], position='learned', max_seq_len=LENGTH),
    'mha_relative': dataclasses.replace(TINY['mha'], position='relative'),
    'nsa_relative': dataclasses.replace(TINY['nsa'], position='relative'),
}


def _layout():
  """(segment ids, positions, [(row, start, length, is_padding)]) for LAYOUT."""
  seg = np.zeros((len(LAYOUT), LENGTH), np.int32)
  pos = np.zeros((len(LAYOUT), LENGTH), np.int32)
  spans = []
  for r, lengths in enumerate(LAYOUT):
    start, sid = 0, 0
    for n in lengths:
      pad = n < 0
      n = abs(n)
      if not pad:
        sid += 1
        seg[r, start:start + n] = sid
      pos[r, start:start + n] = np.arange(n)
      spans.append((r, start, n, pad))
      start += n
    assert start == LENGTH
  return seg, pos, spans


SEGMENTS, POSITIONS, SPANS = _layout()
EXAMPLES = [s for s in SPANS if not s[3]]


def _tokens(seed, vocab):
  """Tokens with disjoint id ranges per span (padding included), so an embedding row's gradient
  belongs to one span."""
  rng = np.random.default_rng(seed)
  width = vocab // len(SPANS)
  tok = np.zeros((len(LAYOUT), LENGTH), np.int32)
  for i, (r, s, n, _) in enumerate(SPANS):
    tok[r, s:s + n] = i * width + rng.integers(0, width, n)
  return tok


def _random_params(cfg, seed=0, scale=0.3):
  """Every parameter drawn normal(scale) (norm gains 1 + that), from numpy, so no per-shape
  compilation. Larger than init_std: with near-uniform attention NSA's block importances tie
  within float rounding, and the packed and the lone row may break such a tie differently."""
  shapes = nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                                   jnp.zeros((1, 8), jnp.int32))['params'])
  rng = np.random.default_rng(seed)

  def draw(path, a):
    x = scale * rng.standard_normal(a.shape)
    return jnp.asarray(1 + x if path[-1].key == 'scale' else x, a.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def _case(name):
  """params, the jitted packed and plain forwards, and the packed row's logits."""
  cfg = CASES[name]
  model = Transformer(cfg)
  packed = jax.jit(lambda p, t, pos, s: model.apply({'params': p}, t, pos, s))
  plain = jax.jit(lambda p, t: model.apply({'params': p}, t))
  params = _random_params(cfg)
  tokens = _tokens(1, cfg.vocab_size)
  return cfg, model, params, packed, plain, tokens, packed(params, tokens, POSITIONS, SEGMENTS)


def test_every_registered_variant_is_tested():
  assert set(ATTENTION) <= set(CASES)


@pytest.mark.parametrize('name', sorted(CASES))
def test_packed_examples_equal_each_example_alone(name):
  cfg, _, params, _, plain, tokens, got = _case(name)
  # Each example at the start of its own row, the rest of the row filler (its future).
  alone = np.random.default_rng(3).integers(0, cfg.vocab_size, (len(EXAMPLES), LENGTH))
  for i, (r, s, n, _) in enumerate(EXAMPLES):
    alone[i, :n] = tokens[r, s:s + n]
  want = plain(params, alone)
  assert np.isfinite(np.asarray(got)).all()  # padding included
  for i, (r, s, n, _) in enumerate(EXAMPLES):
    np.testing.assert_allclose(got[r, s:s + n], want[i, :n], atol=1e-5, rtol=1e-5,
                               err_msg=f'{name}: example {i} (row {r}, offset {s}, {n} tokens)')


@pytest.mark.parametrize('name', sorted(CASES))
def test_changing_one_segment_changes_no_other(name):
  """Every span in turn (padding too) gets other tokens: every other span's logits keep every
  bit, its own change."""
  cfg, _, params, packed, _, tokens, before = _case(name)
  before = np.asarray(before)
  other = _tokens(2, cfg.vocab_size)
  for r, s, n, pad in SPANS:
    changed = tokens.copy()
    changed[r, s:s + n] = other[r, s:s + n]
    after = np.asarray(packed(params, changed, POSITIONS, SEGMENTS))
    inside = np.zeros(before.shape[:2], bool)
    inside[r, s:s + n] = True
    np.testing.assert_array_equal(after[~inside], before[~inside],
                                  err_msg=f'{name}: changing row {r} [{s}, {s + n}) leaked')
    assert np.abs(after[inside] - before[inside]).max() > 1e-3, (name, r, s, pad)


@pytest.mark.parametrize('name', ['gqa', 'nsa_relative'])  # core's mask; NSA's own
def test_gradients_do_not_cross_segments(name):
  """d(loss on one span)/d(embedding rows of the other spans' tokens) is exactly zero (each span
  has its own token ids), and not zero for its own."""
  cfg, model, params, _, _, tokens, _ = _case(name)
  weights = np.random.default_rng(4).standard_normal((len(LAYOUT), LENGTH, cfg.vocab_size))

  @jax.jit
  def grad(table, where):
    loss = lambda t: jnp.sum(where[..., None] * weights * model.apply(
        {'params': {**params, 'embed': {'embedding': t}}}, tokens, jnp.asarray(POSITIONS),
        SEGMENTS))
    return jax.grad(loss)(table)

  width = cfg.vocab_size // len(SPANS)
  for i, (r, s, n, _) in enumerate(SPANS):
    where = np.zeros((len(LAYOUT), LENGTH), np.float32)
    where[r, s:s + n] = 1
    g = np.abs(np.asarray(grad(params['embed']['embedding'], where))).sum(-1)
    own = np.zeros(cfg.vocab_size, bool)
    own[i * width:(i + 1) * width] = True
    assert g[~own].max() == 0, (name, i, np.nonzero(g[~own])[0])
    assert g[own].max() > 0


@pytest.mark.parametrize('name', ['mha_relative', 'nsa'])
def test_one_segment_is_the_unmasked_model(name):
  """All-ones segment ids give the model without segment ids: bit for bit where the variant's
  mask is and-ed into XLA's causal one, to float rounding in NSA (its packed form sums its block
  importances over differently laid out slots)."""
  cfg, _, params, packed, plain, tokens, _ = _case(name)
  arange = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), SEGMENTS.shape)
  ones, none = packed(params, tokens, arange, np.ones_like(SEGMENTS)), plain(params, tokens)
  if cfg.attention == 'nsa':
    np.testing.assert_allclose(ones, none, atol=1e-5, rtol=1e-5)
  else:
    np.testing.assert_array_equal(ones, none)


def test_positions_default_to_restarting_per_segment():
  """Without positions, the model derives them from the segment ids: LAYOUT's hand-written
  ones (and so each example's logits alone, by the tests above)."""
  _, model, params, _, _, tokens, packed_logits = _case('mha_relative')
  derived = jax.jit(lambda p, t, s: model.apply({'params': p}, t, segment_ids=s))
  np.testing.assert_array_equal(derived(params, tokens, SEGMENTS), packed_logits)


def test_segment_positions():
  # LAYOUT's rows, and ids that repeat, fall and end in padding.
  other = np.array([[3, 3, 1, 1, 1, 0, 0] + [5] * (LENGTH - 7)], np.int32)
  want = np.array([[0, 1, 0, 1, 2, 0, 1] + list(range(LENGTH - 7))])
  got = jax.jit(segment_positions)(np.concatenate([SEGMENTS, other]))
  np.testing.assert_array_equal(got, np.concatenate([POSITIONS, want]))


@pytest.mark.parametrize('block_len,stride,rows', [
    (4, 2, [(7, 2, 9, 1, 13), (2,) * 16, (1,) * 32, (4, 4, 4, 4, 4, 4, 8)]),
    (8, 4, [(3, 5, 8, 16), (8,) * 4, (9, 11, 12)])])
def test_packed_block_starts_are_every_whole_block(block_len, stride, rows):
  """Against a loop over each example: its blocks start at its positions 0, d, 2d, ... and end
  inside it; all of them fit the row's length // stride slots, in row order."""
  seg = np.stack([np.repeat(np.arange(1, len(r) + 1), r) for r in rows]).astype(np.int32)
  pos = np.stack([np.concatenate([np.arange(n) for n in r]) for r in rows]).astype(np.int32)
  starts, valid = jax.jit(nsa_lib.packed_block_starts, static_argnums=(2, 3))(
      pos, seg, block_len, stride)
  assert starts.shape == (len(rows), LENGTH // stride)
  for i, lengths in enumerate(rows):
    want, offset = [], 0
    for n in lengths:
      want += [offset + p for p in range(0, n - block_len + 1, stride)]
      offset += n
    assert np.asarray(starts[i])[np.asarray(valid[i])].tolist() == want, lengths


def test_segment_ids_with_a_cache_are_refused():
  with pytest.raises(ValueError, match='segment_ids are for whole sequences'):
    core.dot_product_attention(jnp.zeros((1, 2, 4, 8)), jnp.zeros((1, 2, 4, 8)),
                               jnp.zeros((1, 2, 4, 8)), q_positions=jnp.zeros((1, 2), jnp.int32),
                               k_positions=jnp.zeros((1, 2), jnp.int32),
                               segment_ids=jnp.ones((1, 2), jnp.int32))


# ---------------------------------------------------------------------------------------------
# The cuDNN branch, without a GPU.


def _attention_reference(q, k, v, segment_ids, window, bias):
  """Plain float64 softmax attention over keys j <= i of i's segment (and within the window)."""
  q, k, v, bias = (np.asarray(a, np.float64) for a in (q, k, v, bias))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, 2), np.repeat(v, group, 2)
  t = q.shape[1]
  i, j = np.arange(t)[:, None], np.arange(t)[None]
  allowed = (j <= i) & (j > i - window)
  allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  s = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1]) + bias
  s = np.where(allowed, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', p, v)


def _core_inputs(dtype):
  rng = np.random.default_rng(5)
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  q, k, v = draw(2, LENGTH, 4, 16), draw(2, LENGTH, 2, 16), draw(2, LENGTH, 2, 12)
  bias = jnp.asarray(rng.standard_normal((2, 4, LENGTH, LENGTH)), jnp.float32)
  return q, k, v, bias


@pytest.fixture
def cudnn_version_stub(monkeypatch):
  """jax's cuDNN wrapper asks the installed cuDNN for its version before anything else; with
  that answered (9.10) it checks and traces its arguments as on a GPU."""
  from jax._src.cudnn import fused_attention_stablehlo as fa
  monkeypatch.setattr(fa, 'check_cudnn_version', lambda: 91000)
  return fa


def test_cudnn_arguments_trace_through_jax(cudnn_version_stub):
  """What core passes for implementation='cudnn' (bf16, grouped heads, a narrower v, a bias, a
  window, segment ids) passes jax's checks (check_layout, check_is_flash_attention) and traces,
  forward and backward, to its cuDNN primitives with the causal mask type, the window, and the
  segment mask folded into one [B, heads, T, T] bias; and so does the whole model's step for
  each variant that calls core."""
  q, k, v, bias = _core_inputs(jnp.bfloat16)
  seg = jnp.asarray(SEGMENTS)

  def loss(q, k, v, bias):
    out = core.dot_product_attention(q, k, v, implementation='cudnn', bias=bias, window=5,
                                     segment_ids=seg)
    return jnp.sum(out.astype(jnp.float32))
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
  eqns = {e.primitive.name: e for e in jaxpr.jaxpr.eqns}
  assert {'dot_product_attention_fwd_wrapper', 'dot_product_attention_bwd_wrapper'} <= set(eqns)
  fwd = eqns['dot_product_attention_fwd_wrapper']
  assert fwd.params['mask_type'] == cudnn_version_stub.MaskType.CAUSAL
  assert fwd.params['sliding_window_length'] == 5
  assert fwd.params['variadic_args'] == (True, True)  # a bias, and its gradient
  assert fwd.invars[3].aval.shape == (2, 4, LENGTH, LENGTH)
  assert fwd.invars[3].aval.dtype == jnp.bfloat16

  # cuDNN needs a q/k head width that is a multiple of 8: MLA's tiny 8 + 4 is widened to 12 + 4.
  mla = dataclasses.replace(CASES['mla'], mla=dataclasses.replace(CASES['mla'].mla,
                                                                 qk_nope_head_dim=12))
  gqa = dataclasses.replace(CASES['gqa'], position='relative')  # a bias and a window
  for name, cfg in (('gqa', gqa), ('mla', mla)):
    cfg = dataclasses.replace(cfg, attention_impl='cudnn', dtype=jnp.bfloat16)
    params = _random_params(cfg)
    model = Transformer(cfg)
    step = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, _tokens(1, cfg.vocab_size),
                                                  jnp.asarray(POSITIONS), seg)))
    # The layers are scanned: the primitives sit inside the scan's body.
    text = str(jax.make_jaxpr(step)(params))
    assert 'dot_product_attention_bwd_wrapper' in text, name


def test_cudnn_semantics_on_what_core_passes(monkeypatch):
  """jax's cuDNN entry point replaced by cuDNN's documented semantics, fed exactly what it would
  receive: jax's own `combine_bias_and_mask` (the boolean mask as a bf16 additive bias), then
  cuDNN's causal mask and its sliding window (pos - L, pos]. The result equals the float64
  reference and XLA's, and keys of other segments carry exactly zero weight."""
  from jax._src.cudnn import fused_attention_stablehlo as fa
  from jax._src.nn import functions as nn_functions
  seen = {}

  def cudnn(query, key, value, bias, mask, q_seqlen, kv_seqlen, *, scale, mask_type,
            sliding_window_length, return_residual):
    assert q_seqlen is None and kv_seqlen is None and not return_residual
    seen.update(mask=mask, mask_type=mask_type, window=sliding_window_length)
    bias = fa.combine_bias_and_mask(bias, mask, query.dtype)
    fa.check_layout(query, key, value, bias, None, None, None, None, None, None,
                    fa.AttentionLayout.BTNH)
    group = query.shape[2] // key.shape[2]
    key, value = jnp.repeat(key, group, 2), jnp.repeat(value, group, 2)
    logits = jnp.einsum('btnh,bsnh->bnts', query, key, preferred_element_type=jnp.float32)
    logits = logits * scale + bias.astype(jnp.float32)
    t = query.shape[1]
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None]
    allowed = (j <= i) if mask_type == fa.MaskType.CAUSAL else jnp.ones((t, t), bool)
    if sliding_window_length is not None:
      allowed &= j > i - sliding_window_length
    probs = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
    return jnp.einsum('bnts,bsnh->btnh', probs.astype(value.dtype), value)

  assert hasattr(nn_functions, 'cudnn_dot_product_attention')  # the name jax.nn calls
  monkeypatch.setattr(nn_functions, 'cudnn_dot_product_attention', cudnn)
  q, k, v, bias = _core_inputs(jnp.bfloat16)
  seg = jnp.asarray(SEGMENTS)
  run = jax.jit(lambda impl, q, k, v: core.dot_product_attention(
      q, k, v, implementation=impl, bias=bias, window=5, segment_ids=seg), static_argnums=0)
  got = run('cudnn', q, k, v)
  assert seen['mask'].shape == (2, 1, LENGTH, LENGTH) and seen['mask'].dtype == jnp.bool_
  assert seen['mask_type'] == fa.MaskType.CAUSAL and seen['window'] == 5
  # The reference sees the bias as cuDNN gets it, rounded to bf16.
  want = _attention_reference(q, k, v, SEGMENTS, 5, bias.astype(jnp.bfloat16))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=3e-2, rtol=3e-2)
  np.testing.assert_allclose(np.asarray(run('xla', q, k, v), np.float64), want, atol=3e-2,
                             rtol=3e-2)
  # Other segments' keys and values changed: every bit of the rest stays.
  for r, s, n, _ in SPANS:
    noise = jnp.zeros_like(k).at[r, s:s + n].set(7.0)
    changed = run('cudnn', q, k + noise, v + noise[..., :12])
    inside = np.zeros((2, LENGTH), bool)
    inside[r, s:s + n] = True
    np.testing.assert_array_equal(np.asarray(changed)[~inside], np.asarray(got)[~inside])

"""Properties every registered attention variant must have, and the K/V-head family's identities.

Every registry entry must appear in `variants.TINY`, so a new variant is tested by adding one line.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientjax.attention import ATTENTION
from efficientjax.attention import cache as kv_cache
from efficientjax.model import Transformer, init_cache
from tests.attention.variants import BASE, TINY
from tests.helpers import jitted_forward, jitted_init, prefill_then_decode

LENGTH = 24


def _init(cfg, seed=0, batch=2, length=LENGTH):
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(seed + 1), (batch, length), 0, cfg.vocab_size)
  params = nn.unbox(jitted_init(cfg)(jax.random.key(seed), tokens)['params'])
  return model, params, tokens


def _forward(model, params, tokens):
  return jitted_forward(model.config)({'params': params}, tokens)


def test_every_registered_variant_has_a_tiny_config():
  assert set(ATTENTION) == set(TINY)


@pytest.mark.parametrize('name', sorted(TINY))
def test_causal(name):
  cfg = TINY[name]
  model, params, tokens = _init(cfg, seed=4)
  cut = 13
  changed = tokens.at[:, cut:].set((tokens[:, cut:] + 7) % cfg.vocab_size)
  before, after = _forward(model, params, tokens), _forward(model, params, changed)
  np.testing.assert_allclose(before[:, :cut], after[:, :cut], atol=1e-6, rtol=1e-6)
  assert np.abs(before[:, cut:] - after[:, cut:]).max() > 1e-3  # the change is visible after


@pytest.mark.parametrize('scan_layers', [True, False], ids=['scanned', 'unscanned'])
@pytest.mark.parametrize('name', sorted(TINY))
def test_prefill_then_decode_equals_forward(name, scan_layers):
  cfg = dataclasses.replace(TINY[name], scan_layers=scan_layers)
  model, params, tokens = _init(cfg, seed=2)
  want = _forward(model, params, tokens)
  # A one-token prompt (all decoding), and one that ends mid-block (NSA's blocks here are 2-4
  # tokens) in a cache longer than the sequence (unwritten slots must stay invisible).
  for prompt_len, max_len in ((1, None), (7, LENGTH + 5)):
    got = prefill_then_decode(cfg, params, tokens, prompt_len, max_len)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5,
                               err_msg=f'{name}: prompt {prompt_len}')


@pytest.mark.parametrize('name', sorted(TINY))
def test_cache_size_matches_the_analytic_count(name):
  cfg = TINY[name]
  variant = ATTENTION.get(cfg.attention)
  cache = init_cache(cfg, batch=3, max_len=64, dtype=jnp.bfloat16)
  per_token = kv_cache.nbytes(cache) / (3 * 64 * cfg.num_layers * 2)
  assert per_token == pytest.approx(variant.cache_values_per_token(cfg), rel=0.1)


def _expand_kv(params, cfg, num_kv_heads):
  """The same network with K/V heads repeated so each query head has its own copy: query head h
  reads K/V head h // group (the grouping convention of GQA and Hugging Face)."""
  group = num_kv_heads // cfg.num_kv_heads

  def expand(path, a):
    names = [getattr(k, 'key', None) for k in path]
    if 'attn' in names and names[-2] in ('k', 'v'):
      return jnp.repeat(a, group, axis=-2)  # kernel [layers, embed, kv_heads, head_dim]
    return a
  return jax.tree_util.tree_map_with_path(expand, params)


@pytest.mark.parametrize('kv', [1, 2], ids=['mqa', 'gqa'])
def test_grouped_kv_heads_equal_mha_with_repeated_kv_weights(kv):
  """GQA/MQA compute MHA with tied K/V heads: with each K/V head's weights copied to every query
  head of its group, MHA gives the same logits (so the grouping is the standard one)."""
  grouped = TINY['mqa' if kv == 1 else 'gqa']
  model, params, tokens = _init(grouped, seed=5)
  mha = Transformer(BASE)
  np.testing.assert_allclose(_forward(model, params, tokens),
                             _forward(mha, _expand_kv(params, grouped, BASE.num_heads), tokens),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('kv', [1, 4], ids=['one_group_is_mqa', 'groups_of_one_is_mha'])
def test_gqa_limits(kv):
  """GQA with one K/V group is MQA, and with one query head per group it is MHA: the same
  weights give the same logits under either name."""
  other = TINY['mqa'] if kv == 1 else TINY['mha']
  gqa = dataclasses.replace(other, attention='gqa')
  model, params, tokens = _init(other, seed=6)
  np.testing.assert_array_equal(_forward(model, params, tokens),
                                _forward(Transformer(gqa), params, tokens))


def _attention_reference(q, k, v, window=None):
  """Plain causal softmax attention per head; q [b,t,h,d], k/v [b,t,h,d] (repeated heads)."""
  t = q.shape[1]
  i, j = np.arange(t)[:, None], np.arange(t)[None]
  allowed = j <= i
  if window is not None:
    allowed &= j > i - window
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  s = jnp.where(allowed, s, -jnp.inf)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, -1), v)


@pytest.mark.parametrize('window', [None, 5])
def test_core_against_plain_attention(window):
  from efficientjax.attention.core import dot_product_attention
  keys = jax.random.split(jax.random.key(7), 3)
  q = jax.random.normal(keys[0], (2, 11, 4, 8))
  k = jax.random.normal(keys[1], (2, 11, 2, 8))
  v = jax.random.normal(keys[2], (2, 11, 2, 6))  # a narrower v, as MLA has
  want = _attention_reference(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2), window)
  got = dot_product_attention(q, k, v, implementation='xla', window=window)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # The cache form: the same keys in a longer buffer, queries at their positions.
  pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
  buf = lambda a: jnp.pad(a, ((0, 0), (0, 6), (0, 0), (0, 0)), constant_values=9.0)
  got = dot_product_attention(q, buf(k), buf(v), window=window, q_positions=pos,
                              k_positions=kv_cache.slot_positions(buf(k)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_sliding_window_and_qk_norm_and_biases_through_the_model():
  """The options of the K/V-head family against the plain per-head computation, forward and
  backward."""
  cfg = dataclasses.replace(TINY['gqa'], sliding_window=5, qk_norm=True, qkv_bias=True,
                            num_layers=1)
  model, params, tokens = _init(cfg, seed=8)
  # Non-zero biases and norm gains, so a dropped term shows.
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: a + 0.3 * jax.random.normal(jax.random.key(len(str(path))), a.shape)
      if any(getattr(k, 'key', None) in ('bias', 'scale') for k in path) else a, params)
  p = jax.tree.map(lambda a: a[0], params['blocks'])
  a = p['attn']

  def rms(x, g):
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * g

  def rope(x):
    t, d = x.shape[1], x.shape[-1]
    freq = cfg.rope_theta ** (-np.arange(0, d, 2) / d)
    ang = np.arange(t)[:, None] * freq[None]
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)

  x = params['embed']['embedding'][tokens]
  h = rms(x, p['attn_norm']['scale'])
  group = cfg.num_heads // cfg.num_kv_heads

  def reference(a, h):
    proj = lambda n: jnp.einsum('bte,ehd->bthd', h, a[n]['kernel']) + a[n]['bias']
    q = rope(rms(proj('q'), a['q_norm']['scale']))
    k = rope(rms(proj('k'), a['k_norm']['scale']))
    o = _attention_reference(q, jnp.repeat(k, group, 2), jnp.repeat(proj('v'), group, 2), 5)
    return jnp.einsum('bthd,hde->bte', o, a['o']['kernel'])

  positions = jnp.broadcast_to(jnp.arange(LENGTH), tokens.shape)
  module = lambda a, h: ATTENTION.get('gqa')(cfg).apply({'params': a}, h, positions)[0]
  np.testing.assert_allclose(jax.jit(module)(a, h), reference(a, h), atol=2e-5, rtol=2e-5)
  # Backward: gradients of every parameter (biases and norm gains included) and of the input.
  loss = lambda f: jax.jit(jax.grad(lambda a, h: jnp.sum(jnp.sin(f(a, h))), argnums=(0, 1)))
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-4),
               loss(module)(a, h), loss(reference)(a, h))

"""The model against independent computations of the same function."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientjax.model import ModelConfig, Transformer, scan_params, unscan_params
from tests.helpers import jitted_forward, jitted_init

TINY = ModelConfig(vocab_size=97, embed_dim=48, num_layers=3, num_heads=4, num_kv_heads=2,
                   head_dim=12, mlp_dim=80, rope_theta=500.0)


def _init(cfg, seed=0, batch=2, length=16):
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(seed + 1), (batch, length), 0, cfg.vocab_size)
  params = nn.unbox(jitted_init(cfg)(jax.random.key(seed), tokens)['params'])
  return model, params, tokens


def _apply(model, params, tokens):
  # Jitted (once per config): op-by-op dispatch makes these tiny models slow on CPU.
  return jitted_forward(model.config)({'params': params}, tokens)


def _reference_forward(cfg: ModelConfig, params, tokens):
  """The same network in plain jnp, written from the Llama equations, per layer."""
  def rms(x, g):
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * g

  def rope(x):  # [b, t, h, d], half-split pairs
    t, d = x.shape[1], x.shape[-1]
    freq = cfg.rope_theta ** (-np.arange(0, d, 2) / d)
    ang = np.arange(t)[:, None] * freq[None]
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)

  x = params['embed']['embedding'][tokens]
  t = tokens.shape[1]
  causal = np.tril(np.ones((t, t), bool))
  group = cfg.num_heads // cfg.num_kv_heads
  for i in range(cfg.num_layers):
    p = jax.tree.map(lambda a, i=i: a[i], params['blocks'])
    h = rms(x, p['attn_norm']['scale'])
    q = rope(jnp.einsum('bte,ehd->bthd', h, p['attn']['q']['kernel']))
    k = rope(jnp.einsum('bte,ehd->bthd', h, p['attn']['k']['kernel']))
    v = jnp.einsum('bte,ehd->bthd', h, p['attn']['v']['kernel'])
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(cfg.head_dim)
    s = jnp.where(causal, s, -jnp.inf)
    o = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, -1), v)
    x = x + jnp.einsum('bthd,hde->bte', o, p['attn']['o']['kernel'])
    h = rms(x, p['mlp_norm']['scale'])
    m = jax.nn.silu(h @ p['mlp']['gate']['kernel']) * (h @ p['mlp']['up']['kernel'])
    x = x + m @ p['mlp']['down']['kernel']
  x = rms(x, params['final_norm']['scale'])
  return x @ params['lm_head']['kernel']


def test_matches_plain_reference():
  model, params, tokens = _init(TINY)
  got = _apply(model, params, tokens)
  want = _reference_forward(TINY, params, tokens)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_scanned_equals_unscanned_forward_and_backward():
  model, params, tokens = _init(TINY, seed=3)
  unscanned = Transformer(dataclasses.replace(TINY, scan_layers=False))
  flat = unscan_params(params, TINY.num_layers)

  def loss(m, p):
    return jnp.mean(_apply(m, p, tokens) ** 2)

  np.testing.assert_allclose(_apply(model, params, tokens),
                             _apply(unscanned, flat, tokens), atol=1e-5, rtol=1e-5)
  g_scan = jax.jit(jax.grad(lambda p: loss(model, p)))(params)
  g_flat = scan_params(jax.jit(jax.grad(lambda p: loss(unscanned, p)))(flat), TINY.num_layers)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g_scan, g_flat)
  # The unscanned init produces the same tree shape as scanning then unscanning.
  own = jax.eval_shape(unscanned.init, jax.random.key(0), tokens)['params']
  assert jax.tree.structure(nn.unbox(own)) == jax.tree.structure(flat)


@pytest.mark.parametrize('remat', ['full', 'dots_saveable'])
def test_remat_policies_leave_values_and_gradients_unchanged(remat):
  model, params, tokens = _init(TINY, seed=5)
  rematted = Transformer(dataclasses.replace(TINY, remat=remat))

  def loss(m, p):
    return jnp.mean(jax.nn.log_softmax(_apply(m, p, tokens))[..., 0])

  v0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
  v1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(rematted, p)))(params)
  np.testing.assert_allclose(v0, v1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5), g0, g1)


@pytest.mark.parametrize('tie', [False, True])
def test_causal(tie):
  cfg = dataclasses.replace(TINY, tie_embeddings=tie)
  model, params, tokens = _init(cfg, seed=7, length=20)
  cut = 11
  changed = tokens.at[:, cut:].set(
      jax.random.randint(jax.random.key(99), (tokens.shape[0], 20 - cut), 0, cfg.vocab_size))
  assert not np.array_equal(tokens[:, cut:], changed[:, cut:])
  a = _apply(model, params, tokens)
  b = _apply(model, params, changed)
  np.testing.assert_array_equal(a[:, :cut], b[:, :cut])
  assert not np.allclose(a[:, cut:], b[:, cut:])


def test_tied_head_uses_the_embedding_table():
  cfg = dataclasses.replace(TINY, tie_embeddings=True)
  model, params, tokens = _init(cfg, seed=9)
  assert 'lm_head' not in params
  untied = Transformer(dataclasses.replace(TINY))
  p2 = dict(params, lm_head={'kernel': params['embed']['embedding'].T})
  np.testing.assert_allclose(_apply(model, params, tokens),
                             _apply(untied, p2, tokens), atol=1e-6)


def test_bf16_compute_stays_close_to_fp32():
  model, params, tokens = _init(TINY, seed=11)
  bf16 = Transformer(dataclasses.replace(TINY, dtype=jnp.bfloat16))
  a = _apply(model, params, tokens)
  b = _apply(bf16, params, tokens)
  assert b.dtype == jnp.float32  # logits are always returned in fp32
  np.testing.assert_allclose(a, b, atol=0.05)


def test_every_parameter_has_logical_axes():
  model = Transformer(TINY)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert all(len(x.names) == x.value.ndim for x in leaves)

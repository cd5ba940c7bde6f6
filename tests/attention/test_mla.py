"""Multi-head latent attention against the DeepSeek-V2 equations, and its two forms against each
other (Hugging Face parity is in tests/hf/test_deepseek_v2.py)."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientjax.attention import ATTENTION, MultiHeadAttention
from efficientjax.attention import cache as kv_cache
from efficientjax.attention.core import mean_context
from efficientjax.attention.mla import (LATENT_NORM_EPS, MLACache, MultiHeadLatentAttention,
                                        softmax_scale)
from efficientjax.metrics.flops import flops_of
from efficientjax.model import MLAConfig, ModelConfig, YarnConfig, init_cache

BATCH, LENGTH = 2, 12
# v narrower than the q/k head (6 + 4), as in DeepSeek-V2, so the core's v padding is exercised.
SHAPE = dict(kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)
BASE = ModelConfig(vocab_size=61, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=4,
                   head_dim=4, mlp_dim=48, rope_theta=100.0, attention='mla',
                   mla=MLAConfig(q_lora_rank=0, **SHAPE))
Q_LORA = {'q_direct': 0, 'q_lora': 12}


def _cfg(q_lora_rank=0, **changes):
  return dataclasses.replace(BASE, mla=MLAConfig(q_lora_rank=q_lora_rank, **SHAPE), **changes)


def _positions(length=LENGTH, batch=BATCH):
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def _init(cfg, seed=0):
  """Random layer params (norm gains away from 1, so a dropped norm shows) and an input, drawn
  in numpy on `init`'s shapes: compiling the real init costs seconds on CPU and tests nothing."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(BATCH, LENGTH, cfg.embed_dim)), jnp.float32)
  shapes = jax.eval_shape(MultiHeadLatentAttention(cfg).init, jax.random.key(0), x, _positions())
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(rng.normal(1.0 if path[-1].key == 'scale' else 0.0,
                                             0.3 if path[-1].key == 'scale' else 0.2, s.shape),
                                  jnp.float32), nn.unbox(shapes['params']))
  return params, x


@functools.cache
def _layer(cfg):
  """Jitted (params, x, positions, cache) -> (out, cache), one per config (eager dispatch and
  recompiles cost seconds on a shared CPU)."""
  return jax.jit(lambda p, x, pos, cache=None: MultiHeadLatentAttention(cfg).apply(
      {'params': p}, x, pos, cache))


def _reference(cfg, p, x):
  """DeepSeek-V2 §2.1 in plain jnp, causal over the whole sequence, keys and values expanded.

  c_q = RMSNorm(x W_DQ); [q_C, q_R] = c_q W_UQ (or x W_Q); c_KV = RMSNorm(x W_DKV);
  k_R = RoPE(x W_KR); [k_C, v_C] = c_KV W_UKV; o = softmax([q_C, RoPE(q_R)]·[k_C, k_R] /
  sqrt(d_h + d_R)) v_C; u = o W_O. RoPE pairs feature i with i + d/2 (our layout)."""
  m = cfg.mla
  nope = m.qk_nope_head_dim

  def rms(z, g):
    return z / jnp.sqrt(jnp.mean(z * z, -1, keepdims=True) + LATENT_NORM_EPS) * g

  def rope(z):  # [b, t, h, d]
    t, d = z.shape[1], z.shape[-1]
    freq = cfg.rope_theta ** (-np.arange(0, d, 2) / d)
    ang = np.arange(t)[:, None] * freq[None]
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    z1, z2 = z[..., :d // 2], z[..., d // 2:]
    return jnp.concatenate([z1 * cos - z2 * sin, z1 * sin + z2 * cos], -1)

  if m.q_lora_rank:
    c_q = rms(x @ p['q_a']['kernel'], p['q_norm']['scale'])
    q = jnp.einsum('btc,chd->bthd', c_q, p['q_b']['kernel'])
  else:
    q = jnp.einsum('bte,ehd->bthd', x, p['q']['kernel'])
  q_c, q_r = q[..., :nope], rope(q[..., nope:])
  kv_a = x @ p['kv_a']['kernel']
  c_kv = rms(kv_a[..., :m.kv_lora_rank], p['kv_norm']['scale'])
  k_r = rope(kv_a[:, :, None, m.kv_lora_rank:])[:, :, 0]
  w = p['kv_b']['kernel']
  k_c = jnp.einsum('btc,chn->bthn', c_kv, w[..., :nope])
  v_c = jnp.einsum('btc,chv->bthv', c_kv, w[..., nope:])
  s = (jnp.einsum('bqhn,bkhn->bhqk', q_c, k_c) + jnp.einsum('bqhr,bkr->bhqk', q_r, k_r))
  s = s / math.sqrt(nope + m.qk_rope_head_dim)
  t = x.shape[1]
  s = jnp.where(np.tril(np.ones((t, t), bool)), s, -jnp.inf)
  o = jnp.einsum('bhqk,bkhv->bqhv', jax.nn.softmax(s, -1), v_c)
  return jnp.einsum('bthv,hve->bte', o, p['o']['kernel'])


def test_registered_as_mla():
  assert ATTENTION.get('mla') is MultiHeadLatentAttention


@pytest.mark.parametrize('q_lora_rank', Q_LORA.values(), ids=Q_LORA.keys())
def test_matches_the_equations_forward_and_backward(q_lora_rank):
  cfg = _cfg(q_lora_rank)
  params, x = _init(cfg, seed=q_lora_rank)
  want = jax.jit(functools.partial(_reference, cfg))(params, x)
  got, cache = _layer(cfg)(params, x, _positions())
  assert cache is None
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

  # Gradients with respect to every parameter and the input, against the reference's.
  weights = jax.random.normal(jax.random.key(5), want.shape)
  ours = jax.jit(jax.grad(lambda p, x: jnp.sum(MultiHeadLatentAttention(cfg).apply(
      {'params': p}, x, _positions())[0] * weights), argnums=(0, 1)))(params, x)
  ref = jax.jit(jax.grad(lambda p, x: jnp.sum(_reference(cfg, p, x) * weights),
                         argnums=(0, 1)))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), ours, ref)
  # Every parameter receives gradient (none is cut off from the output).
  for path, g in jax.tree_util.tree_flatten_with_path(ours[0])[0]:
    assert np.abs(g).max() > 1e-4, jax.tree_util.keystr(path)


def _decode(cfg, params, x, prompt_len, max_len, cache=None):
  """The cache form: prefill prompt_len tokens, then one token per call; all outputs."""
  layer = _layer(cfg)
  positions = _positions()
  if cache is None:
    cache = MultiHeadLatentAttention.init_cache(cfg, BATCH, max_len, jnp.float32)
  out, cache = layer(params, x[:, :prompt_len], positions[:, :prompt_len], cache)
  outs = [out]
  for i in range(prompt_len, x.shape[1]):
    out, cache = layer(params, x[:, i:i + 1], positions[:, i:i + 1], cache)
    outs.append(out)
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize('q_lora_rank, position, window', [
    (0, 'rope', None), (12, 'rope', None), (0, 'rope', 5), (12, 'relative', None),
    (0, 'none', None)])
def test_absorbed_cache_form_equals_the_training_form(q_lora_rank, position, window):
  """Prefill + one-token steps in the absorbed form (latent scores, W_UV after the weighted sum)
  give the outputs of the expanded training form, with a sliding window and with a logit bias
  (T5's relative positions) too; the cache is longer than the sequence."""
  cfg = _cfg(q_lora_rank, position=position, sliding_window=window)
  params, x = _init(cfg, seed=3)  # the relative bias table random too: a dropped bias shows
  want, _ = _layer(cfg)(params, x, _positions())
  for prompt_len in (1, 5):
    got, cache = _decode(cfg, params, x, prompt_len, max_len=LENGTH + 4)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f'prompt {prompt_len}')
  assert isinstance(cache, MLACache)


def test_cache_holds_the_normalised_latent_and_the_rotated_key():
  cfg = _cfg(12)
  params, x = _init(cfg, seed=4)
  _, cache = _decode(cfg, params, x, prompt_len=LENGTH, max_len=LENGTH + 3)
  p, m = params, cfg.mla
  kv_a = x @ p['kv_a']['kernel']
  z = kv_a[..., :m.kv_lora_rank]
  c_kv = z / jnp.sqrt(jnp.mean(z * z, -1, keepdims=True) + LATENT_NORM_EPS) * p['kv_norm']['scale']
  np.testing.assert_allclose(cache.c_kv[:, :LENGTH], c_kv, atol=1e-5, rtol=1e-5)
  # Position 0 is unrotated; later ones are rotations (norm-preserving per pair) of x W_KR.
  k = kv_a[..., m.kv_lora_rank:]
  np.testing.assert_allclose(cache.k_rope[:, 0], k[:, 0], atol=1e-6)
  half = m.qk_rope_head_dim // 2
  pair_norm = lambda a: a[..., :half] ** 2 + a[..., half:] ** 2
  np.testing.assert_allclose(pair_norm(cache.k_rope[:, :LENGTH]), pair_norm(k), rtol=1e-5)
  assert not np.allclose(cache.k_rope[:, 1:LENGTH], k[:, 1:])
  np.testing.assert_array_equal(cache.c_kv[:, LENGTH:], 0)  # slots past the tokens: untouched


def test_causal_in_both_forms():
  cfg = _cfg(12)
  params, x = _init(cfg, seed=6)
  layer = _layer(cfg)
  cut = 7
  changed = x.at[:, cut:].add(1.0)
  before, _ = layer(params, x, _positions())
  after, _ = layer(params, changed, _positions())
  np.testing.assert_array_equal(before[:, :cut], after[:, :cut])
  assert np.abs(before[:, cut:] - after[:, cut:]).max() > 1e-3

  # The cache form ignores whatever the slots past each query hold.
  junk = MLACache(c_kv=jax.random.normal(jax.random.key(1), (BATCH, LENGTH + 4, 8)) * 100,
                  k_rope=jax.random.normal(jax.random.key(2), (BATCH, LENGTH + 4, 4)) * 100)
  got, _ = _decode(cfg, params, x, prompt_len=cut, max_len=LENGTH + 4, cache=junk)
  np.testing.assert_allclose(got, before, atol=1e-5, rtol=1e-5)


def test_cache_size_is_latent_plus_rope_per_token_and_layer():
  cfg = _cfg(12)
  batch, max_len = 3, 40
  cache = init_cache(cfg, batch, max_len, jnp.bfloat16)
  m = cfg.mla
  assert cache.c_kv.shape == (cfg.num_layers, batch, max_len, m.kv_lora_rank)
  assert cache.k_rope.shape == (cfg.num_layers, batch, max_len, m.qk_rope_head_dim)
  measured = kv_cache.nbytes(cache) / (cfg.num_layers * batch * max_len * 2)  # bf16: 2 bytes
  assert measured == m.kv_lora_rank + m.qk_rope_head_dim == 12
  assert MultiHeadLatentAttention.cache_values_per_token(cfg) == 12
  # Against MHA with MLA's per-head q/k width: 2 · heads · 10 values.
  assert MultiHeadAttention.cache_values_per_token(dataclasses.replace(
      cfg, attention='mha', head_dim=10)) == 80


def _mla_param_count(cfg):
  """The formula reported for sizing configs (attention only, norm gains included)."""
  m, e, h = cfg.mla, cfg.embed_dim, cfg.num_heads
  qk = m.qk_nope_head_dim + m.qk_rope_head_dim
  q = (e * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * h * qk) if m.q_lora_rank else e * h * qk
  kv = (e * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
        + m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim))
  return q + kv + h * m.v_head_dim * e


@pytest.mark.parametrize('q_lora_rank', Q_LORA.values(), ids=Q_LORA.keys())
def test_parameter_count_and_flops(q_lora_rank):
  cfg = dataclasses.replace(BASE, embed_dim=256, num_heads=8, attention_impl='xla', mla=MLAConfig(
      q_lora_rank=q_lora_rank and 48, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
      v_head_dim=24))
  t = 128
  x = jax.ShapeDtypeStruct((1, t, cfg.embed_dim), jnp.float32)
  layer = MultiHeadLatentAttention(cfg)
  boxed = jax.eval_shape(layer.init, jax.random.key(0), x, _positions(t, 1))
  # Every parameter carries logical axis names, one per dim.
  boxes = jax.tree.leaves(boxed, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
  assert boxes and all(isinstance(a, nn.LogicallyPartitioned) and len(a.names) == a.value.ndim
                       for a in boxes)
  shapes = nn.unbox(boxed)
  leaves = jax.tree_util.tree_flatten_with_path(shapes['params'])[0]
  assert sum(a.size for _, a in leaves) == _mla_param_count(cfg)

  flops = MultiHeadLatentAttention.flops_per_token(cfg, t)
  kernels = sum(a.size for path, a in leaves if path[-1].key == 'kernel')
  assert flops['projections'] == 2 * kernels  # one multiply-add per kernel entry per token
  m, h = cfg.mla, cfg.num_heads
  qk = m.qk_nope_head_dim + m.qk_rope_head_dim
  assert flops['attention'] == 2 * h * (qk + m.v_head_dim) * mean_context(t)
  # XLA's own count of the whole-sequence form (dense scores, v padded to the q/k width); the
  # small remainder is elementwise work (norms, RoPE, softmax).
  xla = flops_of(jax.jit(lambda p, x: layer.apply(p, x, _positions(t, 1))[0]).lower(shapes, x))
  analytic = t * (flops['projections'] + flops['attention_as_executed'])
  assert 1.0 <= xla / analytic < 1.05


def test_softmax_scale_with_deepseek_yarn():
  cfg = _cfg()
  assert softmax_scale(cfg) == pytest.approx(1 / math.sqrt(10))
  yarn = dataclasses.replace(cfg, yarn=YarnConfig(factor=40.0, mscale=0.707, mscale_all_dim=0.707))
  mscale = 0.1 * 0.707 * math.log(40.0) + 1.0
  assert softmax_scale(yarn) == pytest.approx(mscale ** 2 / math.sqrt(10))
  # YaRN without DeepSeek's mscale_all_dim leaves the logits' scale alone (only cos/sin change).
  plain = dataclasses.replace(cfg, yarn=YarnConfig(factor=40.0))
  assert softmax_scale(plain) == pytest.approx(1 / math.sqrt(10))


def _check(**changes):
  m = dict(attention='mla', num_heads=4, num_kv_heads=None, position='rope', qkv_bias=False,
           qk_norm=False, mla=dict(q_lora_rank=0, **SHAPE))
  for key, value in changes.items():
    if key in m['mla']:
      m['mla'] = {**m['mla'], key: value}
    else:
      m[key] = value
  return [(e.field, e.message) for e in MultiHeadLatentAttention.check(m, 64)]


def test_check():
  assert _check() == []
  assert _check(num_kv_heads=4, q_lora_rank=16) == []
  cases = {
      'model.mla.kv_lora_rank': dict(kv_lora_rank=0),
      'model.mla.v_head_dim': dict(v_head_dim=11),
      'model.mla.q_lora_rank': dict(q_lora_rank=-1),
      'model.num_kv_heads': dict(num_kv_heads=2),
      'model.qkv_bias': dict(qkv_bias=True),
      'model.qk_norm': dict(qk_norm=True),
  }
  for field, change in cases.items():
    errors = _check(**change)
    assert [f for f, _ in errors] == [field], (change, errors)
  (field, message), = _check(qk_rope_head_dim=5)
  assert field == 'model.mla.qk_rope_head_dim' and 'even' in message
  assert 'exceeds the q/k head width' in dict(_check(v_head_dim=11))['model.mla.v_head_dim']

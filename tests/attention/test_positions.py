"""Positional encodings against independent references: transformers' YaRN and T5 buckets, the
paper's sinusoids, and a plain-jnp model per encoding (forward, backward, prefill + decode)."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.t5.modeling_t5 import T5Attention

from configs import quickstart
from efficientjax.attention import POSITIONS
from efficientjax.attention.positions import (LearnedEmbedding, RelativeBias,
                                              relative_position_bucket, sinusoids,
                                              yarn_parameters)
from efficientjax.model import (ModelConfig, RelativeConfig, Transformer, YarnConfig, scan_params,
                               unscan_params)
from efficientjax.parallel.mesh import LOGICAL_AXIS_RULES
from experiments import validate
from tests.helpers import prefill_then_decode

# ---------------------------------------------------------------------------------------------
# YaRN against transformers' ROPE_INIT_FUNCTIONS['yarn'].

YARN_CASES = {
    'qwen_style': dict(factor=4.0, original_max_position_embeddings=32),
    'betas': dict(factor=8.0, original_max_position_embeddings=4096, beta_fast=16.0,
                  beta_slow=2.0),
    # DeepSeek's temperature: the ratio of two mscales.
    'deepseek_mscale': dict(factor=40.0, original_max_position_embeddings=4096, mscale=0.707,
                            mscale_all_dim=0.707),
    'mscale_ratio': dict(factor=3.0, original_max_position_embeddings=2048, mscale=1.2,
                         mscale_all_dim=0.8),
    # mscale alone is ignored by HF (both must be set).
    'mscale_alone': dict(factor=3.0, original_max_position_embeddings=2048, mscale=1.2),
    'untruncated': dict(factor=4.0, original_max_position_embeddings=512, truncate=False),
    # A ramp of zero width (low == high after truncation): HF widens it by 0.001.
    'zero_width_ramp': dict(factor=2.0, original_max_position_embeddings=64, beta_fast=2.0,
                            beta_slow=2.0),
}


def _yarn_from_hf(params: dict) -> YarnConfig:
  both = params.get('mscale') and params.get('mscale_all_dim')
  return YarnConfig(factor=params['factor'],
                    original_max_len=params['original_max_position_embeddings'],
                    beta_fast=params.get('beta_fast', 32.0), beta_slow=params.get('beta_slow', 1.0),
                    mscale=params['mscale'] if both else 1.0,
                    mscale_all_dim=params['mscale_all_dim'] if both else 0.0,
                    truncate=params.get('truncate', True))


@pytest.mark.parametrize('case', sorted(YARN_CASES))
@pytest.mark.parametrize('head_dim, theta', [(32, 10000.0), (64, 1e6)])
def test_yarn_matches_transformers(case, head_dim, theta):
  params = YARN_CASES[case]
  hf = transformers.Qwen2Config(
      hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
      max_position_embeddings=int(params['factor'] * params['original_max_position_embeddings']),
      rope_parameters=dict(rope_type='yarn', rope_theta=theta, **params))
  want_inv_freq, want_factor = ROPE_INIT_FUNCTIONS['yarn'](hf)
  inv_freq, factor = yarn_parameters(head_dim, theta, _yarn_from_hf(params))
  assert inv_freq.dtype == np.float32 and inv_freq.shape == (head_dim // 2,)
  # float32 throughout, as in transformers; numpy's and torch's pow differ in the last bit, which
  # the blend of the two frequency sets can double.
  np.testing.assert_array_max_ulp(inv_freq, want_inv_freq.numpy(), maxulp=4)
  assert factor == pytest.approx(want_factor, rel=1e-12)
  # Not plain RoPE: the low frequencies really are interpolated.
  plain = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
  assert inv_freq[-1] < 0.9 * plain[-1]


def test_yarn_rotation_matches_transformers_qwen2():
  """RoPE.rotate with YaRN = transformers' Qwen2 rotary embedding (cos/sin scaled by the
  attention factor) applied by its apply_rotary_pos_emb, at positions beyond the original."""
  b, t, h, d = 2, 40, 3, 16
  yarn = dict(factor=4.0, original_max_position_embeddings=16)
  hf = transformers.Qwen2Config(hidden_size=h * d, num_attention_heads=h, head_dim=d,
                                max_position_embeddings=64,
                                rope_parameters=dict(rope_type='yarn', rope_theta=500.0, **yarn))
  cfg = ModelConfig(vocab_size=8, embed_dim=h * d, num_layers=1, num_heads=h, num_kv_heads=h,
                    head_dim=d, mlp_dim=8, rope_theta=500.0, yarn=_yarn_from_hf(yarn))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, t, h, d)).astype(np.float32)
  positions = np.stack([np.arange(t), np.arange(t) + 17])
  rotary = modeling_qwen2.Qwen2RotaryEmbedding(hf)
  xt = torch.from_numpy(x).transpose(1, 2)  # [b, h, t, d]
  cos, sin = rotary(xt, torch.from_numpy(positions))
  want, _ = modeling_qwen2.apply_rotary_pos_emb(xt, xt, cos, sin)
  got = POSITIONS.get('rope')(cfg).rotate(jnp.asarray(x), jnp.asarray(positions))
  np.testing.assert_allclose(got, want.transpose(1, 2).numpy(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Sinusoids and learned rows.


@pytest.mark.parametrize('dim', [32, 7])
def test_sinusoids_match_the_paper(dim):
  positions = np.array([[0, 1, 2, 50], [127, 3, 64, 9]])
  want = np.zeros(positions.shape + (dim,))
  for i in range(dim):
    angle = positions / 10000.0 ** (2 * (i // 2) / dim)
    want[..., i] = np.sin(angle) if i % 2 == 0 else np.cos(angle)
  got = sinusoids(jnp.asarray(positions), dim)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_learned_rows_and_nan_past_the_table():
  cfg = ModelConfig(vocab_size=8, embed_dim=6, num_layers=1, num_heads=2, num_kv_heads=2,
                    head_dim=3, mlp_dim=8, max_seq_len=10, position='learned')
  module = LearnedEmbedding(cfg)
  positions = jnp.array([[0, 9, 4], [10, 3, -1]])
  params = nn.unbox(module.init(jax.random.key(0), positions)['params'])
  table = np.asarray(params['embedding'])
  assert table.shape == (10, 6) and 0.01 < table.std() < 0.03  # normal(init_std)
  out = np.asarray(module.apply({'params': params}, positions))
  np.testing.assert_array_equal(out[0], table[[0, 9, 4]])
  np.testing.assert_array_equal(out[1, 1], table[3])
  assert np.isnan(out[1, 0]).all() and np.isnan(out[1, 2]).all()  # never a clamped row


# ---------------------------------------------------------------------------------------------
# T5's relative buckets against transformers.


@pytest.mark.parametrize('num_buckets, max_distance', [(32, 128), (8, 20), (64, 256), (16, 32),
                                                       (32, 512)])
def test_relative_buckets_match_t5(num_buckets, max_distance):
  relative = torch.arange(-20000, 6)
  want = T5Attention._relative_position_bucket(relative, bidirectional=False,
                                               num_buckets=num_buckets, max_distance=max_distance)
  got = relative_position_bucket(jnp.asarray(relative.numpy()), num_buckets, max_distance)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, want.numpy())
  assert set(np.unique(got)) == set(range(num_buckets))  # every bucket reachable


def test_relative_bias_gathers_per_head():
  cfg = ModelConfig(vocab_size=8, embed_dim=8, num_layers=1, num_heads=3, num_kv_heads=3,
                    head_dim=4, mlp_dim=8, position='relative',
                    relative=RelativeConfig(num_buckets=8, max_distance=20))
  q_pos = jnp.array([[5, 6], [40, 41]])
  k_pos = jnp.broadcast_to(jnp.arange(48), (2, 48))
  module = RelativeBias(cfg)
  params = nn.unbox(module.init(jax.random.key(0), q_pos, k_pos)['params'])
  bias = np.asarray(module.apply({'params': params}, q_pos, k_pos))
  assert bias.shape == (2, 3, 2, 48) and bias.dtype == np.float32
  table = np.asarray(params['embedding'])  # [buckets, heads]
  buckets = T5Attention._relative_position_bucket(
      torch.from_numpy(np.asarray(k_pos)[:, None, :] - np.asarray(q_pos)[:, :, None]),
      bidirectional=False, num_buckets=8, max_distance=20).numpy()
  np.testing.assert_array_equal(bias, table[buckets].transpose(0, 3, 1, 2))


@pytest.mark.parametrize('overrides, field, phrase', [
    ({'model.position': 'learned', 'model.max_seq_len': 8}, 'model.max_seq_len',
     'has 8 rows but data.seq_len='),
    ({'model.yarn.factor': 0.5}, 'model.yarn.factor', 'must be at least 1'),
    ({'model.yarn.factor': 4.0, 'model.yarn.beta_fast': 1.0}, 'model.yarn.beta_fast',
     'beta_fast > beta_slow'),
    ({'model.position': 'relative', 'model.relative.max_distance': 16},
     'model.relative.max_distance', 'must exceed num_buckets // 2 = 16'),
    ({'model.position': 'relative', 'model.relative.num_buckets': 1},
     'model.relative.num_buckets', 'at least 2 buckets'),
])
def test_config_checks(overrides, field, phrase):
  """The encodings' own checks run in the run config's validation, naming field and fix."""
  c = quickstart.get_config('smoke').to_dict()
  for path, value in overrides.items():
    *parents, key = path.split('.')
    node = c
    for part in parents:
      node = node[part]
    node[key] = value
  errors = validate.check(c, num_devices=1, process_count=1, backend='cpu')
  assert [e.field for e in errors] == [field] and phrase in errors[0].message


def test_new_logical_axes_have_rules():
  names = {name for name, _ in LOGICAL_AXIS_RULES}
  assert {'positions', 'position_buckets', 'kv_length'} <= names


# ---------------------------------------------------------------------------------------------
# Each encoding through the Transformer, against a plain-jnp model written from the equations.

# The learned table holds LENGTH rows; caches hold CACHE_LEN slots, room to decode past it.
VOCAB, LENGTH, PROMPT, CACHE_LEN = 61, 12, 5, 16
BASE = ModelConfig(vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=4,
                   head_dim=8, mlp_dim=48, rope_theta=100.0, max_seq_len=LENGTH)
YARN = dict(factor=4.0, original_max_position_embeddings=4, beta_fast=8.0, beta_slow=1.0)
ENCODINGS = {
    'none': dict(position='none'),
    'rope': dict(position='rope'),
    'yarn': dict(position='rope', yarn=_yarn_from_hf(YARN)),
    'absolute': dict(position='absolute'),
    'learned': dict(position='learned'),
    'relative': dict(position='relative', relative=RelativeConfig(num_buckets=6, max_distance=9)),
}


def test_every_encoding_is_tested():
  assert set(POSITIONS) == {v['position'] for v in ENCODINGS.values()}


@functools.cache
def _setup(name: str, scan_layers: bool = True):
  """(cfg, model, params, tokens, jitted apply) with the same weights in either layout."""
  cfg = dataclasses.replace(BASE, **ENCODINGS[name])
  model = Transformer(cfg)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, CACHE_LEN)), jnp.int32)
  # Random values on init's shapes (compiling the real init costs seconds on CPU and tests
  # nothing here); norm scales around 1.
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)['params']
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(rng.normal('scale' in jax.tree_util.keystr(path), 0.2, x.shape),
                                  jnp.float32), nn.unbox(shapes))
  if not scan_layers:
    cfg = dataclasses.replace(cfg, scan_layers=False)
    model = Transformer(cfg)
    params = unscan_params(params, cfg.num_layers)
  # One compile per config, shared by the tests (eager apply costs seconds on 2 CPU cores).
  return cfg, model, params, tokens[:, :LENGTH], jax.jit(model.apply)


def _reference_logits(cfg: ModelConfig, params, tokens):
  """The model in plain jnp, per layer, with each encoding from its own source: the paper's
  sinusoids (numpy, float64), the learned table's rows, RoPE frequencies from transformers
  (plain and YaRN), T5's buckets from transformers."""
  t, d, e = tokens.shape[1], cfg.head_dim, cfg.embed_dim
  pos = np.arange(t)

  def rms(x, g):
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * g

  inv_freq, attention_factor = None, 1.0
  if cfg.position == 'rope':
    hf = transformers.Qwen2Config(hidden_size=e, num_attention_heads=cfg.num_heads, head_dim=d,
                                  max_position_embeddings=64, rope_parameters=(
                                      dict(rope_type='yarn', rope_theta=cfg.rope_theta, **YARN)
                                      if cfg.yarn.factor > 1 else
                                      dict(rope_type='default', rope_theta=cfg.rope_theta)))
    kind = hf.rope_parameters['rope_type']
    init = (modeling_qwen2.Qwen2RotaryEmbedding.compute_default_rope_parameters
            if kind == 'default' else ROPE_INIT_FUNCTIONS[kind])
    inv_freq, attention_factor = init(hf)
    inv_freq = inv_freq.numpy().astype(np.float64)

  def rope(x):
    if inv_freq is None:
      return x
    ang = pos[:, None] * inv_freq[None]
    cos = (np.cos(ang) * attention_factor)[None, :, None]
    sin = (np.sin(ang) * attention_factor)[None, :, None]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)

  x = params['embed']['embedding'][tokens]
  if cfg.position == 'absolute':
    i = np.arange(e)
    angle = pos[:, None] / 10000.0 ** (2 * (i // 2) / e)
    x = x + np.where(i % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32)
  elif cfg.position == 'learned':
    x = x + params['position']['embedding'][:t]
  buckets = T5Attention._relative_position_bucket(
      torch.from_numpy(pos[None, :] - pos[:, None]), bidirectional=False,
      num_buckets=cfg.relative.num_buckets, max_distance=cfg.relative.max_distance).numpy()
  causal = np.tril(np.ones((t, t), bool))
  for layer in range(cfg.num_layers):
    p = jax.tree.map(lambda a, i=layer: a[i], params['blocks'])
    h = rms(x, p['attn_norm']['scale'])
    q = rope(jnp.einsum('bte,ehd->bthd', h, p['attn']['q']['kernel']))
    k = rope(jnp.einsum('bte,ehd->bthd', h, p['attn']['k']['kernel']))
    v = jnp.einsum('bte,ehd->bthd', h, p['attn']['v']['kernel'])
    s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(d)
    if cfg.position == 'relative':
      s = s + p['attn']['position_bias']['embedding'][buckets].transpose(2, 0, 1)[None]
    s = jnp.where(causal, s, -jnp.inf)
    o = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, -1), v)
    x = x + jnp.einsum('bthd,hde->bte', o, p['attn']['o']['kernel'])
    h = rms(x, p['mlp_norm']['scale'])
    x = x + (jax.nn.silu(h @ p['mlp']['gate']['kernel']) * (h @ p['mlp']['up']['kernel'])
             ) @ p['mlp']['down']['kernel']
  return rms(x, params['final_norm']['scale']) @ params['lm_head']['kernel']


def _loss(logits):
  return jnp.mean(jax.nn.log_softmax(logits)[..., 3]) + 1e-2 * jnp.mean(logits ** 2), logits


# `rope` and `none` are the Llama model of tests/test_model.py (with and without its rotation).
# Unscanned: it compiles faster, and the scanned layout is the same computation
# (tests/test_model.py; the decode tests below run both).
@pytest.mark.parametrize('name', ['absolute', 'yarn', 'learned', 'relative'])
def test_forward_and_backward_match_reference(name):
  cfg, model, params, tokens, _ = _setup(name, scan_layers=False)
  ours = jax.jit(jax.value_and_grad(lambda p: _loss(model.apply({'params': p}, tokens)),
                                    has_aux=True))
  ref = jax.jit(jax.value_and_grad(
      lambda p: _loss(_reference_logits(cfg, scan_params(p, cfg.num_layers), tokens)),
      has_aux=True))
  (v0, logits0), g0 = ours(params)
  (v1, logits1), g1 = ref(params)
  np.testing.assert_allclose(logits0, logits1, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(v0, v1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g0, g1)
  # A gradient reaches the encoding's own parameters.
  if name == 'learned':
    assert (np.abs(g0['position']['embedding']).max(-1) > 0).all()
  elif name == 'relative':
    for i in range(cfg.num_layers):
      assert np.abs(g0[f'block_{i}']['attn']['position_bias']['embedding']).max() > 0


@pytest.mark.parametrize('name', sorted(ENCODINGS))
def test_causal(name):
  _, _, params, tokens, apply = _setup(name)
  cut = 7
  changed = tokens.at[:, cut:].set((tokens[:, cut:] + 5) % VOCAB)
  before, after = apply({'params': params}, tokens), apply({'params': params}, changed)
  np.testing.assert_allclose(before[:, :cut], after[:, :cut], atol=1e-6, rtol=1e-6)
  assert np.abs(before[:, cut:] - after[:, cut:]).max() > 1e-3


# Per-layer bias tables are the one encoding state that scanning stacks; the unscanned layout
# runs it too.
@pytest.mark.parametrize('name, scan_layers', [(name, True) for name in sorted(ENCODINGS)] +
                         [('relative', False)])
def test_prefill_then_decode_equals_forward(name, scan_layers):
  cfg, _, params, tokens, apply = _setup(name, scan_layers)
  got = prefill_then_decode(cfg, params, tokens, PROMPT, CACHE_LEN)
  np.testing.assert_allclose(got, apply({'params': params}, tokens), atol=1e-5, rtol=1e-5)


def test_learned_positions_decode_past_the_table_is_nan():
  """A learned table has max_seq_len rows; decoding beyond it poisons the logits instead of
  reusing the last row."""
  cfg, _, params, _, _ = _setup('learned')
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, CACHE_LEN)), jnp.int32)
  logits = prefill_then_decode(cfg, params, tokens, PROMPT, CACHE_LEN)
  assert np.isfinite(logits[:, :LENGTH]).all()
  assert np.isnan(logits[:, LENGTH:]).all()

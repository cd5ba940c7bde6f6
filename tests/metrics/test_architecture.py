"""The record's `model.attention`: parameters, KV cache per token and FLOPs per token, by hand.

Each variant's numbers are worked out here from docs/metrics.md's definitions at the tiny
configs of tests/attention/variants.py (2 layers, embed 32, 4 heads of 8), with the compute
dtype (bf16) differing from the parameter dtype (fp32): the cache is stored in the compute
dtype, so a cache sized by the wrong dtype is off by 2x. What this proves:
- `kv_cache_bytes_per_token` = layers x the variant's values per token x the compute dtype's
  bytes (MHA/GQA/MQA 2·kv_heads·head_dim, MLA kv_lora_rank + qk_rope_head_dim, NSA three
  branches plus the compressed keys and values every `stride` tokens);
- `kv_cache_bytes_per_token_measured` is the real cache's bytes over its slots, which for
  NSA differs from the analytic count by the compressed blocks actually allocated;
- `params` counts the `attn` subtree of every layer, norm gains and biases included;
- `forward_flops_per_token` sums the variant's per-layer counts over the layers (MHA/GQA/MQA
  and MLA written out here; NSA's own terms are tested in tests/attention/test_nsa.py).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from efficientjax.metrics.architecture import attention_summary
from efficientjax.model import Transformer
from tests.attention.variants import TINY

T = 24                     # the measured cache's length (data.seq_len in a run)
LAYERS, E, H, D = 2, 32, 4, 8
BF16 = 2                   # bytes per cached value


def _summary(name):
  cfg = dataclasses.replace(TINY[name], dtype=jnp.bfloat16, param_dtype=jnp.float32)
  assert (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.head_dim) == (LAYERS, E, H, D)
  tokens = jax.ShapeDtypeStruct((1, T), jnp.int32)
  # Shapes only: the count needs no values.
  params = nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens))['params']
  out = attention_summary(cfg, params, T)
  assert out['variant'] == name and out['kv_cache_dtype'] == 'bfloat16'
  assert out['kv_cache_measured_len'] == T
  return out


def _mha_like(kv):
  """Per layer: q and o are E x H·D, k and v E x kv·D; no biases, no QK-norm."""
  proj_params = E * H * D + 2 * E * kv * D + H * D * E
  cache_values = 2 * kv * D                       # a key and a value per K/V head
  per_key = 2 * 2 * H * D                         # q·k and the weighted v, per head
  return {
      'params': LAYERS * proj_params,
      'kv_cache_bytes_per_token': LAYERS * cache_values * BF16,
      'kv_cache_bytes_per_token_measured': LAYERS * cache_values * BF16,
      'forward_flops_per_token': {
          'attention': LAYERS * per_key * T / 2,  # causal: half the sequence on average
          'attention_as_executed': LAYERS * per_key * T,
          'projections': LAYERS * 2 * proj_params,  # one multiply-add per weight
      },
  }


@pytest.mark.parametrize('name, kv', [('mha', 4), ('gqa', 2), ('mqa', 1)])
def test_mha_gqa_mqa_by_hand(name, kv):
  out = _summary(name)
  want = _mha_like(kv)
  assert {k: out[k] for k in want} == want
  # The figures a table of the study shows: MHA 256 B, GQA 128 B, MQA 64 B a token.
  assert out['kv_cache_bytes_per_token'] == {'mha': 256, 'gqa': 128, 'mqa': 64}[name]


def test_mla_by_hand():
  out = _summary('mla')
  # q_lora 12, kv_lora 16, qk_nope 8, qk_rope 4, v 6.
  q = E * 12 + 12 + 12 * H * (8 + 4)           # q_a, its norm gain, q_b
  kv = E * (16 + 4) + 16 + 16 * H * (8 + 6)    # kv_a (latent + shared rope key), norm, kv_b
  o = H * 6 * E
  assert out['params'] == LAYERS * (q + kv + o) == 6584
  # The latent and the shared RoPE key: 20 values a token and layer.
  assert out['kv_cache_bytes_per_token'] == LAYERS * (16 + 4) * BF16 == 80
  assert out['kv_cache_bytes_per_token_measured'] == 80
  q_flops = E * 12 + 12 * H * (8 + 4)           # matmuls only: the norm gain is elementwise
  kv_flops = E * (16 + 4) + 16 * H * (8 + 6)
  assert out['forward_flops_per_token'] == {
      'attention': LAYERS * 2 * H * ((8 + 4) + 6) * T / 2,
      # Executed: v padded to the q/k width, the full T x T square.
      'attention_as_executed': LAYERS * 2 * H * 2 * (8 + 4) * T,
      'projections': LAYERS * 2 * (q_flops + kv_flops + o),
  }


def test_nsa_cache_by_hand():
  out = _summary('nsa')
  # kv_heads 2: a key and a value of 2 x 8 per branch (compressed-source, selected, window),
  # plus one compressed key and value every stride = 2 tokens.
  kv_values = 2 * 2 * D
  assert out['kv_cache_bytes_per_token'] == LAYERS * (3 * kv_values + kv_values / 2) * BF16
  assert out['kv_cache_bytes_per_token'] == 448
  # Measured: T raw slots per branch and the (T - block_len) // stride + 1 = 11 complete
  # compressed blocks init_cache allocates for 24 tokens, over the 24 slots.
  blocks = (T - 4) // 2 + 1
  measured = LAYERS * (3 * kv_values * T + kv_values * blocks) * BF16 / T
  assert out['kv_cache_bytes_per_token_measured'] == pytest.approx(measured, rel=1e-12)
  # Parameters: q, six K/V projections (two per branch), the gate (with bias) and o, and for
  # keys and values each a compression MLP: block positions l x D, l·D -> D and D -> D, biased.
  compress = 4 * D + (4 * D * D + D) + (D * D + D)
  per_layer = E * H * D + 6 * E * 2 * D + (E * H * 3 + H * 3) + H * D * E + 2 * compress
  assert out['params'] == LAYERS * per_layer

"""Multi-head attention with any number of K/V heads: MHA (kv_heads = heads), GQA, MQA (1)."""

import flax.linen as nn
import jax

from efficientjax.attention import cache as kv_cache
from efficientjax.attention.core import dot_product_attention, mean_context
from efficientjax.attention.positions import POSITIONS
from efficientjax.errors import ConfigError
from efficientjax.nn.linear import Linear
from efficientjax.nn.norms import RMSNorm


def rope_head_dim_errors(m) -> list[ConfigError]:
  """RoPE rotates feature pairs: a variant whose heads are rotated whole needs an even width."""
  head_dim = m['head_dim'] or m['embed_dim'] // m['num_heads']
  if m['position'] == 'rope' and head_dim % 2:
    return [ConfigError('model.head_dim', f'RoPE rotates feature pairs, so the head dimension '
                        f'must be even, got {head_dim} (e.g. {head_dim + 1})',
                        {'model.head_dim': head_dim + 1})]
  return []


def gqa_kv_heads(num_heads: int) -> list[int]:
  """The K/V head counts GQA can have with `num_heads` query heads, largest first: divisors
  strictly between MQA's 1 and MHA's num_heads (none for 1, 2 or a prime)."""
  return [d for d in range(num_heads // 2, 1, -1) if num_heads % d == 0]


def kv_head_variant(num_heads: int, num_kv_heads: int) -> str:
  """The registry name for these head counts."""
  if num_kv_heads == num_heads:
    return 'mha'
  return 'mqa' if num_kv_heads == 1 else 'gqa'


class MultiHeadAttention(nn.Module):
  """Grouped-query attention (Ainslie et al. 2023): each of `num_kv_heads` K/V heads serves
  num_heads / num_kv_heads query heads. Options: q/k/v biases (Qwen2), QK-norm (an RMSNorm
  over head_dim, shared by the heads, before RoPE, as in Qwen3 / OLMo 2), a sliding window."""
  config: 'efficientjax.model.ModelConfig'  # noqa: F821 (import cycle)

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, cache: kv_cache.KVCache | None = None,
               *, segment_ids: jax.Array | None = None
               ) -> tuple[jax.Array, kv_cache.KVCache | None]:
    """segment_ids [batch, t] (whole sequences only): a token attends only to its own segment's
    earlier tokens (packed examples; see core.dot_product_attention)."""
    cfg = self.config
    proj = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, adapter=cfg.adapter,
                kernel_init=nn.initializers.normal(cfg.init_std))
    qkv = dict(use_bias=cfg.qkv_bias, **proj)
    q = Linear((cfg.num_heads, cfg.head_dim), ('embed', 'heads', 'head_dim'), name='q', **qkv)(x)
    k = Linear((cfg.num_kv_heads, cfg.head_dim), ('embed', 'kv_heads', 'head_dim'), name='k',
               **qkv)(x)
    v = Linear((cfg.num_kv_heads, cfg.head_dim), ('embed', 'kv_heads', 'head_dim'), name='v',
               **qkv)(x)
    if cfg.qk_norm:
      norm = dict(eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
      q, k = RMSNorm(name='q_norm', **norm)(q), RMSNorm(name='k_norm', **norm)(k)
    pos = POSITIONS.get(cfg.position)(cfg)
    q, k = pos.rotate(q, positions), pos.rotate(k, positions)
    q = nn.with_logical_constraint(q, ('batch', 'length', 'heads', 'head_dim'))
    k = nn.with_logical_constraint(k, ('batch', 'length', 'kv_heads', 'head_dim'))
    v = nn.with_logical_constraint(v, ('batch', 'length', 'kv_heads', 'head_dim'))

    k_positions = None
    if cache is not None:
      cache = kv_cache.KVCache(k=kv_cache.write(cache.k, k, positions),
                               v=kv_cache.write(cache.v, v, positions))
      k, v = kv_cache.read(cache.k, cfg.dtype), kv_cache.read(cache.v, cfg.dtype)
      k_positions = kv_cache.slot_positions(k)
    bias = None
    if pos.attention_bias is not None:
      bias = pos.attention_bias(cfg, name='position_bias')(
          positions, positions if k_positions is None else k_positions)
    out = dot_product_attention(
        q, k, v, implementation=cfg.attention_impl, bias=bias, window=cfg.sliding_window,
        q_positions=None if cache is None else positions, k_positions=k_positions,
        segment_ids=segment_ids)
    out = nn.with_logical_constraint(out, ('batch', 'length', 'heads', 'head_dim'))
    out = Linear((cfg.embed_dim,), ('heads', 'head_dim', 'embed'), in_dims=2, name='o', **proj)(out)
    return out, cache

  @staticmethod
  def check(m, seq_len: int) -> list[ConfigError]:
    """The registry name must say what the head counts are, so records and tables label a run
    by what it computed: mha (kv = heads), mqa (kv = 1), gqa (anything between)."""
    del seq_len
    errors = rope_head_dim_errors(m)
    kv, heads, name = m['num_kv_heads'], m['num_heads'], m['attention']
    if kv is None:
      if name == 'gqa':
        # GQA is strictly between MQA (1) and MHA (heads); a head count without such a divisor
        # (1, 2, a prime) has no GQA, and the fix is the variant it has.
        groups = gqa_kv_heads(heads)
        example = f'e.g. {groups[0]}' if groups else "none exists; use 'mha' or 'mqa'"
        fix = {'model.num_kv_heads': groups[0]} if groups else {'model.attention': 'mha'}
        errors.append(ConfigError('model.num_kv_heads', "attention 'gqa' needs the number of K/V "
                                  f'heads, a divisor of model.num_heads={heads} ({example})', fix))
      return errors
    want = kv_head_variant(heads, kv)
    if want != name:
      errors.append(ConfigError('model.attention', f'{name!r} with model.num_kv_heads={kv} and '
                                f'model.num_heads={heads} is {want.upper()}; set '
                                f'model.attention={want!r} or change model.num_kv_heads',
                                {'model.attention': want}))
    return errors

  @staticmethod
  def init_cache(cfg, batch: int, max_len: int, dtype) -> kv_cache.KVCache:
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return kv_cache.KVCache(k=kv_cache.zeros(shape, dtype), v=kv_cache.zeros(shape, dtype))

  @staticmethod
  def cache_values_per_token(cfg) -> int:
    """Values one layer caches per token: a key and a value per K/V head."""
    return 2 * cfg.num_kv_heads * cfg.head_dim

  @staticmethod
  def flops_per_token(cfg, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one layer, averaged over a causal sequence of `seq_len`."""
    e, h, kv, d = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_key = 2.0 * 2 * h * d  # a score (q·k) and a weighted value per head
    return {'projections': 2.0 * (e * h * d + 2 * e * kv * d + h * d * e),
            'attention': per_key * mean_context(seq_len, cfg.sliding_window),
            'attention_as_executed': per_key * seq_len}  # XLA and cuDNN compute the full square

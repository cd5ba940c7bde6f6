"""Multi-head latent attention (MLA; DeepSeek-V2, arXiv 2405.04434 §2.1).

Keys and values are not projected from the input per head but expanded from one small latent
per token, c_kv = RMSNorm(x · W_DKV) [kv_lora_rank]; position reaches the scores only through a
separate ("decoupled") RoPE key k_rope = RoPE(x · W_KR) [qk_rope_head_dim], shared by every
head. Queries are [q_nope, RoPE(q_rope)] per head, from x directly or through their own
normalised latent (q_lora_rank > 0). A decoding cache therefore holds kv_lora_rank +
qk_rope_head_dim values per token and layer (576 in DeepSeek-V2, against 2 · 128 · 128 for
its multi-head twin).

One function, two forms:
- whole sequences (training, evaluation): keys [W_UK c_kv, k_rope] and values W_UV c_kv are
  expanded per head and go through the shared attention core (cuDNN's flash attention on GPU);
- against the cache (prefill and decoding): the absorbed form (§2.1.2's remark that W_UK folds
  into the query and W_UV into the output). Per head, q_nope · (W_UK c) = (q_nope · W_UKᵀ) · c,
  so scores are q_lat · c_kv + q_rope · k_rope with q_lat in the latent space, and the weighted
  sum is taken of the latents and expanded once per query, out = (Σ p · c_kv) · W_UV. The cache
  is read as it is stored, never expanded to per-head keys and values.
"""

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from efficientjax.attention import cache as kv_cache
from efficientjax.attention.core import causal_mask, dot_product_attention, mean_context
from efficientjax.attention.positions import POSITIONS
from efficientjax.errors import ConfigError
from efficientjax.nn.linear import Linear
from efficientjax.nn.norms import RMSNorm
from efficientjax.quant import container as quant

# DeepSeek-V2 normalises both latents with a fixed eps of 1e-6, whatever its rms_norm_eps
# (the block norms') is, in its own code and in transformers'; we follow it, so checkpoints
# load exactly and `model.norm_eps` keeps meaning the block norms' eps.
LATENT_NORM_EPS = 1e-6


@flax.struct.dataclass
class MLACache:
  """One layer's decoding cache, slot = position.

  c_kv: [batch, max_len, kv_lora_rank], the normalised latents;
  k_rope: [batch, max_len, qk_rope_head_dim], the shared keys, already rotated.
  """
  c_kv: jax.Array
  k_rope: jax.Array


def _yarn_mscale(factor: float, mscale: float) -> float:
  """YaRN's temperature term 0.1 · mscale · ln(factor) + 1 (1 without scaling)."""
  return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(cfg) -> float:
  """1/sqrt(qk_nope_head_dim + qk_rope_head_dim), times DeepSeek's YaRN correction
  mscale(factor, mscale_all_dim)² when YaRN is on (Hugging Face's `yarn_apply_mscale`).

  With YaRN our `rope` rotation scales cos and sin by mscale(factor, mscale) /
  mscale(factor, mscale_all_dim), so the rotated part of each logit gains that ratio squared;
  with this factor on every logit, the rotated part ends up tempered by mscale(factor, mscale)²
  and the position-free part by mscale(factor, mscale_all_dim)² (DeepSeek-V2 sets both to 0.707:
  one temperature for the whole logit).
  """
  m = cfg.mla
  scale = (m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5
  if cfg.yarn.factor > 1.0 and cfg.yarn.mscale_all_dim:
    scale *= _yarn_mscale(cfg.yarn.factor, cfg.yarn.mscale_all_dim) ** 2
  return scale


class MultiHeadLatentAttention(nn.Module):
  """MLA with DeepSeek-V2's parameter names in our layout (kernels [in..., out...]):

    q     [embed, heads, nope + rope]          (q_lora_rank = 0), or
    q_a   [embed, q_lora_rank], q_norm, q_b [q_lora_rank, heads, nope + rope];
    kv_a  [embed, kv_lora_rank + rope]         (the latent, then the shared RoPE key);
    kv_norm, kv_b [kv_lora_rank, heads, nope + v]  (per head: W_UK, then W_UV);
    o     [heads, v, embed].

  The positional encoding's `rotate` acts on the rope features only (q_rope and the shared
  k_rope), its `attention_bias`, if any, is added to the logits in both forms, and embeddings
  are the model's; so every registered encoding composes with MLA.
  """
  config: 'efficientjax.model.ModelConfig'  # noqa: F821 (import cycle)

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, cache: MLACache | None = None,
               *, segment_ids: jax.Array | None = None) -> tuple[jax.Array, MLACache | None]:
    """segment_ids [batch, t] (whole sequences only): a token attends only to its own segment's
    earlier tokens (packed examples; see core.dot_product_attention)."""
    cfg = self.config
    m = cfg.mla
    heads, nope, rope, v_dim = cfg.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    proj = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, adapter=cfg.adapter,
                kernel_init=nn.initializers.normal(cfg.init_std))
    norm = dict(eps=LATENT_NORM_EPS, dtype=cfg.dtype, param_dtype=cfg.param_dtype)

    if m.q_lora_rank:
      c_q = Linear((m.q_lora_rank,), ('embed', 'latent'), name='q_a', **proj)(x)
      c_q = RMSNorm(name='q_norm', **norm)(c_q)
      c_q = nn.with_logical_constraint(c_q, ('batch', 'length', 'latent'))
      q = Linear((heads, nope + rope), ('latent', 'heads', 'head_dim'), name='q_b', **proj)(c_q)
    else:
      q = Linear((heads, nope + rope), ('embed', 'heads', 'head_dim'), name='q', **proj)(x)
    q = nn.with_logical_constraint(q, ('batch', 'length', 'heads', 'head_dim'))

    kv_a = Linear((m.kv_lora_rank + rope,), ('embed', 'latent'), name='kv_a', **proj)(x)
    c_kv = RMSNorm(name='kv_norm', **norm)(kv_a[..., :m.kv_lora_rank])
    c_kv = nn.with_logical_constraint(c_kv, ('batch', 'length', 'latent'))
    pos = POSITIONS.get(cfg.position)(cfg)
    q_nope, q_rope = q[..., :nope], pos.rotate(q[..., nope:], positions)
    k_rope = pos.rotate(kv_a[..., None, m.kv_lora_rank:], positions)[:, :, 0]  # one head
    k_rope = nn.with_logical_constraint(k_rope, ('batch', 'length', 'head_dim'))

    kv_b = Linear((heads, nope + v_dim), ('latent', 'heads', 'head_dim'), name='kv_b', **proj)
    bias_module = pos.attention_bias
    scale = softmax_scale(cfg)
    if cache is None:
      kv = kv_b(c_kv)
      k = jnp.concatenate(
          [kv[..., :nope], jnp.broadcast_to(k_rope[:, :, None], kv.shape[:3] + (rope,))], axis=-1)
      k = nn.with_logical_constraint(k, ('batch', 'length', 'heads', 'head_dim'))
      v = nn.with_logical_constraint(kv[..., nope:], ('batch', 'length', 'heads', 'head_dim'))
      q = jnp.concatenate([q_nope, q_rope], axis=-1)
      bias = None if bias_module is None else bias_module(cfg, name='position_bias')(
          positions, positions)
      out = dot_product_attention(q, k, v, implementation=cfg.attention_impl, scale=scale,
                                  bias=bias, window=cfg.sliding_window, segment_ids=segment_ids)
    else:
      if segment_ids is not None:
        raise ValueError('segment_ids are for whole sequences; decoding with a cache takes none')
      cache = MLACache(c_kv=kv_cache.write(cache.c_kv, c_kv, positions),
                       k_rope=kv_cache.write(cache.k_rope, k_rope, positions))
      k_positions = kv_cache.slot_positions(cache.c_kv)
      bias = None if bias_module is None else bias_module(cfg, name='position_bias')(
          positions, k_positions)
      # The absorbed form multiplies by kv_b's kernel transposed per head, which a Linear call
      # cannot express, so it reads the kernel (dequantised, if stored quantised); the empty call
      # creates it when `init` runs this path (and costs nothing).
      kv_b(jnp.zeros((0, m.kv_lora_rank), cfg.dtype))
      kernel = quant.dequantize(nn.unbox(kv_b.get_variable('params', 'kernel')),
                                cfg.dtype).astype(cfg.dtype)
      out = _absorbed_attention(q_nope, q_rope, cache, kernel, mask=causal_mask(
          positions, k_positions, cfg.sliding_window), scale=scale, bias=bias)
    out = nn.with_logical_constraint(out, ('batch', 'length', 'heads', 'head_dim'))
    out = Linear((cfg.embed_dim,), ('heads', 'head_dim', 'embed'), in_dims=2, name='o', **proj)(out)
    return out, cache

  @staticmethod
  def check(m, seq_len: int) -> list[ConfigError]:
    """Shapes MLA cannot run, each with its fix."""
    del seq_len
    la, errors = m['mla'], []
    for key in ('kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim'):
      if la[key] < 1:
        errors.append(ConfigError(f'model.mla.{key}', f'must be positive, got {la[key]}'))
    if la['q_lora_rank'] < 0:
      errors.append(ConfigError('model.mla.q_lora_rank', f'must be 0 (queries projected '
                                f'directly) or a positive rank, got {la["q_lora_rank"]}'))
    if la['qk_rope_head_dim'] % 2:
      errors.append(ConfigError('model.mla.qk_rope_head_dim', f'RoPE rotates feature pairs, so '
                                f'it must be even, got {la["qk_rope_head_dim"]}',
                                {'model.mla.qk_rope_head_dim': la['qk_rope_head_dim'] + 1}))
    qk = la['qk_nope_head_dim'] + la['qk_rope_head_dim']
    if la['v_head_dim'] > qk:
      # The core zero-pads v up to the q/k width, as jax.nn.dot_product_attention (cuDNN)
      # needs one width for q, k and v; a wider v would need q and k padded instead.
      errors.append(ConfigError('model.mla.v_head_dim', f'{la["v_head_dim"]} exceeds the q/k '
                                f'head width qk_nope_head_dim + qk_rope_head_dim = {qk}; lower '
                                'it or widen the q/k head', {'model.mla.v_head_dim': qk}))
    kv = m['num_kv_heads']
    if kv is not None and kv != m['num_heads']:
      errors.append(ConfigError('model.num_kv_heads', f'is {kv}, but MLA expands keys and '
                                f'values for every one of the model.num_heads={m["num_heads"]} '
                                'query heads from the shared latent (its cache size is set by '
                                'model.mla.kv_lora_rank); leave model.num_kv_heads unset',
                                {'model.num_kv_heads': None}))
    # Options of the K/V-head family that MLA's projections do not have (DeepSeek's have
    # neither): refused rather than silently ignored.
    for field, off, why in (('qkv_bias', False, 'its latent projections have no biases'),
                            ('qk_norm', False, 'it normalises the latents, not per-head q/k')):
      if m[field] != off:
        errors.append(ConfigError(f'model.{field}', f'is not supported by MLA ({why}); set '
                                  f'model.{field}={off}', {f'model.{field}': off}))
    return errors

  @staticmethod
  def init_cache(cfg, batch: int, max_len: int, dtype) -> MLACache:
    return MLACache(c_kv=kv_cache.zeros((batch, max_len, cfg.mla.kv_lora_rank), dtype),
                    k_rope=kv_cache.zeros((batch, max_len, cfg.mla.qk_rope_head_dim), dtype))

  @staticmethod
  def cache_values_per_token(cfg) -> int:
    """Values one layer caches per token: the latent and the shared RoPE key."""
    return cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim

  @staticmethod
  def flops_per_token(cfg, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one layer, averaged over a causal sequence of `seq_len`, in
    the training form (keys and values expanded per head)."""
    m = cfg.mla
    e, h = cfg.embed_dim, cfg.num_heads
    qk, v = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    if m.q_lora_rank:
      q = e * m.q_lora_rank + m.q_lora_rank * h * qk
    else:
      q = e * h * qk
    kv = e * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * h * (m.qk_nope_head_dim + v)
    per_key = 2.0 * h * (qk + v)  # a score over the q/k width and a weighted value per head
    return {'projections': 2.0 * (q + kv + h * v * e),
            'attention': per_key * mean_context(seq_len, cfg.sliding_window),
            # The core pads v to the q/k width, and XLA and cuDNN compute the full square.
            'attention_as_executed': 2.0 * h * 2 * qk * seq_len}


def _absorbed_attention(q_nope: jax.Array, q_rope: jax.Array, cache: MLACache, kernel: jax.Array,
                        *, mask: jax.Array, scale: float, bias: jax.Array | None) -> jax.Array:
  """Attention in the latent space.

  Args:
    q_nope: [batch, t, heads, nope]; q_rope: [batch, t, heads, rope], rotated.
    cache: the layer's cache with the new tokens written: c_kv [batch, slots, latent], k_rope
      [batch, slots, rope].
    kernel: kv_b's [latent, heads, nope + v] (W_UK, then W_UV, per head).
    mask: [batch, 1, t, slots], which slots each query sees; bias: broadcastable to
      [batch, heads, t, slots], or None.
  Returns:
    [batch, t, heads, v].
  """
  nope = q_nope.shape[-1]
  dtype = q_nope.dtype
  c_kv = kv_cache.read(cache.c_kv, dtype).astype(dtype)
  k_rope = kv_cache.read(cache.k_rope, dtype).astype(dtype)
  q_latent = jnp.einsum('bthn,chn->bthc', q_nope, kernel[..., :nope])
  scores = (jnp.einsum('bthc,bsc->bhts', q_latent, c_kv, preferred_element_type=jnp.float32) +
            jnp.einsum('bthr,bsr->bhts', q_rope, k_rope, preferred_element_type=jnp.float32))
  scores = scores * scale
  if bias is not None:
    scores = scores + bias.astype(jnp.float32)
  # Every query sees at least its own slot, so no row is all masked.
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  out_latent = jnp.einsum('bhts,bsc->bthc', probs, c_kv)
  return jnp.einsum('bthc,chv->bthv', out_latent, kernel[..., nope:])

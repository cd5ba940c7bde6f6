"""Positional encodings and their registry (`model.position`).

An encoding can act in three places, each optional:
- `rotate(x, positions)`: on queries and keys inside attention (RoPE and its scalings);
- `embedding`: a module added to the token embeddings, called as `Embedding(config)(positions)`
  (sinusoidal and learned absolute positions);
- `attention_bias`: a module giving a bias added to the attention logits, called as
  `Bias(config)(q_positions, k_positions)` -> [batch, heads, q_len, k_len] (T5's relative
  buckets).
Every variant calls `rotate` and `attention_bias` and the model calls `embedding`, so a new
encoding is one class here and works with every attention variant that can take it. An encoding
may also have a static `check(model_fields, seq_len)` -> list of `ConfigError`s for its fields.

The entries: `none` (NoPE), `rope` (scaled by YaRN, Llama 3.1's rule or linear interpolation
when `model.yarn.factor`, `model.llama3_rope.factor` or `model.linear_rope_factor` > 1), `absolute`
(sinusoidal, Vaswani et al. 2017), `learned` (a trained table of `max_seq_len` rows) and
`relative` (T5's bucketed bias, Raffel et al. 2020).
"""

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efficientjax.errors import ConfigError
from efficientjax.registry import Registry

POSITIONS = Registry('model.position')


@POSITIONS.register('none')
@dataclasses.dataclass(frozen=True)
class NoPosition:
  """No positional information beyond causality (NoPE)."""
  config: Any  # efficientjax.model.ModelConfig (import cycle)
  embedding: ClassVar[type[nn.Module] | None] = None
  attention_bias: ClassVar[type[nn.Module] | None] = None

  def rotate(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    del positions
    return x


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """segment_ids [batch, length] (each segment a contiguous run) -> int32 positions restarting
  at 0 where each run starts: every encoding then gives a packed example what it gets alone
  (RoPE, absolute and learned read the position itself, the relative bias the difference of
  two positions of one example)."""
  offsets = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  first = jax.lax.cummax(jnp.where(starts, offsets, 0), axis=1)
  return offsets - first


# ---------------------------------------------------------------------------------------------
# RoPE and its frequency scalings: YaRN, Llama 3.1's (`llama3`), linear interpolation.


@POSITIONS.register('rope')
@dataclasses.dataclass(frozen=True)
class RoPE(NoPosition):
  """Rotary embeddings (Su et al. 2021) in the half-split layout of GPT-NeoX and Hugging Face
  Llama: feature i pairs with feature i + head_dim/2, so HF checkpoints load unpermuted.

  With `yarn.factor` > 1 the frequencies and the cos/sin scale are YaRN's (`yarn_parameters`);
  with `llama3_rope.factor` > 1 the frequencies are Llama 3.1's (`llama3_frequencies`); with
  `linear_rope_factor` > 1 they are divided by it (position interpolation, Chen et al. 2023).
  At most one may be on (`rope_scaling`). The rotated width is x's last dim, so a variant
  rotating part of a head (MLA's decoupled RoPE features) gets the scaling computed for that
  width, as Hugging Face does for DeepSeek.
  """

  @staticmethod
  def check(m, seq_len: int) -> list[ConfigError]:
    del seq_len
    y = m['yarn']
    if y['factor'] < 1.0:
      return [ConfigError('model.yarn.factor', f'must be at least 1 (1: plain RoPE), got '
                          f'{y["factor"]}; YaRN stretches the original context by this factor')]
    errors = []
    if y['factor'] > 1.0 and y['original_max_len'] < 1:
      errors.append(ConfigError('model.yarn.original_max_len', 'must be the positive context '
                                f'length the model was trained at, got {y["original_max_len"]}'))
    if y['factor'] > 1.0 and not y['beta_fast'] > y['beta_slow'] > 0:
      errors.append(ConfigError('model.yarn.beta_fast', f'YaRN needs beta_fast > beta_slow > 0 '
                                f'(rotations bounding the ramp), got {y["beta_fast"]} and '
                                f'{y["beta_slow"]}; the paper uses 32 and 1',
                                {'model.yarn.beta_fast': 32.0, 'model.yarn.beta_slow': 1.0}))
    l3 = m['llama3_rope']
    if l3['factor'] > 1.0 and not l3['high_freq_factor'] > l3['low_freq_factor']:
      # Equal, the smoothing divides by zero; swapped, the band and its blend turn inside out.
      errors.append(ConfigError(
          'model.llama3_rope.high_freq_factor', 'Llama 3 RoPE scaling needs high_freq_factor > '
          f'low_freq_factor (original_max_len over each bounds the smoothed band), got '
          f'{l3["high_freq_factor"]} and {l3["low_freq_factor"]}; Llama 3.1 uses 4 and 1',
          {'model.llama3_rope.high_freq_factor': 4.0, 'model.llama3_rope.low_freq_factor': 1.0}))
    return errors

  def rotate(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    cfg = self.config
    if rope_scaling(cfg) is None:
      return apply_rope(x, positions, cfg.rope_theta)
    inv_freq, attention_factor = rope_frequencies(cfg, x.shape[-1])
    return apply_rope(x, positions, cfg.rope_theta, jnp.asarray(inv_freq), attention_factor)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float,
               inv_freq: jax.Array | None = None, attention_factor: float = 1.0) -> jax.Array:
  """x: [batch, length, heads, dim]; positions: [batch, length] integers.

  `inv_freq` ([dim/2]) overrides the plain 1/theta^(2i/dim) frequencies (scalings); cos and sin are
  multiplied by `attention_factor`, as Hugging Face applies YaRN's temperature.
  """
  half = x.shape[-1] // 2
  if inv_freq is None:
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, half]
  sin = (jnp.sin(angles) * attention_factor)[:, :, None, :]
  cos = (jnp.cos(angles) * attention_factor)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def rope_scaling(cfg: Any) -> str | None:
  """Which frequency scaling `cfg`'s RoPE uses: 'yarn', 'llama3', 'linear', or None.

  Each replaces the frequencies, so at most one factor may exceed 1 (validation refuses two; a
  ModelConfig built by hand gets this ValueError rather than one of them silently).
  """
  factors = {'yarn': cfg.yarn.factor, 'llama3': cfg.llama3_rope.factor,
             'linear': cfg.linear_rope_factor}
  on = [name for name, factor in factors.items() if factor > 1.0]
  if len(on) > 1:
    raise ValueError(f'RoPE scalings {" and ".join(on)} are both on (factors {factors}); only '
                     'one can apply')
  return on[0] if on else None


def rope_frequencies(cfg: Any, dim: int | None = None) -> tuple[np.ndarray, float]:
  """(inv_freq float32 [dim/2], attention_factor) of `cfg`'s RoPE, scaling included, on the
  host (checkpoint loaders compare them with stored buffers). `dim` defaults to head_dim."""
  dim = cfg.head_dim if dim is None else dim
  scaling = rope_scaling(cfg)
  if scaling == 'yarn':
    return yarn_parameters(dim, cfg.rope_theta, cfg.yarn)
  exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  inv_freq = (np.float32(1.0) / np.float32(cfg.rope_theta) ** exponents).astype(np.float32)
  if scaling == 'llama3':
    return llama3_frequencies(inv_freq, cfg.llama3_rope), 1.0
  if scaling == 'linear':
    # Hugging Face's `linear`: positions p / factor, folded into the frequencies.
    return (inv_freq / np.float32(cfg.linear_rope_factor)).astype(np.float32), 1.0
  return inv_freq, 1.0


def llama3_frequencies(inv_freq: np.ndarray, llama3: Any) -> np.ndarray:
  """Llama 3.1's scaling of plain RoPE frequencies `inv_freq` (float32 [dim/2]) for `llama3`
  (a `Llama3RopeConfig`): Meta's `apply_scaling`, computed as Hugging Face's
  `_compute_llama3_parameters` (transformers 5.x) does, operation for operation in float32, so
  that the same plain frequencies give the same bits.

  With L = original_max_len, a wavelength 2π/f above L / low_freq_factor (fewer than
  low_freq_factor turns over the original context) is interpolated (f / factor), one below
  L / high_freq_factor kept, and in the band between f is blended as (1 - s)·f/factor + s·f with
  s = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor) rising from 0 to 1
  across the band. Unlike YaRN, no attention temperature.
  """
  f32 = np.float32
  inv_freq = np.asarray(inv_freq, np.float32)
  factor, low, high = llama3.factor, llama3.low_freq_factor, llama3.high_freq_factor
  original = llama3.original_max_len
  # torch compares a float32 tensor with a Python float in float32.
  low_freq_wavelen, high_freq_wavelen = f32(original / low), f32(original / high)
  # torch evaluates `scalar / tensor` as reciprocal(tensor) * scalar; so do we, for its bits.
  wavelen = (f32(1) / inv_freq) * f32(2 * math.pi)
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / f32(factor), inv_freq)
  smooth = ((f32(1) / wavelen) * f32(original) - f32(low)) / f32(high - low)
  smoothed = (f32(1) - smooth) * scaled / f32(factor) + smooth * scaled
  medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def yarn_attention_factor(factor: float, mscale: float = 1.0, mscale_all_dim: float = 0.0
                          ) -> float:
  """YaRN's temperature as a cos/sin multiplier: 0.1·ln(factor) + 1 (the paper's sqrt(1/t)),
  or DeepSeek's ratio mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are
  set (non-zero) - Hugging Face's rule, which ignores `mscale` alone."""
  def get_mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
  if mscale and mscale_all_dim:
    return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
  return get_mscale(factor)


def yarn_parameters(dim: int, theta: float, yarn: Any) -> tuple[np.ndarray, float]:
  """YaRN (Peng et al. 2023, arXiv 2309.00071 §3.2-3.4): (inv_freq float32 [dim/2],
  attention_factor) for `yarn` (a `YarnConfig`), computed exactly as Hugging Face's
  `_compute_yarn_parameters` (transformers 5.x), float32 where it uses float32.

  Frequencies that turn fewer than `beta_slow` times over the original context are interpolated
  (divided by `factor`), those turning more than `beta_fast` times are kept, and a linear ramp
  over the dims between blends the two. `truncate` (HF's default True) rounds the ramp's ends
  outwards to whole dims.
  """
  factor = float(yarn.factor)
  original = yarn.original_max_len

  def correction_dim(num_rotations: float) -> float:
    # The dim whose wavelength fits `num_rotations` times into the original context.
    return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

  low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
  if yarn.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # HF's guard against a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) /
                 np.float32(high - low), 0, 1).astype(np.float32)
  extrapolation_weight = np.float32(1) - ramp

  pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  extrapolated = np.float32(1) / pos_freqs
  interpolated = np.float32(1) / (np.float32(factor) * pos_freqs)
  inv_freq = (interpolated * (np.float32(1) - extrapolation_weight) +
              extrapolated * extrapolation_weight)
  attention_factor = yarn_attention_factor(factor, yarn.mscale, yarn.mscale_all_dim)
  return inv_freq.astype(np.float32), attention_factor


# ---------------------------------------------------------------------------------------------
# Absolute positions, added to the token embeddings.


def sinusoids(positions: jax.Array, dim: int) -> jax.Array:
  """Vaswani et al. 2017 §3.5, interleaved as in the paper: PE[p, 2i] = sin(p / 10000^(2i/dim)),
  PE[p, 2i+1] = cos(p / 10000^(2i/dim)). positions [...] -> float32 [..., dim]."""
  pairs = (dim + 1) // 2
  inv_freq = 1.0 / (10000.0 ** (2 * jnp.arange(pairs, dtype=jnp.float32) / dim))
  angles = positions[..., None].astype(jnp.float32) * inv_freq
  pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return pe.reshape(*positions.shape, 2 * pairs)[..., :dim]


class SinusoidalEmbedding(nn.Module):
  """positions [batch, t] -> [batch, t, embed] fixed sinusoids; no parameters, any position."""
  config: Any

  def __call__(self, positions: jax.Array) -> jax.Array:
    cfg = self.config
    pe = sinusoids(positions, cfg.embed_dim).astype(cfg.dtype)
    return nn.with_logical_constraint(pe, ('batch', 'length', 'embed'))


@POSITIONS.register('absolute')
@dataclasses.dataclass(frozen=True)
class AbsolutePosition(NoPosition):
  """Sinusoidal absolute positions added to the token embeddings (the original Transformer)."""
  embedding: ClassVar[type[nn.Module] | None] = SinusoidalEmbedding


class LearnedEmbedding(nn.Module):
  """positions [batch, t] -> [batch, t, embed]: rows of a trained table [max_seq_len, embed]
  (GPT-2), initialised normal(init_std).

  A position outside [0, max_seq_len) has no row. Rather than clamp to the last row, as a plain
  gather would, silently giving every later token the same position, it embeds as NaN: that
  token's logits are NaN, and so is everything attending to it afterwards (its K/V enter the
  cache), so a loss, a perplexity or a decode past the table cannot go unnoticed. Keeping
  seq_len (and prefill + generated tokens) <= max_seq_len is the config check's job.
  """
  config: Any

  @nn.compact
  def __call__(self, positions: jax.Array) -> jax.Array:
    cfg = self.config
    table = self.param(
        'embedding',
        nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ('positions', 'embed')),
        (cfg.max_seq_len, cfg.embed_dim), cfg.param_dtype)
    inside = (positions >= 0) & (positions < cfg.max_seq_len)
    rows = jnp.take(table, jnp.clip(positions, 0, cfg.max_seq_len - 1), axis=0).astype(cfg.dtype)
    pe = jnp.where(inside[..., None], rows, jnp.nan)
    return nn.with_logical_constraint(pe, ('batch', 'length', 'embed'))


@POSITIONS.register('learned')
@dataclasses.dataclass(frozen=True)
class LearnedPosition(NoPosition):
  """Learned absolute positions added to the token embeddings (GPT-2); `max_seq_len` rows."""
  embedding: ClassVar[type[nn.Module] | None] = LearnedEmbedding

  @staticmethod
  def check(m, seq_len: int) -> list[ConfigError]:
    rows = m['max_seq_len']
    if rows is not None and rows < seq_len:
      return [ConfigError('model.max_seq_len', f'the learned position table has {rows} rows but '
                          f'data.seq_len={seq_len}; positions past the table embed as NaN. Raise '
                          'it (or unset it to follow data.seq_len)', {'model.max_seq_len': None})]
    return []


# ---------------------------------------------------------------------------------------------
# T5's relative-position bias.


def relative_position_bucket(relative_position: jax.Array, num_buckets: int = 32,
                             max_distance: int = 128) -> jax.Array:
  """T5's causal (unidirectional) buckets (Raffel et al. 2020 §2.1; Mesh TensorFlow's and
  transformers' `_relative_position_bucket(..., bidirectional=False)`, float32 as they are).

  relative_position = key position - query position (<= 0 for the past; a future key, which
  the causal mask hides anyway, falls in bucket 0 with the query itself). Distances below
  num_buckets/2 get a bucket each; larger ones share logarithmically wider buckets up to
  max_distance, beyond which all fall in the last bucket. Returns int32 in [0, num_buckets).
  """
  distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  # max(·, 1): log(0) is only ever taken for small distances, whose result where() discards.
  scaled = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
            / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
  return jnp.where(is_small, distance, large).astype(jnp.int32)


class RelativeBias(nn.Module):
  """(q_positions [batch, tq], k_positions [batch, tk]) -> float32 [batch, heads, tq, tk]:
  a learned scalar per head and relative-distance bucket, added to the attention logits.

  One table [num_buckets, heads] per layer: T5 shares one across its layers (computed in the
  first and passed down), but our layers are scanned with per-layer parameters and a variant
  knows nothing of its neighbours, so each layer owns its table (num_buckets x heads values a
  layer, negligible). Initialised normal(init_std). Unlike T5 our logits are scaled by
  1/sqrt(head_dim) before the bias is added; the bias itself is unscaled.
  """
  config: Any

  @nn.compact
  def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    cfg = self.config
    rel = cfg.relative
    table = self.param(
        'embedding', nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                  ('position_buckets', 'heads')),
        (rel.num_buckets, cfg.num_heads), cfg.param_dtype)
    buckets = relative_position_bucket(k_positions[:, None, :] - q_positions[:, :, None],
                                       rel.num_buckets, rel.max_distance)  # [b, tq, tk]
    bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [b, tq, tk, heads]
    bias = jnp.transpose(bias, (0, 3, 1, 2))
    return nn.with_logical_constraint(bias, ('batch', 'heads', 'length', 'kv_length'))


@POSITIONS.register('relative')
@dataclasses.dataclass(frozen=True)
class RelativePosition(NoPosition):
  """T5's bucketed relative-position bias on the attention logits; nothing on q, k or x."""
  attention_bias: ClassVar[type[nn.Module] | None] = RelativeBias

  @staticmethod
  def check(m, seq_len: int) -> list[ConfigError]:
    del seq_len
    buckets, distance = m['relative']['num_buckets'], m['relative']['max_distance']
    if buckets < 2:
      return [ConfigError('model.relative.num_buckets', f'needs at least 2 buckets (half exact, '
                          f'half logarithmic), got {buckets}; T5 uses 32')]
    if distance <= buckets // 2:
      return [ConfigError('model.relative.max_distance', f'must exceed num_buckets // 2 = '
                          f'{buckets // 2} (the exactly bucketed distances), got {distance}; '
                          'T5 uses 128 with 32 buckets',
                          # T5's ratio, unless that overflows an int64 (an absurd bucket count).
                          {'model.relative.max_distance': 4 * buckets if buckets < 2**60
                           else buckets + 1})]
    return []

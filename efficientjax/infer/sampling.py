"""Next-token sampling for the decode engine: greedy, temperature, top-k, top-p, per slot.

Every parameter is a per-slot array (`SamplingParams`), so one compiled decode step serves any
mix of requests, and a request entering a slot changes data, never the program.

A row with temperature 0 takes the argmax (the first on ties, as `jnp.argmax` and torch's).
Any other row is warped as transformers' `generate(do_sample=True)` warps it, in its order:
`TemperatureLogitsWarper` (logits / T), `TopKLogitsWarper` (keeps every token whose logit is at
least the k-th largest, so ties at the boundary are all kept and more than k may survive; k = 0
is off; k > vocab keeps everything), then `TopPLogitsWarper` over what top-k kept (keeps the
smallest set of most probable tokens whose probability sums to >= p, at least one; p = 1 is off).
One deliberate difference: where tokens of equal logit straddle the top-p boundary,
transformers keeps the ones its (unstable) `torch.sort` happens to place later, so its answer
depends on sort internals; here the whole tie group is kept, as top-k keeps its boundary ties.
Then one categorical draw from the warped logits (Gumbel-max, `jax.random.categorical`).

Keys: a request's draw for its token `index` (0 for the first generated token) uses
`request_keys(seed, index)`: the request's seed folded with the index. Each row draws with its
own key and reads only its own logits and parameters, so a request's tokens depend on its seed
and logits alone, never on its slot or on the other requests in the batch. Keys are raw
threefry keys, uint32 [S, 2] (fixed to threefry2x32 whatever `jax_default_prng_impl` says);
`sample` also takes typed key arrays [S].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from efficientjax.errors import ConfigError

# The dotted config path of a request's sampling options, named in errors.
FIELD = 'inference.sampling'

KEY_IMPL = 'threefry2x32'
SEED_LIMIT = 2**32


@flax.struct.dataclass
class SamplingParams:
  """Per-slot sampling parameters, a pytree of [S] arrays."""

  temperature: jax.Array  # f32; 0 = greedy
  top_k: jax.Array        # int32; 0 = off
  top_p: jax.Array        # f32; 1 = off


@dataclasses.dataclass(frozen=True)
class Sampling:
  """One request's sampling options, checked on construction (a ConfigError names the field).

  `seed` in [0, 2**32) keys the request's draws (`request_keys`)."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    errors = sampling_errors(self)
    if errors:
      raise errors[0]


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
  return (isinstance(x, (int, float, np.integer, np.floating))
          and not isinstance(x, (bool, np.bool_)))


def sampling_errors(s: Sampling, field: str = FIELD) -> list[ConfigError]:
  """Every problem of `s`, each a ConfigError naming `field`.<option>."""
  errors = []
  t, k, p, seed = s.temperature, s.top_k, s.top_p, s.seed
  if not _is_real(t) or not math.isfinite(t) or t < 0:
    errors.append(ConfigError(f'{field}.temperature', f'must be a finite number >= 0, got {t!r}; '
                              'use 0 for greedy decoding, or e.g. 0.7'))
  if not _is_int(k) or k < 0:
    errors.append(ConfigError(f'{field}.top_k', f'must be an integer >= 0, got {k!r}; use 0 to '
                              'turn top-k off, or e.g. 50'))
  if not _is_real(p) or not 0.0 < p <= 1.0:
    errors.append(ConfigError(f'{field}.top_p', f'must lie in (0, 1], got {p!r}; use 1.0 to turn '
                              'top-p off, or e.g. 0.9'))
  if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
    errors.append(ConfigError(f'{field}.seed', f'must be an integer in [0, 2**32), got {seed!r}'))
  return errors


def stack_params(samplings: Sequence[Sampling]) -> SamplingParams:
  """The per-slot SamplingParams of `samplings` (one per slot, in slot order)."""
  for s in samplings:
    if not isinstance(s, Sampling):
      raise TypeError(f'expected Sampling objects, got {type(s).__name__}')
    errors = sampling_errors(s)  # a Sampling mutated through object.__setattr__ stays caught
    if errors:
      raise errors[0]
  return SamplingParams(
      temperature=jnp.asarray([s.temperature for s in samplings], jnp.float32),
      top_k=jnp.asarray([s.top_k for s in samplings], jnp.int32),
      top_p=jnp.asarray([s.top_p for s in samplings], jnp.float32))


def greedy_params(num_slots: int) -> SamplingParams:
  """SamplingParams for `num_slots` greedy slots (what empty slots hold)."""
  return stack_params([Sampling()] * num_slots)


def set_slot(params: SamplingParams, slot, sampling: Sampling) -> SamplingParams:
  """`params` with slot `slot` (an int or a traced scalar) holding `sampling`'s parameters."""
  one = stack_params([sampling])
  return jax.tree.map(lambda all_, new: all_.at[slot].set(new[0]), params, one)


def request_keys(seeds, indices) -> jax.Array:
  """Raw keys uint32 [..., 2]: each request seed folded with the index of the token it draws.

  `seeds` (ints in [0, 2**32)) and `indices` (>= 0) broadcast against each other; python
  ints and traced arrays give the same keys."""
  seeds, indices = jnp.broadcast_arrays(jnp.asarray(seeds, jnp.uint32),
                                        jnp.asarray(indices, jnp.uint32))

  def one(seed, index):
    key = jax.random.fold_in(jax.random.key(seed, impl=KEY_IMPL), index)
    return jax.random.key_data(key)

  flat = jax.vmap(one)(seeds.reshape(-1), indices.reshape(-1))
  return flat.reshape(seeds.shape + flat.shape[1:])


def _typed_keys(keys) -> jax.Array:
  keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
  if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    return keys
  if keys.dtype != jnp.uint32 or keys.shape[-1:] != (2,):
    raise TypeError(f'keys must be raw threefry keys uint32 [S, 2] or typed keys [S], got '
                    f'{keys.dtype}{list(keys.shape)}; make them with request_keys')
  return jax.random.wrap_key_data(keys, impl=KEY_IMPL)


def _bar(x: jax.Array, k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Per row, the smallest logit top-k and then top-p keep (-inf where neither cuts)."""
  ordered = jnp.flip(jnp.sort(x, axis=-1), axis=-1)  # descending

  # Top-k: the k-th largest logit is the bar, so every tie with it stays.
  kth = jnp.take_along_axis(ordered, jnp.maximum(k - 1, 0)[:, None], axis=-1)[:, 0]
  kth = jnp.where(k > 0, kth, -jnp.inf)
  ordered = jnp.where(ordered >= kth[:, None], ordered, -jnp.inf)

  # Top-p, as transformers computes it: a token goes when the probability of it and of every
  # less probable token sums to <= 1 - p; the most probable token always stays.
  probs = jax.nn.softmax(ordered, axis=-1)
  tail = jnp.flip(jnp.cumsum(jnp.flip(probs, axis=-1), axis=-1), axis=-1)
  remove = (tail <= (1.0 - top_p)[:, None]).at[:, 0].set(False)
  # The kept positions are a prefix of the descending order: the bar is the last one's logit,
  # and comparing logits with it keeps whole tie groups.
  cutoff = jnp.min(jnp.where(remove, jnp.inf, ordered), axis=-1)
  cutoff = jnp.where(top_p < 1.0, cutoff, -jnp.inf)
  return jnp.maximum(kth, cutoff)


def warp(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """Logits [S, V] f32 whose softmax is the distribution `sample` draws from: each row's
  warped logits (temperature, top-k, top-p) on its support and -inf elsewhere; a greedy row
  keeps its argmax alone, at logit 0."""
  logits = jnp.asarray(logits, jnp.float32)
  vocab = logits.shape[-1]
  t = params.temperature.astype(jnp.float32)
  x = logits / jnp.where(t > 0, t, 1.0)[:, None]
  k = jnp.clip(params.top_k.astype(jnp.int32), 0, vocab)
  top_p = params.top_p.astype(jnp.float32)
  truncating = (t > 0) & (((k > 0) & (k < vocab)) | (top_p < 1.0))
  # Sorting the vocabulary is the cost here: skipped, at run time, unless a row truncates.
  bar = jax.lax.cond(jnp.any(truncating), _bar, lambda *_: jnp.full(k.shape, -jnp.inf), x, k,
                     top_p)
  warped = jnp.where(x >= bar[:, None], x, -jnp.inf)
  greedy = jnp.where(jnp.arange(vocab) == jnp.argmax(logits, axis=-1)[:, None], 0.0, -jnp.inf)
  return jnp.where((t > 0)[:, None], warped, greedy)


def sample(logits: jax.Array, keys, params: SamplingParams) -> jax.Array:
  """Next tokens int32 [S] from logits [S, V]: argmax where temperature == 0, else one draw
  from softmax(warp(logits, params)) with that row's key (raw uint32 [S, 2] or typed [S])."""
  logits = jnp.asarray(logits, jnp.float32)
  keys = _typed_keys(keys)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw(_):
    drawn = jax.vmap(jax.random.categorical)(keys, warp(logits, params))
    return jnp.where(params.temperature > 0, drawn, greedy).astype(jnp.int32)

  # An all-greedy batch (e.g. a bandwidth benchmark) pays for the argmax alone.
  return jax.lax.cond(jnp.any(params.temperature > 0), draw, lambda _: greedy, None)

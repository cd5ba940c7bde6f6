"""Sampling, checked against transformers' warpers (torch CPU) as the oracle.

- The support and probabilities of `warp` equal those of TemperatureLogitsWarper ->
  TopKLogitsWarper -> TopPLogitsWarper (applied as `generate` applies them) for many parameter
  rows in one call, on logits full of ties; where a tie group straddles the top-p boundary
  (transformers keeps whichever members its unstable sort puts last) the whole group is kept.
- `sample` draws from that distribution: chi-square over many draws, with a bound that a
  planted bug (temperature dropped, top-p off by one token) breaks.
- greedy = argmax; a request's token depends on its seed, index and logits only.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from efficientjax.errors import ConfigError
from efficientjax.infer import sampling
from efficientjax.infer.sampling import Sampling

warp = jax.jit(sampling.warp)
sample = jax.jit(sampling.sample)


def hf_scores(row: np.ndarray, s: Sampling) -> np.ndarray:
  """transformers' processed scores for one row, with the warpers `generate` would add."""
  scores = torch.from_numpy(row[None].astype(np.float32))
  t, p = float(np.float32(s.temperature)), float(np.float32(s.top_p))
  if t != 1.0:
    scores = TemperatureLogitsWarper(t)(None, scores)
  if s.top_k != 0:
    scores = TopKLogitsWarper(top_k=s.top_k)(None, scores)
  if p < 1.0:
    scores = TopPLogitsWarper(top_p=p)(None, scores)
  return scores[0].numpy()


def tied_logits(rng, rows, vocab):
  """Half the rows are multiples of 0.5 in a narrow range (ties everywhere), half continuous."""
  tied = rng.integers(0, 8, (rows, vocab)) * 0.5
  smooth = rng.normal(size=(rows, vocab)) * 2.0
  return np.where(np.arange(rows)[:, None] % 2 == 0, tied, smooth).astype(np.float32)


GRID = [Sampling(t, k, p)
        for t in (0.5, 1.0, 1.7) for k in (0, 1, 3, 10, 100) for p in (1.0, 0.9, 0.6, 0.2)]
# No row truncates: the path that skips the sort.
UNTRUNCATED = [s for s in GRID if s.top_k in (0, 100) and s.top_p == 1.0] + [Sampling()]


@pytest.mark.parametrize('grid', [GRID, UNTRUNCATED], ids=['truncating', 'untruncated'])
def test_support_and_probabilities_match_transformers_warpers(grid):
  rng = np.random.default_rng(0)
  vocab = 48
  params = grid * 3  # each parameter row on tied and on smooth logits rows
  logits = tied_logits(rng, len(params), vocab)
  ours = np.asarray(warp(logits, sampling.stack_params(params)))

  straddles = ties_at_k = 0
  for i, s in enumerate(params):
    if s.temperature == 0:
      np.testing.assert_array_equal(np.isfinite(ours[i]), np.arange(vocab) == logits[i].argmax())
      continue
    oracle = hf_scores(logits[i], s)
    kept = np.isfinite(oracle)
    x = logits[i].astype(np.float32) / np.float32(s.temperature)
    # A tie group split by top-p's boundary is kept whole; nothing else differs.
    expected = x >= x[kept].min()
    straddles += int((expected != kept).any())
    ties_at_k += int(0 < s.top_k < vocab and s.top_p == 1.0 and kept.sum() > s.top_k)
    np.testing.assert_array_equal(np.isfinite(ours[i]), expected, err_msg=f'row {i}: {s}')
    want = np.where(expected, x.astype(np.float64), -np.inf)
    want = np.exp(want - want.max())
    want /= want.sum()
    got = np.asarray(jax.nn.softmax(ours[i]))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f'row {i}: {s}')
    if (expected == kept).all():
      hf_probs = torch.softmax(torch.from_numpy(oracle), -1).numpy()
      np.testing.assert_allclose(got, hf_probs, rtol=0, atol=1e-6, err_msg=f'row {i}: {s}')
  # The data exercises both tie rules (fixed seed: these counts are the same on every run).
  if grid is GRID:
    assert ties_at_k >= 3 and 1 <= straddles <= len(params) // 4, (ties_at_k, straddles)


def test_top_p_keeps_a_straddling_tie_group_whole():
  # p(2) = 0.447, each 1 gets 0.164: top-p 0.5 needs one more token, and the three are tied.
  logits = jnp.asarray([[2.0, 1.0, 1.0, 1.0, 0.0]])
  out = warp(logits, sampling.stack_params([Sampling(1.0, 0, 0.5)]))
  np.testing.assert_array_equal(np.isfinite(out[0]), [True, True, True, True, False])
  out = warp(logits, sampling.stack_params([Sampling(1.0, 0, 0.4)]))
  np.testing.assert_array_equal(np.isfinite(out[0]), [True, False, False, False, False])


def chi_square_p_value(tokens: np.ndarray, probs: np.ndarray) -> float:
  """p-value of the draws `tokens` under `probs`; 0 if any lies outside the support."""
  counts = np.bincount(tokens, minlength=probs.size)
  support = probs > 0
  if counts[~support].any():
    return 0.0
  expected = tokens.size * probs[support]
  stat = ((counts[support] - expected)**2 / expected).sum()
  return float(scipy.stats.chi2.sf(stat, support.sum() - 1))


def test_draw_frequencies_match_the_warped_distribution():
  rng = np.random.default_rng(1)
  vocab, draws = 12, 4000
  rows = [Sampling(0.5, 6, 0.9), Sampling(2.0, 0, 0.7), Sampling(1.0, 0, 1.0),
          Sampling(0.5, 3, 1.0)]
  base = np.round(rng.normal(size=(len(rows), vocab)) * 1.5, 1).astype(np.float32)  # ties
  logits = np.repeat(base, draws, axis=0)
  params = sampling.stack_params([r for r in rows for _ in range(draws)])
  keys = sampling.request_keys(np.arange(logits.shape[0]), 0)
  tokens = np.asarray(sample(logits, keys, params)).reshape(len(rows), draws)
  probs = np.asarray(jax.nn.softmax(warp(base, sampling.stack_params(rows))), np.float64)
  for r, s in enumerate(rows):
    assert chi_square_p_value(tokens[r], probs[r]) > 1e-3, s
    # The same bound rejects nearby wrong distributions: a dropped or wrong temperature, and
    # a truncation that keeps one token fewer.
    wrong = np.asarray(jax.nn.softmax(warp(base[r:r + 1], sampling.stack_params(
        [dataclasses.replace(s, temperature=1.0 if s.temperature != 1.0 else 0.5)]))))[0]
    assert chi_square_p_value(tokens[r], wrong.astype(np.float64)) < 1e-6, s
    support = np.flatnonzero(probs[r] > 0)
    if support.size == vocab:
      continue  # no truncation: its least likely token is too rare to miss in these draws
    smaller = probs[r].copy()
    smaller[support[np.argmin(probs[r][support])]] = 0
    assert chi_square_p_value(tokens[r], smaller / smaller.sum()) < 1e-6, s


def test_greedy_is_argmax_whatever_top_k_and_top_p():
  rng = np.random.default_rng(2)
  logits = tied_logits(rng, 8, 16)
  params = sampling.stack_params([Sampling(0.0, k, p) for k in (0, 3) for p in (1.0, 0.3, 0.9,
                                                                              0.5)])
  keys = sampling.request_keys(np.arange(8), 0)
  np.testing.assert_array_equal(sample(logits, keys, params), np.argmax(logits, -1))
  warped = np.asarray(warp(logits, params))
  np.testing.assert_array_equal(np.isfinite(warped), np.eye(16, dtype=bool)[np.argmax(logits,
                                                                                      -1)])


def test_a_request_draws_the_same_tokens_in_any_slot_and_batch():
  rng = np.random.default_rng(3)
  vocab, n = 32, 16
  logits = rng.normal(size=(n, vocab)).astype(np.float32)
  reqs = [Sampling(1.5, int(rng.integers(0, 20)), float(rng.uniform(0.7, 1.0)), seed=100 + i)
          for i in range(n)]
  others = rng.normal(size=(8, vocab)).astype(np.float32)
  other_reqs = [Sampling(0.9, 4, 0.8, seed=7), Sampling()] * 4
  order = rng.permutation(n)
  for index in range(4):
    alone = [int(sample(logits[i:i + 1], sampling.request_keys([r.seed], index),
                        sampling.stack_params([r]))[0]) for i, r in enumerate(reqs)]
    batch = sample(logits, sampling.request_keys([r.seed for r in reqs], index),
                   sampling.stack_params(reqs))
    np.testing.assert_array_equal(batch, alone)
    # Permuted slots, and other requests around them.
    mixed_logits = np.concatenate([others[:3], logits[order], others[3:]])
    mixed = reqs_in = [reqs[i] for i in order]
    mixed = other_reqs[:3] + reqs_in + other_reqs[3:]
    keys = sampling.request_keys([r.seed for r in mixed], index)
    got = np.asarray(sample(mixed_logits, keys, sampling.stack_params(mixed)))[3:3 + n]
    np.testing.assert_array_equal(got, np.asarray(alone)[order])
    # Typed keys draw what raw keys draw.
    typed = jax.random.wrap_key_data(keys, impl='threefry2x32')
    np.testing.assert_array_equal(sample(mixed_logits, typed, sampling.stack_params(mixed)),
                                  sample(mixed_logits, keys, sampling.stack_params(mixed)))


def test_different_seeds_and_indices_draw_differently():
  vocab, n = 64, 200
  logits = np.zeros((n, vocab), np.float32)  # uniform: two draws agree with p = 1/64
  params = sampling.stack_params([Sampling(1.0)] * n)
  by_seed = np.asarray(sample(logits, sampling.request_keys(np.arange(n), 0), params))
  by_seed2 = np.asarray(sample(logits, sampling.request_keys(np.arange(n) + n, 0), params))
  by_index = np.asarray(sample(logits, sampling.request_keys(np.arange(n), 1), params))
  assert (by_seed != by_seed2).mean() > 0.9 and (by_seed != by_index).mean() > 0.9
  assert len(np.unique(by_seed)) > vocab // 2
  # The same seed and index again: the same tokens.
  np.testing.assert_array_equal(
      by_seed, sample(logits, sampling.request_keys(np.arange(n), 0), params))


def test_request_keys_are_the_same_on_the_host_and_under_jit():
  seeds, indices = np.array([0, 1, 2**31, 2**32 - 1]), np.array([0, 5, 1, 2**20])
  host = [np.asarray(sampling.request_keys(int(s), int(i))) for s, i in zip(seeds, indices)]
  traced = jax.jit(sampling.request_keys)(jnp.asarray(seeds, jnp.uint32),
                                          jnp.asarray(indices, jnp.int32))
  assert traced.dtype == jnp.uint32 and traced.shape == (4, 2)
  np.testing.assert_array_equal(traced, np.stack(host))
  expected = jax.random.key_data(jax.random.fold_in(jax.random.key(5, impl='threefry2x32'), 3))
  np.testing.assert_array_equal(sampling.request_keys(5, 3), expected)


def test_set_slot_and_greedy_params():
  params = sampling.greedy_params(4)
  np.testing.assert_array_equal(params.temperature, 0.0)
  new = jax.jit(sampling.set_slot, static_argnums=2)(params, jnp.int32(2),
                                                     Sampling(0.7, 5, 0.9))
  want = sampling.stack_params([Sampling()] * 2 + [Sampling(0.7, 5, 0.9), Sampling()])
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(want)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('kwargs, field', [
    ({'temperature': -0.1}, 'temperature'),
    ({'temperature': float('nan')}, 'temperature'),
    ({'temperature': True}, 'temperature'),
    ({'top_k': -1}, 'top_k'),
    ({'top_k': 2.0}, 'top_k'),
    ({'top_p': 0.0}, 'top_p'),
    ({'top_p': 1.5}, 'top_p'),
    ({'seed': -1}, 'seed'),
    ({'seed': 2**32}, 'seed'),
])
def test_bad_sampling_options_name_their_field(kwargs, field):
  with pytest.raises(ConfigError) as e:
    Sampling(**kwargs)
  assert e.value.field == f'inference.sampling.{field}'


def test_bad_keys_are_refused():
  with pytest.raises(TypeError, match='request_keys'):
    sampling.sample(jnp.zeros((2, 4)), jnp.zeros((2, 2), jnp.int32), sampling.greedy_params(2))

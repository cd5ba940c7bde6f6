"""The serving engine against a reference that recomputes the whole forward pass for every new
token: greedy tokens and their log-probabilities, for every attention variant (fp32), chunked
and padded prefill, requests batched, alone, and arriving while others decode."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientjax.attention import ATTENTION
from efficientjax.infer.engine import Engine, prefill_buckets
from efficientjax.infer.workload import Request
from efficientjax.infer.sampling import Sampling, request_keys, sample, stack_params
from efficientjax.model import MoEConfig
from tests.attention.variants import BASE, TINY
from tests.helpers import jitted_forward, jitted_init

CHUNK = 16             # one prefill shape (a compile each fewer): short prompts pad to it
MAX_LEN = 64
PROMPT_LENGTHS = (5, 20, 40)  # one padded chunk; 16 + a padded 4; 16 + 16 + a padded 8
NEW = 6


@functools.cache
def _model(name, scale=8.0):
  cfg = TINY[name] if name in TINY else LEARNED
  params = jitted_init(cfg)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))['params']
  # Greedy tests scale the weights up from init's 0.02 so that logits are far from ties and
  # greedy paths differ; sampling tests scale them less, so that draws are far from certain.
  params = jax.tree.map(lambda a: a * scale if a.ndim >= 2 else a, params)
  return cfg, params


# Learned positions give NaN beyond their table: the prefill's padding must never reach there
# (the 40-token prompt's third chunk pads to positions 32..47, past the table's 46 rows).
LEARNED = dataclasses.replace(BASE, position='learned', max_seq_len=46)


SAMPLED = 'gqa-sampled'  # the GQA model at scale 2

# The engine's sampler, jitted once: called op by op, its lax.conds trace and compile afresh at
# every call (~0.5 s each), which was most of this file's time.
_sample = jax.jit(sample)


def _reference(name, prompt, new, sampling=Sampling()):
  """Tokens and logprobs with the whole forward pass recomputed for each one: the sequence sits
  in a fixed buffer (a causal model's logits at i depend only on tokens <= i); token i is
  argmax, or drawn with the request's key for index i (`request_keys(seed, i)`)."""
  cfg, params = _model(*_key(name))
  buf = np.zeros((1, min(MAX_LEN, cfg.max_seq_len)), np.int32)
  buf[0, :len(prompt)] = prompt
  n, tokens, logprobs = len(prompt), [], []
  for i in range(new):
    logits = np.asarray(jitted_forward(cfg)({'params': params}, jnp.asarray(buf))[0, n - 1],
                        np.float64)
    token = int(_sample(jnp.asarray(logits, jnp.float32)[None],
                        request_keys(sampling.seed, i)[None], stack_params([sampling]))[0])
    logp = logits - logits.max() - np.log(np.sum(np.exp(logits - logits.max())))
    tokens.append(token)
    logprobs.append(float(logp[token]))
    buf[0, n] = token
    n += 1
  return tokens, logprobs


def _key(name):
  return ('gqa', 2.0) if name == SAMPLED else (name,)


def _prompts(cfg, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, cfg.vocab_size, n).tolist() for n in PROMPT_LENGTHS]


class FakeClock:
  """Time that moves one unit per reading (and by what is slept), so arrivals interleave with
  engine steps deterministically."""

  def __init__(self):
    self.t = 0.0

  def __call__(self):
    self.t += 1.0
    return self.t

  def sleep(self, s):
    self.t += s


@functools.cache
def _engine(name, slots):
  cfg, params = _model(*_key(name))
  return Engine(cfg, params, num_slots=slots, max_len=MAX_LEN, prefill_chunk=CHUNK)


def _serve(engine, requests, **kw):
  clock = FakeClock()
  return engine.serve(requests, clock=clock, sleep=clock.sleep, **kw)


def test_prefill_buckets():
  assert prefill_buckets(32) == (16, 32)
  assert prefill_buckets(100) == (16, 32, 64, 100)
  assert prefill_buckets(8) == (8,)


@pytest.mark.parametrize('name', sorted(ATTENTION) + ['learned'])
def test_greedy_generation_equals_recomputing_the_whole_sequence(name):
  """Three requests on two slots, the third arriving while the first two decode: each gets the
  reference's tokens and log-probabilities."""
  cfg, _ = _model(name)
  prompts = _prompts(cfg)
  requests = [Request(i, p, NEW, arrival_s=float(3 * i)) for i, p in enumerate(prompts)]
  out = _serve(_engine(name, 2), requests)
  for r, c in zip(requests, out):
    tokens, logprobs = _reference(name, r.prompt, NEW)
    assert c.tokens == tokens, (name, r.id)
    np.testing.assert_allclose(c.logprobs, logprobs, atol=2e-4, rtol=0)
    assert c.finish_reason == 'length'
  # The third request waited for a slot and reused one: continuous batching happened.
  assert out[2].first_token_s > min(out[0].finish_s, out[1].finish_s)
  assert out[2].slot in (out[0].slot, out[1].slot)


def test_a_batch_equals_its_requests_alone_under_sampling():
  """Sampled requests (each its own seed and settings) give the same tokens batched, with
  staggered arrivals, as each served alone; the same seed repeats, another seed differs."""
  cfg, _ = _model('gqa')
  prompts = _prompts(cfg, seed=3) + _prompts(cfg, seed=4)[:2]
  settings = [Sampling(temperature=1.0, seed=11), Sampling(temperature=0.7, top_k=5, seed=12),
              Sampling(temperature=1.3, top_p=0.8, seed=13), Sampling(), Sampling(
                  temperature=1.0, top_k=3, top_p=0.9, seed=14)]
  engine = _engine(SAMPLED, 2)
  together = _serve(engine, [Request(i, p, NEW, float(2 * i), s)
                             for i, (p, s) in enumerate(zip(prompts, settings))])
  for i, (p, s) in enumerate(zip(prompts, settings)):
    alone = _serve(engine, [Request(i, p, NEW, 0.0, s)])[0]
    assert alone.tokens == _reference(SAMPLED, p, NEW, s)[0], i
    assert alone.tokens == together[i].tokens, i
    np.testing.assert_allclose(alone.logprobs, together[i].logprobs, atol=1e-5)
  other = _serve(engine, [Request(0, prompts[0], NEW, 0.0, dataclasses.replace(
      settings[0], seed=99))])[0]
  assert other.tokens != together[0].tokens
  assert {c.slot for c in together} == {0, 1}


def test_a_stop_token_ends_the_request_and_frees_its_slot():
  cfg, _ = _model('mha')
  prompt = _prompts(cfg)[1]
  tokens, _ = _reference('mha', prompt, NEW)
  stop = tokens[2]
  cut = tokens.index(stop) + 1
  engine = _engine('mha', 2)  # compiled already by the greedy test on this worker
  out = _serve(engine, [Request(0, prompt, NEW), Request(1, prompt, NEW), Request(2, prompt, NEW)],
               stop_ids=[stop])
  assert all(c.tokens == tokens[:cut] and c.finish_reason == 'stop' for c in out)
  assert out[2].slot == out[0].slot or out[2].slot == out[1].slot  # a freed slot, reused
  assert engine.generate([prompt], max_new_tokens=NEW) == [tokens]  # no stop ids: to the end


def test_a_moe_model_serves_with_its_routing_bias():
  """Variables, not just params: an auxiliary-loss-free MoE routes with the bias in its
  `moe_state`, and the engine's tokens are the full forward pass's with that bias."""
  cfg = dataclasses.replace(BASE, ffn='moe', moe=MoEConfig(
      num_experts=4, top_k=2, expert_dim=16, router='sigmoid', aux_free=True))
  variables = jitted_init(cfg)(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))
  params = jax.tree.map(lambda a: a * 8 if a.ndim >= 2 else a, variables['params'])
  bias = jax.tree.map(lambda b: jax.random.normal(jax.random.key(4), b.shape),
                      variables['moe_state'])
  served = {'params': params, 'moe_state': bias}
  prompt = _prompts(cfg)[1]
  tokens = Engine(cfg, served, num_slots=1, max_len=MAX_LEN, prefill_chunk=CHUNK).generate(
      [prompt], max_new_tokens=4)[0]
  forward = jitted_forward(cfg)

  def greedy(variables):  # the whole sequence again for each token, in a fixed buffer
    buf = np.zeros((1, MAX_LEN), np.int32)
    buf[0, :len(prompt)] = prompt
    for n in range(len(prompt), len(prompt) + 4):
      buf[0, n] = int(jnp.argmax(forward(variables, jnp.asarray(buf))[0, n - 1]))
    return buf[0, len(prompt):len(prompt) + 4].tolist()

  assert tokens == greedy(served)
  unbiased = {'params': params, 'moe_state': jax.tree.map(jnp.zeros_like, bias)}
  assert greedy(unbiased) != tokens  # the bias matters to this test


def test_decode_bytes_count_an_untied_embedding_by_the_rows_a_step_gathers():
  cfg, params = _model('mha')
  engine = Engine(cfg, params, num_slots=3, max_len=MAX_LEN, prefill_chunk=CHUNK)
  nbytes = lambda tree: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))
  table = jax.tree.leaves(params['embed'])[0]  # (boxed as init makes it)
  rows = 3 * cfg.embed_dim * table.dtype.itemsize
  assert engine.decode_bytes_per_step() == (nbytes(params) - nbytes(table) + rows
                                            + nbytes(engine.cache))
  tied = dataclasses.replace(cfg, tie_embeddings=True)
  tied_params = {k: v for k, v in params.items() if k != 'lm_head'}
  engine = Engine(tied, tied_params, num_slots=3, max_len=MAX_LEN, prefill_chunk=CHUNK)
  assert engine.decode_bytes_per_step() == nbytes(tied_params) + nbytes(engine.cache)


def test_requests_that_do_not_fit_are_refused_before_anything_runs():
  cfg, params = _model('mha')
  engine = Engine(cfg, params, num_slots=1, max_len=16, prefill_chunk=16)
  with pytest.raises(ValueError, match='max_len=16'):
    engine.generate([[1] * 10], max_new_tokens=7)
  with pytest.raises(ValueError, match='at least one token'):
    engine.generate([[]], max_new_tokens=1)

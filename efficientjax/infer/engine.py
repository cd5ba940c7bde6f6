"""A serving engine: chunked prefill and continuous batching over a fixed number of decode slots.

The KV cache (`efficientjax.model.init_cache`, any attention variant) has one row per slot and
is donated to every step, so it is updated in place. A request is prefilled into a free slot's
row in chunks of at most `prefill_chunk` tokens (the last chunk padded to a power of two, so a
few compiled shapes serve every prompt length), its first token sampled from the prefill's
last logits; from then on it decodes one token per engine step beside whatever else occupies
the other slots, and leaves its slot at a stop token or its length limit. Nothing recompiles
when requests come and go: the decode step always runs every slot (an empty one computes a
token nobody reads).

Why stale rows need no clearing: a cache slot holds the token at that position (see
`attention/cache.py`), every query attends only to slots at or before its own position, and a
new request writes slots 0, 1, ... of its row before any query can see them. Whatever an
earlier request (or a prefill's padding) left beyond the current position stays invisible
until it is overwritten. The padding's positions are clamped to the prompt's last one so that
what it writes is finite (learned position tables give NaN beyond their rows, and 0·NaN would
leak through the attention's masked sum).

Each request draws from its own keys (`sampling.request_keys(seed, i)` for its i-th token,
counting from 0), so what it generates depends on its prompt, its sampling settings and its
seed, never on the slot it got or on the other requests: continuous batching gives every
request the tokens it would get alone (up to float reassociation in batched matmuls; exact on
the CPU).
"""

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficientjax.attention import cache as kv_cache
from efficientjax.infer import sampling as sampling_lib
from efficientjax.infer.workload import Request
from efficientjax.model import ModelConfig, Transformer, as_variables, init_cache
from efficientjax.quant import weight_bytes
from efficientjax.train.execution import EXECUTIONS, EagerStep

MIN_PREFILL_BUCKET = 16


@dataclasses.dataclass
class Completion:
  """One served request: what it generated and when (seconds from the start of the run)."""
  id: Any
  prompt_len: int
  tokens: list[int]            # generated tokens, a stop token included
  logprobs: list[float]        # each token's log-probability under the model (before sampling's
                               # temperature / top-k / top-p)
  finish_reason: str           # 'stop' (a stop token) | 'length' (max_new_tokens)
  arrival_s: float
  token_s: list[float]         # when each token reached the host
  slot: int

  @property
  def first_token_s(self) -> float:
    return self.token_s[0]

  @property
  def finish_s(self) -> float:
    return self.token_s[-1]


@dataclasses.dataclass
class _Active:
  request: Any
  slot: int
  position: int                # where the next fed-back token goes
  completion: Completion


@dataclasses.dataclass
class EngineStats:
  """What the engine measured while serving (wall-clock, host-synchronised)."""
  prefill_s: list[float] = dataclasses.field(default_factory=list)   # per request, all chunks
  prefill_tokens: int = 0
  decode_step_s: list[float] = dataclasses.field(default_factory=list)
  decode_active_slots: list[int] = dataclasses.field(default_factory=list)
  compile_s: float | None = None


def prefill_buckets(chunk: int) -> tuple[int, ...]:
  """The prefill lengths that get compiled: powers of two from 16 below `chunk`, and `chunk`."""
  sizes, b = [], MIN_PREFILL_BUCKET
  while b < chunk:
    sizes.append(b)
    b *= 2
  return tuple(sizes) + (chunk,)


class Engine:
  """Serves requests on one model with `num_slots` concurrent decode slots, on one device
  (the params' and its cache's; sharded serving is not built).

  Args:
    cfg: the model; `params` its parameters (quantised containers included), already placed,
      or its variables (params and e.g. a MoE model's `moe_state` routing bias).
    num_slots: requests decoded together (the decode step's batch).
    max_len: the longest request, prompt plus generated tokens.
    prefill_chunk: the most prompt tokens one prefill call processes.
    cache_dtype: the KV cache's dtype (default the model's compute dtype).
    stop_ids: tokens that end a request (e.g. the tokenizer's end-of-sequence ids).
    buckets: the padded lengths prefill compiles (default `prefill_buckets(prefill_chunk)`);
      the largest must be `prefill_chunk`. A benchmark whose prompts fill whole chunks needs
      only that one.
    execution: 'jit' (each step one compiled program, the cache donated) or 'eager' (the same
      step functions op by op under jax.disable_jit: efficientjax/train/execution.py; every
      primitive compiled on its own at warm-up, nothing fused, the cache copied, not donated).
  """

  def __init__(self, cfg: ModelConfig, params: Any, *, num_slots: int = 8, max_len: int = 2048,
               prefill_chunk: int = 512, cache_dtype: Any = None, stop_ids: Sequence[int] = (),
               buckets: Sequence[int] | None = None, execution: str = 'jit'):
    if num_slots < 1 or max_len < 2 or prefill_chunk < 1:
      raise ValueError(f'num_slots={num_slots}, max_len={max_len} and prefill_chunk='
                       f'{prefill_chunk} must be >= 1, >= 2 and >= 1')
    self.cfg, self.variables = cfg, as_variables(params)
    # A chunk longer than any request would only compile a bigger shape than is ever used.
    prefill_chunk = min(prefill_chunk, max_len)
    self.num_slots, self.max_len, self.prefill_chunk = num_slots, max_len, prefill_chunk
    self.stop_ids = frozenset(int(t) for t in stop_ids)
    # Room for the last chunk's padding: a chunk starting below max_len ends by the next
    # multiple of the chunk (a write past the end would be clamped back onto real slots).
    self.cache_len = -(-max_len // prefill_chunk) * prefill_chunk
    self.cache_dtype = jnp.dtype(cache_dtype or cfg.dtype)
    # On the params' device, committed: a cache that started uncommitted would compile each
    # step once more when the first (committed) output comes back.
    device = next(iter(jax.tree.leaves(self.variables['params'])[0].devices()))
    self.cache = jax.device_put(init_cache(cfg, num_slots, self.cache_len, self.cache_dtype),
                                device)
    self.buckets = tuple(sorted(buckets)) if buckets else prefill_buckets(prefill_chunk)
    if self.buckets[-1] != prefill_chunk:
      raise ValueError(f'the largest prefill bucket {self.buckets[-1]} must be prefill_chunk='
                       f'{prefill_chunk}')
    self.stats = EngineStats()
    model = Transformer(cfg)

    def prefill(variables, cache, slot, tokens, start, last, seed, settings):
      """Runs tokens [1, b] at positions start.. into `slot`'s row; samples at index `last`."""
      row = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=1), cache)
      offsets = jnp.arange(tokens.shape[1], dtype=jnp.int32)
      positions = (start + jnp.minimum(offsets, last))[None]
      logits, row = model.apply(variables, tokens, positions, row, method=Transformer.decode_step)
      cache = jax.tree.map(lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r, slot, axis=1),
                           cache, row)
      logits = logits[:, last]
      keys = sampling_lib.request_keys(seed, jnp.zeros_like(seed))
      token = sampling_lib.sample(logits, keys, settings)
      return token, _logprob(logits, token), cache

    def decode(variables, cache, slots, settings):
      """slots uint32 [4, S]: each slot's last token, position, seed and token index (one
      host-to-device copy a step rather than four)."""
      tokens, positions = slots[0].astype(jnp.int32), slots[1].astype(jnp.int32)
      seeds, indices = slots[2], slots[3]
      logits, cache = model.apply(variables, tokens[:, None], positions[:, None], cache,
                                  method=Transformer.decode_step)
      logits = logits[:, 0]
      token = sampling_lib.sample(logits, sampling_lib.request_keys(seeds, indices), settings)
      return token, _logprob(logits, token), cache

    self._settings_key, self._settings = None, None
    if execution not in EXECUTIONS:
      raise ValueError(f'execution={execution!r}; valid: {", ".join(EXECUTIONS)}')
    self.execution = execution
    if execution == 'eager':
      # Outputs stay where the ops put them: on the one device the weights and cache are on.
      self._prefill, self._decode = EagerStep(prefill), EagerStep(decode)
    else:
      self._prefill = jax.jit(prefill, donate_argnums=1)
      self._decode = jax.jit(decode, donate_argnums=1)

  # --- the steps -------------------------------------------------------------------------------

  def check_request(self, prompt: Sequence[int], max_new_tokens: int) -> None:
    if not prompt:
      raise ValueError('a prompt needs at least one token')
    if max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
    if len(prompt) + max_new_tokens > self.max_len:
      raise ValueError(f'a prompt of {len(prompt)} tokens plus {max_new_tokens} new ones exceeds '
                       f'the engine\'s max_len={self.max_len}; raise max_len or shorten it')

  def _prefill_request(self, slot: int, prompt: Sequence[int], sampling: Any
                       ) -> tuple[int, float]:
    """Prefills `prompt` into `slot` chunk by chunk; returns its first token and its logprob."""
    settings = sampling_lib.stack_params([sampling])
    seed = jnp.asarray([sampling.seed], jnp.uint32)
    prompt = np.asarray(prompt, np.int32)
    for start in range(0, len(prompt), self.prefill_chunk):
      chunk = prompt[start:start + self.prefill_chunk]
      size = next(b for b in self.buckets if b >= len(chunk))
      tokens = np.zeros((1, size), np.int32)
      tokens[0, :len(chunk)] = chunk
      token, logprob, self.cache = self._prefill(
          self.variables, self.cache, jnp.int32(slot), jnp.asarray(tokens), jnp.int32(start),
          jnp.int32(len(chunk) - 1), seed, settings)
    return int(token[0]), float(logprob[0])

  def warmup(self) -> float:
    """Compiles every prefill bucket and the decode step, and runs the host-side conversions
    around them once, by serving a throw-away request per bucket (their cache rows are garbage
    no later request can see); returns the seconds it took. The stats start afresh after."""
    t0 = time.perf_counter()
    longest = self.max_len - 1  # a prompt that leaves room for its one token
    # No stop ids: the last request must reach its decode step, whatever it draws first.
    self.serve([Request(i, [0] * min(size, longest), 1) for i, size in enumerate(self.buckets)]
               + [Request(len(self.buckets), [0], 2)], stop_ids=())
    jax.block_until_ready(self.cache)
    self.stats = EngineStats(compile_s=time.perf_counter() - t0)
    return self.stats.compile_s

  def decode_bytes_per_step(self) -> int:
    """The bytes a decode step must read: every weight as stored and the whole cache (the
    step attends over every slot of every row, masked), but of an untied input embedding only
    the `num_slots` rows it gathers (a tied one is read whole, as the head)."""
    params = self.variables['params']
    total = weight_bytes(params)
    if not self.cfg.tie_embeddings and 'embed' in params:
      table = jax.tree.leaves(params['embed'])[0]
      total -= weight_bytes(table) - self.num_slots * table.shape[-1] * table.dtype.itemsize
    return total + kv_cache.nbytes(self.cache)

  # --- serving ---------------------------------------------------------------------------------

  def serve(self, requests: Sequence[Any], *, stop_ids: Sequence[int] | None = None,
            clock: Callable[[], float] = time.perf_counter,
            sleep: Callable[[float], None] = time.sleep) -> list[Completion]:
    """Serves `requests` (objects with `id`, `prompt`, `max_new_tokens`, `arrival_s`,
    `sampling`), each admitted once its arrival time has passed, first come first served;
    returns their completions in the order given. A request is prefilled as soon as a slot is
    free (before the next decode step: prefill first, as vLLM schedules by default).
    `stop_ids` replaces the engine's for this call."""
    stop = self.stop_ids if stop_ids is None else frozenset(int(t) for t in stop_ids)
    for r in requests:
      self.check_request(r.prompt, r.max_new_tokens)
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    pending = collections.deque(requests[i] for i in order)
    waiting: collections.deque = collections.deque()
    active: list[_Active | None] = [None] * self.num_slots
    done: dict[int, Completion] = {}
    t0 = clock()
    now = lambda: clock() - t0

    def finish(a: _Active, reason: str) -> None:
      a.completion.finish_reason = reason
      done[id(a.request)] = a.completion
      active[a.slot] = None

    def record(a: _Active, token: int, logprob: float, at: float) -> None:
      a.completion.tokens.append(token)
      a.completion.logprobs.append(logprob)
      a.completion.token_s.append(at)
      if token in stop:
        finish(a, 'stop')
      elif len(a.completion.tokens) >= a.request.max_new_tokens:
        finish(a, 'length')

    while pending or waiting or any(active):
      while pending and pending[0].arrival_s <= now():
        waiting.append(pending.popleft())
      while waiting and None in active:
        r, slot = waiting.popleft(), active.index(None)
        start = time.perf_counter()
        token, logprob = self._prefill_request(slot, r.prompt, r.sampling)
        self.stats.prefill_s.append(time.perf_counter() - start)
        self.stats.prefill_tokens += len(r.prompt)
        t = now()
        a = _Active(r, slot, len(r.prompt), Completion(
            r.id, len(r.prompt), [], [], '', r.arrival_s, [], slot))
        active[slot] = a
        record(a, token, logprob, t)
      running = [a for a in active if a is not None]
      if running:
        drawn = self._decode_once(running)
        t = now()
        for a, (token, logprob) in zip(running, drawn):
          a.position += 1
          record(a, token, logprob, t)
      elif pending and not waiting:
        sleep(max(0.0, pending[0].arrival_s - now()))
    return [done[id(r)] for r in requests]

  def _decode_once(self, running: list[_Active]) -> list[tuple[int, float]]:
    """One decode step of every slot; the (token, logprob) of each running request."""
    slots = np.zeros((4, self.num_slots), np.uint32)  # token, position, seed, index
    settings = [sampling_lib.Sampling()] * self.num_slots
    for a in running:
      slots[:, a.slot] = (a.completion.tokens[-1], a.position, a.request.sampling.seed,
                          len(a.completion.tokens))
      settings[a.slot] = a.request.sampling
    # The per-slot settings change only when requests come or go: built (and copied) then.
    key = tuple(settings)
    if key != self._settings_key:
      self._settings_key, self._settings = key, sampling_lib.stack_params(settings)
    start = time.perf_counter()
    token, logprob, self.cache = self._decode(self.variables, self.cache, jnp.asarray(slots),
                                              self._settings)
    token, logprob = np.asarray(token), np.asarray(logprob)
    self.stats.decode_step_s.append(time.perf_counter() - start)
    self.stats.decode_active_slots.append(len(running))
    return [(int(token[a.slot]), float(logprob[a.slot])) for a in running]

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
               sampling: Any = None, stop_ids: Sequence[int] | None = None) -> list[list[int]]:
    """The new tokens of each prompt (all arriving at once), a stop token included.
    `sampling`: one `sampling.Sampling` for all, a list (one per prompt), or None (greedy)."""
    n = len(prompts)
    lengths = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    settings = (sampling if isinstance(sampling, (list, tuple))
                else [sampling or sampling_lib.Sampling()] * n)
    if len(lengths) != n or len(settings) != n:
      raise ValueError(f'{n} prompts need as many max_new_tokens and sampling settings')
    requests = [Request(i, list(p), m, 0.0, s)
                for i, (p, m, s) in enumerate(zip(prompts, lengths, settings))]
    return [c.tokens for c in self.serve(requests, stop_ids=stop_ids)]


def _logprob(logits: jax.Array, token: jax.Array) -> jax.Array:
  """log p(token) under logits [S, V] (float32)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, token[:, None].astype(jnp.int32), axis=-1)[:, 0]

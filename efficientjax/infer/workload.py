"""Request workloads for the serving engine, in MLPerf Inference's scenarios.

Scenarios (`scenario`):
    offline     every request arrives at t = 0: throughput with the whole queue available.
    server      Poisson arrivals at `rate_per_s`: the gaps before each arrival are independent
                exponentials of mean 1 / rate_per_s (arrival i is the sum of the first i + 1
                gaps), from a numpy Generator seeded by `seed`.

Prompts (`prompts`):
    jsonl:PATH  one JSON object per line (PATH may be a glob), request i taking line i (cycling
                when there are more requests than lines), each with one of
                  "prompt" or "text": a string, tokenized as it is;
                  "messages": a chat [{"role": system|user|assistant, "content"}, ...], rendered
                    with the generation prompt after it (trailing assistant turns, a reference
                    answer, are dropped): through the checkpoint's chat template where the
                    tokenizer has one (efficientjax.data.chat), else as the plain template of
                    efficientjax.data.instructions ("User: ...\\nAssistant: ");
                  "instruction" (+ "input"): Alpaca, rendered as instructions renders it;
                and optionally "max_new_tokens", which replaces the drawn output length.
    CORPUS      a pretraining corpus spec (stdlib, text:GLOB, hf:NAME[:CONFIG]): each prompt is a
                window of `input_lengths` tokens at a uniformly drawn offset of the corpus's
                held-out token stream (the documents pipeline.is_held_out puts in the held-out
                split at `eval_fraction`, packed as the perplexity evaluation packs them), so a
                window may cross a document boundary; with a BOS-adding tokenizer the window
                starts with BOS (counted in the length).
    synthetic   uniformly random token ids of `input_lengths` tokens.

Length distributions (`input_lengths`, `output_lengths`), in tokens:
    N               always N (>= 1)
    uniform:A:B     an integer uniform on [A, B], both included (1 <= A <= B)
    normal:MEAN:STD a normal draw rounded to the nearest integer, then raised to 1 if below

Everything is a pure function of the arguments: the same seed gives the same requests. Each
request gets its own sampling seed, drawn from (seed, request id), in place of the template's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from efficientjax.data import chat
from efficientjax.data import corpora
from efficientjax.data import instructions
from efficientjax.data import pipeline
from efficientjax.data.tokenizers import Tokenizer
from efficientjax.errors import ConfigError
from efficientjax.infer.sampling import Sampling

SCENARIOS = ('offline', 'server')

# The dotted config paths named in errors; one place to change if the config moves them.
FIELDS = {
    'prompts': 'inference.prompts',
    'num_requests': 'inference.num_requests',
    'input_lengths': 'inference.input_lengths',
    'output_lengths': 'inference.output_lengths',
    'scenario': 'inference.scenario',
    'rate_per_s': 'inference.rate_per_s',
    'seed': 'seed',
    'eval_fraction': 'data.eval_fraction',
}

LENGTH_FORMS = "'N', 'uniform:A:B' or 'normal:MEAN:STD'"
PROMPT_FORMS = ("'jsonl:PATH', a pretraining corpus ('stdlib', 'text:GLOB', 'hf:NAME[:CONFIG]') "
                "or 'synthetic'")

# Tags that keep the random streams of different uses apart (as in pipeline).
_ARRIVAL_TAG = zlib.crc32(b'efficientjax/infer/arrivals')
_INPUT_TAG = zlib.crc32(b'efficientjax/infer/input-lengths')
_OUTPUT_TAG = zlib.crc32(b'efficientjax/infer/output-lengths')
_OFFSET_TAG = zlib.crc32(b'efficientjax/infer/prompt-offsets')
_TOKEN_TAG = zlib.crc32(b'efficientjax/infer/synthetic-tokens')
_SAMPLING_TAG = zlib.crc32(b'efficientjax/infer/sampling-seeds')


@dataclasses.dataclass(frozen=True)
class Request:
  """One request: its prompt ids, how many tokens it may generate, when it arrives (seconds
  from the start of the run) and how its tokens are drawn."""

  id: int
  prompt: list[int]
  max_new_tokens: int
  arrival_s: float = 0.0
  sampling: Sampling = Sampling()


# ------------------------------------------------------------------------------ lengths


@dataclasses.dataclass(frozen=True)
class Lengths:
  """A parsed length distribution: kind 'fixed' (a), 'uniform' (a..b) or 'normal' (mean a,
  std b)."""

  kind: str
  a: float
  b: float

  @property
  def bounds(self) -> tuple[int, int | None]:
    """(smallest, largest or None when unbounded) length a draw can take."""
    if self.kind == 'fixed':
      return int(self.a), int(self.a)
    if self.kind == 'uniform':
      return int(self.a), int(self.b)
    return 1, None

  def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` lengths, int64 [n]."""
    if self.kind == 'fixed':
      return np.full(n, int(self.a), np.int64)
    if self.kind == 'uniform':
      return rng.integers(int(self.a), int(self.b), n, endpoint=True).astype(np.int64)
    return np.maximum(1, np.rint(rng.normal(self.a, self.b, n))).astype(np.int64)


def _parse_lengths(spec: Any) -> Lengths | str:
  """The distribution, or what is wrong with `spec`."""
  if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
    spec = str(int(spec))
  if not isinstance(spec, str):
    return f'must be a string, got {spec!r}'
  kind, *args = spec.strip().split(':')
  try:
    if not args:
      try:
        n = int(kind)
      except ValueError:
        return f'unknown length distribution {spec!r}'
      if n < 1:
        return f'a fixed length must be >= 1, got {spec!r}'
      return Lengths('fixed', n, n)
    if kind == 'uniform' and len(args) == 2:
      lo, hi = int(args[0]), int(args[1])
      if not 1 <= lo <= hi:
        return f'uniform:A:B needs 1 <= A <= B, got {spec!r}'
      return Lengths('uniform', lo, hi)
    if kind == 'normal' and len(args) == 2:
      mean, std = float(args[0]), float(args[1])
      if not (math.isfinite(mean) and math.isfinite(std)) or mean < 1 or std < 0:
        return f'normal:MEAN:STD needs a finite MEAN >= 1 and STD >= 0, got {spec!r}'
      return Lengths('normal', mean, std)
  except ValueError:
    return f'{spec!r} has a number that does not parse'
  return f'unknown length distribution {spec!r}'


def length_errors(spec: Any, field: str) -> list[ConfigError]:
  """[] if `spec` is a valid length distribution, else one ConfigError naming `field`."""
  parsed = _parse_lengths(spec)
  if isinstance(parsed, Lengths):
    return []
  return [ConfigError(field, f'{parsed}; use {LENGTH_FORMS}, e.g. \'128\', \'uniform:64:512\' '
                      "or 'normal:256:64'")]


def parse_lengths(spec: Any, field: str) -> Lengths:
  """The length distribution `spec`; a ConfigError naming `field` if it is not one."""
  parsed = _parse_lengths(spec)
  if isinstance(parsed, Lengths):
    return parsed
  raise length_errors(spec, field)[0]


# ----------------------------------------------------------------------------- arrivals


def arrival_times(scenario: str, n: int, rate_per_s: float | None,
                  rng: np.random.Generator) -> np.ndarray:
  """Arrival times in seconds, float64 [n], non-decreasing."""
  if scenario == 'offline':
    return np.zeros(n)
  if scenario == 'server':
    return np.cumsum(rng.exponential(1.0 / rate_per_s, n))
  raise ConfigError(FIELDS['scenario'], f'unknown scenario {scenario!r}; use one of {SCENARIOS}')


# ------------------------------------------------------------------------------- checks


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _source(prompts: Any) -> str | None:
  """'jsonl', 'corpus' or 'synthetic'; None when `prompts` is no valid spec."""
  if not isinstance(prompts, str):
    return None
  prefix, _, arg = prompts.partition(':')
  if prefix == 'jsonl':
    return 'jsonl' if arg else None
  if prefix == 'synthetic':
    return 'synthetic' if not arg else None
  if prefix in corpora.CORPORA:
    return 'corpus'
  return None


def workload_errors(*, prompts: Any, num_requests: Any, output_lengths: Any,
                    input_lengths: Any = None, scenario: Any = 'offline',
                    rate_per_s: Any = None, seed: Any = 0,
                    eval_fraction: Any = 0.05) -> list[ConfigError]:
  """Every problem of these `build_workload` arguments found without reading any file."""
  errors = []
  source = _source(prompts)
  if source is None:
    errors.append(ConfigError(FIELDS['prompts'], f'{prompts!r} is no prompt source; use '
                              f'{PROMPT_FORMS}'))
  if num_requests is None:
    if source not in ('jsonl', None):
      errors.append(ConfigError(FIELDS['num_requests'], f'is needed for prompts={prompts!r} '
                                '(only a jsonl file has a natural count); set e.g. 256'))
  elif not _is_int(num_requests) or num_requests < 1:
    errors.append(ConfigError(FIELDS['num_requests'], f'must be a positive integer, got '
                              f'{num_requests!r}' + (' (or None: one request per line)'
                                                     if source == 'jsonl' else '')))
  errors += length_errors(output_lengths, FIELDS['output_lengths'])
  if source == 'jsonl':
    if input_lengths is not None:
      errors.append(ConfigError(FIELDS['input_lengths'], f'must be unset for prompts={prompts!r}:'
                                ' the prompts in the file have their own lengths', fix={
                                    FIELDS['input_lengths']: None}))
  elif source is not None:
    if input_lengths is None:
      errors.append(ConfigError(FIELDS['input_lengths'], f'is needed for prompts={prompts!r}; '
                                f'use {LENGTH_FORMS}, e.g. \'uniform:64:512\''))
    else:
      errors += length_errors(input_lengths, FIELDS['input_lengths'])
  if scenario not in SCENARIOS:
    errors.append(ConfigError(FIELDS['scenario'], f'unknown scenario {scenario!r}; use one of '
                              f'{", ".join(SCENARIOS)}'))
  elif scenario == 'server' and (
      isinstance(rate_per_s, bool) or not isinstance(rate_per_s, (int, float, np.number))
      or not math.isfinite(rate_per_s) or rate_per_s <= 0):
    errors.append(ConfigError(FIELDS['rate_per_s'], f'the server scenario needs a finite '
                              f'arrival rate > 0 (requests per second), got {rate_per_s!r}'))
  if not _is_int(seed) or seed < 0:
    errors.append(ConfigError(FIELDS['seed'], f'must be a non-negative integer, got {seed!r}'))
  if source == 'corpus' and (isinstance(eval_fraction, bool)
                             or not isinstance(eval_fraction, (int, float))
                             or not 0.0 < eval_fraction < 1.0):
    errors.append(ConfigError(FIELDS['eval_fraction'], f'must lie strictly between 0 and 1, got '
                              f'{eval_fraction!r}; use e.g. 0.05'))
  return errors


# ------------------------------------------------------------------------------ prompts


def _with_bos(ids: np.ndarray, tokenizer: Tokenizer) -> list[int]:
  bos = getattr(tokenizer, 'bos_id', None)
  head = [int(bos)] if getattr(tokenizer, 'add_bos', False) and bos is not None else []
  return head + [int(t) for t in ids]


def _bad_line(prompts: str, name: str, problem: str) -> ConfigError:
  return ConfigError(FIELDS['prompts'], f'{prompts!r}: line {name} {problem}; expected one JSON '
                     'object per line with "prompt" or "text" (a string), "messages" (a chat) '
                     'or "instruction" (+ "input"), and optionally "max_new_tokens" (int >= 1)')


def _messages(prompts: str, name: str, messages: Any) -> list[dict[str, str]]:
  if not isinstance(messages, list) or not messages:
    raise _bad_line(prompts, name, 'has "messages" that is not a non-empty list')
  kept = []
  for i, m in enumerate(messages):
    if (not isinstance(m, dict) or m.get('role') not in instructions.ROLES
        or not isinstance(m.get('content'), str)):
      raise _bad_line(prompts, name, f'has messages[{i}]={m!r}, not a {{"role": one of '
                      f'{"/".join(instructions.ROLES)}, "content": str}} object')
    kept.append({'role': m['role'], 'content': m['content']})
  while kept and kept[-1]['role'] == 'assistant':
    kept.pop()  # a reference answer: the model is to write it
  if not kept:
    raise _bad_line(prompts, name, 'has only assistant messages: there is no prompt')
  return kept


def _encode_line(prompts: str, name: str, record: Any, tokenizer: Tokenizer,
                 template: str | None) -> tuple[list[int], int | None]:
  if not isinstance(record, dict):
    raise _bad_line(prompts, name, f'is a JSON {type(record).__name__}, not an object')
  max_new = record.get('max_new_tokens')
  if max_new is not None and (not _is_int(max_new) or max_new < 1):
    raise _bad_line(prompts, name, f'has max_new_tokens={max_new!r}, not an integer >= 1')
  found = [k for k in ('prompt', 'text', 'messages', 'instruction') if k in record]
  if len(found) != 1:
    raise _bad_line(prompts, name, f'has {"none" if not found else " and ".join(found)} of '
                    '"prompt", "text", "messages", "instruction" (exactly one is needed)')
  # pylint: disable-next=protected-access
  use_chat = instructions._uses_chat_template(tokenizer, template)
  key = found[0]
  if key in ('prompt', 'text'):
    if not isinstance(record[key], str):
      raise _bad_line(prompts, name, f'has a "{key}" that is not a string')
    return _with_bos(tokenizer.encode(record[key]), tokenizer), max_new
  if key == 'instruction':
    given = record.get('input') or ''
    if not isinstance(record['instruction'], str) or not isinstance(given, str):
      raise _bad_line(prompts, name, 'has an "instruction" or "input" that is not a string')
    if not use_chat:
      form = instructions.ALPACA_PROMPT_WITH_INPUT if given else instructions.ALPACA_PROMPT
      text = form.format(instruction=record['instruction'], input=given)
      return _with_bos(tokenizer.encode(text), tokenizer), max_new
    messages = [{'role': 'user',
                 'content': record['instruction'] + ('\n\n' + given if given else '')}]
  else:
    messages = _messages(prompts, name, record['messages'])
  if use_chat:
    ids = chat.encode_chat(tokenizer, messages, add_generation_prompt=True,
                           chat_template=template)
    return [int(t) for t in ids], max_new  # the template writes its own BOS
  text = '\n'.join(f'{instructions.PLAIN_ROLE_NAMES[m["role"]]}: {m["content"]}'
                   for m in messages)
  text += '\n' + instructions.PLAIN_ROLE_NAMES['assistant'] + ': '
  return _with_bos(tokenizer.encode(text), tokenizer), max_new


def read_jsonl_prompts(prompts: str, tokenizer: Tokenizer,
                       template: str | None = None) -> list[tuple[list[int], int | None]]:
  """(prompt ids, max_new_tokens or None) of every line of the `jsonl:PATH` file(s), in order.

  `template` as in instructions.encode_example: None uses the tokenizer's chat template where
  it has one, 'plain' never does, anything else names a template or is one."""
  pattern = prompts.partition(':')[2]
  try:
    documents = corpora.load_text(pattern)
  except ConfigError as e:
    raise ConfigError(FIELDS['prompts'], e.message) from e
  lines = []
  for doc in documents:
    for number, line in enumerate(doc.text.split('\n'), start=1):
      if not line.strip():
        continue
      name = f'{doc.name}:{number}'
      try:
        record = json.loads(line)
      except ValueError as e:
        raise _bad_line(prompts, name, f'is not valid JSON ({e})') from e
      lines.append(_encode_line(prompts, name, record, tokenizer, template))
  if not lines:
    raise ConfigError(FIELDS['prompts'], f'{prompts!r} holds no JSON lines')
  return lines


def held_out_stream(corpus: str, tokenizer: Tokenizer, eval_fraction: float,
                    max_documents: int | None = None) -> np.ndarray:
  """The corpus's held-out documents as one token stream, packed as the perplexity evaluation
  packs them (each document followed by the tokenizer's separator)."""
  try:
    documents = corpora.load_documents(corpus, max_documents=max_documents)
  except ConfigError as e:
    if e.field != 'data.corpus':
      raise
    raise ConfigError(FIELDS['prompts'], e.message) from e
  _, held_out = pipeline.split_documents(documents, eval_fraction)
  if not held_out:
    raise ConfigError(FIELDS['eval_fraction'], f'none of the {len(documents)} documents of '
                      f'{corpus!r} fell into the held-out split at eval_fraction={eval_fraction}; '
                      'raise it or use more documents')
  tokens, _ = pipeline._pack(held_out, tokenizer)  # pylint: disable=protected-access
  return tokens


# ------------------------------------------------------------------------------ building


def request_seeds(seed: int, n: int) -> list[int]:
  """Each request's sampling seed in [0, 2**32): a function of (seed, request id) alone."""
  return [int(np.random.SeedSequence([seed, _SAMPLING_TAG, i]).generate_state(1)[0])
          for i in range(n)]


def build_workload(*, prompts: str, tokenizer: Tokenizer, num_requests: int | None,
                   output_lengths: str, input_lengths: str | None = None,
                   scenario: str = 'offline', rate_per_s: float | None = None, seed: int = 0,
                   sampling: Sampling = Sampling(), eval_fraction: float = 0.05,
                   max_documents: int | None = None,
                   template: str | None = None) -> list[Request]:
  """The requests of a workload (see the module docstring), ordered by arrival (= by id).

  `num_requests` None takes one request per line of a jsonl file. `rate_per_s` is read only by
  the server scenario. `eval_fraction` and `max_documents` pick the held-out split as the
  run's data config does. `sampling` is every request's template; its seed is replaced by
  `request_seeds(seed, ...)`."""
  errors = workload_errors(prompts=prompts, num_requests=num_requests,
                           output_lengths=output_lengths, input_lengths=input_lengths,
                           scenario=scenario, rate_per_s=rate_per_s, seed=seed,
                           eval_fraction=eval_fraction)
  if errors:
    raise errors[0]
  source = _source(prompts)
  out_dist = parse_lengths(output_lengths, FIELDS['output_lengths'])

  def rng(tag: int) -> np.random.Generator:
    return np.random.default_rng([seed, tag])

  if source == 'jsonl':
    lines = read_jsonl_prompts(prompts, tokenizer, template)
    n = len(lines) if num_requests is None else int(num_requests)
    chosen = [lines[i % len(lines)] for i in range(n)]
    prompt_ids = [ids for ids, _ in chosen]
    drawn = out_dist.draw(rng(_OUTPUT_TAG), n)
    max_new = [int(m) if m is not None else int(d) for (_, m), d in zip(chosen, drawn)]
  else:
    n = int(num_requests)
    in_dist = parse_lengths(input_lengths, FIELDS['input_lengths'])
    lengths = in_dist.draw(rng(_INPUT_TAG), n)
    max_new = [int(d) for d in out_dist.draw(rng(_OUTPUT_TAG), n)]
    if source == 'synthetic':
      tokens = rng(_TOKEN_TAG)
      prompt_ids = [tokens.integers(0, tokenizer.vocab_size, int(length)).tolist()
                    for length in lengths]
    else:
      stream = held_out_stream(prompts, tokenizer, eval_fraction, max_documents)
      bos = getattr(tokenizer, 'bos_id', None)
      add_bos = bool(getattr(tokenizer, 'add_bos', False)) and bos is not None
      if stream.size < lengths.max():
        raise ConfigError(FIELDS['input_lengths'], f'the held-out stream of {prompts!r} has '
                          f'{stream.size} tokens, fewer than the longest drawn prompt '
                          f'({lengths.max()}); use shorter prompts, a larger corpus or a larger '
                          'data.eval_fraction')
      offsets = rng(_OFFSET_TAG)
      prompt_ids = []
      for length in lengths:
        body = int(length) - add_bos
        start = int(offsets.integers(0, stream.size - body, endpoint=True))
        window = stream[start:start + body]
        prompt_ids.append(([int(bos)] if add_bos else []) + window.astype(np.int64).tolist())

  arrivals = arrival_times(scenario, n, rate_per_s, rng(_ARRIVAL_TAG))
  seeds = request_seeds(int(seed), n)
  return [Request(id=i, prompt=prompt_ids[i], max_new_tokens=max_new[i],
                  arrival_s=float(arrivals[i]),
                  sampling=dataclasses.replace(sampling, seed=seeds[i])) for i in range(n)]


def workload_stats(requests: Sequence[Request]) -> dict[str, Any]:
  """What a result record says of a workload: counts, token totals, offered load."""
  n = len(requests)
  prompt_tokens = sum(len(r.prompt) for r in requests)
  span = max((r.arrival_s for r in requests), default=0.0)
  return {
      'requests': n,
      'prompt_tokens': prompt_tokens,
      'prompt_tokens_mean': prompt_tokens / n if n else None,
      'max_new_tokens_total': sum(r.max_new_tokens for r in requests),
      'arrival_span_s': span,
      # n arrivals in (0, span]: the Poisson rate's maximum-likelihood estimate.
      'offered_rate_per_s': n / span if span > 0 else None,
  }

"""From a corpus spec to deterministic, resumable, per-process batches of token windows.

The corpus is split by document into train and held-out parts. Each part is tokenized into
one stream (every document followed by the tokenizer's separator: eos, then bos where a
checkpoint's tokenizer starts texts with one) and cut into windows of `seq_len + 1` tokens with
stride `seq_len`, so `w[:-1]` / `w[1:]` are inputs / targets and every next-token pair
of the stream is scored exactly once. The batch at training step `i` is a pure function of
(data config, seed, i): resuming needs only the step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from efficientjax.data import corpora
from efficientjax.data.corpora import Document
from efficientjax.data.tokenizers import Tokenizer
from efficientjax.errors import ConfigError

# The dotted config paths named in errors; kept here so a config rename is a one-line change.
SEED_FIELD = 'seed'
BATCH_FIELD = 'train.global_batch_size'

# Tags that keep the random streams of different uses apart. SeedSequence treats [s] and
# [s, 0] as the same entropy, so a use is told apart by a large tag, never by a zero.
_DOCUMENT_ORDER_TAG = zlib.crc32(b'efficientjax/data/document-order')
_SYNTHETIC_TRAIN_TAG = zlib.crc32(b'efficientjax/data/synthetic-train')
_SYNTHETIC_EVAL_TAG = zlib.crc32(b'efficientjax/data/synthetic-eval')

# Tokenize about this many characters per encode_batch call: large enough to keep the HF
# library's threads busy, small enough that the int32 ids of one chunk stay modest.
_CHUNK_CHARS = 8 << 20


def is_held_out(name: str, eval_fraction: float) -> bool:
  """Whether the document `name` belongs to the held-out split.

  A hash of the name alone decides, so the split does not move with the seed, with
  `max_documents`, or when documents are added to the corpus.
  """
  digest = hashlib.sha1(name.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64 < eval_fraction


def split_documents(documents: Sequence[Document],
                    eval_fraction: float) -> tuple[list[Document], list[Document]]:
  """(train, held-out) documents, each in the input order."""
  train, held_out = [], []
  for doc in documents:
    (held_out if is_held_out(doc.name, eval_fraction) else train).append(doc)
  return train, held_out


def _pack(documents: Sequence[Document], tokenizer: Tokenizer) -> tuple[np.ndarray, list[int]]:
  """One token stream of `documents`, each followed by the tokenizer's separator; and each
  document's token count."""
  # uint16 halves the memory of the stream for any vocabulary that fits (byte, GPT-2, Llama 2).
  dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
  separator = np.asarray(tokenizer.separator, dtype=dtype)
  pieces, counts = [], []
  start = 0
  while start < len(documents):
    stop, chars = start, 0
    while stop < len(documents) and (stop == start or chars < _CHUNK_CHARS):
      chars += len(documents[stop].text)
      stop += 1
    chunk = []
    for ids in tokenizer.encode_batch([d.text for d in documents[start:stop]]):
      chunk.append(ids.astype(dtype, copy=False))
      chunk.append(separator)
      counts.append(int(ids.size))
    pieces.append(np.concatenate(chunk))
    start = stop
  tokens = np.concatenate(pieces) if pieces else np.zeros((0,), dtype)
  return tokens, counts


def _fingerprint(documents: Sequence[Document], counts: Sequence[int]) -> str:
  """A short digest of which documents, with how many tokens, make up a split."""
  h = hashlib.sha1()
  for doc, n in zip(documents, counts):
    h.update(f'{doc.name}\0{n}\0'.encode('utf-8'))
  return h.hexdigest()[:16]


class _BatchSource(Protocol):
  """Rows [lo, hi) of the global batch at a step; a pure function of its arguments."""

  fingerprint: dict[str, Any]
  batches_per_epoch: int | None

  def rows(self, step: int, lo: int, hi: int) -> np.ndarray:
    ...


class PackedWindows:
  """Windows of `seq_len + 1` tokens with stride `seq_len` over a token stream."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self.tokens = tokens
    self.seq_len = seq_len
    self.num_windows = max(0, (tokens.size - 1) // seq_len)
    self._offsets = np.arange(seq_len + 1)

  def gather(self, indices: np.ndarray) -> np.ndarray:
    """Windows `indices` as an int32 array [len(indices), seq_len + 1], made on demand."""
    starts = np.asarray(indices, dtype=np.int64) * self.seq_len
    return self.tokens[starts[:, None] + self._offsets].astype(np.int32)


class _ShuffledEpochs:
  """Each epoch visits every window once, in an order drawn from (seed, epoch)."""

  def __init__(self, windows: PackedWindows, global_batch_size: int, seed: int,
               fingerprint: dict[str, Any]):
    self.windows = windows
    self.global_batch_size = global_batch_size
    self.seed = seed
    # The incomplete last batch of an epoch is dropped, so every batch is full.
    self.batches_per_epoch = windows.num_windows // global_batch_size
    self.fingerprint = fingerprint
    self._epoch, self._order = -1, None

  def rows(self, step: int, lo: int, hi: int) -> np.ndarray:
    epoch, position = divmod(step, self.batches_per_epoch)
    if epoch != self._epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._epoch, self._order = epoch, rng.permutation(self.windows.num_windows)
    first = position * self.global_batch_size
    return self.windows.gather(self._order[first + lo:first + hi])


def _random_rows(seed: int, tag: int, step: int, lo: int, hi: int, width: int,
                 vocab_size: int) -> np.ndarray:
  # One generator per row: a process draws only its own rows, yet the rows of all processes
  # together are the same global batch whatever the process count.
  return np.stack([
      np.random.default_rng([seed, tag, step, row]).integers(
          0, vocab_size, (width,), dtype=np.int32) for row in range(lo, hi)
  ])


class _SyntheticSteps:
  """Uniformly random tokens; the batch at step i depends only on (seed, i)."""

  batches_per_epoch = None

  def __init__(self, seed: int, seq_len: int, vocab_size: int, fingerprint: dict[str, Any]):
    self.seed, self.seq_len, self.vocab_size = seed, seq_len, vocab_size
    self.fingerprint = fingerprint

  def rows(self, step: int, lo: int, hi: int) -> np.ndarray:
    return _random_rows(self.seed, _SYNTHETIC_TRAIN_TAG, step, lo, hi, self.seq_len + 1,
                        self.vocab_size)


# Which config field to blame when a saved state's fingerprint differs from the stream's,
# most direct cause first: a new seq_len also changes num_windows, but seq_len is the news.
_FINGERPRINT_FIELDS = {
    'kind': 'data.corpus',
    'tokenizer': 'data.tokenizer',
    'vocab_size': 'data.tokenizer',
    'seq_len': 'data.seq_len',
    'global_batch_size': BATCH_FIELD,
    'seed': SEED_FIELD,
    'corpus': 'data.corpus',
    'num_windows': 'data.corpus',
    'separator': 'data.tokenizer',
}


class TrainStream:
  """An endless, resumable iterator over this process's share of the training batches.

  `next()` gives int32 [global_batch_size // process_count, seq_len + 1]: rows
  `process_index * local : (process_index + 1) * local` of the global batch. The state is
  the global step, so it can be restored under a different process count.
  """

  def __init__(self, source: _BatchSource, *, global_batch_size: int, process_index: int,
               process_count: int):
    self._source = source
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self._lo = process_index * self.local_batch_size
    self._hi = self._lo + self.local_batch_size
    self.step = 0

  @property
  def batches_per_epoch(self) -> int | None:
    """Full global batches in one pass over the training windows; None when endless."""
    return self._source.batches_per_epoch

  def _epoch_position(self) -> tuple[int, int]:
    if self.batches_per_epoch is None:
      return 0, self.step
    return divmod(self.step, self.batches_per_epoch)

  def next(self) -> np.ndarray:
    batch = self._source.rows(self.step, self._lo, self._hi)
    self.step += 1
    return batch

  def __iter__(self) -> Iterator[np.ndarray]:
    return self

  def __next__(self) -> np.ndarray:
    return self.next()

  def state(self) -> dict[str, Any]:
    """Where the stream is, as JSON-serialisable data for the checkpoint."""
    epoch, position = self._epoch_position()
    return {'step': self.step, 'epoch': epoch, 'position': position,
            'fingerprint': dict(self._source.fingerprint)}

  def restore(self, state: dict[str, Any]) -> None:
    """Continues from `state`; refuses a state saved from a different data config."""
    try:
      step, saved = int(state['step']), dict(state['fingerprint'])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f'not a TrainStream state: {state!r}') from e
    current = self._source.fingerprint
    extra = (set(saved) | set(current)) - set(_FINGERPRINT_FIELDS)
    keys = list(_FINGERPRINT_FIELDS) + sorted(extra)
    differing = [k for k in keys if saved.get(k) != current.get(k)]
    if differing:
      details = ', '.join(f'{k}: saved {saved.get(k)!r}, now {current.get(k)!r}'
                          for k in differing)
      raise ConfigError(
          _FINGERPRINT_FIELDS.get(differing[0], 'data.corpus'),
          f'the checkpointed data position belongs to a different data config ({details}); '
          'resume with the data config, seed and batch size the run started with, or start '
          'a fresh run in a new workdir')
    if step < 0:
      raise ValueError(f'negative step in TrainStream state: {state!r}')
    self.step = step


@dataclasses.dataclass
class Data:
  """The data of one run: the training stream, the held-out batches, and what they hold."""

  train: TrainStream
  synthetic: bool
  stats: dict[str, Any]
  tokenizer: Tokenizer
  # The packed token streams (each document followed by eos; train in its shuffled order),
  # for inspection and tests; None for synthetic data.
  train_tokens: np.ndarray | None
  eval_tokens: np.ndarray | None
  _eval_rows: Any = dataclasses.field(repr=False)
  _num_eval_batches: int = dataclasses.field(repr=False)
  _local_rows: tuple[int, int] = dataclasses.field(repr=False)

  def eval_batches(self) -> list[np.ndarray]:
    """The held-out batches, this process's rows only; the same on every call."""
    lo, hi = self._local_rows
    return [self._eval_rows(b, lo, hi) for b in range(self._num_eval_batches)]


def _check_positive_int(field: str, value: Any, hint: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ConfigError(field, f'must be a positive integer, got {value!r}; {hint}')


def _too_short(split: str, tokens: int, windows: int, seq_len: int, global_batch_size: int,
               fix: str) -> str:
  return (f'the {split} split has {tokens} tokens = {windows} sequences of seq_len+1='
          f'{seq_len + 1}, fewer than one global batch of {global_batch_size}; {fix}')


def check_arguments(seq_len: Any, global_batch_size: Any, eval_batches: Any, seed: Any,
                    eval_fraction: Any, process_index: Any, process_count: Any) -> None:
  """What every data builder (this one, efficientjax.data.instructions') checks of its
  arguments before reading anything: a ConfigError naming the field, or a ValueError."""
  _check_positive_int('data.seq_len', seq_len, 'use e.g. 1024')
  _check_positive_int(BATCH_FIELD, global_batch_size, 'use e.g. 32')
  _check_positive_int('data.eval_batches', eval_batches, 'use e.g. 16')
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ConfigError(SEED_FIELD, f'must be a non-negative integer, got {seed!r}')
  if (isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float))
      or not 0.0 < eval_fraction < 1.0):
    raise ConfigError('data.eval_fraction', f'must lie strictly between 0 and 1, got '
                      f'{eval_fraction!r}; use e.g. 0.05')
  if not isinstance(process_count, int) or process_count < 1:
    raise ValueError(f'process_count must be a positive integer, got {process_count!r}')
  if not isinstance(process_index, int) or not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index!r} is not in [0, {process_count})')
  if global_batch_size % process_count:
    raise ConfigError(
        BATCH_FIELD,
        f'{global_batch_size} rows do not split evenly among {process_count} processes; use '
        f'a multiple of {process_count}')


def build_data(*, corpus: str, tokenizer: Tokenizer, seq_len: int, global_batch_size: int,
               seed: int, eval_fraction: float, eval_batches: int, process_index: int = 0,
               process_count: int = 1, max_documents: int | None = None) -> Data:
  """Loads, splits, tokenizes and packs `corpus` into a train stream and held-out batches."""
  check_arguments(seq_len, global_batch_size, eval_batches, seed, eval_fraction, process_index,
                  process_count)
  seq_len, global_batch_size, seed = int(seq_len), int(global_batch_size), int(seed)
  local = global_batch_size // process_count
  local_rows = (process_index * local, (process_index + 1) * local)
  base_fingerprint = {'tokenizer': tokenizer.name, 'vocab_size': int(tokenizer.vocab_size),
                      'seq_len': seq_len, 'global_batch_size': global_batch_size, 'seed': seed}
  if tuple(tokenizer.separator) != (tokenizer.eos_id,):
    # Only where it is not the eos alone (what every stream had before checkpoint tokenizers
    # added a bos after it), so older states still resume; a state saved with another
    # separator is a different stream and is refused.
    base_fingerprint['separator'] = [int(t) for t in tokenizer.separator]

  if corpora.is_synthetic(corpus):
    corpora.load_documents(corpus)  # Only to reject 'synthetic:<anything>'.
    source = _SyntheticSteps(seed, seq_len, tokenizer.vocab_size,
                             {'kind': 'synthetic', **base_fingerprint})

    def synthetic_eval_rows(b: int, lo: int, hi: int) -> np.ndarray:
      return _random_rows(seed, _SYNTHETIC_EVAL_TAG, b, lo, hi, seq_len + 1,
                          tokenizer.vocab_size)

    stats = {
        'synthetic': True,
        'train_documents': 0, 'eval_documents': 0,
        # Random tokens are unbounded: there is no finite training set to count.
        'train_tokens': None, 'train_sequences': None,
        'eval_tokens': eval_batches * global_batch_size * (seq_len + 1),
        'eval_sequences': eval_batches * global_batch_size,
        'eval_batches': eval_batches,
    }
    train = TrainStream(source, global_batch_size=global_batch_size,
                        process_index=process_index, process_count=process_count)
    return Data(train=train, synthetic=True, stats=stats, tokenizer=tokenizer,
                train_tokens=None, eval_tokens=None,
                _eval_rows=synthetic_eval_rows, _num_eval_batches=eval_batches,
                _local_rows=local_rows)

  documents = corpora.load_documents(corpus, max_documents=max_documents)
  if len(documents) < 2:
    raise ConfigError(
        'data.corpus',
        f'{corpus!r} gave {len(documents)} document(s), but the held-out split is made of '
        'whole documents and needs at least 2; use a corpus with more files'
        + (' or raise data.max_documents' if max_documents is not None else ''))
  train_docs, eval_docs = split_documents(documents, eval_fraction)
  if not eval_docs:
    raise ConfigError(
        'data.eval_fraction',
        f'none of the {len(documents)} documents fell into the held-out split at '
        f'eval_fraction={eval_fraction}; raise data.eval_fraction or use more documents')
  if not train_docs:
    raise ConfigError(
        'data.eval_fraction',
        f'all {len(documents)} documents fell into the held-out split at '
        f'eval_fraction={eval_fraction}; lower data.eval_fraction or use more documents')

  # Shuffling documents (not only windows) keeps neighbouring windows from always coming
  # from the same few files; held-out stays in corpus order so eval is seed-independent.
  order = np.random.default_rng([seed, _DOCUMENT_ORDER_TAG]).permutation(len(train_docs))
  train_docs = [train_docs[i] for i in order]
  train_tokens, train_counts = _pack(train_docs, tokenizer)
  eval_tokens, _ = _pack(eval_docs, tokenizer)
  train_windows = PackedWindows(train_tokens, seq_len)
  eval_windows = PackedWindows(eval_tokens, seq_len)

  if eval_windows.num_windows < global_batch_size:
    raise ConfigError('data.eval_fraction', _too_short(
        'held-out', eval_tokens.size, eval_windows.num_windows, seq_len, global_batch_size,
        'lower data.seq_len or train.global_batch_size, or raise data.eval_fraction'))
  if train_windows.num_windows < global_batch_size:
    raise ConfigError(BATCH_FIELD, _too_short(
        'train', train_tokens.size, train_windows.num_windows, seq_len, global_batch_size,
        'lower data.seq_len or train.global_batch_size, or use a larger corpus'
        + (' (raise data.max_documents)' if max_documents is not None else '')))

  fingerprint = {'kind': 'packed', 'corpus': _fingerprint(train_docs, train_counts),
                 'num_windows': train_windows.num_windows, **base_fingerprint}
  source = _ShuffledEpochs(train_windows, global_batch_size, seed, fingerprint)
  num_eval_batches = min(eval_batches, eval_windows.num_windows // global_batch_size)

  def packed_eval_rows(b: int, lo: int, hi: int) -> np.ndarray:
    first = b * global_batch_size
    return eval_windows.gather(np.arange(first + lo, first + hi))

  stats = {
      'synthetic': False,
      'train_documents': len(train_docs), 'eval_documents': len(eval_docs),
      'train_tokens': int(train_tokens.size), 'eval_tokens': int(eval_tokens.size),
      'train_sequences': train_windows.num_windows,
      'eval_sequences': eval_windows.num_windows,
      'eval_batches': num_eval_batches,
  }
  train = TrainStream(source, global_batch_size=global_batch_size,
                      process_index=process_index, process_count=process_count)
  return Data(train=train, synthetic=False, stats=stats, tokenizer=tokenizer,
              train_tokens=train_tokens, eval_tokens=eval_tokens,
              _eval_rows=packed_eval_rows, _num_eval_batches=num_eval_batches,
              _local_rows=local_rows)

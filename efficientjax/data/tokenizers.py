"""Tokenizers: byte-level (needs no files) or any Hugging Face `tokenizer.json`.

Both satisfy the `Tokenizer` protocol. `eos_id` is the document separator that packing puts
after every document.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from efficientjax.errors import ConfigError

# Tried in order when no eos_token is given: the names used by GPT-2/Qwen, Llama 3, Llama 2 /
# Mistral, Gemma and ChatML tokenizers.
EOS_CANDIDATES = ('</s>', '<|endoftext|>', '<|end_of_text|>', '<eos>', '<|im_end|>')

_VALID_SPECS = (
    "'byte', a path to a Hugging Face tokenizer.json, or a directory containing tokenizer.json")


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline and the inference engine need from a tokenizer."""

  name: str
  vocab_size: int
  eos_id: int

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text` as int32, without special tokens."""
    ...

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    ...

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    ...


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, plus 256 as end-of-document."""

  name = 'byte'
  vocab_size = 257
  eos_id = 256

  def encode(self, text: str) -> np.ndarray:
    # frombuffer avoids a Python-level loop over every byte: the stdlib corpus is tens of MB.
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    ids = ids[(ids >= 0) & (ids < 256)].astype(np.uint8)
    return ids.tobytes().decode('utf-8', errors='replace')

  def __repr__(self) -> str:
    return 'ByteTokenizer()'


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer loaded from a `tokenizer.json` file."""

  def __init__(self, path: str, eos_token: str | None = None):
    if not os.path.isfile(path):
      raise ConfigError(
          'data.tokenizer',
          f'no tokenizer file at {path!r}; pass the path of an existing tokenizer.json '
          '(or of a directory holding one), or use data.tokenizer="byte"')
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ConfigError(
          'data.tokenizer',
          f'loading {path!r} needs the Hugging Face tokenizers library ({e}); '
          'run `pip install tokenizers`, or use data.tokenizer="byte"') from e
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # The library raises plain Exception subclasses from Rust.
      raise ConfigError(
          'data.tokenizer',
          f'could not load {path!r} as a Hugging Face tokenizer.json: {e}; '
          'pass a tokenizer.json saved by the tokenizers/transformers libraries') from e
    self.name = path
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.eos_id = self._find_eos(eos_token)
    self.eos_token = self._tok.id_to_token(self.eos_id)
    # encode_batch_fast skips computing character offsets, which packing never uses.
    self._encode_batch = getattr(self._tok, 'encode_batch_fast', self._tok.encode_batch)

  def _find_eos(self, eos_token: str | None) -> int:
    if eos_token is not None:
      eos_id = self._tok.token_to_id(eos_token)
      if eos_id is None:
        raise ConfigError(
            'data.eos_token',
            f'{eos_token!r} is not in the vocabulary of {self.name!r}; pass a token the '
            'tokenizer has (look in its added_tokens / model.vocab)')
      return eos_id
    for candidate in EOS_CANDIDATES:
      eos_id = self._tok.token_to_id(candidate)
      if eos_id is not None:
        return eos_id
    raise ConfigError(
        'data.tokenizer',
        f'found no end-of-document token in {self.name!r} (tried {", ".join(EOS_CANDIDATES)}); '
        'name the one it uses with data.eos_token')

  def encode(self, text: str) -> np.ndarray:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return np.asarray(ids, dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    # The library parallelises a batch across threads; one call per chunk is much faster
    # than a Python loop over encode.
    encodings = self._encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)])

  def __repr__(self) -> str:
    return f'HFTokenizer({self.name!r}, eos={self.eos_token!r})'


def get_tokenizer(spec: str, eos_token: str | None = None) -> Tokenizer:
  """The tokenizer named by `spec`: 'byte' or a path to a tokenizer.json or its directory."""
  if spec == 'byte':
    if eos_token is not None:
      raise ConfigError(
          'data.eos_token',
          f'{eos_token!r} was given but the byte tokenizer has a fixed eos id '
          f'({ByteTokenizer.eos_id}); leave data.eos_token unset, or use a tokenizer.json')
    return ByteTokenizer()
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    candidate = os.path.join(path, 'tokenizer.json')
    if not os.path.isfile(candidate):
      raise ConfigError(
          'data.tokenizer',
          f'the directory {spec!r} has no tokenizer.json; point data.tokenizer at the file, '
          f'or use one of: {_VALID_SPECS}')
    return HFTokenizer(candidate, eos_token=eos_token)
  if os.path.isfile(path):
    return HFTokenizer(path, eos_token=eos_token)
  raise ConfigError(
      'data.tokenizer',
      f'{spec!r} is neither "byte" nor an existing file or directory; use one of: '
      f'{_VALID_SPECS} (hub names are not fetched: download the tokenizer.json first; '
      'relative paths are resolved from the current directory)')

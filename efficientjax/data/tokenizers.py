"""Tokenizers: byte-level (needs no files), a Hugging Face `tokenizer.json`, or the tokenizer of a
Hugging Face checkpoint directory.

All satisfy the `Tokenizer` protocol. `separator` is what packing puts after every document:
`eos_id`, then `bos_id` where a checkpoint's tokenizer starts every text with its BOS, so that
each document after the first reads as that tokenizer encodes it. A checkpoint directory also
gives its special tokens, its generation stop ids and its chat templates (rendered by
`efficientjax.data.chat`), read the way transformers 5 reads them; tests/data/test_chat.py
compares them with `AutoTokenizer` and `GenerationConfig`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from efficientjax.errors import ConfigError

# Tried in order when no eos_token is given: the names used by GPT-2/Qwen, Llama 3, Llama 2 /
# Mistral, Gemma and ChatML tokenizers.
EOS_CANDIDATES = ('</s>', '<|endoftext|>', '<|end_of_text|>', '<eos>', '<|im_end|>')

_VALID_SPECS = (
    "'byte', a path to a Hugging Face tokenizer.json, or a Hugging Face checkpoint directory "
    '(tokenizer.json + tokenizer_config.json)')

# The special tokens transformers names (its SPECIAL_TOKENS_ATTRIBUTES). Any other
# tokenizer_config.json key ending in `_token` whose value is a token (image_token, ...) is a
# model-specific special token, and a chat template sees it too.
NAMED_SPECIAL_TOKENS = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token',
                        'cls_token', 'mask_token')


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline and the inference engine need from a tokenizer."""

  name: str
  vocab_size: int
  eos_id: int

  @property
  def separator(self) -> tuple[int, ...]:
    """The ids packing puts after every document."""
    ...

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text` as int32, without special tokens."""
    ...

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    ...

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    ...


class _OneEos:
  """Special ids of a tokenizer that knows only its end-of-document token."""

  eos_id: int
  bos_id: int | None = None
  pad_id: int | None = None

  @property
  def separator(self) -> tuple[int, ...]:
    # A property, not a class attribute: subclasses that change eos_id must not keep a stale one.
    return (self.eos_id,)

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """The ids that end a generation."""
    return (self.eos_id,)


class ByteTokenizer(_OneEos):
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


class HFTokenizer(_OneEos):
  """A Hugging Face `tokenizers` tokenizer loaded from a `tokenizer.json` file."""

  def __init__(self, path: str, eos_token: str | None = None):
    if not os.path.isfile(path):
      raise ConfigError(
          'data.tokenizer',
          f'no tokenizer file at {path!r}; pass the path of an existing tokenizer.json '
          '(or of a checkpoint directory holding one), or use data.tokenizer="byte"')
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
    # Special tokens written in the text (<|im_start|>, ...) still become their ids: only the
    # post-processor's additions (a leading BOS) are left out.
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


@dataclasses.dataclass(frozen=True)
class GenerationIds:
  """The special ids of a checkpoint's generation settings (generation_config.json, else the
  same keys of config.json, which is where transformers takes them from without one)."""

  bos_id: int | None
  eos_ids: tuple[int, ...]  # generation stops at any of them; Llama 3.x Instruct lists three
  pad_id: int | None
  source: str | None  # the file they came from; None when the directory has neither


class CheckpointTokenizer(HFTokenizer):
  """The tokenizer of a Hugging Face checkpoint directory.

  Reads tokenizer.json and tokenizer_config.json (both required); special_tokens_map.json,
  generation_config.json (else config.json), chat_template.jinja,
  additional_chat_templates/*.jinja and chat_template.json when present. What it reads follows
  transformers 5's `AutoTokenizer.from_pretrained`:
  - special tokens (`bos_token`, ... as strings or AddedToken objects) come from
    tokenizer_config.json; special_tokens_map.json overrides them only when tokenizer_config.json
    has no `added_tokens_decoder` (the legacy layout);
  - `add_bos_token` is not consulted: as in transformers 5, which drops it whenever there is a
    tokenizer.json, the tokenizer.json post-processor decides whether a text starts with BOS
    (`add_bos`);
  - chat_template.jinja and additional_chat_templates/ win over tokenizer_config.json's
    `chat_template`; chat_template.json (the processor's file, which AutoTokenizer ignores) is
    read only when there is no other template.
  Where transformers would quietly extend the vocabulary (a special token, or an
  `added_tokens_decoder` entry, that tokenizer.json lacks), this refuses: the model's
  embedding table has no row for it.

  Attributes beyond HFTokenizer's: `directory`; `bos_id`, `pad_id` (None when unset) and their
  tokens; `add_bos`; `special_tokens` (name -> token text: what a chat template sees);
  `generation` (GenerationIds); `eos_ids`; `chat_template` (a string, a dict name -> template,
  or None). `eos_id`, the document separator, is `data.eos_token` when given, else the
  tokenizer's `eos_token`.
  """

  def __init__(self, directory: str, eos_token: str | None = None):
    self.directory = directory
    config = _read_json(directory, 'tokenizer_config.json')
    if not isinstance(config, dict):
      raise _bad_file(directory, 'tokenizer_config.json', 'is not a JSON object')
    tokens_map = None
    if os.path.isfile(os.path.join(directory, 'special_tokens_map.json')):
      tokens_map = _read_json(directory, 'special_tokens_map.json')
      if not isinstance(tokens_map, dict):
        raise _bad_file(directory, 'special_tokens_map.json', 'is not a JSON object')
    self.special_tokens = _special_tokens(directory, config, tokens_map)
    super().__init__(os.path.join(directory, 'tokenizer.json'), eos_token=eos_token)
    self.name = directory
    self._check_special_tokens(config)
    self.bos_token = self.special_tokens.get('bos_token')
    self.pad_token = self.special_tokens.get('pad_token')
    self.bos_id = None if self.bos_token is None else self._special_id('bos_token')
    self.pad_id = None if self.pad_token is None else self._special_id('pad_token')
    # What the post-processor puts around a text: encoding '' leaves exactly its additions.
    added = self._tok.encode('', add_special_tokens=True).ids
    self.add_bos = self.bos_id is not None and added[:1] == [self.bos_id]
    self.generation = _generation_ids(directory, self.vocab_size)
    self.chat_template = _chat_templates(directory, config)

  def _find_eos(self, eos_token: str | None) -> int:
    if eos_token is None and 'eos_token' in self.special_tokens:
      return self._special_id('eos_token')
    return super()._find_eos(eos_token)

  def _special_id(self, key: str) -> int:
    text = self.special_tokens[key]
    token_id = self._tok.token_to_id(text)
    if token_id is None:
      raise ConfigError(
          'data.tokenizer',
          f'{self.directory!r}: {key}={text!r} (tokenizer_config.json or '
          'special_tokens_map.json) is not in tokenizer.json; transformers would append it as '
          'a new token the model has no embedding for. Take tokenizer.json and '
          'tokenizer_config.json from the same checkpoint, or remove the entry')
    return token_id

  def _check_special_tokens(self, config: Mapping[str, Any]) -> None:
    for key in self.special_tokens:
      self._special_id(key)
    decoder = config.get('added_tokens_decoder') or {}
    if not isinstance(decoder, dict):
      raise _bad_file(self.directory, 'tokenizer_config.json',
                      'has an added_tokens_decoder that is not an object of id -> token')
    for key, token in decoder.items():
      text = _token_text(token, self.directory, 'tokenizer_config.json',
                         f'added_tokens_decoder[{key!r}]')
      found = self._tok.token_to_id(text) if text is not None else None
      if not str(key).isdigit() or found != int(key):
        raise ConfigError(
            'data.tokenizer',
            f'{self.directory!r}: tokenizer_config.json gives {text!r} id {key}, but '
            f'tokenizer.json has it {"as " + str(found) if found is not None else "nowhere"}; '
            'the two files are from different checkpoints: take both from the same one')

  @property
  def separator(self) -> tuple[int, ...]:
    return (self.eos_id, self.bos_id) if self.add_bos else (self.eos_id,)

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return self.generation.eos_ids or (self.eos_id,)

  def __repr__(self) -> str:
    return (f'CheckpointTokenizer({self.directory!r}, eos={self.eos_token!r}, '
            f'bos={self.bos_token!r}, pad={self.pad_token!r})')


def _bad_file(directory: str, name: str, problem: str) -> ConfigError:
  return ConfigError('data.tokenizer', f'{directory!r}: {name} {problem}; copy an intact '
                     f'{name} from the checkpoint')


def _read_json(directory: str, name: str) -> Any:
  path = os.path.join(directory, name)
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    raise _bad_file(directory, name, f'cannot be read as JSON ({e})') from e


def _token_text(value: Any, directory: str, file: str, key: str) -> str | None:
  """The text of a token written as a string or as an AddedToken object ({"content": ...})."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get('content'), str):
    return value['content']
  raise _bad_file(directory, file, f'has {key}={value!r}, neither a token string nor an '
                  'AddedToken object with a "content" string')


def _special_tokens(directory: str, config: Mapping[str, Any],
                    tokens_map: Mapping[str, Any] | None) -> dict[str, str]:
  """Name -> text of every special token that is set, as transformers' `special_tokens_map`."""
  sources = {key: 'tokenizer_config.json' for key in config}
  merged = dict(config)
  if tokens_map is not None and 'added_tokens_decoder' not in config:
    merged.update(tokens_map)
    sources.update({key: 'special_tokens_map.json' for key in tokens_map})
  found = {}
  for key, value in merged.items():
    # Another key ending in _token is a model-specific token only when its value is one, as in
    # transformers: `add_bos_token: true` is not, nor is a dict tokenizer_config.json does not
    # mark as an AddedToken (special_tokens_map.json's dicts are all taken as AddedTokens).
    is_token = isinstance(value, str) or isinstance(value, dict) and (
        value.get('__type') == 'AddedToken' or sources[key] == 'special_tokens_map.json')
    if key in NAMED_SPECIAL_TOKENS or (key.endswith('_token') and is_token):
      text = _token_text(value, directory, sources[key], key)
      if text is not None:
        found[key] = text
  extra = merged.get('extra_special_tokens')
  if isinstance(extra, dict):  # transformers 5's form of model-specific tokens
    for key, value in extra.items():
      text = _token_text(value, directory, sources['extra_special_tokens'], key)
      if text is not None:
        found[key] = text
  return found


def _generation_ids(directory: str, vocab_size: int) -> GenerationIds:
  for name in ('generation_config.json', 'config.json'):
    if os.path.isfile(os.path.join(directory, name)):
      data = _read_json(directory, name)
      if not isinstance(data, dict):
        raise _bad_file(directory, name, 'is not a JSON object')
      break
  else:
    return GenerationIds(None, (), None, None)

  def ids(key: str) -> list[int]:
    value = data.get(key)
    values = [] if value is None else value if isinstance(value, list) else [value]
    for v in values:
      if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab_size:
        if key != 'eos_token_id' and isinstance(v, int) and not isinstance(v, bool):
          # An unused bos/pad id out of range (older Llama conversions write pad -1):
          # transformers warns and goes on, so do we, without it.
          warnings.warn(f'{directory}/{name}: {key}={value!r} is not a token id of '
                        f'tokenizer.json (vocabulary {vocab_size}); ignored')
          return []
        raise _bad_file(directory, name, f'has {key}={value!r}; it must be a token id in '
                        f'[0, {vocab_size}) of tokenizer.json (or a list of them, for '
                        'eos_token_id)')
    return values

  bos, eos, pad = ids('bos_token_id'), ids('eos_token_id'), ids('pad_token_id')
  for key, values in (('bos_token_id', bos), ('pad_token_id', pad)):
    if len(values) > 1:
      raise _bad_file(directory, name, f'has a list for {key}; it takes one id')
  return GenerationIds(bos[0] if bos else None, tuple(eos), pad[0] if pad else None, name)


def _chat_templates(directory: str, config: Mapping[str, Any]) -> str | dict[str, str] | None:
  """The checkpoint's chat template(s), found where transformers looks for them."""
  templates = {}
  if os.path.isfile(os.path.join(directory, 'chat_template.jinja')):
    templates['default'] = _read_text(directory, 'chat_template.jinja')
  for path in sorted(glob.glob(os.path.join(directory, 'additional_chat_templates', '*.jinja'))):
    name = os.path.basename(path).removesuffix('.jinja')
    templates[name] = _read_text(directory, os.path.join('additional_chat_templates',
                                                         os.path.basename(path)))
  if templates:
    return templates['default'] if list(templates) == ['default'] else templates
  value, file = config.get('chat_template'), 'tokenizer_config.json'
  if value is None and os.path.isfile(os.path.join(directory, 'chat_template.json')):
    processor = _read_json(directory, 'chat_template.json')
    value, file = (processor.get('chat_template') if isinstance(processor, dict) else processor,
                   'chat_template.json')
  if value is None or isinstance(value, str):
    return value
  # The several-templates form: [{"name": "default", "template": "..."}, ...].
  if isinstance(value, list) and all(
      isinstance(t, dict) and isinstance(t.get('name'), str) and isinstance(t.get('template'), str)
      for t in value):
    return {t['name']: t['template'] for t in value}
  raise _bad_file(directory, file, 'has a chat_template that is neither a string nor a list of '
                  '{"name": ..., "template": ...} objects')


def _read_text(directory: str, name: str) -> str:
  try:
    with open(os.path.join(directory, name), encoding='utf-8') as f:
      return f.read()
  except (OSError, ValueError) as e:
    raise _bad_file(directory, name, f'cannot be read as UTF-8 text ({e})') from e


def _checkpoint_tokenizer(spec: str, path: str, eos_token: str | None) -> CheckpointTokenizer:
  missing = [name for name in ('tokenizer.json', 'tokenizer_config.json')
             if not os.path.isfile(os.path.join(path, name))]
  if missing:
    fix = f'copy {" and ".join(missing)} from the checkpoint into {spec!r}'
    if 'tokenizer.json' in missing and os.path.isfile(os.path.join(path, 'tokenizer.model')):
      # A SentencePiece-only checkpoint: transformers can write the tokenizer.json.
      fix = ('it has only a SentencePiece tokenizer.model: write tokenizer.json with '
             '`AutoTokenizer.from_pretrained(dir).save_pretrained(dir)` (transformers)')
    elif missing == ['tokenizer_config.json']:
      fix += (', or point data.tokenizer at its tokenizer.json to use that file alone (the '
              'end-of-document token then guessed or named by data.eos_token)')
    raise ConfigError(
        'data.tokenizer',
        f'the directory {spec!r} has no {" and no ".join(missing)}; a checkpoint directory '
        f'needs tokenizer.json and tokenizer_config.json: {fix}')
  return CheckpointTokenizer(path, eos_token=eos_token)


def get_tokenizer(spec: str, eos_token: str | None = None) -> Tokenizer:
  """The tokenizer named by `spec`: 'byte', a path to a tokenizer.json, or a checkpoint
  directory (a `CheckpointTokenizer`)."""
  if spec == 'byte':
    if eos_token is not None:
      raise ConfigError(
          'data.eos_token',
          f'{eos_token!r} was given but the byte tokenizer has a fixed eos id '
          f'({ByteTokenizer.eos_id}); leave data.eos_token unset, or use a tokenizer.json')
    return ByteTokenizer()
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    return _checkpoint_tokenizer(spec, path, eos_token)
  if os.path.isfile(path):
    return HFTokenizer(path, eos_token=eos_token)
  raise ConfigError(
      'data.tokenizer',
      f'{spec!r} is neither "byte" nor an existing file or directory; use one of: '
      f'{_VALID_SPECS} (hub names are not fetched: download the files first; '
      'relative paths are resolved from the current directory)')

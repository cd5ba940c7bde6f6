"""Named sources of documents, keyed by the prefix of the corpus spec.

    stdlib              the running Python's standard-library sources (offline default)
    text:GLOB           local files, one document per file (`**` recurses)
    hf:NAME[:CONFIG]    the 'train' split of a Hugging Face dataset (needs `datasets`)
    synthetic           no documents: the pipeline draws random tokens

Every loader returns documents in a fixed order, so `max_documents` keeps the same prefix on
every machine.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import sysconfig
from collections.abc import Callable

from efficientjax.errors import ConfigError

VALID_FORMS = "'stdlib', 'text:GLOB', 'hf:NAME[:CONFIG]' or 'synthetic'"

_GLOB_MAGIC = re.compile(r'[*?[]')


@dataclasses.dataclass(frozen=True)
class Document:
  """One unit of the held-out split: `name` is stable across machines and runs."""

  name: str
  text: str


def _take(max_documents: int | None) -> int | None:
  if max_documents is None:
    return None
  if isinstance(max_documents, bool) or not isinstance(max_documents, int) or max_documents < 1:
    raise ConfigError(
        'data.max_documents',
        f'must be a positive integer or None, got {max_documents!r}; use None for the '
        'whole corpus')
  return max_documents


def _read_files(paths: list[tuple[str, str]], max_documents: int | None) -> list[Document]:
  """Reads (name, path) pairs in order, skipping empty files, up to max_documents."""
  documents = []
  for name, path in paths:
    if max_documents is not None and len(documents) >= max_documents:
      break
    # errors='replace': a stray non-UTF-8 byte should not make a whole corpus unusable.
    with open(path, encoding='utf-8', errors='replace') as f:
      text = f.read()
    if text:
      documents.append(Document(name=name, text=text))
  return documents


def load_stdlib(arg: str, max_documents: int | None = None) -> list[Document]:
  """The standard library's `.py` files; names are paths relative to the stdlib root."""
  if arg:
    raise ConfigError('data.corpus', f"'stdlib' takes no argument, got 'stdlib:{arg}'; "
                      "write data.corpus='stdlib'")
  root = sysconfig.get_paths()['stdlib']
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Installed third-party packages differ between machines; the stdlib itself does not
    # (for a given Python version), which is what makes this corpus reproducible.
    dirnames[:] = [d for d in dirnames if d not in ('site-packages', 'dist-packages')]
    for filename in filenames:
      if filename.endswith('.py'):
        path = os.path.join(dirpath, filename)
        paths.append((os.path.relpath(path, root).replace(os.sep, '/'), path))
  paths.sort()
  documents = _read_files(paths, max_documents)
  if not documents:
    raise ConfigError('data.corpus', f'found no Python sources under {root!r}; this Python '
                      "ships without its stdlib sources: use 'text:GLOB' or 'synthetic'")
  return documents


def _glob_root(pattern: str) -> str:
  """The leading directories of `pattern` that contain no glob magic."""
  parts = pattern.split(os.sep)
  fixed = []
  for part in parts[:-1]:
    if _GLOB_MAGIC.search(part):
      break
    fixed.append(part)
  return os.sep.join(fixed) if fixed else '.'


def load_text(pattern: str, max_documents: int | None = None) -> list[Document]:
  """Local files matching `pattern`; names are paths relative to the glob's fixed prefix."""
  if not pattern:
    raise ConfigError('data.corpus', "'text:' needs a glob, e.g. 'text:data/**/*.txt'")
  expanded = os.path.expanduser(pattern)
  matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
  if not matches:
    raise ConfigError(
        'data.corpus',
        f'no files match {pattern!r}; check the glob, it is resolved relative to the current '
        f'directory ({os.getcwd()}) and `**` needs to be its own path component')
  # Names relative to the fixed prefix keep the held-out split (a hash of the name) the same
  # wherever the corpus lives and however the path is spelled.
  root = _glob_root(expanded)
  paths = [(os.path.relpath(p, root).replace(os.sep, '/'), p) for p in matches]
  paths.sort()
  documents = _read_files(paths, max_documents)
  if not documents:
    raise ConfigError('data.corpus', f'all {len(matches)} files matching {pattern!r} are empty; '
                      'point the glob at files with text in them')
  return documents


def load_hf(arg: str, max_documents: int | None = None) -> list[Document]:
  """The 'train' split of a Hugging Face dataset, one document per non-empty 'text' row."""
  name, _, config = arg.partition(':')
  if not name:
    raise ConfigError('data.corpus', "'hf:' needs a dataset name, e.g. "
                      "'hf:wikitext:wikitext-2-raw-v1'")
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(
        'data.corpus',
        f"'hf:{arg}' needs the Hugging Face datasets library, which is not installed ({e}); "
        "run `pip install datasets` (it also needs a network or a local cache of the "
        "dataset), or use 'stdlib' or 'text:GLOB'") from e
  try:
    dataset = datasets.load_dataset(name, config or None, split='train')
  except Exception as e:  # Offline, unknown name, bad config...: all the user's to fix.
    raise ConfigError(
        'data.corpus',
        f'could not load the Hugging Face dataset {name!r} (config {config or None!r}): '
        f'{type(e).__name__}: {e}; check the name and config, and without a network set '
        "HF_DATASETS_OFFLINE=1 with the dataset in the local cache, or use 'stdlib' or "
        "'text:GLOB'") from e
  columns = list(getattr(dataset, 'column_names', None) or [])
  if 'text' not in columns:
    raise ConfigError(
        'data.corpus',
        f"the dataset {name!r} has no 'text' column (its columns: {columns}); use a dataset "
        "with a 'text' column, or export the text to files and use 'text:GLOB'")
  documents = []
  for i, text in enumerate(dataset['text']):
    if max_documents is not None and len(documents) >= max_documents:
      break
    if text:
      # The row index names the document: stable for a fixed dataset revision.
      documents.append(Document(name=f'{name}/{config}/train/{i}', text=text))
  if not documents:
    raise ConfigError('data.corpus', f"the 'text' column of {name!r} is empty; use another "
                      'dataset or config')
  return documents


def load_synthetic(arg: str, max_documents: int | None = None) -> list[Document]:
  """No documents: the pipeline generates random tokens for `synthetic`."""
  del max_documents
  if arg:
    raise ConfigError('data.corpus', f"'synthetic' takes no argument, got 'synthetic:{arg}'; "
                      "write data.corpus='synthetic'")
  return []


CORPORA: dict[str, Callable[[str, int | None], list[Document]]] = {
    'stdlib': load_stdlib,
    'text': load_text,
    'hf': load_hf,
    'synthetic': load_synthetic,
}


def parse_spec(spec: str) -> tuple[str, str]:
  """Splits a corpus spec into (prefix, argument), checking the prefix is known."""
  if not isinstance(spec, str):
    raise ConfigError('data.corpus', f'must be a string, got {spec!r}; use one of {VALID_FORMS}')
  prefix, _, arg = spec.partition(':')
  if prefix not in CORPORA:
    raise ConfigError('data.corpus', f'unknown corpus {spec!r}; use one of {VALID_FORMS}')
  return prefix, arg


def is_synthetic(spec: str) -> bool:
  return parse_spec(spec)[0] == 'synthetic'


def load_documents(spec: str, *, max_documents: int | None = None) -> list[Document]:
  """The documents of the corpus `spec`, in its fixed order, at most `max_documents`."""
  prefix, arg = parse_spec(spec)
  return CORPORA[prefix](arg, _take(max_documents))

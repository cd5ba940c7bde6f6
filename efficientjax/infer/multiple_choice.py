"""Zero-shot multiple-choice evaluation of lm-evaluation-harness task YAMLs over local JSON data.

A task file in lm-eval's format (`output_type: multiple_choice`, `dataset_path: json`,
`dataset_kwargs: {data_files: {SPLIT: PATH}}`, `test_split` or `validation_split`) is read
without lm-eval and scored with `efficientjax.infer.loglikelihood`, with lm-eval's definitions
(`lm_eval/api/task.py`, 0.4.x):
- the context is `description + doc_to_text(doc)` and each choice is scored as the continuation
  `target_delimiter + choice` (target_delimiter defaults to " ");
- `acc`: the choice of highest log-likelihood is the gold one; `acc_norm`: the same with each
  log-likelihood divided by its choice's length in characters (the delimiter not counted);
  ties go to the first choice (np.argmax); a gold label outside the choices scores 0;
- `*_stderr`: the sample standard deviation over documents / sqrt(n) (None for one document).
`doc_to_text`, `doc_to_choice` and `doc_to_target` are a field name (a key of the documents) or
a Jinja template rendered as lm-eval renders it (StrictUndefined, trailing newlines kept, its
`regex_replace` filter; here in Jinja's sandbox, since the file is data); `doc_to_target` may be
an int; `doc_to_choice` may be a list. Only zero-shot: few-shot prompts, `!function` hooks,
`process_docs`, prompt sources, multiple inputs or targets and generation prefixes are refused
with a `ConfigError` naming the key. Relative `data_files` paths resolve from the current
directory, as the `datasets` library (hence lm-eval) resolves them; `include:` from the task
file's directory, as lm-eval does.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from efficientjax.errors import ConfigError
from efficientjax.infer import loglikelihood
from efficientjax.model import ModelConfig

FIELD = 'eval.task'

# Keys that change which requests a document makes or how they are scored, beyond what this
# evaluator implements (zero-shot, one context, single gold label).
_REFUSED = {
    'process_docs': 'a Python hook over the documents',
    'process_results': 'a Python hook over the results',
    'use_prompt': 'a promptsource prompt',
    'gen_prefix': 'a generation prefix',
    'doc_to_image': 'image inputs',
    'doc_to_audio': 'audio inputs',
    'custom_dataset': 'a Python dataset hook',
    'dataset_name': 'a named dataset configuration',
}


class _FunctionTag:
  """An lm-eval `!function module.name` value: Python, which this loader does not run."""

  def __init__(self, name: str):
    self.name = name


def _yaml_loader():
  import yaml  # pylint: disable=g-import-not-at-top  (PyYAML: a flax dependency)

  class Loader(yaml.SafeLoader):
    pass

  Loader.add_constructor('!function',
                         lambda loader, node: _FunctionTag(loader.construct_scalar(node)))
  return yaml, Loader


def _read_yaml(path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
  """The task file as a dict, with `include:` files merged under it (its own keys win)."""
  path = os.path.abspath(path)
  if path in seen:
    raise ConfigError(FIELD, f'{path}: includes itself (through {" -> ".join(seen)})')
  yaml, loader = _yaml_loader()
  try:
    with open(path, encoding='utf-8') as f:
      config = yaml.load(f, Loader=loader)  # noqa: S506  (a SafeLoader subclass)
  except OSError as e:
    raise ConfigError(FIELD, f'cannot read the task file {path!r} ({e}); give the path of an '
                      'lm-eval task YAML') from None
  except yaml.YAMLError as e:
    raise ConfigError(FIELD, f'{path} is not valid YAML ({e})') from None
  if not isinstance(config, dict):
    raise ConfigError(FIELD, f'{path} is not a mapping of task keys')
  include = config.pop('include', None)
  if include is not None:
    base = os.path.join(os.path.dirname(path), include)
    config = {**_read_yaml(base, seen + (path,)), **config}
  return config


def _jinja_env():
  from jinja2 import BaseLoader, StrictUndefined  # pylint: disable=g-import-not-at-top
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=g-import-not-at-top
  env = ImmutableSandboxedEnvironment(loader=BaseLoader, undefined=StrictUndefined,
                                      keep_trailing_newline=True)
  env.filters['regex_replace'] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s,
                                                                         count=count)
  return env


@dataclasses.dataclass
class MultipleChoiceTask:
  """A zero-shot multiple-choice task: its documents and how each becomes requests."""

  name: str
  path: str                      # the task YAML
  split: str
  docs: list[dict[str, Any]]
  doc_to_text: str
  doc_to_choice: str | list[str] | dict[Any, str]
  doc_to_target: str | int
  target_delimiter: str = ' '
  description: str = ''

  def __post_init__(self):
    self._env = _jinja_env()
    self.features = {k for doc in self.docs for k in doc}

  def _render(self, template: str, doc: Mapping[str, Any]) -> str:
    return self._env.from_string(template).render(**doc)

  def text(self, doc: Mapping[str, Any]) -> str:
    """doc_to_text: the question, as lm-eval renders it."""
    spec = self.doc_to_text
    if spec in self.features:
      value = doc[spec]
      index = isinstance(value, int)
    else:
      value = self._render(spec, doc)
      index = value.isdigit()
    if index:
      raise ConfigError(FIELD, f'{self.path}: doc_to_text gives {value!r}, an index: that is '
                        "lm-eval's multiple-input form (one context per choice, Winogrande), "
                        'which this evaluator does not implement')
    return value

  def context(self, doc: Mapping[str, Any]) -> str:
    """The context every choice is scored after: the description, then the question."""
    description = self.description
    if description:
      description = doc[description] if description in doc else self._render(description, doc)
    return (description or '') + self.text(doc)

  def choices(self, doc: Mapping[str, Any]) -> list[str]:
    spec = self.doc_to_choice
    if isinstance(spec, list):
      return list(spec)
    if isinstance(spec, dict):
      return list(spec.values())
    if spec in self.features:
      return list(doc[spec])
    return list(ast.literal_eval(self._render(spec, doc)))

  def target(self, doc: Mapping[str, Any]) -> int | str:
    """doc_to_target as lm-eval reads it: an int, a field's value, or a rendered template (an
    int when it renders as digits)."""
    spec = self.doc_to_target
    if isinstance(spec, int):
      return spec
    if spec in self.features:
      value = doc[spec]
    else:
      value = self._render(spec, doc)
      if value.isdigit():
        return int(value)
      if len(value) >= 2 and value[0] == '[' and value[-1] == ']':
        try:
          value = ast.literal_eval(value)
        except (SyntaxError, ValueError):
          pass
    if isinstance(value, list):
      raise ConfigError(FIELD, f'{self.path}: doc_to_target gives a list ({value!r}): several '
                        'gold answers, which this evaluator does not implement')
    return value

  def gold(self, doc: Mapping[str, Any]) -> int:
    """The gold choice's index; -100 (lm-eval's mark, never predicted) if it is not one."""
    choices, target = self.choices(doc), self.target(doc)
    if isinstance(target, bool) or not isinstance(target, (int, str)):
      raise ConfigError(FIELD, f'{self.path}: doc_to_target gives {target!r}; it must give a '
                        'choice index or a choice string')
    if isinstance(target, int):
      return target if target < len(choices) else -100
    return choices.index(target) if target in choices else -100

  def requests(self, doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    """One (context, continuation) text pair per choice, as lm-eval's construct_requests."""
    context = self.context(doc)
    return [(context, f'{self.target_delimiter}{c}') for c in self.choices(doc)]


def _string_or_int(config: Mapping[str, Any], key: str, path: str, allowed: tuple[type, ...]
                   ) -> Any:
  value = config.get(key)
  if isinstance(value, _FunctionTag):
    raise ConfigError(FIELD, f'{path}: {key} is `!function {value.name}`, Python this loader '
                      'does not run; write it as a field name or a Jinja template, or run the '
                      'task through lm_eval with efficientjax.infer.lm_eval_adapter')
  if value is None or isinstance(value, bool) or not isinstance(value, allowed):
    raise ConfigError(FIELD, f'{path}: {key} must be set to '
                      f'{" or ".join(t.__name__ for t in allowed)}, got {value!r}')
  return value


def _load_json_docs(files: Any, split: str, path: str) -> list[dict[str, Any]]:
  """The documents of one split: JSON Lines files, or JSON files holding a list of objects."""
  if isinstance(files, str):
    files = [files]
  if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
    raise ConfigError(FIELD, f'{path}: dataset_kwargs.data_files.{split} must be a path or a '
                      f'list of paths, got {files!r}')
  docs = []
  for file in files:
    full = os.path.expanduser(file)
    if not os.path.isfile(full):
      raise ConfigError(FIELD, f'{path}: data file {file!r} (split {split!r}) does not exist; '
                        f'relative paths resolve from the current directory ({os.getcwd()}), '
                        'as the datasets library resolves them: write an absolute path or run '
                        'from the directory they are relative to')
    with open(full, encoding='utf-8') as f:
      text = f.read()
    try:
      if text.lstrip().startswith('['):
        rows = json.loads(text)
      else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as e:
      raise ConfigError(FIELD, f'{path}: {file} is neither JSON Lines nor a JSON list ({e})'
                        ) from None
    if not all(isinstance(r, dict) for r in rows):
      raise ConfigError(FIELD, f'{path}: {file} must hold JSON objects (one document each)')
    docs.extend(rows)
  if not docs:
    raise ConfigError(FIELD, f'{path}: split {split!r} has no documents')
  return docs


def load_task(task_yaml: str) -> MultipleChoiceTask:
  """Reads an lm-eval multiple-choice task YAML over local JSON data."""
  path = os.path.abspath(os.path.expanduser(task_yaml))
  config = _read_yaml(path)
  name = config.get('task')
  if not isinstance(name, str) or not name:
    raise ConfigError(FIELD, f'{path}: has no `task:` name')
  if config.get('output_type') != 'multiple_choice':
    raise ConfigError(FIELD, f'{path}: output_type is {config.get("output_type")!r}; this '
                      'evaluator scores `output_type: multiple_choice` tasks (run others '
                      'through lm_eval with efficientjax.infer.lm_eval_adapter)')
  for key, what in _REFUSED.items():
    if config.get(key) is not None:
      raise ConfigError(FIELD, f'{path}: sets {key} ({what}), which this evaluator does not '
                        'implement; run the task through lm_eval with '
                        'efficientjax.infer.lm_eval_adapter')
  shots = config.get('num_fewshot') or 0
  if shots != 0:
    raise ConfigError(FIELD, f'{path}: num_fewshot is {shots!r}; this evaluator is zero-shot '
                      'only: set num_fewshot: 0, or run the task through lm_eval with '
                      'efficientjax.infer.lm_eval_adapter')
  if config.get('dataset_path') != 'json':
    raise ConfigError(FIELD, f'{path}: dataset_path is {config.get("dataset_path")!r}; this '
                      'evaluator reads local data only: `dataset_path: json` with '
                      '`dataset_kwargs: {data_files: {test: PATH.jsonl}}`')
  split = config.get('test_split') or config.get('validation_split')
  if not split:
    raise ConfigError(FIELD, f'{path}: names neither test_split nor validation_split')
  data_files = (config.get('dataset_kwargs') or {}).get('data_files')
  if isinstance(data_files, (str, list)):  # the datasets library calls a bare path 'train'
    data_files = {'train': data_files}
  if not isinstance(data_files, dict) or split not in data_files:
    raise ConfigError(FIELD, f'{path}: dataset_kwargs.data_files has no {split!r} split '
                      f'(got {data_files!r}); map the split to a JSON Lines file')
  docs = _load_json_docs(data_files[split], split, path)
  doc_to_choice = config.get('doc_to_choice')
  if not isinstance(doc_to_choice, (list, dict)):
    doc_to_choice = _string_or_int(config, 'doc_to_choice', path, (str,))
  task = MultipleChoiceTask(
      name=name, path=path, split=split, docs=docs,
      doc_to_text=_string_or_int(config, 'doc_to_text', path, (str,)),
      doc_to_choice=doc_to_choice,
      doc_to_target=_string_or_int(config, 'doc_to_target', path, (str, int)),
      target_delimiter=config.get('target_delimiter', ' '),
      description=config.get('description') or '')
  return task


def predictions(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
  """(argmax of the log-likelihoods, argmax of them per character of the choice)."""
  lls = np.asarray(lls, dtype=np.float64)
  lengths = np.array([float(len(c)) for c in choices])
  return int(np.argmax(lls)), int(np.argmax(lls / lengths))


def _stderr(values: Sequence[float]) -> float | None:
  if len(values) < 2:
    return None
  mean = sum(values) / len(values)
  sample_std = math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1))
  return sample_std / math.sqrt(len(values))


def _take(docs: list[dict[str, Any]], limit: int | float | None) -> list[dict[str, Any]]:
  """The first documents, as lm-eval's `limit`: a count, or a fraction below 1.0."""
  if limit is None:
    return docs
  count = int(math.ceil(len(docs) * limit)) if limit < 1.0 else int(limit)
  return docs[:count]


def evaluate(cfg: ModelConfig, params: Mapping[str, Any], tokenizer: Any, task_yaml: str, *,
             limit: int | float | None = None, batch_size: int = 8,
             max_len: int | None = None) -> dict[str, Any]:
  """Zero-shot acc and acc_norm of the model on a multiple-choice task YAML.

  Returns {'task', 'n', 'acc', 'acc_stderr', 'acc_norm', 'acc_norm_stderr', 'lls'}: `lls` the
  per-document lists of choice log-likelihoods, in document order.
  """
  task = load_task(task_yaml)
  docs = _take(task.docs, limit)
  if not docs:
    raise ConfigError(FIELD, f'{task.path}: limit={limit!r} leaves no documents to score')
  requests, owners = [], []
  for d, doc in enumerate(docs):
    for request in task.requests(doc):
      requests.append(request)
      owners.append(d)
  scores = loglikelihood.score_texts(cfg, params, tokenizer, requests, batch_size=batch_size,
                                     max_len=max_len)
  lls: list[list[float]] = [[] for _ in docs]
  for d, (ll, _) in zip(owners, scores):
    lls[d].append(ll)
  acc, acc_norm = [], []
  for doc, doc_lls in zip(docs, lls):
    gold = task.gold(doc)
    pred, pred_norm = predictions(doc_lls, task.choices(doc))
    acc.append(1.0 if pred == gold else 0.0)
    acc_norm.append(1.0 if pred_norm == gold else 0.0)
  n = len(docs)
  return {'task': task.name, 'n': n,
          'acc': sum(acc) / n, 'acc_stderr': _stderr(acc),
          'acc_norm': sum(acc_norm) / n, 'acc_norm_stderr': _stderr(acc_norm),
          'lls': lls}

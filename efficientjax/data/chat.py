"""Chat templates of Hugging Face checkpoints, rendered as transformers renders them.

A chat template is a Jinja program shipped with the checkpoint (chat_template.jinja,
additional_chat_templates/*.jinja, or tokenizer_config.json's `chat_template`; see
`CheckpointTokenizer`). `render_chat` runs it in the environment of transformers'
`apply_chat_template(tokenize=False)`, so the text is the one the model was tuned on:
- a sandbox whose inputs the template cannot change (Jinja's ImmutableSandboxedEnvironment):
  templates come from the Hub and are untrusted code;
- `trim_blocks` and `lstrip_blocks` on, and `{% break %}` / `{% continue %}` (loopcontrols);
- `raise_exception(message)`, which raises jinja2.TemplateError, and `strftime_now(format)`, the
  local time (Llama 3.2 writes today's date with it);
- a `tojson` filter that is plain `json.dumps`: no HTML escaping, non-ASCII kept
  (ensure_ascii=False), with its indent, separators and sort_keys arguments;
- `dict` and `namespace` globals that refuse names starting with an underscore;
- `{% generation %}...{% endgeneration %}` (transformers marks assistant text with it),
  rendered as its body;
- the variables `messages`, `tools`, `documents`, `add_generation_prompt`, every special token
  of the tokenizer (bos_token, eos_token, ..., model-specific ones such as image_token), then the
  caller's keyword arguments, which win (e.g. `date_string`, `enable_thinking`).
Messages are passed as transformers passes them: keys whose value is None dropped, and a
reasoning field (reasoning_content / thinking / reasoning) copied under the other two names.

`encode_chat` gives the ids: the rendered text encoded without the tokenizer's own additions
(add_special_tokens=False, as transformers does), so a template that writes `{{ bos_token }}`
gets one BOS, not two. tests/data/test_chat.py checks text and ids against transformers.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np

from efficientjax.data.tokenizers import CheckpointTokenizer
from efficientjax.data.tokenizers import get_tokenizer
from efficientjax.errors import ConfigError

# transformers copies a message's reasoning under each of these names; templates read one.
_REASONING_FIELDS = ('reasoning_content', 'thinking', 'reasoning')


def render_chat(tokenizer_or_dir: CheckpointTokenizer | str | os.PathLike,
                messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                tools: Sequence[Mapping[str, Any]] | None = None,
                documents: Sequence[Mapping[str, Any]] | None = None,
                chat_template: str | None = None, **kwargs: Any) -> str:
  """The text of `messages` under the checkpoint's chat template.

  `tokenizer_or_dir` is a `CheckpointTokenizer` or its directory. `chat_template` picks one of
  several named templates (default: 'tool_use' when `tools` are given and there is one, else
  'default'), or is a template's source itself. `tools` are JSON schemas, as in transformers'
  apply_chat_template. A template's raise_exception raises jinja2.TemplateError.
  """
  # apply_chat_template's own options, not template variables: refused rather than passed to
  # the template, where they would change nothing and the output would silently differ.
  unsupported = sorted(set(kwargs) & _APPLY_OPTIONS)
  if unsupported:
    raise TypeError(f'render_chat does not implement apply_chat_template\'s '
                    f'{", ".join(unsupported)}; render the conversation without it (ids: '
                    'encode_chat)')
  tokenizer = _checkpoint(tokenizer_or_dir)
  template = _compile(_select(tokenizer, chat_template, tools))
  if not messages:
    raise ValueError('cannot render an empty conversation: give at least one message')
  if tools is not None:
    for tool in tools:
      if not isinstance(tool, Mapping):
        raise TypeError(f'tools are JSON schemas (dicts), got {type(tool).__name__}; '
                        'transformers.utils.get_json_schema(fn) makes one from a function')
  if documents is not None and not all(isinstance(d, Mapping) for d in documents):
    raise TypeError("documents are dicts with 'title' and 'text' keys")
  variables = {**tokenizer.special_tokens, **_plain(kwargs)}
  return template.render(messages=_messages(messages), tools=_plain(tools),
                         documents=_plain(documents),
                         add_generation_prompt=add_generation_prompt, **variables)


# transformers' apply_chat_template options that are not template variables.
_APPLY_OPTIONS = frozenset({
    'continue_final_message', 'tokenize', 'padding', 'truncation', 'max_length',
    'return_tensors', 'return_dict', 'return_assistant_tokens_mask', 'tokenizer_kwargs'})


def encode_chat(tokenizer_or_dir: CheckpointTokenizer | str | os.PathLike,
                messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                tools: Sequence[Mapping[str, Any]] | None = None,
                documents: Sequence[Mapping[str, Any]] | None = None,
                chat_template: str | None = None, **kwargs: Any) -> np.ndarray:
  """The int32 token ids of `render_chat(...)`, with the special tokens the template wrote and
  nothing added by the tokenizer (no second BOS)."""
  tokenizer = _checkpoint(tokenizer_or_dir)
  text = render_chat(tokenizer, messages, add_generation_prompt, tools, documents,
                     chat_template, **kwargs)
  return tokenizer.encode(text)  # add_special_tokens=False, as apply_chat_template's


def _checkpoint(tokenizer_or_dir: Any) -> CheckpointTokenizer:
  tokenizer = tokenizer_or_dir
  if isinstance(tokenizer_or_dir, (str, os.PathLike)):
    tokenizer = get_tokenizer(os.fspath(tokenizer_or_dir))
  if not isinstance(tokenizer, CheckpointTokenizer):
    raise ConfigError(
        'data.tokenizer',
        f'{tokenizer!r} has no chat template: chat templates come with a Hugging Face checkpoint '
        'directory (tokenizer.json + tokenizer_config.json); pass that directory')
  return tokenizer


def _select(tokenizer: CheckpointTokenizer, name: str | None,
            tools: Sequence[Any] | None) -> str:
  """The template source, chosen as transformers' `get_chat_template` chooses it."""
  templates = tokenizer.chat_template
  if isinstance(templates, dict):
    if name is not None and name in templates:
      return templates[name]
    if name is None:
      if tools is not None and 'tool_use' in templates:
        return templates['tool_use']
      if 'default' in templates:
        return templates['default']
      raise ConfigError(
          'data.tokenizer',
          f'{tokenizer.directory!r} has several chat templates and none is named "default"; '
          f'pick one with chat_template= (one of: {", ".join(sorted(templates))})')
  elif name is None:
    if templates is None:
      raise ConfigError(
          'data.tokenizer',
          f'{tokenizer.directory!r} has no chat template (no chat_template.jinja, no '
          'chat_template in tokenizer_config.json): use an instruction-tuned checkpoint\'s '
          'directory, or pass the template source as chat_template=')
    return templates
  # transformers takes any other string as a template's source. A bare word is far more
  # likely a misspelt name than a template that prints itself, so that is refused.
  if '{' not in name:
    names = sorted(templates) if isinstance(templates, dict) else []
    raise ValueError(f'no chat template named {name!r} in {tokenizer.directory!r} (it has: '
                     f'{", ".join(names) or "one unnamed template"}); pass a name it has, or '
                     'a template source')
  return name


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
  # Jinja's own tojson escapes <, >, & and ' for HTML; a prompt wants the JSON as written.
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # pylint: disable=redefined-builtin
  return datetime.datetime.now().strftime(format)


def _check_name(name: Any) -> None:
  if isinstance(name, str) and name.startswith('_'):
    raise jinja2.exceptions.SecurityError(
        f'a chat template may not store {name!r} on a namespace: names starting with an '
        'underscore could reach Python internals')


class _Namespace(jinja2.utils.Namespace):
  """Jinja's namespace(), refusing underscore-prefixed attributes."""

  def __init__(*args: Any, **kwargs: Any):  # pylint: disable=no-method-argument
    # Jinja's own signature trick: `self` travels in args, so namespace(self=...) still works.
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _check_name(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name: str, value: Any) -> None:
    _check_name(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)


class _Dict:
  """dict() and dict.fromkeys() for templates, without the type object itself (whose
  attributes lead towards Python internals)."""

  def __call__(self, *args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)

  def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
    return dict.fromkeys(*args, **kwargs)


class _Generation(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`: rendered as its body (transformers uses the tag
  to find the assistant's tokens for a loss mask, which rendering does not need)."""

  tags = {'generation'}

  def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
    # A call block, as in transformers: the body gets its own scope, so a {% set %} inside
    # does not leak out.
    return jinja2.nodes.CallBlock(self.call_method('_body'), [], [], body).set_lineno(lineno)

  def _body(self, caller: Any) -> str:
    return caller()


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters['tojson'] = _tojson
  env.globals['raise_exception'] = _raise_exception
  env.globals['strftime_now'] = _strftime_now
  env.globals['dict'] = _Dict()
  env.globals['namespace'] = _Namespace
  return env.from_string(source)


def _plain(value: Any) -> Any:
  """`value` rebuilt from plain JSON-like types, so a template sees no object with methods of
  its own (numpy scalars become Python numbers; anything else unknown a '<TypeName>' string,
  as transformers does)."""
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, str):  # subclasses (enums) lose their extra methods
    return str.__str__(value)
  if isinstance(value, int):
    return int.__int__(value)
  if isinstance(value, float):
    return float.__float__(value)
  if isinstance(value, Mapping):
    return {_plain(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_plain(v) for v in value]
  if isinstance(value, tuple):
    return tuple(_plain(v) for v in value)
  if isinstance(value, np.generic):
    return _plain(value.item())
  return f'<{type(value).__name__}>'


def _messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  out = []
  for message in messages:
    if not isinstance(message, Mapping):
      raise TypeError(f'a chat message is a dict with "role" and "content", got {message!r}')
    # Many templates print a None content as "None" but handle a missing key.
    message = {k: _plain(v) for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
    if reasoning is not None:
      message = {'thinking': reasoning, **message, 'reasoning_content': reasoning}
    out.append(message)
  return out

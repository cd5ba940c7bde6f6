"""Instruction-tuning data: prompt/answer examples, their loss masks, packed rows and batches.

Corpora of examples (`data.corpus` of a fine-tuning run):

    jsonl:PATH        one JSON object per line (PATH may be a glob of .jsonl files), each either
                      Alpaca ({"instruction", "input" (optional), "output"}) or chat
                      ({"messages": [{"role": system|user|assistant, "content"}, ...]}),
                      told apart line by line. Each line is its own document, named
                      `FILE:LINE` (FILE relative to the glob's fixed prefix, LINE from 1).
    functions         the offline default: the running Python's standard-library sources
    functions:GLOB    local .py files. Each top-level function, and each method of a top-level
                      class, that has a docstring and at least MIN_BODY_STATEMENTS statements
                      after it becomes one example: the prompt is FUNCTION_INSTRUCTION and the
                      source from the `def` line (decorators dropped) to the end of the
                      docstring; the answer is the source of the rest of the body. Both lose
                      the def's own indentation, so prompt + "\\n" + answer is the function as
                      top-level source. The document is the .py FILE: a file's functions are
                      all train or all held-out. Files that do not parse are skipped.

The held-out split is pipeline's: `is_held_out(document, eval_fraction)`, a hash of the
document's name. `max_documents` keeps the first documents that hold examples (the first jsonl
lines; the first files, in sorted order, with at least one function).

An example becomes token ids and an answer mask (`encode_example`):
- with a checkpoint tokenizer that has a chat template, the conversation (Alpaca: the user says
  instruction + "\\n\\n" + input, the assistant answers output) is rendered with the template
  (efficientjax.data.chat) and tokenized as one text. Each assistant turn is found by rendering
  prefixes: render(messages[:i], add_generation_prompt=True) must begin
  render(messages[:i+1]), which must begin the whole conversation's text; the turn is what lies
  between the two. Its tokens are answer tokens up to and including the last generation stop
  token (`eos_ids`: <|im_end|>, <|eot_id|>, </s> ...) inside it, so the model learns the turn's
  content and to stop, and not the template's assistant header before it nor the newline some
  templates write after the stop token. A token is in the mask when it overlaps those
  characters, as transformers' `apply_chat_template(return_assistant_tokens_mask=True)` decides
  for the `{% generation %}` span of a template that marks exactly that (TRL's Llama 3 and
  Mistral training templates do; its Qwen2.5 one also marks the "\\n" before and after).
- without one (the byte tokenizer, a bare tokenizer.json, or template='plain'): Alpaca's prompt
  (ALPACA_PROMPT / ALPACA_PROMPT_WITH_INPUT); chat as "System: ...", "User: ...",
  "Assistant: ..." lines joined by "\\n". After every answer (Alpaca's output, each assistant
  turn) comes the tokenizer's eos; answer and eos are the mask, prompt text is not. Prompt and
  answer pieces are encoded separately, so the prompt's tokens are those of the prompt alone,
  as at inference. A tokenizer that starts texts with BOS gets one in front.

`pack_examples` packs encoded examples greedily, in order, into rows of seq_len + 1 tokens with
segment ids, restarted positions and the loss mask; `build_instruction_data` makes the same
`Data` as pipeline.build_data, whose batches are dicts of those four arrays.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import warnings
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import numpy as np

from efficientjax.data import corpora
from efficientjax.data import pipeline
from efficientjax.data.chat import render_chat
from efficientjax.data.corpora import Document
from efficientjax.data.pipeline import BATCH_FIELD
from efficientjax.data.pipeline import Data
from efficientjax.data.pipeline import is_held_out
from efficientjax.data.pipeline import TrainStream
from efficientjax.data.tokenizers import CheckpointTokenizer
from efficientjax.data.tokenizers import Tokenizer
from efficientjax.errors import ConfigError

VALID_FORMS = "'jsonl:PATH' (a file or a glob of .jsonl files), 'functions' or 'functions:GLOB'"

ROLES = ('system', 'user', 'assistant')
PLAIN = 'plain'

# Stanford Alpaca's prompts, the common plain format for instruction tuning.
ALPACA_PROMPT = (
    'Below is an instruction that describes a task. Write a response that appropriately '
    'completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n')
ALPACA_PROMPT_WITH_INPUT = (
    'Below is an instruction that describes a task, paired with an input that provides further '
    'context. Write a response that appropriately completes the request.\n\n'
    '### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n')
PLAIN_ROLE_NAMES = {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}

FUNCTION_INSTRUCTION = 'Complete the body of this Python function.'
# Statements after the docstring (nested ones count): fewer is mostly `return self._x` or
# `pass`, too little to learn from.
MIN_BODY_STATEMENTS = 3

_EXAMPLE_ORDER_TAG = zlib.crc32(b'efficientjax/data/instruction-order')

_EXPECTED_LINE = (
    'expected one JSON object per line, either Alpaca {"instruction": str, "input": str '
    '(optional), "output": str} or chat {"messages": [{"role": "system"|"user"|"assistant", '
    '"content": str}, ...]} with at least one assistant message, not first')


@dataclasses.dataclass(frozen=True)
class Example:
  """One prompt/answer example. `name` is unique and stable; `document` is its unit of the
  held-out split. Alpaca examples have `instruction`/`input`/`output`; chat examples have
  `messages` ({'role', 'content'} dicts) and `instruction` None."""

  name: str
  document: str
  instruction: str | None = None
  input: str = ''
  output: str = ''
  messages: tuple[Mapping[str, str], ...] | None = None

  def as_messages(self) -> list[dict[str, str]]:
    """The example as a conversation: Alpaca's user turn is instruction + "\\n\\n" + input."""
    if self.messages is not None:
      return [dict(m) for m in self.messages]
    user = self.instruction + ('\n\n' + self.input if self.input else '')
    return [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': self.output}]


# -------------------------------------------------------------------------------- corpora


def parse_spec(spec: str) -> tuple[str, str]:
  """(kind, argument) of an instruction corpus spec: ('jsonl', PATH) or ('functions', GLOB)."""
  if not isinstance(spec, str):
    raise ConfigError('data.corpus', f'must be a string, got {spec!r}; use one of {VALID_FORMS}')
  prefix, _, arg = spec.partition(':')
  if prefix == 'jsonl':
    if not arg:
      raise ConfigError('data.corpus', "'jsonl:' needs a path or glob, e.g. "
                        "'jsonl:data/alpaca.jsonl' or 'jsonl:data/*.jsonl'")
    return prefix, arg
  if prefix == 'functions':
    return prefix, arg
  hint = ''
  if prefix in corpora.CORPORA:
    hint = (f' ({spec!r} is a pretraining corpus of plain documents; fine-tuning needs '
            'prompt/answer examples)')
  raise ConfigError('data.corpus', f'unknown instruction corpus {spec!r}{hint}; use one of '
                    f'{VALID_FORMS}')


def load_examples(spec: str, *, max_documents: int | None = None) -> list[Example]:
  """The examples of the instruction corpus `spec`, in its fixed order, from at most
  `max_documents` documents."""
  kind, arg = parse_spec(spec)
  take = corpora._take(max_documents)  # pylint: disable=protected-access
  if kind == 'jsonl':
    return _jsonl_examples(spec, arg, take)
  files = corpora.load_stdlib('') if not arg else corpora.load_text(arg)
  examples, documents = [], 0
  for doc in files:
    if take is not None and documents >= take:
      break
    found = function_examples(doc)
    examples.extend(found)
    documents += bool(found)
  if not examples:
    where = 'the standard library' if not arg else repr(arg)
    raise ConfigError(
        'data.corpus',
        f'{spec!r}: no function in {where} has a docstring and at least {MIN_BODY_STATEMENTS} '
        'statements after it (or no file parses as Python); point the glob at Python sources, '
        "or use 'jsonl:PATH'")
  return examples


def _jsonl_examples(spec: str, pattern: str, take: int | None) -> list[Example]:
  examples = []
  for doc in corpora.load_text(pattern):
    # Split at \n alone: str.splitlines also splits at U+2028 and others, which JSON strings
    # may hold raw.
    for number, line in enumerate(doc.text.split('\n'), start=1):
      if take is not None and len(examples) >= take:
        return examples
      if not line.strip():
        continue  # A blank line (a trailing one, most often) is no example.
      name = f'{doc.name}:{number}'
      try:
        record = json.loads(line)
      except ValueError as e:
        raise _bad_line(spec, name, f'is not valid JSON ({e})') from e
      examples.append(_parse_record(spec, name, record))
  return examples


def _bad_line(spec: str, name: str, problem: str) -> ConfigError:
  return ConfigError('data.corpus', f'{spec!r}: line {name} {problem}; {_EXPECTED_LINE}')


def _parse_record(spec: str, name: str, record: Any) -> Example:
  if not isinstance(record, dict):
    raise _bad_line(spec, name, f'is a JSON {type(record).__name__}, not an object')
  if 'messages' in record:
    if 'instruction' in record:
      raise _bad_line(spec, name, 'has both "messages" (chat) and "instruction" (Alpaca)')
    messages = record['messages']
    if not isinstance(messages, list) or not messages:
      raise _bad_line(spec, name, 'has "messages" that is not a non-empty list')
    kept = []
    for i, m in enumerate(messages):
      if not isinstance(m, dict) or m.get('role') not in ROLES or not isinstance(
          m.get('content'), str):
        raise _bad_line(spec, name, f'has messages[{i}]={m!r}, not a {{"role": one of '
                        f'{"/".join(ROLES)}, "content": str}} object')
      kept.append({'role': m['role'], 'content': m['content']})
    roles = [m['role'] for m in kept]
    if 'assistant' not in roles:
      raise _bad_line(spec, name, 'has no assistant message: there is no answer to learn')
    if roles[0] == 'assistant':
      raise _bad_line(spec, name, 'starts with an assistant message: a conversation starts '
                      'with a system or user message')
    return Example(name=name, document=name, messages=tuple(kept))
  if 'instruction' in record:
    instruction, output = record['instruction'], record.get('output')
    given = record.get('input')
    given = '' if given is None else given
    if not all(isinstance(v, str) for v in (instruction, output, given)):
      raise _bad_line(spec, name, 'is Alpaca-like but "instruction" and "output" (and "input", '
                      'when given) are not all strings')
    return Example(name=name, document=name, instruction=instruction, input=given,
                   output=output)
  raise _bad_line(spec, name, f'has neither "messages" nor "instruction" (its keys: '
                  f'{sorted(record)})')


def function_examples(doc: Document) -> list[Example]:
  """The function examples of one Python source file (see the module docstring), in source
  order; none when it does not parse."""
  # ast numbers lines split at \n, \r\n and \r; splitting the same way keeps them aligned.
  text = doc.text.replace('\r\n', '\n').replace('\r', '\n')
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # SyntaxWarnings of old escape sequences, not ours
      tree = ast.parse(text)
  except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
    return []
  lines = text.split('\n')
  examples = []
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      candidates = [(node.name, node)]
    elif isinstance(node, ast.ClassDef):
      candidates = [(f'{node.name}.{n.name}', n) for n in node.body
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    else:
      continue
    for qualname, function in candidates:
      pair = _prompt_and_body(function, lines)
      if pair is not None:
        examples.append(Example(
            name=f'{doc.name}:{function.lineno}:{qualname}', document=doc.name,
            instruction=FUNCTION_INSTRUCTION, input=pair[0], output=pair[1]))
  return examples


def _prompt_and_body(function: ast.FunctionDef | ast.AsyncFunctionDef,
                     lines: list[str]) -> tuple[str, str] | None:
  """(signature + docstring, body after it), both without the def's own indentation; None
  when the function has no docstring or too short a body."""
  body = function.body
  if ast.get_docstring(function, clean=False) is None or len(body) < 2:
    return None
  statements = sum(isinstance(n, ast.stmt) for s in body[1:] for n in ast.walk(s))
  if statements < MIN_BODY_STATEMENTS:
    return None
  docstring_end = body[0].end_lineno
  # The docstring must end its line and follow the def's line: the line-based cut below
  # would otherwise split a statement.
  if body[1].lineno <= docstring_end:
    return None
  indent = function.col_offset  # the def line's leading whitespace: ASCII, so bytes == chars

  def dedent(line: str) -> str:
    # Lines inside a string literal may be less indented than the def: strip what is there.
    cut = len(line[:indent]) - len(line[:indent].lstrip())
    return line[cut:]

  prompt = [dedent(line) for line in lines[function.lineno - 1:docstring_end]]
  answer = [dedent(line) for line in lines[docstring_end:function.end_lineno]]
  while answer and not answer[0].strip():
    answer.pop(0)
  return '\n'.join(prompt), '\n'.join(answer)


# ----------------------------------------------------------------------- rendering, masks


def _uses_chat_template(tokenizer: Tokenizer, template: str | None) -> bool:
  if template == PLAIN:
    return False
  if template is not None:
    return True  # a named template or a template's source: render_chat checks the tokenizer
  return isinstance(tokenizer, CheckpointTokenizer) and tokenizer.chat_template is not None


def describe_template(tokenizer: Tokenizer, template: str | None = None) -> str:
  """'plain', or 'chat:' + a digest of the chat template(s) and the choice among them: what
  the data fingerprint records of how examples were rendered."""
  if not _uses_chat_template(tokenizer, template):
    return PLAIN
  source = json.dumps([getattr(tokenizer, 'chat_template', None), template], sort_keys=True)
  return 'chat:' + hashlib.sha1(source.encode('utf-8')).hexdigest()[:12]


def encode_example(example: Example, tokenizer: Tokenizer,
                   template: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(token ids int32, answer mask bool) of `example`, of the same length.

  `template`: None renders with the tokenizer's chat template where it has one and with the
  plain template otherwise; 'plain' always uses the plain template; any other string picks one
  of the checkpoint's named chat templates, or is a template's source (as render_chat's
  `chat_template`).
  """
  if _uses_chat_template(tokenizer, template):
    return _encode_chat(example.as_messages(), tokenizer, template)
  return _encode_plain(example, tokenizer)


def _encode_plain(example: Example, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  # (text, is_answer) pieces; an answer piece is followed by eos.
  pieces = []
  if example.messages is None:
    prompt = ALPACA_PROMPT_WITH_INPUT if example.input else ALPACA_PROMPT
    pieces = [(prompt.format(instruction=example.instruction, input=example.input), False),
              (example.output, True)]
  else:
    for i, message in enumerate(example.messages):
      head = ('\n' if i else '') + PLAIN_ROLE_NAMES[message['role']] + ': '
      if message['role'] == 'assistant':
        pieces += [(head, False), (message['content'], True)]
      else:
        pieces.append((head + message['content'], False))
  bos = getattr(tokenizer, 'bos_id', None)
  ids: list[np.ndarray] = []
  mask: list[np.ndarray] = []
  if getattr(tokenizer, 'add_bos', False) and bos is not None:
    ids.append(np.asarray([bos], np.int32))
    mask.append(np.zeros(1, bool))
  prompt = ''
  for text, is_answer in pieces:
    if not is_answer:
      prompt += text  # consecutive prompt pieces are encoded as one text
      continue
    if prompt:
      ids.append(tokenizer.encode(prompt).astype(np.int32))
      mask.append(np.zeros(ids[-1].size, bool))
      prompt = ''
    answer = np.append(tokenizer.encode(text), tokenizer.eos_id).astype(np.int32)
    ids.append(answer)
    mask.append(np.ones(answer.size, bool))
  if prompt:
    ids.append(tokenizer.encode(prompt).astype(np.int32))
    mask.append(np.zeros(ids[-1].size, bool))
  return np.concatenate(ids), np.concatenate(mask)


def _encode_chat(messages: list[dict[str, str]], tokenizer: Any,
                 template: str | None) -> tuple[np.ndarray, np.ndarray]:
  text = render_chat(tokenizer, messages, chat_template=template)
  spans = []
  for i, message in enumerate(messages):
    if message['role'] != 'assistant':
      continue
    before = render_chat(tokenizer, messages[:i], add_generation_prompt=True,
                         chat_template=template)
    through = render_chat(tokenizer, messages[:i + 1], chat_template=template)
    if not (through.startswith(before) and text.startswith(through)) or through == before:
      raise ConfigError(
          'data.tokenizer',
          f'the chat template of {tokenizer.name!r} does not render this conversation by '
          f'appending turns: the first {i} messages with the generation prompt are not a '
          f'prefix of the first {i + 1}, or those are not a prefix of the whole conversation, '
          f'so the tokens of assistant turn {i} cannot be found. Some templates rewrite '
          'earlier turns (e.g. drop their reasoning): use a training variant of the template '
          "that leaves earlier turns as they were, or the plain template (template='plain')")
    spans.append((len(before), len(through)))
  # The whole text tokenized once, as apply_chat_template does, with each token's characters.
  # pylint: disable-next=protected-access
  encoding = tokenizer._tok.encode(text, add_special_tokens=False)
  ids = np.asarray(encoding.ids, np.int32)
  offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
  stops = np.isin(ids, np.asarray(list(tokenizer.eos_ids) + [tokenizer.eos_id], np.int32))
  mask = np.zeros(ids.size, bool)
  for start, end in spans:
    inside = (offsets[:, 1] > start) & (offsets[:, 0] < end)
    stop = np.flatnonzero(inside & stops)
    if stop.size:
      end = int(offsets[stop[-1], 1])
    else:
      # No stop token in the turn: its text without trailing whitespace.
      end = start + len(text[start:end].rstrip())
    mask |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
  return ids, mask


# ------------------------------------------------------------------------------- packing


@dataclasses.dataclass
class PackedExamples:
  """Rows of seq_len + 1 tokens, each holding whole examples one after the other.

  `tokens`, `segment_ids` (1, 2, ... per example in a row; 0 on the padding at the end),
  `positions` (from 0 in each example; 0 on padding) and `loss_mask` (1 on answer tokens that
  are not the first of their example: target t is predicted from token t-1 of the same
  example) are int32 [rows, seq_len + 1]. `placement[i]` is where input example i went, as
  (row, first column, length), or None when it was dropped; `truncated` and `dropped` count
  the examples cut to seq_len + 1 tokens and those left with no answer token to score.
  """

  tokens: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  loss_mask: np.ndarray
  placement: list[tuple[int, int, int] | None]
  truncated: int
  dropped: int

  def as_dict(self) -> dict[str, np.ndarray]:
    return {'tokens': self.tokens, 'segment_ids': self.segment_ids,
            'positions': self.positions, 'loss_mask': self.loss_mask}


def pack_examples(encoded: Sequence[tuple[np.ndarray, np.ndarray]],
                  seq_len: int) -> PackedExamples:
  """Packs (ids, answer mask) pairs, in order, into rows of seq_len + 1 tokens.

  Next fit: an example goes at the end of the current row when it fits, else it starts a new
  row; an example is never split across rows. One longer than seq_len + 1 tokens keeps its
  first seq_len + 1 (counted in `truncated`); one with no answer token after its first
  (nothing to score, e.g. after truncation) is left out (counted in `dropped`).
  """
  width = seq_len + 1
  placement: list[tuple[int, int, int] | None] = []
  kept = []
  truncated = dropped = 0
  row, fill = -1, width
  for ids, mask in encoded:
    ids, mask = np.asarray(ids).reshape(-1), np.asarray(mask, bool).reshape(-1)
    if ids.shape != mask.shape:
      raise ValueError(f'an example has {ids.size} ids but {mask.size} mask entries')
    if ids.size > width:
      ids, mask = ids[:width], mask[:width]
      truncated += 1
    if not mask[1:].any():
      dropped += 1
      placement.append(None)
      continue
    if fill + ids.size > width:
      row, fill = row + 1, 0
    placement.append((row, fill, ids.size))
    kept.append((ids, mask))
    fill += ids.size
  shape = (row + 1, width)
  tokens, segment_ids, positions, loss_mask = (np.zeros(shape, np.int32) for _ in range(4))
  segment = 0
  for (ids, mask), (r, start, n) in zip(kept, [p for p in placement if p is not None]):
    segment = 1 if start == 0 else segment + 1
    tokens[r, start:start + n] = ids
    segment_ids[r, start:start + n] = segment
    positions[r, start:start + n] = np.arange(n)
    loss_mask[r, start + 1:start + n] = mask[1:]
  return PackedExamples(tokens, segment_ids, positions, loss_mask, placement, truncated,
                        dropped)


class _Rows:
  """Packed rows, stored narrow, handed out as int32 dicts: what _ShuffledEpochs gathers."""

  def __init__(self, packed: PackedExamples, vocab_size: int, seq_len: int):
    narrow = np.uint16 if seq_len + 1 <= 2**16 else np.int32
    self.arrays = {
        'tokens': packed.tokens.astype(np.uint16 if vocab_size <= 2**16 else np.int32),
        'segment_ids': packed.segment_ids.astype(narrow),
        'positions': packed.positions.astype(narrow),
        'loss_mask': packed.loss_mask.astype(np.uint8),
    }
    self.num_windows = packed.tokens.shape[0]

  def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, dtype=np.int64)
    return {k: v[indices].astype(np.int32) for k, v in self.arrays.items()}


# ------------------------------------------------------------------------------- batches


def _encode_all(examples: Sequence[Example], tokenizer: Tokenizer,
                template: str | None) -> list[tuple[np.ndarray, np.ndarray]]:
  encoded = []
  for example in examples:
    try:
      encoded.append(encode_example(example, tokenizer, template))
    except jinja2.TemplateError as e:  # the template's raise_exception: the data's to fix
      raise ConfigError(
          'data.corpus',
          f'{example.name}: the chat template of {tokenizer.name!r} refuses this conversation '
          f'({e}); fix or drop the example, or use the plain template') from e
    except ConfigError as e:  # which example, for errors that could not know it
      raise ConfigError(e.field, f'{example.name}: {e.message}', e.fix) from e
  return encoded


def _too_few_rows(split: str, examples: int, tokens: int, rows: int, seq_len: int,
                  global_batch_size: int, fix: str) -> str:
  return (f'the {split} split has {examples} examples ({tokens} tokens) packed into {rows} rows '
          f'of seq_len+1={seq_len + 1}, fewer than one global batch of {global_batch_size}; '
          f'{fix}')


def build_instruction_data(*, corpus: str, tokenizer: Tokenizer, seq_len: int,
                           global_batch_size: int, seed: int, eval_fraction: float,
                           eval_batches: int, process_index: int = 0, process_count: int = 1,
                           max_documents: int | None = None,
                           template: str | None = None) -> Data:
  """Loads, splits, encodes and packs the instruction corpus `corpus` into a train stream and
  held-out batches, as pipeline.build_data does for pretraining.

  Every batch is a dict of int32 [global_batch_size // process_count, seq_len + 1] arrays
  'tokens', 'segment_ids', 'positions' and 'loss_mask' (see PackedExamples); a training step
  takes inputs tokens[:, :-1], targets tokens[:, 1:] weighted by loss_mask[:, 1:], with
  segment_ids[:, :-1] and positions[:, :-1]. The train examples are shuffled once from the
  seed and packed; each epoch visits the rows in an order drawn from (seed, epoch), dropping
  the last incomplete batch. Held-out rows are packed in corpus order and do not depend on the
  seed. `template` as encode_example's. `Data.train_tokens` / `eval_tokens` are the packed
  token rows [rows, seq_len + 1] (train in its shuffled order).

  A chat template that writes today's date (Llama 3.x's `strftime_now`) makes the tokens
  depend on the day: where that changes an example's token count, the fingerprint refuses to
  resume from a state saved on another day (data.corpus).
  """
  pipeline.check_arguments(seq_len, global_batch_size, eval_batches, seed, eval_fraction,
                           process_index, process_count)
  seq_len, global_batch_size, seed = int(seq_len), int(global_batch_size), int(seed)
  local = global_batch_size // process_count
  local_rows = (process_index * local, (process_index + 1) * local)

  examples = load_examples(corpus, max_documents=max_documents)
  documents = list(dict.fromkeys(e.document for e in examples))
  if len(documents) < 2:
    raise ConfigError(
        'data.corpus',
        f'{corpus!r} gave {len(documents)} document(s), but the held-out split is made of '
        'whole documents and needs at least 2; use a corpus with more examples or files'
        + (' or raise data.max_documents' if max_documents is not None else ''))
  held_out = {d for d in documents if is_held_out(d, eval_fraction)}
  if not held_out:
    raise ConfigError(
        'data.eval_fraction',
        f'none of the {len(documents)} documents fell into the held-out split at '
        f'eval_fraction={eval_fraction}; raise data.eval_fraction or use more documents')
  if len(held_out) == len(documents):
    raise ConfigError(
        'data.eval_fraction',
        f'all {len(documents)} documents fell into the held-out split at '
        f'eval_fraction={eval_fraction}; lower data.eval_fraction or use more documents')
  train_examples = [e for e in examples if e.document not in held_out]
  eval_examples = [e for e in examples if e.document in held_out]
  order = np.random.default_rng([seed, _EXAMPLE_ORDER_TAG]).permutation(len(train_examples))
  train_examples = [train_examples[i] for i in order]

  train_encoded = _encode_all(train_examples, tokenizer, template)
  eval_encoded = _encode_all(eval_examples, tokenizer, template)
  train_packed = pack_examples(train_encoded, seq_len)
  eval_packed = pack_examples(eval_encoded, seq_len)
  train_rows = _Rows(train_packed, tokenizer.vocab_size, seq_len)
  eval_rows = _Rows(eval_packed, tokenizer.vocab_size, seq_len)

  def count(packed: PackedExamples) -> tuple[int, int, int]:
    examples = sum(p is not None for p in packed.placement)
    return examples, int((packed.segment_ids > 0).sum()), int(packed.loss_mask.sum())

  (train_n, train_tokens, train_answer), (eval_n, eval_tokens, eval_answer) = (
      count(train_packed), count(eval_packed))
  if eval_rows.num_windows < global_batch_size:
    raise ConfigError('data.eval_fraction', _too_few_rows(
        'held-out', eval_n, eval_tokens, eval_rows.num_windows, seq_len, global_batch_size,
        'lower train.global_batch_size or data.seq_len, or raise data.eval_fraction'))
  if train_rows.num_windows < global_batch_size:
    raise ConfigError(BATCH_FIELD, _too_few_rows(
        'train', train_n, train_tokens, train_rows.num_windows, seq_len, global_batch_size,
        'lower train.global_batch_size or data.seq_len, or use a larger corpus'
        + (' (raise data.max_documents)' if max_documents is not None else '')))

  fingerprint = {
      'kind': 'instructions', 'tokenizer': tokenizer.name,
      'vocab_size': int(tokenizer.vocab_size), 'seq_len': seq_len,
      'global_batch_size': global_batch_size, 'seed': seed,
      # Which examples, with how many tokens, in which order: a changed corpus, tokenizer or
      # template changes it.
      'corpus': pipeline._fingerprint(  # pylint: disable=protected-access
          [e for e, p in zip(train_examples, train_packed.placement) if p is not None],
          [p[2] for p in train_packed.placement if p is not None]),
      'num_rows': train_rows.num_windows,
      'template': describe_template(tokenizer, template),
  }
  source = pipeline._ShuffledEpochs(  # pylint: disable=protected-access
      train_rows, global_batch_size, seed, fingerprint)
  num_eval_batches = min(eval_batches, eval_rows.num_windows // global_batch_size)

  def held_out_rows(b: int, lo: int, hi: int) -> dict[str, np.ndarray]:
    first = b * global_batch_size
    return eval_rows.gather(np.arange(first + lo, first + hi))

  stats = {
      'synthetic': False,
      'template': fingerprint['template'],
      'train_documents': len(documents) - len(held_out), 'eval_documents': len(held_out),
      'train_examples': train_n, 'eval_examples': eval_n,
      'train_tokens': train_tokens, 'eval_tokens': eval_tokens,
      'train_answer_tokens': train_answer, 'eval_answer_tokens': eval_answer,
      'train_sequences': train_rows.num_windows, 'eval_sequences': eval_rows.num_windows,
      'train_truncated': train_packed.truncated, 'eval_truncated': eval_packed.truncated,
      'train_dropped': train_packed.dropped, 'eval_dropped': eval_packed.dropped,
      'eval_batches': num_eval_batches,
  }
  train = TrainStream(source, global_batch_size=global_batch_size,
                      process_index=process_index, process_count=process_count)
  return Data(train=train, synthetic=False, stats=stats, tokenizer=tokenizer,
              train_tokens=train_rows.arrays['tokens'], eval_tokens=eval_rows.arrays['tokens'],
              _eval_rows=held_out_rows, _num_eval_batches=num_eval_batches,
              _local_rows=local_rows)

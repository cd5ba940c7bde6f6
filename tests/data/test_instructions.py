"""Tests for efficientjax.data.instructions: example corpora, answer masks, packing, batches.

Masks are checked by content: the masked tokens of an example must be exactly its answers'
tokens and end-of-turn tokens, written out by hand here for the plain template and the byte
tokenizer, and, for checkpoints with a chat template, equal to transformers'
`apply_chat_template(return_assistant_tokens_mask=True)` on templates with `{% generation %}`
markers (and to each assistant content + its stop token on real templates without them).
"""

import ast
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from efficientjax.data import build_instruction_data
from efficientjax.data import ByteTokenizer
from efficientjax.data import encode_example
from efficientjax.data import Example
from efficientjax.data import get_tokenizer
from efficientjax.data import is_held_out
from efficientjax.data import load_examples
from efficientjax.data import pack_examples
from efficientjax.data import render_chat
from efficientjax.errors import ConfigError
from tests.data.test_chat import make_llama
from tests.data.test_chat import make_mistral
from tests.data.test_chat import make_qwen

BYTE = ByteTokenizer()
EOS = BYTE.eos_id


def byte_ids(text):
  return list(text.encode('utf-8'))


def write_jsonl(path, records):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records),
                  encoding='utf-8')


def expect_config_error(field, phrase, fn, *args, **kwargs):
  with pytest.raises(ConfigError) as info:
    fn(*args, **kwargs)
  assert info.value.field == field, info.value
  assert phrase in info.value.message, info.value.message
  return info.value


def runs(mask):
  """[start, stop) of each run of True in a 1-D mask."""
  edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
  return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


ALPACA = {'instruction': 'Name a colour.', 'input': 'Only one word, s\'il vous plaît.',
          'output': 'Blue — like the sea.'}
ALPACA_NO_INPUT = {'instruction': 'Say hi.', 'output': 'Hi!'}
CHAT = {'messages': [
    {'role': 'system', 'content': 'You are terse.'},
    {'role': 'user', 'content': 'What is 2+2?'},
    {'role': 'assistant', 'content': 'Four.'},
    {'role': 'user', 'content': 'And 3+3, in français?'},
    {'role': 'assistant', 'content': 'Six — six.'}]}

# --------------------------------------------------------------- plain template, byte ids


def test_plain_template_masks_exactly_the_answers(tmp_path):
  write_jsonl(tmp_path / 'mixed.jsonl', [ALPACA, ALPACA_NO_INPUT, CHAT])
  examples = load_examples(f'jsonl:{tmp_path}/mixed.jsonl')
  assert [e.name for e in examples] == ['mixed.jsonl:1', 'mixed.jsonl:2', 'mixed.jsonl:3']
  assert [e.document for e in examples] == [e.name for e in examples]
  # The expected token streams, written out: (text or eos, in the mask?).
  with_input = [
      ('Below is an instruction that describes a task, paired with an input that provides '
       'further context. Write a response that appropriately completes the request.\n\n'
       '### Instruction:\nName a colour.\n\n### Input:\nOnly one word, s\'il vous plaît.\n\n'
       '### Response:\n', False),
      ('Blue — like the sea.', True), (EOS, True)]
  without_input = [
      ('Below is an instruction that describes a task. Write a response that appropriately '
       'completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n', False),
      ('Hi!', True), (EOS, True)]
  chat = [('System: You are terse.\nUser: What is 2+2?\nAssistant: ', False),
          ('Four.', True), (EOS, True),
          ('\nUser: And 3+3, in français?\nAssistant: ', False),
          ('Six — six.', True), (EOS, True)]
  for example, pieces in zip(examples, [with_input, without_input, chat]):
    want_ids, want_mask = [], []
    for piece, answer in pieces:
      ids = [piece] if piece == EOS else byte_ids(piece)
      want_ids += ids
      want_mask += [answer] * len(ids)
    ids, mask = encode_example(example, BYTE)
    assert ids.dtype == np.int32 and mask.dtype == bool
    assert ids.tolist() == want_ids
    assert mask.tolist() == want_mask
  # Read the other way: the masked tokens are each answer then eos, nothing else.
  ids, mask = encode_example(examples[2], BYTE)
  assert ids[mask].tolist() == byte_ids('Four.') + [EOS] + byte_ids('Six — six.') + [EOS]
  ids, mask = encode_example(examples[0], BYTE)
  assert BYTE.decode(ids[~mask]).endswith('### Response:\n') and ids[mask][-1] == EOS


def test_plain_template_starts_with_bos_where_the_tokenizer_does(checkpoints):
  llama = checkpoints['llama']
  assert llama.add_bos
  example = Example(name='x', document='x', instruction='Say hi.', output='Hi there')
  ids, mask = encode_example(example, llama, template='plain')
  prompt = ('Below is an instruction that describes a task. Write a response that appropriately '
            'completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n')
  want = [llama.bos_id, *llama.encode(prompt), *llama.encode('Hi there'), llama.eos_id]
  assert ids.tolist() == want
  assert mask.tolist() == [False] * (1 + len(llama.encode(prompt))) + [True] * (
      len(want) - 1 - len(llama.encode(prompt)))


# -------------------------------------------------------------------------- chat templates


@pytest.fixture(scope='module')
def checkpoint_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('instruction_checkpoints')
  for name, make in (('llama', make_llama), ('qwen', make_qwen), ('mistral', make_mistral)):
    make(root / name)
  return {name: str(root / name) for name in ('llama', 'qwen', 'mistral')}


@pytest.fixture(scope='module')
def checkpoints(checkpoint_dirs):
  return {name: get_tokenizer(d) for name, d in checkpoint_dirs.items()}


# Templates with {% generation %} around each assistant content and its end-of-turn token, in
# the three common shapes: ChatML (a newline after the stop token), Llama 3 (content trimmed,
# a BOS from the template) and Mistral ([INST] turns, the answer after a space, eos as stop).
CHATML_GENERATION = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA_GENERATION = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ m['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
MISTRAL_GENERATION = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
    "{% generation %}{{ ' ' + m['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ raise_exception('user and assistant turns only') }}{% endif %}{% endfor %}")

GENERATION_CASES = {
    'chatml': ('qwen', CHATML_GENERATION),
    'llama': ('llama', LLAMA_GENERATION),
    'mistral': ('mistral', MISTRAL_GENERATION),
}


@pytest.mark.parametrize('case', list(GENERATION_CASES))
def test_chat_mask_equals_transformers_assistant_mask(case, checkpoint_dirs, checkpoints):
  family, source = GENERATION_CASES[case]
  hf = AutoTokenizer.from_pretrained(checkpoint_dirs[family])
  chat = CHAT['messages'][1:] if family == 'mistral' else CHAT['messages']
  examples = [Example(name='a', document='a', **ALPACA),
              Example(name='c', document='c', messages=tuple(chat))]
  for example in examples:
    ids, mask = encode_example(example, checkpoints[family], template=source)
    expected = hf.apply_chat_template(example.as_messages(), chat_template=source,
                                      tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
    assert ids.tolist() == list(expected['input_ids'])
    assert mask.astype(int).tolist() == list(expected['assistant_masks'])
    assert mask.sum() > 0 and not mask.all()


REAL_CASES = {  # family: the token after each assistant content that ends the turn
    'qwen': '<|im_end|>', 'llama': '<|eot_id|>', 'mistral': '</s>'}


@pytest.mark.parametrize('family', list(REAL_CASES))
def test_chat_mask_is_each_assistant_content_and_its_stop_token(family, checkpoints):
  """The checkpoints' own templates (Qwen2.5, Llama 3.2, Mistral v0.1), which have no
  generation markers: each masked run is one assistant content's tokens and the stop token."""
  tok = checkpoints[family]
  stop = tok._tok.token_to_id(REAL_CASES[family])  # pylint: disable=protected-access
  chat = CHAT['messages'][1:] if family == 'mistral' else CHAT['messages']
  alpaca = Example(name='a', document='a', **ALPACA)
  for example, answers in [(alpaca, [ALPACA['output']]),
                           (Example(name='c', document='c', messages=tuple(chat)),
                            ['Four.', 'Six — six.'])]:
    ids, mask = encode_example(example, tok)
    assert ids.tolist() == tok.encode(render_chat(tok, example.as_messages())).tolist()
    got = [ids[a:b].tolist() for a, b in runs(mask)]
    assert got == [tok.encode(answer).tolist() + [stop] for answer in answers]
    # The user's text is nowhere in the mask.
    user = example.as_messages()[-2 if len(answers) > 1 else 0]['content']
    assert user not in tok.decode(ids[mask])


# A template that renders earlier assistant turns differently from the last one.
REWRITING = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ '[earlier]' }}"
    "{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


# A template whose turns end in a newline, with no stop token.
NO_STOP_TOKEN = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def test_template_edge_cases(checkpoints, tmp_path):
  example = Example(name='c', document='c', messages=tuple(CHAT['messages']))
  # Without a stop token, a turn's answer is its text up to the trailing whitespace.
  tok = checkpoints['qwen']
  ids, mask = encode_example(example, tok, NO_STOP_TOKEN)
  assert [tok.decode(ids[a:b]) for a, b in runs(mask)] == ['Four.', 'Six — six.']
  expect_config_error('data.tokenizer', 'does not render this conversation by appending turns',
                      encode_example, example, checkpoints['qwen'], REWRITING)
  # One assistant turn is fine: the rewriting never shows.
  one = Example(name='a', document='a', **ALPACA)
  ids, mask = encode_example(one, checkpoints['qwen'], REWRITING)
  assert checkpoints['qwen'].decode(ids[mask]) == ALPACA['output']
  # A template's raise_exception, met while building the data, names the example.
  write_jsonl(tmp_path / 'chat.jsonl', [CHAT] * 8)
  err = expect_config_error(
      'data.corpus', 'refuses this conversation', build_instruction_data,
      corpus=f'jsonl:{tmp_path}/chat.jsonl', tokenizer=checkpoints['mistral'], seq_len=64,
      global_batch_size=1, seed=0, eval_fraction=0.5, eval_batches=1)
  assert 'chat.jsonl:' in err.message and 'Conversation roles must alternate' in err.message


def test_chat_batches_score_the_held_out_answers(checkpoints, tmp_path):
  """End to end with Qwen2.5's template: each held-out row's scored targets are its examples'
  answers and <|im_end|>, each predicted from a token of the same example."""
  tok = checkpoints['qwen']
  records = [{'messages': [{'role': 'user', 'content': f'Question {i}?'},
                           {'role': 'assistant', 'content': f'Answer number {i}.'}]}
             for i in range(30)]
  write_jsonl(tmp_path / 'qa.jsonl', records)
  data = build_instruction_data(corpus=f'jsonl:{tmp_path}/qa.jsonl', tokenizer=tok, seq_len=96,
                                global_batch_size=1, seed=3, eval_fraction=0.3,
                                eval_batches=10**6)
  held = [i for i in range(30) if is_held_out(f'qa.jsonl:{i + 1}', 0.3)]
  assert data.stats['eval_examples'] == len(held) and data.stats['template'].startswith('chat:')
  stop = tok._tok.token_to_id('<|im_end|>')  # pylint: disable=protected-access
  answers = []
  for batch in data.eval_batches():
    tokens, segments, weights = batch['tokens'][0], batch['segment_ids'][0], batch['loss_mask'][0]
    for s in range(1, segments.max() + 1):
      scored = (segments == s) & (weights == 1)
      assert (segments[np.flatnonzero(scored) - 1] == s).all()
      answers.append(tokens[scored].tolist())
  assert answers == [tok.encode(f'Answer number {i}.').tolist() + [stop] for i in held]


# -------------------------------------------------------------------------------- packing


def test_packing_by_hand():
  def ex(ids, mask):
    return np.asarray(ids, np.int32), np.asarray(mask, bool)

  encoded = [
      ex([10, 11, 12], [0, 1, 1]),
      ex([20, 21], [1, 1]),  # an answer token first: never scored (nothing before it)
      ex([30, 31, 32, 33], [0, 0, 1, 1]),  # does not fit row 0's three free columns
      ex(range(40, 50), [0] * 8 + [1, 1]),  # truncated to 8: its answer is cut off, dropped
      ex(range(50, 60), [0, 0, 0] + [1] * 7),  # truncated to 8, a row of its own
      ex([60], [1]),  # a single token predicts nothing: dropped
  ]
  packed = pack_examples(encoded, seq_len=7)
  np.testing.assert_array_equal(packed.tokens, [
      [10, 11, 12, 20, 21, 0, 0, 0], [30, 31, 32, 33, 0, 0, 0, 0], list(range(50, 58))])
  np.testing.assert_array_equal(packed.segment_ids, [
      [1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0], [1] * 8])
  np.testing.assert_array_equal(packed.positions, [
      [0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 0, 0, 0, 0], list(range(8))])
  np.testing.assert_array_equal(packed.loss_mask, [
      [0, 1, 1, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]])
  for a in (packed.tokens, packed.segment_ids, packed.positions, packed.loss_mask):
    assert a.dtype == np.int32
  assert packed.placement == [(0, 0, 3), (0, 3, 2), (1, 0, 4), None, (2, 0, 8), None]
  assert (packed.truncated, packed.dropped) == (2, 2)


def test_packing_random_examples_keeps_each_whole_and_once():
  rng = np.random.default_rng(0)
  seq_len = 31
  encoded = []
  for _ in range(200):
    n = int(rng.integers(1, 45))
    prompt = int(rng.integers(0, n))
    encoded.append((rng.integers(0, 1000, n).astype(np.int32), np.arange(n) >= prompt))
  packed = pack_examples(encoded, seq_len)
  want = []
  for ids, mask in encoded:
    ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
    if mask[1:].any():
      want.append((ids.tolist(), mask))
  # Reading the rows back by segment gives every kept example, whole, in order.
  got, row_of = [], []
  for r in range(packed.tokens.shape[0]):
    seg = packed.segment_ids[r]
    used = seg > 0
    assert not (used[1:] & ~used[:-1]).any()  # padding only at the end
    assert (np.diff(seg[used]) >= 0).all() and set(seg[used]) == set(range(1, seg.max() + 1))
    for s in range(1, seg.max() + 1):
      cols = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(packed.positions[r, cols], np.arange(cols.size))
      got.append((packed.tokens[r, cols].tolist(), packed.loss_mask[r, cols]))
      row_of.append(r)
  assert [g[0] for g in got] == [w[0] for w in want]
  for (_, loss), (_, mask) in zip(got, want):
    np.testing.assert_array_equal(loss, np.concatenate([[0], mask[1:]]))
  # Next fit: a row ends only where the next example would not fit in it.
  lengths = [len(w[0]) for w in want]
  for i in range(1, len(want)):
    if row_of[i] != row_of[i - 1]:
      used = sum(l for l, r in zip(lengths, row_of) if r == row_of[i - 1])
      assert used + lengths[i] > seq_len + 1
  # What the training step reads: every weighted target follows a token of its own example.
  weights = packed.loss_mask[:, 1:] == 1
  assert (packed.segment_ids[:, :-1][weights] == packed.segment_ids[:, 1:][weights]).all()
  assert (packed.positions[:, 1:][weights] == packed.positions[:, :-1][weights] + 1).all()
  assert packed.truncated == sum(len(e[0]) > seq_len + 1 for e in encoded)
  assert packed.dropped == len(encoded) - len(want)


# ------------------------------------------------------------------------ functions corpus

SOURCE = '''import functools


def no_doc(x):
    a = x
    b = a + 1
    return b


@functools.lru_cache()
def documented(a,
               b=2):
    """Adds things.

    More text.
    """

    total = a + b
    if total > 3:
        total -= 1
    return total


def short(x):
    """Too short."""
    return x


class Widget:
    """A class."""

    def method(self, value):
        """Scales value."""
        scaled = value * 2
        # a comment stays
        scaled += 1
        return scaled

    def _no_doc(self):
        pass


async def fetch(n):
    """Waits n times."""
    for _ in range(n):
        await None
    return n
'''


def test_functions_corpus_prompts_and_answers(tmp_path):
  (tmp_path / 'src').mkdir()
  (tmp_path / 'src' / 'mod.py').write_text(SOURCE)
  (tmp_path / 'src' / 'broken.py').write_text('def f(:\n    """doc"""\n')
  examples = load_examples(f'functions:{tmp_path}/src/*.py')
  assert [e.name for e in examples] == ['mod.py:11:documented', 'mod.py:32:Widget.method',
                                        'mod.py:43:fetch']
  assert {e.document for e in examples} == {'mod.py'}
  first, method, _ = examples
  assert first.input == 'def documented(a,\n               b=2):\n    """Adds things.\n\n' \
      '    More text.\n    """'
  assert first.output == ('    total = a + b\n    if total > 3:\n        total -= 1\n'
                          '    return total')
  assert method.input == 'def method(self, value):\n    """Scales value."""'
  assert method.output == ('    scaled = value * 2\n    # a comment stays\n    scaled += 1\n'
                           '    return scaled')
  # Prompt and answer together are the function again, decorators dropped.
  namespace = {}
  exec(first.input + '\n' + first.output, namespace)  # pylint: disable=exec-used
  assert namespace['documented'](1) == 3 and namespace['documented'](5) == 6
  original = next(n for n in ast.parse(SOURCE).body if getattr(n, 'name', '') == 'documented')
  rebuilt = ast.parse(first.input + '\n' + first.output).body[0]
  original.decorator_list = []
  assert ast.dump(rebuilt) == ast.dump(original)
  # Rendered: the instruction line, signature and docstring are prompt; the body is answer.
  ids, mask = encode_example(first, BYTE)
  prompt = BYTE.decode(ids[~mask])
  assert 'Complete the body of this Python function.' in prompt
  assert 'def documented(a,' in prompt and 'More text.' in prompt and '@functools' not in prompt
  assert ids[mask].tolist() == byte_ids(first.output) + [EOS]


def test_functions_split_keeps_a_file_together(tmp_path):
  names = [f'm{i:02d}.py' for i in range(12)]
  (tmp_path / 'pkg').mkdir()
  for i, name in enumerate(names):
    funcs = ''.join(
        f'def f{i}_{j}(x):\n    """F {i} {j}."""\n    y = x + {j}\n    y *= 2\n    return y\n\n'
        for j in range(3))
    (tmp_path / 'pkg' / name).write_text(funcs)
  data = build_instruction_data(corpus=f'functions:{tmp_path}/pkg/*.py', tokenizer=BYTE,
                                seq_len=400, global_batch_size=1, seed=0, eval_fraction=0.5,
                                eval_batches=10**6)
  held = {n for n in names if is_held_out(n, 0.5)}
  assert 0 < len(held) < len(names)
  assert data.stats['eval_documents'] == len(held) and data.stats['eval_examples'] == 3 * len(
      held)
  eval_text = BYTE.decode(np.concatenate([b['tokens'][0] for b in data.eval_batches()]))
  train_text = BYTE.decode(data.train_tokens.reshape(-1))
  for i, name in enumerate(names):
    for j in range(3):
      assert (f'def f{i}_{j}(x)' in eval_text) == (name in held)
      assert (f'def f{i}_{j}(x)' in train_text) == (name not in held)
  # max_documents counts files that hold examples.
  assert len(load_examples(f'functions:{tmp_path}/pkg/*.py', max_documents=2)) == 6


def test_stdlib_functions_corpus_smoke():
  examples = load_examples('functions', max_documents=5)
  assert len({e.document for e in examples}) == 5
  for e in examples[:50]:
    assert e.input.startswith(('def ', 'async def ')) and e.output
    ast.parse(e.input + '\n' + e.output)  # prompt + answer is valid source


# -------------------------------------------------------------------- batches and resume


@pytest.fixture
def alpaca(tmp_path):
  """An Alpaca corpus of two files: its spec, and each line's record by document name."""
  rng = np.random.default_rng(1)
  records = [{'instruction': f'Task {i}: repeat.', 'input': 'x' * int(rng.integers(0, 3)),
              'output': f'reply {i} ' * int(rng.integers(1, 4))} for i in range(80)]
  write_jsonl(tmp_path / 'a.jsonl', records[:50])
  write_jsonl(tmp_path / 'b.jsonl', records[50:])
  by_name = {f'a.jsonl:{i + 1}': r for i, r in enumerate(records[:50])}
  by_name.update({f'b.jsonl:{i + 1}': r for i, r in enumerate(records[50:])})
  return f'jsonl:{tmp_path}/*.jsonl', by_name


def build(corpus, **overrides):
  kwargs = dict(tokenizer=BYTE, seq_len=300, global_batch_size=4, seed=0, eval_fraction=0.25,
                eval_batches=2)
  kwargs.update(overrides)
  return build_instruction_data(corpus=corpus, **kwargs)


def take(stream, n):
  return [stream.next() for _ in range(n)]


def assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert set(x) == {'tokens', 'segment_ids', 'positions', 'loss_mask'}
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_stats_and_epochs(alpaca):
  spec, records = alpaca
  data = build(spec)
  held = [n for n in records if is_held_out(n, 0.25)]
  s = data.stats
  assert (s['train_documents'], s['eval_documents']) == (80 - len(held), len(held))
  assert (s['train_examples'], s['eval_examples']) == (80 - len(held), len(held))
  assert s['train_truncated'] == s['train_dropped'] == 0
  # Every example's answer is scored: the answer tokens are the outputs + eos.
  assert s['train_answer_tokens'] == sum(
      len(byte_ids(r['output'])) + 1 for n, r in records.items() if n not in held)
  assert s['eval_answer_tokens'] == sum(len(byte_ids(records[n]['output'])) + 1 for n in held)
  rows = data.train.batches_per_epoch * 4
  batches = take(data.train, data.train.batches_per_epoch + 1)
  epoch = {k: np.concatenate([b[k] for b in batches[:-1]]) for k in batches[0]}
  assert s['train_sequences'] == data.train_tokens.shape[0] >= rows > 0
  # An epoch is the packed rows in the order drawn from (seed, epoch); the next starts over
  # in another order.
  order = np.random.default_rng([0, 0]).permutation(s['train_sequences'])
  np.testing.assert_array_equal(epoch['tokens'], data.train_tokens[order[:rows]])
  order1 = np.random.default_rng([0, 1]).permutation(s['train_sequences'])
  np.testing.assert_array_equal(batches[-1]['tokens'], data.train_tokens[order1[:4]])


def test_deterministic_and_resumable(alpaca):
  spec, _ = alpaca
  a = take(build(spec, seed=5).train, 12)
  assert_batches_equal(a, take(build(spec, seed=5).train, 12))
  other = take(build(spec, seed=6).train, 12)
  assert not all(np.array_equal(x['tokens'], y['tokens']) for x, y in zip(a, other))
  # Held-out batches do not depend on the seed.
  assert_batches_equal(build(spec, seed=5).eval_batches(),
                       build(spec, seed=6).eval_batches())
  data = build(spec, seed=5)
  take(data.train, 7)
  state = json.loads(json.dumps(data.train.state()))
  assert state['step'] == 7
  fresh = build(spec, seed=5)
  fresh.train.restore(state)
  assert_batches_equal(take(fresh.train, 5), a[7:12])
  # Per-process shares are rows of the global batch.
  halves = [build(spec, seed=5, process_index=p, process_count=2) for p in range(2)]
  for h in halves:
    h.train.restore(state)
  for step in range(7, 12):
    parts = [h.train.next() for h in halves]
    assert parts[0]['tokens'].shape == (2, 301)
    for k in parts[0]:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), a[step][k])
  # A state from another data config is refused, naming the field.
  expect_config_error('data.seq_len', 'different data config',
                      build(spec, seed=5, seq_len=260).train.restore, state)
  expect_config_error('seed', 'different data config', build(spec).train.restore, state)


def test_bad_corpora_and_arguments(tmp_path, alpaca):
  spec, _ = alpaca
  path = tmp_path / 'bad' / 'bad.jsonl'
  cases = [
      ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
       'line bad.jsonl:2 is not valid JSON'),
      ('{"instruction": "a", "output": "b"}\n\n{"prompt": "a", "completion": "b"}\n',
       "line bad.jsonl:3 has neither \"messages\" nor \"instruction\" (its keys: ['completion', "
       "'prompt'])"),
      ('[1, 2]\n', 'line bad.jsonl:1 is a JSON list'),
      ('{"instruction": "a", "output": 3}\n', 'line bad.jsonl:1 is Alpaca-like'),
      ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}\n',
       'line bad.jsonl:1 has messages[1]='),
      ('{"messages": [{"role": "user", "content": "a"}]}\n', 'has no assistant message'),
      ('{"messages": [{"role": "assistant", "content": "a"}]}\n', 'starts with an assistant'),
  ]
  for text, phrase in cases:
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    err = expect_config_error('data.corpus', phrase, load_examples, f'jsonl:{path}')
    assert 'expected one JSON object per line' in err.message
  # Lines are split at \n only: JSON may hold a raw U+2028 (a line separator to Python).
  path.write_text(json.dumps({'instruction': 'a\u2028b', 'output': 'c'}, ensure_ascii=False))
  assert '\u2028' in path.read_text()
  assert [e.instruction for e in load_examples(f'jsonl:{path}')] == ['a\u2028b']
  expect_config_error('data.corpus', 'pretraining corpus', load_examples, 'stdlib')
  expect_config_error('data.corpus', "'jsonl:' needs a path", load_examples, 'jsonl:')
  expect_config_error('data.corpus', 'no files match', load_examples, f'jsonl:{tmp_path}/*.nope')
  (tmp_path / 'nofunc.py').write_text('x = 1\n')
  expect_config_error('data.corpus', 'no function', load_examples, f'functions:{tmp_path}/*.py')
  expect_config_error('data.max_documents', 'positive integer', load_examples, spec,
                      max_documents=0)
  expect_config_error('data.corpus', 'at least 2', build, spec, max_documents=1)
  expect_config_error('data.seq_len', 'positive integer', build, spec, seq_len=0)
  expect_config_error('seed', 'non-negative', build, spec, seed=-1)
  expect_config_error('data.eval_fraction', 'between 0 and 1', build, spec,
                      eval_fraction=1.0)
  expect_config_error('train.global_batch_size', 'multiple of 4', build, spec,
                      global_batch_size=6, process_count=4)
  err = expect_config_error('data.eval_fraction', 'fewer than one global batch of 64', build,
                            spec, global_batch_size=64)
  assert 'held-out split has' in err.message and 'rows of seq_len+1=301' in err.message
  # Train too short for a batch while held-out is not: most documents held out.
  counts = build(spec, global_batch_size=1, eval_fraction=0.75).stats
  assert counts['train_sequences'] < counts['eval_sequences']
  err = expect_config_error('train.global_batch_size', 'the train split has', build, spec,
                            global_batch_size=counts['train_sequences'] + 1, eval_fraction=0.75)
  assert 'use a larger corpus' in err.message

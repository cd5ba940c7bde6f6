"""Log-likelihood scoring and the multiple-choice evaluator, against hand computations.

Scores are compared with the log-softmax of one direct `Transformer.apply` per request (no
padding, no batching), summed by hand in float64; acc and acc_norm with a transcription of
lm-eval's definitions over those sums; the offline stdlib task with the files it was made from.
"""

import dataclasses
import functools
import json
import math

import jax
import numpy as np
import pytest

from efficientjax.data import ByteTokenizer, is_held_out, load_documents
from efficientjax.data.mc_tasks import write_stdlib_next_line
from efficientjax.errors import ConfigError
from efficientjax.infer import loglikelihood, multiple_choice
from efficientjax.model import Transformer
from tests.attention.variants import BASE
from tests.helpers import jitted_init

# init_std 0.5: logits far from uniform, so that choices differ and acc differs from acc_norm.
CFG = dataclasses.replace(BASE, max_seq_len=24, init_std=0.5)
BYTES = dataclasses.replace(CFG, vocab_size=257, max_seq_len=64)


def init(cfg, seed=0):
  # Jitted (op by op, init compiles every op: seconds of the module's setup).
  return jitted_init(cfg)(jax.random.key(seed), np.zeros((1, 4), np.int32))['params']


@pytest.fixture(scope='module')
def params():
  return init(CFG)


@pytest.fixture(scope='module')
def byte_params():
  return init(BYTES, seed=1)


@functools.cache
def _log_softmax(cfg):
  model = Transformer(cfg)
  return jax.jit(lambda p, t: jax.nn.log_softmax(model.apply({'params': p}, t), axis=-1))


def direct_logp(cfg, params, tokens):
  """log-softmax [len(tokens), vocab] of one unpadded forward pass, float64."""
  return np.asarray(_log_softmax(cfg)(params, np.asarray(tokens, np.int32)[None])[0], np.float64)


def by_hand(cfg, params, pairs, max_len, pad_to=None):
  """[(sum of log p(continuation), greedy)] of (context, continuation) token pairs: one direct
  pass per pair over its truncated window, or (pad_to) one pass over all of them right-padded
  to pad_to tokens (a causal model's logits do not see what follows)."""
  windows = [(list(c) + list(x))[-(max_len + 1):] for c, x in pairs]
  if pad_to is None:
    logps = [direct_logp(cfg, params, w[:-1]) for w in windows]
  else:
    rows = np.zeros((len(windows), pad_to), np.int32)
    for r, w in enumerate(windows):
      rows[r, :len(w) - 1] = w[:-1]
    logps = np.asarray(_log_softmax(cfg)(params, rows), np.float64)
  out = []
  for (_, continuation), whole, logp in zip(pairs, windows, logps):
    positions = range(len(whole) - 1 - len(continuation), len(whole) - 1)
    total = sum(logp[r, t] for r, t in zip(positions, continuation))
    greedy = all(np.argmax(logp[r]) == t for r, t in zip(positions, continuation))
    out.append((total, greedy))
  return out


def random_requests(seed, count, vocab, max_len):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    n_ctx = int(rng.integers(1, max_len + 8))  # some longer than the window: cut from the left
    n_cont = int(rng.integers(1, 6))
    out.append((rng.integers(0, vocab, n_ctx).tolist(), rng.integers(0, vocab, n_cont).tolist()))
  return out


def test_score_equals_a_direct_forward_pass_per_request(params):
  requests = random_requests(0, 4, CFG.vocab_size, CFG.max_seq_len)
  requests.append(([3], [5]))  # the shortest request
  # A continuation that is the model's greedy choice at every position.
  context = [1, 2, 3]
  greedy_cont = []
  for _ in range(3):
    greedy_cont.append(int(np.argmax(direct_logp(CFG, params, context + greedy_cont)[-1])))
  requests.append((context, greedy_cont))
  assert any(len(c) + len(x) > CFG.max_seq_len + 1 for c, x in requests)
  got = loglikelihood.score(CFG, params, requests, batch_size=4)
  for (ll, greedy), (want_ll, want_greedy) in zip(got, by_hand(CFG, params, requests, 24)):
    assert ll == pytest.approx(want_ll, rel=1e-5, abs=1e-4)
    assert greedy == want_greedy
  assert got[-1][1] and not all(g for _, g in got[:-1])


def test_batching_padding_and_order_do_not_change_scores(params):
  requests = random_requests(1, 9, CFG.vocab_size, CFG.max_seq_len)
  one = loglikelihood.score(CFG, params, requests, batch_size=1)
  many = loglikelihood.score(CFG, params, requests, batch_size=8)
  order = np.random.default_rng(2).permutation(len(requests))
  shuffled = loglikelihood.score(CFG, params, [requests[i] for i in order], batch_size=4)
  np.testing.assert_allclose([s for s, _ in many], [s for s, _ in one], rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose([shuffled[list(order).index(i)][0] for i in range(len(requests))],
                             [s for s, _ in one], rtol=1e-6, atol=1e-5)
  # A variables dict is read as it is.
  np.testing.assert_allclose(
      [s for s, _ in loglikelihood.score(CFG, {'params': params}, requests[:2])],
      [s for s, _ in one[:2]], rtol=1e-6, atol=1e-5)


def test_byte_token_accounting_and_text_scores(byte_params):
  tok = ByteTokenizer()
  # Trailing spaces of the context move onto the continuation; the rest is bytes.
  assert loglikelihood.encode_pair(tok, 'def f(x):  ', 'return x') == (
      list(b'def f(x):'), list(b'  return x'))
  assert loglikelihood.encode_pair(tok, 'é', ' ü') == (list('é'.encode()), list(' ü'.encode()))
  # An empty context is the prefix token (the byte tokenizer has no BOS: its EOS, 256).
  assert loglikelihood.encode_pair(tok, '', 'abc') == ([256], list(b'abc'))
  pairs = [('x = 1\n', 'y = 2'), ('', 'import os'), ('for i in range(3): ', 'pass')]
  got = loglikelihood.score_texts(BYTES, byte_params, tok, pairs)
  want = by_hand(BYTES, byte_params, [
      (list(c.rstrip().encode()) or [256], list((c[len(c.rstrip()):] + x).encode()))
      for c, x in pairs], 64, pad_to=64)
  np.testing.assert_allclose([s for s, _ in got], [s for s, _ in want], rtol=1e-5)


def test_rolling_scores_every_token_once(byte_params):
  tokens = list(b'import sys\nprint(sys.argv)\n')  # 27 tokens: one window of 64
  logp = direct_logp(BYTES, byte_params, [256] + tokens[:-1])
  want = sum(logp[i, t] for i, t in enumerate(tokens))
  got = loglikelihood.rolling(BYTES, byte_params, tokens, 64, prefix_token=256)
  assert got == pytest.approx(want, rel=1e-5)


# The multiple-choice evaluator.

DOCS = [
    {'question': 'x = 1 +', 'choices': ['1', 'one hundred', 'None'], 'label': 0, 'answer': '1'},
    {'question': 'def f(', 'choices': ['self):', 'x', 'a, b, c):'], 'label': 2,
     'answer': 'a, b, c):'},
    {'question': 'import ', 'choices': ['os', 'sys', 'collections.abc'], 'label': 1,
     'answer': 'sys'},
    {'question': 'return ', 'choices': ['True', 'x + y', 'None  # done'], 'label': 1,
     'answer': 'x + y'},  # the context ends with a space: it moves onto each continuation
    {'question': '', 'choices': ['pass', 'print(1)', 'x'], 'label': 0, 'answer': 'pass'},
    {'question': 'while ', 'choices': ['True:', 'i < n:', 'not done:'], 'label': 2,
     'answer': 'not done:'},
    {'question': 'for k in', 'choices': [' d:', ' range(10):', ' d.items():'], 'label': 1,
     'answer': 'nowhere'},  # a gold answer outside the choices: never right
]


def write_task(directory, name='tiny_mc', cache_dir=None, **keys):
  """The task YAML of DOCS (with lm-eval's datasets cache in cache_dir, if given)."""
  data = directory / f'{name}.jsonl'
  data.write_text(''.join(json.dumps(d) + '\n' for d in DOCS))
  dataset_kwargs = {'data_files': {'test': str(data)}}
  if cache_dir is not None:
    dataset_kwargs['cache_dir'] = str(cache_dir)
  task = {'task': name, 'dataset_path': 'json', 'dataset_kwargs': dataset_kwargs,
          'test_split': 'test', 'output_type': 'multiple_choice',
          'doc_to_text': '{{question}}', 'doc_to_choice': 'choices', 'doc_to_target': 'label',
          **keys}
  path = directory / f'{name}.yaml'
  path.write_text(json.dumps(task))  # JSON is YAML
  return str(path)


def hand_results(cfg, params, docs, context_of, gold_of, delimiter=' '):
  """acc, acc_norm and per-document log-likelihoods by lm-eval's definitions."""
  pairs = []
  for doc in docs:
    context = context_of(doc)
    stripped = context.rstrip()  # trailing spaces move onto the continuation
    for choice in doc['choices']:
      continuation = context[len(stripped):] + delimiter + choice
      pairs.append((list(stripped.encode()) or [256], list(continuation.encode())))
  scores = iter(by_hand(cfg, params, pairs, cfg.max_seq_len, pad_to=cfg.max_seq_len))
  acc, acc_norm, lls = [], [], []
  for doc in docs:
    doc_lls = [next(scores)[0] for _ in doc['choices']]
    lls.append(doc_lls)
    gold = gold_of(doc)
    acc.append(float(int(np.argmax(doc_lls)) == gold))
    norm = [ll / len(c) for ll, c in zip(doc_lls, doc['choices'])]
    acc_norm.append(float(int(np.argmax(norm)) == gold))
  return acc, acc_norm, lls


def stderr(values):
  mean = sum(values) / len(values)
  return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def test_evaluate_equals_the_hand_computation(tmp_path, byte_params):
  tok = ByteTokenizer()
  task = write_task(tmp_path)
  result = multiple_choice.evaluate(BYTES, byte_params, tok, task)
  acc, acc_norm, lls = hand_results(BYTES, byte_params, DOCS, lambda d: d['question'],
                                    lambda d: d['label'])
  # The hand computation must tell acc from acc_norm, or it could not catch a wrong norm.
  assert acc != acc_norm
  assert result['task'] == 'tiny_mc' and result['n'] == len(DOCS)
  assert result['acc'] == sum(acc) / len(acc)
  assert result['acc_norm'] == sum(acc_norm) / len(acc_norm)
  assert result['acc_stderr'] == pytest.approx(stderr(acc))
  assert result['acc_norm_stderr'] == pytest.approx(stderr(acc_norm))
  np.testing.assert_allclose(np.concatenate(result['lls']), np.concatenate(lls), rtol=1e-5)
  assert multiple_choice.evaluate(BYTES, byte_params, tok, task, limit=2)['n'] == 2


def test_templates_description_and_string_targets(tmp_path, byte_params):
  """doc_to_target as a template giving the answer string (one not among the choices scores
  0), a templated doc_to_text, a description and another delimiter."""
  task = write_task(tmp_path, 'templated', doc_to_text='Q: {{question}}\nA:',
                    doc_to_target='{{answer}}', description='# {{choices | length}} choices\n',
                    target_delimiter='\t')
  loaded = multiple_choice.load_task(task)
  assert loaded.context(DOCS[0]) == '# 3 choices\nQ: x = 1 +\nA:'
  # '1' renders as digits: lm-eval reads that as an index, not as the choice '1'.
  golds = [1, 2, 1, 1, 0, 2, -100]
  assert [loaded.gold(d) for d in DOCS] == golds
  result = multiple_choice.evaluate(BYTES, byte_params, ByteTokenizer(), task)
  acc, acc_norm, _ = hand_results(
      BYTES, byte_params, DOCS,
      lambda d: f'# {len(d["choices"])} choices\nQ: {d["question"]}\nA:',
      lambda d: golds[DOCS.index(d)], delimiter='\t')
  assert (result['acc'], result['acc_norm']) == (sum(acc) / len(acc), sum(acc_norm) / len(acc))


@pytest.mark.parametrize('keys, message', [
    ({'num_fewshot': 5}, 'zero-shot only'),
    ({'output_type': 'generate_until'}, 'output_type'),
    ({'process_docs': 'x'}, 'process_docs'),
    ({'dataset_path': 'hellaswag'}, 'local data only'),
    ({'test_split': 'validation'}, "no 'validation' split"),
])
def test_unsupported_tasks_are_refused(tmp_path, keys, message):
  with pytest.raises(ConfigError, match=message):
    multiple_choice.load_task(write_task(tmp_path, **keys))


def test_function_hooks_and_multiple_inputs_are_refused(tmp_path):
  path = tmp_path / 'hook.yaml'
  path.write_text(open(write_task(tmp_path)).read().replace(
      '"doc_to_text": "{{question}}"', '"doc_to_text": !function utils.doc_to_text'))
  with pytest.raises(ConfigError, match='!function utils.doc_to_text'):
    multiple_choice.load_task(str(path))
  task = multiple_choice.load_task(write_task(tmp_path, doc_to_text='{{label}}'))
  with pytest.raises(ConfigError, match='multiple-input'):
    task.context(DOCS[0])


# The offline stdlib task.


def test_stdlib_next_line_is_deterministic_and_its_answers_are_right(tmp_path):
  first = write_stdlib_next_line(str(tmp_path / 'a'), n=30, choices=4, seed=3)
  again = write_stdlib_next_line(str(tmp_path / 'b'), n=30, choices=4, seed=3)
  other = write_stdlib_next_line(str(tmp_path / 'c'), n=30, choices=4, seed=4)
  rows = lambda yaml: open(yaml.replace('.yaml', '.jsonl')).read()
  assert rows(first) == rows(again) and rows(first) != rows(other)
  docs = [json.loads(line) for line in rows(first).splitlines()]
  texts = {d.name: [line.rstrip() for line in d.text.split('\n')]
           for d in load_documents('stdlib') if is_held_out(d.name, 0.02)}
  line_sets = {name: set(lines) for name, lines in texts.items()}
  task = multiple_choice.load_task(first)
  assert len(docs) == 30 and task.docs == docs and task.target_delimiter == '\n'
  labels = set()
  for doc in docs:
    name, line = doc['source'].rsplit(':', 1)
    lines = texts[name]  # held out: pretraining never saw the file
    i = int(line) - 1
    assert doc['context'] == '\n'.join(lines[i - 4:i])
    assert doc['choices'][doc['label']] == lines[i] and len(set(doc['choices'])) == 4
    assert task.requests(doc)[doc['label']] == (doc['context'], '\n' + lines[i])
    for k, choice in enumerate(doc['choices']):
      if k != doc['label']:  # a distractor: a line of another held-out file
        assert any(choice in lines_of for n, lines_of in line_sets.items() if n != name)
    labels.add(doc['label'])
  assert labels == {0, 1, 2, 3}

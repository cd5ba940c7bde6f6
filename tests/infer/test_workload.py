"""Workloads: Poisson arrivals (mean and Kolmogorov-Smirnov against the exponential CDF, a
bound that uniform gaps of the same mean fail), length distributions, prompts read from JSONL
(byte ids written out by hand; chat and BOS equal to transformers' tokenizer) and cut from the
held-out token stream (rebuilt here from the held-out rule), determinism, and clear errors."""

import json

import numpy as np
import pytest
import scipy.stats
from transformers import AutoTokenizer

from efficientjax.data import ByteTokenizer
from efficientjax.data import get_tokenizer
from efficientjax.data import is_held_out
from efficientjax.data.instructions import ALPACA_PROMPT_WITH_INPUT
from efficientjax.errors import ConfigError
from efficientjax.infer import workload
from efficientjax.infer.sampling import Sampling
from efficientjax.infer.workload import build_workload
from tests.data.test_chat import make_llama

BYTE = ByteTokenizer()


def byte_ids(text):
  return list(text.encode('utf-8'))


def write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records),
                  encoding='utf-8')


def synthetic(**kwargs):
  args = dict(prompts='synthetic', tokenizer=BYTE, num_requests=2000, input_lengths='4',
              output_lengths='16', seed=0)
  return build_workload(**{**args, **kwargs})


# ------------------------------------------------------------------------------ arrivals


def ks_p_value(gaps, rate):
  return scipy.stats.kstest(gaps, 'expon', args=(0, 1 / rate)).pvalue


@pytest.mark.parametrize('rate', [5.0, 0.25])
def test_server_arrivals_are_poisson_at_the_rate(rate):
  n = 4000
  requests = synthetic(num_requests=n, scenario='server', rate_per_s=rate)
  arrivals = np.array([r.arrival_s for r in requests])
  assert [r.id for r in requests] == list(range(n)) and np.all(np.diff(arrivals) >= 0)
  gaps = np.diff(np.concatenate([[0.0], arrivals]))
  # The mean of n exponential gaps has standard deviation (1/rate)/sqrt(n): 4 of them.
  assert abs(gaps.mean() * rate - 1) < 4 / np.sqrt(n)
  assert ks_p_value(gaps, rate) > 1e-3
  # The same bounds reject uniform gaps of the same mean, and a rate off by 10%.
  uniform = np.random.default_rng(0).uniform(0, 2 / rate, n)
  assert ks_p_value(uniform, rate) < 1e-6
  assert ks_p_value(gaps, rate * 1.1) < 1e-3
  assert workload.workload_stats(requests)['offered_rate_per_s'] == pytest.approx(
      rate, rel=4 / np.sqrt(n))


def test_offline_requests_all_arrive_at_zero():
  requests = synthetic(num_requests=50, scenario='offline', rate_per_s=3.0)  # rate unread
  assert all(r.arrival_s == 0.0 for r in requests)


# ------------------------------------------------------------------------------- lengths


def test_lengths_follow_their_distributions():
  n = 3000
  fixed = synthetic(num_requests=n, input_lengths='7', output_lengths=9)
  assert {len(r.prompt) for r in fixed} == {7} and {r.max_new_tokens for r in fixed} == {9}
  uniform = synthetic(num_requests=n, input_lengths='uniform:3:8',
                      output_lengths='uniform:1:1')
  lengths = np.array([len(r.prompt) for r in uniform])
  counts = np.bincount(lengths, minlength=9)[3:]
  assert lengths.min() == 3 and lengths.max() == 8 and {r.max_new_tokens for r in uniform} == {1}
  assert scipy.stats.chisquare(counts).pvalue > 1e-3  # flat over 3..8, both ends included
  normal = np.array([r.max_new_tokens for r in synthetic(num_requests=n,
                                                         output_lengths='normal:64:8')])
  assert abs(normal.mean() - 64) < 4 * 8 / np.sqrt(n) and abs(normal.std() / 8 - 1) < 0.1
  assert np.all(normal == np.round(normal))
  clipped = np.array([r.max_new_tokens for r in synthetic(num_requests=n,
                                                          output_lengths='normal:2:5')])
  # P(round(N(2, 5)) <= 1) = P(N < 1.5) = 0.46: those are all raised to 1.
  assert clipped.min() == 1 and abs((clipped == 1).mean() - 0.46) < 0.04
  synthetic_tokens = np.concatenate([r.prompt for r in fixed])
  assert synthetic_tokens.min() >= 0 and synthetic_tokens.max() < BYTE.vocab_size


@pytest.mark.parametrize('spec', ['0', '-3', 'uniform:5:2', 'uniform:0:3', 'uniform:1',
                                  'normal:abc:1', 'normal:5:-1', 'normal:0.5:1', 'normal:inf:1',
                                  'gauss:1:2', '', 'uniform:1.5:3', None, True, 2.5])
def test_bad_length_specs_name_the_field(spec):
  errors = workload.length_errors(spec, 'inference.output_lengths')
  assert len(errors) == 1 and errors[0].field == 'inference.output_lengths'
  assert 'uniform:A:B' in errors[0].message
  with pytest.raises(ConfigError):
    workload.parse_lengths(spec, 'inference.output_lengths')


def test_good_length_specs_parse():
  assert workload.parse_lengths('12', 'f').bounds == (12, 12)
  assert workload.parse_lengths(12, 'f').bounds == (12, 12)
  assert workload.parse_lengths('uniform:2:9', 'f').bounds == (2, 9)
  assert workload.parse_lengths('normal:100:0', 'f').bounds == (1, None)
  assert workload.length_errors('normal:100.5:3.5', 'f') == []


# ------------------------------------------------------------------------------- prompts


def test_jsonl_prompts_with_the_byte_tokenizer(tmp_path):
  system, user = 'Be brief.', 'Name a river — one.'
  records = [
      {'prompt': 'Once upon'},
      {'text': 'A text line', 'max_new_tokens': 3},
      {'messages': [{'role': 'system', 'content': system}, {'role': 'user', 'content': user},
                    {'role': 'assistant', 'content': 'The Nile.'}]},
      {'instruction': 'Add.', 'input': '2 and 2', 'output': '4'},
  ]
  write_jsonl(tmp_path / 'p.jsonl', records)
  requests = build_workload(prompts=f'jsonl:{tmp_path}/p.jsonl', tokenizer=BYTE,
                            num_requests=None, output_lengths='5')
  assert [r.prompt for r in requests] == [
      byte_ids('Once upon'), byte_ids('A text line'),
      byte_ids(f'System: {system}\nUser: {user}\nAssistant: '),  # the reference answer dropped
      byte_ids(ALPACA_PROMPT_WITH_INPUT.format(instruction='Add.', input='2 and 2'))]
  assert [r.max_new_tokens for r in requests] == [5, 3, 5, 5]
  # More requests than lines: the lines again, in order.
  more = build_workload(prompts=f'jsonl:{tmp_path}/p.jsonl', tokenizer=BYTE, num_requests=10,
                        output_lengths='5')
  assert [r.prompt for r in more] == [requests[i % 4].prompt for i in range(10)]


def test_jsonl_prompts_with_a_checkpoint_tokenizer_match_transformers(tmp_path):
  make_llama(tmp_path / 'llama')
  tok = get_tokenizer(str(tmp_path / 'llama'))
  hf = AutoTokenizer.from_pretrained(str(tmp_path / 'llama'))
  messages = [{'role': 'system', 'content': 'Be brief.'},
              {'role': 'user', 'content': 'Which river is longest?'}]
  write_jsonl(tmp_path / 'p.jsonl', [{'messages': messages}, {'prompt': 'The river'}])
  chat, plain = build_workload(prompts=f'jsonl:{tmp_path}/p.jsonl', tokenizer=tok,
                               num_requests=None, output_lengths='4')
  # (The template writes today's date, on both sides.)
  want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                return_dict=True)['input_ids']
  assert chat.prompt == list(want)
  assert chat.prompt[0] == tok.bos_id and chat.prompt.count(tok.bos_id) == 1
  assert plain.prompt == list(hf('The river')['input_ids']) and plain.prompt[0] == tok.bos_id


def make_corpus(root, n=12):
  rng = np.random.default_rng(5)
  root.mkdir()
  for i in range(n):
    letters = rng.choice(list('abcdefghijklmnopqrstuvwxyz '), size=200 + 37 * i)
    (root / f'doc{i:02d}.txt').write_text(f'doc {i}: ' + ''.join(letters))


def held_out_stream_by_hand(root, fraction):
  stream = []
  for path in sorted(root.iterdir()):
    if is_held_out(path.name, fraction):
      stream += byte_ids(path.read_text()) + [BYTE.eos_id]
  return np.array(stream)


def test_corpus_prompts_are_windows_of_the_held_out_stream(tmp_path):
  make_corpus(tmp_path / 'corpus')
  fraction = 0.3
  stream = held_out_stream_by_hand(tmp_path / 'corpus', fraction)
  assert 0 < stream.size
  requests = build_workload(prompts=f'text:{tmp_path}/corpus/*.txt', tokenizer=BYTE,
                            num_requests=40, input_lengths='uniform:5:30',
                            output_lengths='8', eval_fraction=fraction, seed=3)
  windows = {}
  for r in requests:
    n = len(r.prompt)
    assert 5 <= n <= 30
    if n not in windows:
      windows[n] = np.lib.stride_tricks.sliding_window_view(stream, n)
    assert (windows[n] == np.array(r.prompt)).all(axis=1).any(), r.prompt
  # Windows start at different places.
  assert len({tuple(r.prompt[:5]) for r in requests}) > 35


def test_corpus_prompts_start_with_bos_where_the_tokenizer_adds_one(tmp_path):
  make_llama(tmp_path / 'llama')
  tok = get_tokenizer(str(tmp_path / 'llama'))
  make_corpus(tmp_path / 'corpus')
  requests = build_workload(prompts=f'text:{tmp_path}/corpus/*.txt', tokenizer=tok,
                            num_requests=10, input_lengths='6', output_lengths='2',
                            eval_fraction=0.3)
  assert all(len(r.prompt) == 6 and r.prompt[0] == tok.bos_id for r in requests)


# ------------------------------------------------------------------------- determinism


def test_workloads_are_deterministic_from_the_seed(tmp_path):
  make_corpus(tmp_path / 'corpus')
  args = dict(prompts=f'text:{tmp_path}/corpus/*.txt', tokenizer=BYTE, num_requests=30,
              input_lengths='uniform:4:12', output_lengths='normal:10:3', scenario='server',
              rate_per_s=2.0, eval_fraction=0.3, sampling=Sampling(0.7, 20, 0.9, seed=123))
  a, b = build_workload(seed=1, **args), build_workload(seed=1, **args)
  assert a == b
  c = build_workload(seed=2, **args)
  assert [r.arrival_s for r in a] != [r.arrival_s for r in c]
  assert [r.prompt for r in a] != [r.prompt for r in c]
  # Each request its own sampling seed; the template's other options kept.
  seeds = [r.sampling.seed for r in a]
  assert len(set(seeds)) == len(seeds) and seeds == workload.request_seeds(1, 30)
  assert {(r.sampling.temperature, r.sampling.top_k, r.sampling.top_p) for r in a} == {
      (0.7, 20, 0.9)}


# ------------------------------------------------------------------------------ errors


GOOD = dict(prompts='synthetic', num_requests=8, input_lengths='4', output_lengths='4',
            scenario='offline', rate_per_s=None, seed=0, eval_fraction=0.05)


@pytest.mark.parametrize('overrides, field, phrase', [
    ({'prompts': 'nothing:here'}, 'inference.prompts', 'no prompt source'),
    ({'prompts': 'jsonl:'}, 'inference.prompts', 'no prompt source'),
    ({'num_requests': 0}, 'inference.num_requests', 'positive integer'),
    ({'num_requests': None}, 'inference.num_requests', 'is needed'),
    ({'input_lengths': None}, 'inference.input_lengths', 'is needed'),
    ({'input_lengths': 'uniform:9:2'}, 'inference.input_lengths', '1 <= A <= B'),
    ({'output_lengths': 'x'}, 'inference.output_lengths', 'unknown length distribution'),
    ({'scenario': 'single_stream'}, 'inference.scenario', 'unknown scenario'),
    ({'scenario': 'server'}, 'inference.rate_per_s', 'rate > 0'),
    ({'scenario': 'server', 'rate_per_s': -1.0}, 'inference.rate_per_s', 'rate > 0'),
    ({'seed': -1}, 'seed', 'non-negative'),
    ({'prompts': 'jsonl:p.jsonl'}, 'inference.input_lengths', 'must be unset'),
    ({'prompts': 'stdlib', 'eval_fraction': 1.5}, 'data.eval_fraction', 'between 0 and 1'),
])
def test_workload_errors_name_the_field(overrides, field, phrase):
  errors = workload.workload_errors(**{**GOOD, **overrides})
  assert [e.field for e in errors] == [field], errors
  assert phrase in errors[0].message
  with pytest.raises(ConfigError) as e:
    build_workload(tokenizer=BYTE, **{**GOOD, **overrides})
  assert e.value.field == field


def test_workload_errors_are_all_reported_at_once():
  errors = workload.workload_errors(**{**GOOD, 'num_requests': -2, 'output_lengths': '0',
                                       'scenario': 'server'})
  assert [e.field for e in errors] == ['inference.num_requests', 'inference.output_lengths',
                                       'inference.rate_per_s']
  assert workload.workload_errors(**GOOD) == []


@pytest.mark.parametrize('line, phrase', [
    ('not json', 'is not valid JSON'),
    ('[1, 2]', 'not an object'),
    ('{"answer": "x"}', 'has none of'),
    ('{"prompt": "a", "text": "b"}', 'has prompt and text'),
    ('{"prompt": 3}', 'not a string'),
    ('{"prompt": "a", "max_new_tokens": 0}', 'max_new_tokens=0'),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', 'only assistant messages'),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', 'messages[0]'),
])
def test_bad_jsonl_lines_name_the_line(tmp_path, line, phrase):
  (tmp_path / 'p.jsonl').write_text('{"prompt": "fine"}\n' + line + '\n')
  with pytest.raises(ConfigError) as e:
    build_workload(prompts=f'jsonl:{tmp_path}/p.jsonl', tokenizer=BYTE, num_requests=None,
                   output_lengths='4')
  assert e.value.field == 'inference.prompts' and 'p.jsonl:2' in e.value.message
  assert phrase in e.value.message, e.value.message


def test_missing_files_and_short_streams_are_config_errors(tmp_path):
  with pytest.raises(ConfigError) as e:
    build_workload(prompts=f'jsonl:{tmp_path}/none.jsonl', tokenizer=BYTE, num_requests=None,
                   output_lengths='4')
  assert e.value.field == 'inference.prompts' and 'no files match' in e.value.message
  make_corpus(tmp_path / 'corpus')
  with pytest.raises(ConfigError) as e:
    build_workload(prompts=f'text:{tmp_path}/corpus/*.txt', tokenizer=BYTE, num_requests=4,
                   input_lengths='100000', output_lengths='4', eval_fraction=0.3)
  assert e.value.field == 'inference.input_lengths' and 'held-out stream' in e.value.message

"""The lm-evaluation-harness adapter, end to end: `lm_eval.simple_evaluate` with
`--model efficientjax --model_args init=run:WORKDIR` runs a local multiple-choice task and a
rolling log-likelihood task on a quickstart:smoke run, and agrees with the project's own
evaluator and with hand computations; its request tokenisation is lm-eval's HF model's.

One `simple_evaluate` call for the module (lm-eval's start-up is seconds); its datasets cache
lives under the test's temporary directory and the `datasets` library is offline.
"""

# pylint: disable=g-import-not-at-top,wrong-import-position
import json

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip('lm_eval')

from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from configs import base
from efficientjax.data import ByteTokenizer, CheckpointTokenizer
from efficientjax.infer import loglikelihood, multiple_choice
from efficientjax.infer.lm_eval_adapter import EfficientJaxLM
from efficientjax.model import ModelConfig
from efficientjax.train import init_from
from efficientjax.train.loop import train
from tests.helpers import smoke_config
from tests.infer.test_multiple_choice import _log_softmax, by_hand, DOCS, write_task

WINDOW = 64  # the smoke run's data.seq_len: its model's max_seq_len, the adapter's window
TEXTS = ['import os\nimport sys\n\n\ndef main(argv):\n  """Runs the tool."""\n'
         '  for name in argv[1:]:\n    print(os.path.basename(name))\n  return 0\n',
         'x = 1\n', 'ü' * 40]  # 131 bytes (three windows), 6, 80 (two-byte characters)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A 2-step quickstart:smoke run and its (cfg, variables), loaded here as a run would."""
  workdir = tmp_path_factory.mktemp('lm_eval') / 'run'
  config = smoke_config(**{'train.steps': 2, 'train.checkpoint_every': 2,
                           'train.eval_every': 0})
  train(config, str(workdir), devices=jax.devices()[:1], progress=False)
  (workdir / 'config.json').write_text(json.dumps(config))
  model, source, _ = init_from.resolve({**config['model'], 'init': f'run:{workdir}'},
                                       config['data'], base.get_config().model.to_dict())
  cfg = ModelConfig.from_config(model, tokenizer_vocab_size=257, seq_len=WINDOW)
  assert cfg.max_seq_len == WINDOW
  return workdir, cfg, init_from.load(source, cfg)['params']


@pytest.fixture(scope='module')
def tasks(tmp_path_factory):
  directory = tmp_path_factory.mktemp('tasks')
  cache = directory / 'datasets_cache'
  mc = write_task(directory, 'tiny_mc', cache_dir=cache)
  texts = directory / 'texts.jsonl'
  texts.write_text(''.join(json.dumps({'text': t}) + '\n' for t in TEXTS))
  (directory / 'tiny_rolling.yaml').write_text(json.dumps({
      'task': 'tiny_rolling', 'dataset_path': 'json', 'dataset_kwargs': {
          'data_files': {'test': str(texts)}, 'cache_dir': str(cache)},
      'test_split': 'test', 'output_type': 'loglikelihood_rolling', 'doc_to_text': '',
      'doc_to_target': 'text'}))
  return directory, mc


@pytest.fixture(scope='module')
def results(run, tasks):
  workdir = run[0]
  directory = tasks[0]
  with pytest.MonkeyPatch.context() as mp:
    import datasets
    mp.setenv('HF_DATASETS_OFFLINE', '1')
    mp.setattr(datasets.config, 'HF_DATASETS_OFFLINE', True)
    mp.setattr(datasets.config, 'HF_HUB_OFFLINE', True)
    return lm_eval.simple_evaluate(
        model='efficientjax', model_args=f'init=run:{workdir},batch_size=4',
        tasks=['tiny_mc', 'tiny_rolling'],
        task_manager=TaskManager(include_path=str(directory), include_defaults=False))


def test_lm_eval_runs_a_local_task_and_agrees_with_evaluate(run, tasks, results):
  _, cfg, params = run
  ours = multiple_choice.evaluate(cfg, params, ByteTokenizer(), tasks[1])
  theirs = results['results']['tiny_mc']
  assert theirs['sample_len'] == ours['n'] == len(DOCS)
  assert theirs['acc,none'] == ours['acc']
  assert theirs['acc_norm,none'] == ours['acc_norm']
  assert theirs['acc_stderr,none'] == pytest.approx(ours['acc_stderr'])
  assert theirs['acc_norm_stderr,none'] == pytest.approx(ours['acc_norm_stderr'])
  # Every choice's log-likelihood, not just the argmaxes: the requests are tokenised alike
  # (an empty context, a context ending in a space) and scored alike.
  samples = sorted(results['samples']['tiny_mc'], key=lambda s: s['doc_id'])
  lm_lls = [[r[0] for r in s['filtered_resps']] for s in samples]
  np.testing.assert_allclose(np.concatenate(lm_lls), np.concatenate(ours['lls']), rtol=1e-6)


def lm_eval_windows(tokens, prefix_token, window):
  return [make_disjoint_window(w) for w in get_rolling_token_windows(
      token_list=tokens, prefix_token=prefix_token, max_seq_len=window, context_len=1)]


def test_rolling_agrees_with_lm_evals_windows_scored_by_hand(run, results):
  _, cfg, params = run
  samples = sorted(results['samples']['tiny_rolling'], key=lambda s: s['doc_id'])
  for text, sample in zip(TEXTS, samples):
    windows = lm_eval_windows(list(text.encode()), 256, WINDOW)
    want = sum(ll for ll, _ in by_hand(cfg, params, windows, WINDOW, pad_to=WINDOW))
    assert sample['resps'][0][0] == pytest.approx(want, rel=1e-5)
    assert loglikelihood.rolling(cfg, params, list(text.encode()), WINDOW,
                                 prefix_token=256) == pytest.approx(want, rel=1e-5)
  assert len(lm_eval_windows(list(TEXTS[0].encode()), 256, WINDOW)) == 3


def test_rolling_windows_are_lm_evals():
  for window in (1, 2, 3, 7, 8):
    for n in range(0, 20):
      tokens = list(range(100, 100 + n))
      assert loglikelihood.rolling_windows(tokens, window, 5) == lm_eval_windows(
          tokens, 5, window), (n, window)


class HFRequests:
  """lm-eval's HF model, only its text-to-token half, over a transformers tokenizer."""
  from lm_eval.models.huggingface import HFLM
  backend = 'causal'
  add_bos_token = None
  custom_prefix_token_id = None
  prefix_token_id = HFLM.__dict__['prefix_token_id']
  tok_encode = HFLM.tok_encode
  _encode_pair = TemplateLM._encode_pair
  loglikelihood = TemplateLM.loglikelihood

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def _loglikelihood_tokens(self, requests, **kwargs):
    del kwargs
    return [(context, continuation) for _, context, continuation in requests]


@pytest.mark.parametrize('make', ['make_llama', 'make_qwen'])
def test_requests_are_tokenised_as_lm_evals_hf_model_does(tmp_path, make):
  """With BOS (Llama 3) and without (Qwen2.5): the pair split, the BOS, the empty context."""
  from transformers import AutoTokenizer
  from tests.data import test_chat
  getattr(test_chat, make)(tmp_path)
  ours = CheckpointTokenizer(str(tmp_path))
  pairs = [('the cat sat', ' on the mat'), ('hello world,  ', 'you are'), ('', 'the cat'),
           ('', ' hello'), ('système', ' ü'), ('the cat ', '')]
  if ours.bos_token:  # a context that already starts with the BOS text gets no second one
    pairs.append((ours.bos_token + 'the cat', ' sat'))
  reference = HFRequests(AutoTokenizer.from_pretrained(str(tmp_path))).loglikelihood(
      [Instance('loglikelihood', {}, pair, 0) for pair in pairs], disable_tqdm=True)
  assert [loglikelihood.encode_pair(ours, c, x) for c, x in pairs] == [
      (list(c), list(x)) for c, x in reference]
  assert any(c[:1] == [ours.bos_id] for c, _ in reference) == ours.add_bos


def test_generate_until_is_greedy_decoding_cut_at_until(run):
  _, cfg, params = run
  lm = EfficientJaxLM(cfg, params, ByteTokenizer(), num_slots=2, prefill_chunk=16)
  prompt = 'def main():\n  '
  tokens = list(prompt.encode())
  new = []
  for _ in range(8):  # greedy by hand: one full pass per token
    logp = by_hand_logits(cfg, params, tokens + new)
    new.append(int(np.argmax(logp)))
  text = ByteTokenizer().decode([t for t in new if t < 256])
  assert 256 not in new  # (else the engine would stop there)
  stop = text[3]
  requests = [Instance('generate_until', {}, (prompt, {'until': ['<never>'], 'max_gen_toks': 8}),
                       0),
              Instance('generate_until', {}, (prompt, {'until': [stop], 'max_gen_toks': 8}), 0)]
  assert lm.generate_until(requests) == [text, text.split(stop, 1)[0]]


def by_hand_logits(cfg, params, tokens):
  """The next-token log-probabilities after `tokens`, from one direct pass (padded to WINDOW)."""
  row = np.zeros((1, WINDOW), np.int32)
  row[0, :len(tokens)] = tokens
  return np.asarray(_log_softmax(cfg)(params, row))[0, len(tokens) - 1]


def test_an_hf_checkpoint_scores_as_lm_evals_hf_model_scores_it(run, tmp_path):
  """`init=hf:DIR` against lm-eval's own HF model (transformers, torch) on the same Llama
  export with a BOS tokenizer, in a 16-token window: long contexts cut, rolling in windows."""
  from lm_eval.models.huggingface import HFLM
  from efficientjax.hf import save_llama
  from tests.data import test_chat
  _, cfg, params = run
  directory = tmp_path / 'hf'
  save_llama(directory, params, cfg)
  test_chat.make_llama(directory)  # tokenizer files (a byte-level BPE of 360 ids)
  ours = EfficientJaxLM.create_from_arg_string(f'init=hf:{directory},max_length=16',
                                               {'batch_size': 2, 'device': 'cpu'})
  theirs = HFLM(pretrained=str(directory), device='cpu', batch_size=2, dtype='float32',
                max_length=16)
  pairs = [('the cat sat', ' on the mat'), ('hello world,  ', 'you are'), ('', 'the cat'),
           ('système', ' ü'), ('the cat sat on the mat, hello world ' * 3, 'assistant')]
  requests = [Instance('loglikelihood', {}, pair, 0) for pair in pairs]
  got, want = ours.loglikelihood(requests), theirs.loglikelihood(requests)
  np.testing.assert_allclose([s for s, _ in got], [s for s, _ in want], rtol=1e-5)
  assert [g for _, g in got] == [g for _, g in want]
  texts = [Instance('loglikelihood_rolling', {}, (t,), 0)
           for t in ('the cat sat on the mat ' * 4, 'hello')]
  np.testing.assert_allclose(ours.loglikelihood_rolling(texts),
                             theirs.loglikelihood_rolling(texts), rtol=1e-5)

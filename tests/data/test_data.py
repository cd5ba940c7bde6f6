"""Tests for efficientjax.data: tokenizers, corpora, splitting, packing and resumable streams."""

import json
import os
import sys

import numpy as np
import pytest

from efficientjax.data import build_data
from efficientjax.data import ByteTokenizer
from efficientjax.data import CORPORA
from efficientjax.data import get_tokenizer
from efficientjax.data import HFTokenizer
from efficientjax.data import is_held_out
from efficientjax.data import load_documents
from efficientjax.data import split_documents
from efficientjax.data import Tokenizer
from efficientjax.data import pipeline
from efficientjax.errors import ConfigError

WORDS = 'alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu'.split()
BYTE = ByteTokenizer()


def write_corpus(root, n, *, start=0, seed=0, lengths=(20, 80)):
  """Writes n documents `doc{i:03d}.txt`, each unique (a `<doc i>` header); returns name->text."""
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  texts = {}
  for i in range(start, start + n):
    words = rng.choice(WORDS, size=int(rng.integers(*lengths)))
    text = f'<doc {i}> ' + ' '.join(words) + '\n'
    name = f'doc{i:03d}.txt'
    (root / name).write_text(text, encoding='utf-8')
    texts[name] = text
  return texts


def build(corpus, **overrides):
  kwargs = dict(tokenizer=BYTE, seq_len=16, global_batch_size=4, seed=0, eval_fraction=0.25,
                eval_batches=4)
  kwargs.update(overrides)
  return build_data(corpus=corpus, **kwargs)


def take(stream, n):
  return [stream.next() for _ in range(n)]


def expect_config_error(field, phrase, fn, *args, **kwargs):
  with pytest.raises(ConfigError) as info:
    fn(*args, **kwargs)
  assert info.value.field == field, info.value
  assert phrase in info.value.message, info.value.message
  return info.value


def split_on_eos(tokens, eos_id):
  """The documents of a packed stream: pieces between eos tokens (the last may be partial)."""
  cuts = np.flatnonzero(tokens == eos_id)
  return np.split(tokens, cuts + 1), cuts


@pytest.fixture
def corpus(tmp_path):
  texts = write_corpus(tmp_path / 'corpus', 40)
  return f'text:{tmp_path}/corpus/*.txt', texts


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_including_non_ascii():
  text = 'héllo wörld — 日本語 🙂\n\ttabs'
  ids = BYTE.encode(text)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, list(text.encode('utf-8')))
  assert BYTE.decode(ids) == text
  assert (BYTE.vocab_size, BYTE.eos_id, BYTE.name) == (257, 256, 'byte')
  assert isinstance(BYTE, Tokenizer)
  # eos and anything beyond the bytes vanish on decoding.
  assert BYTE.decode([*BYTE.encode('ab'), 256, *BYTE.encode('c'), 300]) == 'abc'
  assert BYTE.decode(BYTE.encode('é')[:1]) == '\ufffd'
  batch = BYTE.encode_batch(['a', '', 'ü'])
  assert [b.tolist() for b in batch] == [[97], [], [195, 188]]


def save_word_level(path, special_tokens):
  from tokenizers import models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer as Library  # pylint: disable=g-import-not-at-top
  tok = Library(models.WordLevel(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.train_from_iterator(['the cat sat', 'the dog ran'],
                          trainers.WordLevelTrainer(special_tokens=special_tokens))
  tok.save(str(path))
  return tok.get_vocab()


def test_hf_tokenizer_encode_decode_eos(tmp_path):
  vocab = save_word_level(tmp_path / 'tokenizer.json', ['<unk>', '<|endoftext|>'])
  # A directory is a checkpoint's: it needs tokenizer_config.json too (tests/data/test_chat.py).
  (tmp_path / 'tokenizer_config.json').write_text('{"eos_token": "<|endoftext|>"}')
  for spec in (str(tmp_path / 'tokenizer.json'), str(tmp_path)):
    tok = get_tokenizer(spec)
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert tok.eos_id == vocab['<|endoftext|>']
    assert tok.vocab_size == len(vocab) == 7
    ids = tok.encode('the cat ran zebra')
    assert ids.dtype == np.int32
    # No special tokens added; unknown words map to <unk>.
    assert ids.tolist() == [vocab['the'], vocab['cat'], vocab['ran'], vocab['<unk>']]
    assert tok.decode(tok.encode('the dog sat')) == 'the dog sat'
    assert tok.decode([*tok.encode('the cat'), tok.eos_id]) == 'the cat'
    assert [b.tolist() for b in tok.encode_batch(['the', 'dog dog'])] == [
        [vocab['the']], [vocab['dog'], vocab['dog']]]
  assert get_tokenizer(str(tmp_path), eos_token='<unk>').eos_id == vocab['<unk>']


def test_hf_tokenizer_errors(tmp_path):
  expect_config_error('data.tokenizer', 'no tokenizer file', HFTokenizer,
                      str(tmp_path / 'missing.json'))
  expect_config_error('data.tokenizer', 'neither "byte" nor an existing file', get_tokenizer,
                      'gpt2')
  expect_config_error('data.tokenizer', 'has no tokenizer.json', get_tokenizer, str(tmp_path))
  (tmp_path / 'bad.json').write_text('{"not": "a tokenizer"}')
  expect_config_error('data.tokenizer', 'could not load', get_tokenizer,
                      str(tmp_path / 'bad.json'))
  save_word_level(tmp_path / 'tokenizer.json', ['<unk>'])
  expect_config_error('data.tokenizer', 'no tokenizer_config.json', get_tokenizer, str(tmp_path))
  file = str(tmp_path / 'tokenizer.json')
  expect_config_error('data.tokenizer', 'data.eos_token', get_tokenizer, file)
  expect_config_error('data.eos_token', 'not in the vocabulary', get_tokenizer, file,
                      eos_token='</s>')
  expect_config_error('data.eos_token', 'fixed eos id', get_tokenizer, 'byte', eos_token='</s>')


# ------------------------------------------------------------------------------- corpora


def test_text_corpus_order_names_and_limits(tmp_path, monkeypatch):
  texts = write_corpus(tmp_path / 'c', 5)
  (tmp_path / 'c' / 'sub').mkdir()
  (tmp_path / 'c' / 'sub' / 'deep.txt').write_text('deep text')
  (tmp_path / 'c' / 'empty.txt').write_text('')
  (tmp_path / 'c' / 'bad.txt').write_bytes(b'ok \xff\xfe end')
  docs = load_documents(f'text:{tmp_path}/c/**/*.txt')
  names = [d.name for d in docs]
  # Sorted, relative to the glob's fixed prefix, empty files skipped, bad bytes replaced.
  assert names == sorted(names) == ['bad.txt', *sorted(texts), 'sub/deep.txt']
  assert docs[0].text == 'ok \ufffd\ufffd end'
  assert {d.name: d.text for d in docs if d.name in texts} == texts
  assert load_documents(f'text:{tmp_path}/c/**/*.txt', max_documents=3) == docs[:3]
  # The same files named the same way whichever way the glob is spelled.
  monkeypatch.chdir(tmp_path)
  assert load_documents('text:c/**/*.txt') == docs
  assert set(CORPORA) == {'stdlib', 'text', 'hf', 'synthetic'}


def test_stdlib_corpus_smoke():
  docs = load_documents('stdlib', max_documents=50)
  assert len(docs) == 50
  names = [d.name for d in docs]
  assert names == sorted(names) and len(set(names)) == 50
  assert all(n.endswith('.py') and 'site-packages' not in n for n in names)
  assert all(d.text for d in docs)
  data = build('stdlib', max_documents=50, seq_len=64, global_batch_size=8, eval_fraction=0.2)
  batch = data.train.next()
  assert batch.shape == (8, 65) and batch.dtype == np.int32
  assert data.stats['train_documents'] + data.stats['eval_documents'] == 50
  assert data.train_tokens.dtype == np.uint16


def test_corpus_errors(tmp_path, monkeypatch):
  expect_config_error('data.corpus', "'text:GLOB'", load_documents, 'wiki')
  expect_config_error('data.corpus', 'no files match', load_documents, f'text:{tmp_path}/*.txt')
  expect_config_error('data.corpus', 'needs a glob', load_documents, 'text:')
  (tmp_path / 'empty.txt').write_text('')
  expect_config_error('data.corpus', 'are empty', load_documents, f'text:{tmp_path}/*.txt')
  expect_config_error('data.corpus', 'takes no argument', load_documents, 'stdlib:x')
  expect_config_error('data.corpus', 'takes no argument', load_documents, 'synthetic:x')
  expect_config_error('data.max_documents', 'positive integer', load_documents, 'stdlib',
                      max_documents=0)
  expect_config_error('data.corpus', 'needs a dataset name', load_documents, 'hf:')
  monkeypatch.setitem(sys.modules, 'datasets', None)  # Makes `import datasets` fail.
  err = expect_config_error('data.corpus', 'pip install datasets', load_documents,
                            'hf:wikitext:wikitext-2-raw-v1')
  assert 'network' in err.message and 'stdlib' in err.message


# ------------------------------------------------------------------ split, packing, stream


def test_held_out_split_is_disjoint_and_stable(tmp_path, corpus):
  spec, texts = corpus
  data = build(spec)
  train_names = {n for n in texts if not is_held_out(n, 0.25)}
  eval_names = set(texts) - train_names
  assert train_names and eval_names
  assert data.stats['train_documents'] == len(train_names)
  assert data.stats['eval_documents'] == len(eval_names)
  # By content: each split's stream holds exactly its own documents, nothing of the other.
  train_text = BYTE.decode(data.train_tokens)
  eval_text = BYTE.decode(data.eval_tokens)
  for name, text in texts.items():
    assert (text in eval_text) == (name in eval_names)
    assert (text in train_text) == (name in train_names)
  # Independent of the seed, and of other documents joining the corpus.
  np.testing.assert_array_equal(build(spec, seed=7).eval_tokens, data.eval_tokens)
  write_corpus(tmp_path / 'corpus', 40, start=40, seed=1)
  train2, eval2 = split_documents(load_documents(spec), 0.25)
  assert {d.name for d in eval2} & set(texts) == eval_names
  assert {d.name for d in train2} & set(texts) == train_names
  assert len(eval2) > len(eval_names)


def test_train_stream_packs_every_train_document_once(corpus):
  spec, texts = corpus
  data = build(spec)
  train_texts = sorted(t for n, t in texts.items() if not is_held_out(n, 0.25))
  pieces, cuts = split_on_eos(data.train_tokens, BYTE.eos_id)
  assert cuts[-1] == data.train_tokens.size - 1  # Every document, the last too, ends in eos.
  assert pieces[-1].size == 0
  assert sorted(BYTE.decode(p) for p in pieces[:-1]) == train_texts
  assert data.stats['train_tokens'] == sum(len(t.encode()) + 1 for t in train_texts)
  # The document order is shuffled from the seed.
  other = build(spec, seed=1).train_tokens
  assert other.size == data.train_tokens.size
  assert not np.array_equal(other, data.train_tokens)


def test_packing_does_not_depend_on_chunking_or_storage(corpus, monkeypatch):
  spec, _ = corpus
  data = build(spec)
  assert data.train_tokens.dtype == np.uint16
  monkeypatch.setattr(pipeline, '_CHUNK_CHARS', 50)  # Many encode_batch calls, not one.
  np.testing.assert_array_equal(build(spec).train_tokens, data.train_tokens)
  wide = build(spec, tokenizer=_WideVocab())
  assert wide.train_tokens.dtype == np.int32  # Ids past 65535 would not fit uint16.
  np.testing.assert_array_equal(wide.train_tokens[wide.train_tokens != 70000],
                                data.train_tokens[data.train_tokens != 256])
  np.testing.assert_array_equal(np.flatnonzero(wide.train_tokens == 70000),
                                np.flatnonzero(data.train_tokens == 256))


class _WideVocab(ByteTokenizer):
  name = 'wide'
  vocab_size = 70001
  eos_id = 70000


def test_epochs_visit_windows_in_seeded_permutations(corpus):
  spec, _ = corpus
  seq_len, gb, seed = 16, 4, 3
  data = build(spec, seed=seed)
  tokens = data.train_tokens
  n = (tokens.size - 1) // seq_len
  assert data.stats['train_sequences'] == n
  windows = tokens[np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)].astype(np.int32)
  per_epoch = n // gb
  assert data.train.batches_per_epoch == per_epoch
  batches = take(data.train, per_epoch + 3)
  for epoch in (0, 1):
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for b in range(per_epoch if epoch == 0 else 3):
      expected = windows[order[b * gb:(b + 1) * gb]]
      np.testing.assert_array_equal(batches[epoch * per_epoch + b], expected)
  assert data.train.state()['epoch'] == 1 and data.train.state()['position'] == 3


def test_eval_windows_reconstruct_the_held_out_stream(corpus):
  spec, texts = corpus
  seq_len = 16
  data = build(spec, global_batch_size=1, eval_batches=10**6)
  windows = np.concatenate(data.eval_batches())
  eval_docs = [texts[n] for n in sorted(texts) if is_held_out(n, 0.25)]
  expected = np.concatenate([np.append(BYTE.encode(t), BYTE.eos_id) for t in eval_docs])
  assert data.stats['eval_sequences'] == len(windows) == (expected.size - 1) // seq_len
  assert data.stats['eval_batches'] == len(windows)
  # Consecutive windows overlap by exactly one token.
  np.testing.assert_array_equal(windows[1:, 0], windows[:-1, -1])
  stream = np.concatenate([windows[0], windows[1:, 1:].reshape(-1)])
  assert stream.size == len(windows) * seq_len + 1
  np.testing.assert_array_equal(stream, expected[:stream.size])
  assert expected.size - stream.size < seq_len  # Only a short tail is dropped.
  # Inputs and targets cover every next-token pair of the stream exactly once, in order.
  np.testing.assert_array_equal(windows[:, :-1].reshape(-1), stream[:-1])
  np.testing.assert_array_equal(windows[:, 1:].reshape(-1), stream[1:])
  # Every document that the windows reach in full is intact and followed by eos.
  pieces, _ = split_on_eos(stream, BYTE.eos_id)
  complete = [BYTE.decode(p) for p in pieces[:-1]]
  assert complete == eval_docs[:len(complete)]
  assert len(complete) >= len(eval_docs) - 1


def test_eval_batches_are_the_first_full_batches_in_order(corpus):
  spec, _ = corpus
  data = build(spec, global_batch_size=4, eval_batches=3)
  all_windows = np.concatenate(build(spec, global_batch_size=1, eval_batches=10**6)
                               .eval_batches())
  first = data.eval_batches()
  assert len(first) == 3 and data.stats['eval_batches'] == 3
  np.testing.assert_array_equal(np.concatenate(first), all_windows[:12])
  for a, b in zip(first, data.eval_batches()):
    np.testing.assert_array_equal(a, b)
  # Asking for more than exist gives every full batch, no wrap-around.
  many = build(spec, global_batch_size=4, eval_batches=10**6)
  assert len(many.eval_batches()) == len(all_windows) // 4 == many.stats['eval_batches']


def test_stream_is_deterministic_from_the_seed(corpus):
  spec, _ = corpus
  a = take(build(spec, seed=5).train, 30)
  b = take(build(spec, seed=5).train, 30)
  c = take(build(spec, seed=6).train, 30)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not any(np.array_equal(x, z) for x, z in zip(a, c))
  assert all(x.dtype == np.int32 and x.shape == (4, 17) for x in a)


def test_restore_continues_exactly_and_refuses_foreign_states(tmp_path, corpus):
  spec, _ = corpus
  data = build(spec)
  k = data.train.batches_per_epoch - 2  # The m batches below cross an epoch boundary.
  take(data.train, k)
  state = json.loads(json.dumps(data.train.state()))
  assert (state['step'], state['epoch'], state['position']) == (k, 0, k)
  expected = take(data.train, 5)
  fresh = build(spec)
  fresh.train.restore(state)
  for x, y in zip(take(fresh.train, 5), expected):
    np.testing.assert_array_equal(x, y)
  # A state from another config is refused, naming the field that changed.
  for field, overrides in [('seed', dict(seed=1)),
                           ('train.global_batch_size', dict(global_batch_size=8)),
                           ('data.seq_len', dict(seq_len=8))]:
    expect_config_error(field, 'different data config', build(spec, **overrides).train.restore,
                        state)
  expect_config_error('data.corpus', 'different data config',
                      build('synthetic').train.restore, state)
  # A new training document changes the stream; a new held-out one would leave it alone.
  new = next(i for i in range(500, 600) if not is_held_out(f'doc{i:03d}.txt', 0.25))
  write_corpus(tmp_path / 'corpus', 1, start=new)
  err = expect_config_error('data.corpus', 'different data config',
                            build(spec).train.restore, state)
  assert 'start a fresh run' in err.message


def test_process_shares_concatenate_to_the_global_batch(corpus):
  spec, _ = corpus
  whole = build(spec, global_batch_size=8)
  take(whole.train, 2)
  state = whole.train.state()
  want_train = take(whole.train, 3)
  want_eval = whole.eval_batches()
  for count in (2, 4, 8):
    parts = [build(spec, global_batch_size=8, process_index=p, process_count=count)
             for p in range(count)]
    for part in parts:
      part.train.restore(state)  # A state saved under one process count resumes under another.
    shares = [take(part.train, 3) for part in parts]
    for step in range(3):
      got = np.concatenate([s[step] for s in shares])
      np.testing.assert_array_equal(got, want_train[step])
      assert shares[0][step].shape == (8 // count, 17)
    for b, want in enumerate(want_eval):
      np.testing.assert_array_equal(np.concatenate([p.eval_batches()[b] for p in parts]), want)


def test_synthetic_data():
  tok = ByteTokenizer()
  data = build('synthetic', seq_len=32, global_batch_size=4, eval_batches=2)
  assert data.synthetic and data.stats['synthetic'] and data.train_tokens is None
  assert data.stats['eval_sequences'] == 8 and data.stats['train_documents'] == 0
  batches = take(data.train, 6)
  assert all(b.shape == (4, 33) and b.dtype == np.int32 for b in batches)
  stacked = np.stack(batches)
  assert stacked.min() >= 0 and stacked.max() < tok.vocab_size
  # Roughly uniform over the vocabulary: every id turns up in 792 draws of 257.
  assert len(np.unique(stacked)) > 200
  again = build('synthetic', seq_len=32, global_batch_size=4, eval_batches=2)
  np.testing.assert_array_equal(np.stack(take(again.train, 6)), stacked)
  other = build('synthetic', seq_len=32, global_batch_size=4, eval_batches=2, seed=1)
  assert not np.array_equal(other.train.next(), batches[0])
  evals = data.eval_batches()
  assert len(evals) == 2
  np.testing.assert_array_equal(np.stack(evals), np.stack(data.eval_batches()))
  assert not any(np.array_equal(e, b) for e in evals for b in batches)
  # Resume and per-process shares work as for real data.
  state = json.loads(json.dumps(again.train.state()))
  fresh = build('synthetic', seq_len=32, global_batch_size=4, eval_batches=2)
  fresh.train.restore(state)
  want = data.train.next()
  np.testing.assert_array_equal(fresh.train.next(), want)
  halves = [build('synthetic', seq_len=32, global_batch_size=4, eval_batches=2,
                  process_index=p, process_count=2) for p in range(2)]
  for h in halves:
    h.train.restore(state)
  np.testing.assert_array_equal(np.concatenate([h.train.next() for h in halves]), want)
  np.testing.assert_array_equal(
      np.concatenate([h.eval_batches()[1] for h in halves]), evals[1])
  small = build('synthetic', seq_len=32, global_batch_size=4, eval_batches=2,
                tokenizer=_SmallVocab())
  assert small.train.next().max() < 100
  expect_config_error('data.tokenizer', 'different data config', small.train.restore, state)


class _SmallVocab(ByteTokenizer):
  name = 'small'
  vocab_size = 100


def test_pipeline_config_errors(tmp_path, corpus):
  spec, _ = corpus
  expect_config_error('data.eval_fraction', 'between 0 and 1', build, spec, eval_fraction=0.0)
  expect_config_error('data.eval_fraction', 'between 0 and 1', build, spec, eval_fraction=1.0)
  expect_config_error('train.global_batch_size', 'multiple of 4', build, spec,
                      global_batch_size=6, process_count=4)
  expect_config_error('data.seq_len', 'positive integer', build, spec, seq_len=0)
  expect_config_error('train.global_batch_size', 'positive integer', build, spec,
                      global_batch_size=0)
  expect_config_error('data.eval_batches', 'positive integer', build, spec, eval_batches=0)
  expect_config_error('seed', 'non-negative', build, spec, seed=-1)
  expect_config_error('data.eval_fraction', 'raise data.eval_fraction', build, spec,
                      eval_fraction=1e-12)
  expect_config_error('data.eval_fraction', 'lower data.eval_fraction', build, spec,
                      eval_fraction=1 - 1e-12)
  expect_config_error('data.corpus', 'at least 2', build, spec, max_documents=1)
  # Held-out too short for one global batch: the message carries the numbers.
  err = expect_config_error('data.eval_fraction', 'fewer than one global batch of 4', build, spec,
                            seq_len=1000)
  assert 'held-out split has' in err.message and 'sequences of seq_len+1=1001' in err.message
  # Train too short while held-out is fine: a big held-out document, tiny train ones.
  names = [f'f{i}.txt' for i in range(20)]
  held = [n for n in names if is_held_out(n, 0.5)]
  assert held and len(held) < len(names)
  (tmp_path / 'skew').mkdir()
  for n in names:
    (tmp_path / 'skew' / n).write_text('x' * (5000 if n in held else 10))
  err = expect_config_error('train.global_batch_size', 'the train split has', build,
                            f'text:{tmp_path}/skew/*.txt', eval_fraction=0.5, seq_len=100)
  assert 'use a larger corpus' in err.message

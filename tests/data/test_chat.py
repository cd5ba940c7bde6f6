"""Checkpoint tokenizer directories and chat templates, against transformers (offline).

Four tiny checkpoint directories carry the tokenizer_config.json layouts and the chat templates
of Llama 3.2 Instruct, Qwen2.5 Instruct, Mistral Instruct v0.1 (legacy special_tokens_map.json,
chat_template.jinja, config.json instead of generation_config.json) and a ChatML checkpoint with
several named templates. Their tokenizer.json is a byte-level BPE trained here on a few
sentences, with each family's special tokens. For conversations with a system prompt, several
turns, non-ASCII text, tools and tool calls, with and without the generation prompt,
`render_chat` must give transformers' `apply_chat_template(tokenize=False)` text exactly and
`encode_chat` its ids; templates that call raise_exception must raise the same error; and
the directory's vocabulary size, special ids and generation stop ids must be
`AutoTokenizer`'s and `GenerationConfig`'s.
"""

import datetime
import json

import jinja2
import numpy as np
import pytest
from transformers import AutoConfig
from transformers import AutoTokenizer
from transformers import GenerationConfig

from efficientjax.data import build_data
from efficientjax.data import ByteTokenizer
from efficientjax.data import CheckpointTokenizer
from efficientjax.data import encode_chat
from efficientjax.data import get_tokenizer
from efficientjax.data import is_held_out
from efficientjax.data import load_documents
from efficientjax.data import render_chat
from efficientjax.errors import ConfigError
from experiments import validate
from tests.data import chat_templates
from tests.helpers import smoke_config

TEXT = ['the cat sat on the mat', 'hello world, you are a helpful assistant',
        'system user assistant tool weather city']

LLAMA_SPECIALS = ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>',
                  '<|end_header_id|>', '<|eom_id|>', '<|eot_id|>', '<|python_tag|>']
QWEN_SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
MISTRAL_SPECIALS = ['<unk>', '<s>', '</s>', '[IMG]']


def save_tokenizer(path, specials, *, bos=None, plain=()):
  """A byte-level BPE (any text encodes) with `specials`; `plain` added tokens that are not
  special (Qwen's <tool_call>); a post-processor that starts every text with `bos` if given.
  Returns {id: AddedToken} of its added tokens."""
  # pylint: disable=g-import-not-at-top
  from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
  from tokenizers import Tokenizer as Library
  # pylint: enable=g-import-not-at-top
  tok = Library(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(TEXT, trainers.BpeTrainer(
      vocab_size=360, special_tokens=specials, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
  if bos is not None:
    tok.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A', pair=f'{bos} $A {bos} $B',
        special_tokens=[(bos, tok.token_to_id(bos))])
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / 'tokenizer.json'))
  return tok.get_added_tokens_decoder()


def decoder_json(added):
  """tokenizer_config.json's added_tokens_decoder, as transformers writes it."""
  return {str(i): {'content': t.content, 'lstrip': t.lstrip, 'normalized': t.normalized,
                   'rstrip': t.rstrip, 'single_word': t.single_word, 'special': t.special}
          for i, t in sorted(added.items())}


def write_json(path, data):
  path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding='utf-8')


def ids_of(added):
  return {t.content: i for i, t in added.items()}


def make_llama(path):
  added = save_tokenizer(path, LLAMA_SPECIALS, bos='<|begin_of_text|>')
  ids = ids_of(added)
  write_json(path / 'tokenizer_config.json', {
      'added_tokens_decoder': decoder_json(added),
      'bos_token': '<|begin_of_text|>', 'chat_template': chat_templates.LLAMA_3_2,
      'clean_up_tokenization_spaces': True, 'eos_token': '<|eot_id|>',
      'model_input_names': ['input_ids', 'attention_mask'], 'model_max_length': 131072,
      'tokenizer_class': 'PreTrainedTokenizerFast'})
  # Ignored by transformers (and here): tokenizer_config.json has added_tokens_decoder.
  write_json(path / 'special_tokens_map.json', {
      'bos_token': {'content': '<|begin_of_text|>', 'lstrip': False, 'normalized': False,
                    'rstrip': False, 'single_word': False},
      'eos_token': '<|eot_id|>', 'pad_token': '<|end_of_text|>'})
  write_json(path / 'generation_config.json', {
      'bos_token_id': ids['<|begin_of_text|>'], 'do_sample': True,
      'eos_token_id': [ids['<|end_of_text|>'], ids['<|eom_id|>'], ids['<|eot_id|>']],
      'temperature': 0.6, 'top_p': 0.9, 'transformers_version': '4.45.0.dev0'})


def make_qwen(path):
  added = save_tokenizer(path, QWEN_SPECIALS, plain=['<tool_call>', '</tool_call>'])
  ids = ids_of(added)

  def token(content):  # tokenizer_config.json spells some tokens as AddedToken objects
    return {'__type': 'AddedToken', 'content': content, 'lstrip': False, 'normalized': False,
            'rstrip': False, 'single_word': False, 'special': True}

  write_json(path / 'tokenizer_config.json', {
      'add_bos_token': False, 'add_prefix_space': False,
      'added_tokens_decoder': decoder_json(added),
      'additional_special_tokens': ['<|im_start|>', '<|im_end|>'], 'bos_token': None,
      'chat_template': chat_templates.QWEN_2_5, 'clean_up_tokenization_spaces': False,
      'eos_token': token('<|im_end|>'), 'errors': 'replace', 'model_max_length': 131072,
      'pad_token': '<|endoftext|>', 'split_special_tokens': False,
      'tokenizer_class': 'Qwen2Tokenizer', 'unk_token': None})
  write_json(path / 'generation_config.json', {
      'bos_token_id': ids['<|endoftext|>'], 'pad_token_id': ids['<|endoftext|>'],
      'do_sample': True, 'eos_token_id': [ids['<|im_end|>'], ids['<|endoftext|>']],
      'repetition_penalty': 1.05, 'temperature': 0.7, 'top_p': 0.8, 'top_k': 20})


def make_mistral(path):
  # The legacy layout: no added_tokens_decoder, so special_tokens_map.json is read (and wins);
  # add_bos_token=true with a post-processor that adds none: transformers 5 follows the latter.
  save_tokenizer(path, MISTRAL_SPECIALS)
  write_json(path / 'tokenizer_config.json', {
      'add_bos_token': True, 'add_eos_token': False, 'bos_token': '<s>', 'eos_token': '<unk>',
      'image_token': '[IMG]', 'legacy': True, 'tokenizer_class': 'LlamaTokenizer',
      'unk_token': '<unk>', 'use_default_system_prompt': False,
      'sep_like_token': {'content': '[IMG]'}})  # not marked an AddedToken: not a token
  write_json(path / 'special_tokens_map.json', {
      'bos_token': '<s>', 'eos_token': {'content': '</s>', 'lstrip': False, 'normalized': False,
                                        'rstrip': False, 'single_word': False},
      'pad_token': '</s>', 'unk_token': '<unk>'})
  (path / 'chat_template.jinja').write_text(chat_templates.MISTRAL_V0_1, encoding='utf-8')
  (path / 'additional_chat_templates').mkdir()
  (path / 'additional_chat_templates' / 'features.jinja').write_text(chat_templates.FEATURES,
                                                                     encoding='utf-8')
  write_json(path / 'config.json', {'architectures': ['MistralForCausalLM'],
                                    'model_type': 'mistral', 'bos_token_id': 1,
                                    'eos_token_id': 2, 'vocab_size': 32000})


def make_chatml(path):
  added = save_tokenizer(path, QWEN_SPECIALS)
  write_json(path / 'tokenizer_config.json', {
      'added_tokens_decoder': decoder_json(added), 'bos_token': '<|im_start|>',
      'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>',
      'tokenizer_class': 'PreTrainedTokenizerFast',
      'chat_template': [{'name': 'default', 'template': chat_templates.CHATML},
                        {'name': 'tool_use', 'template': chat_templates.QWEN_2_5}]})


MAKERS = {'llama': make_llama, 'qwen': make_qwen, 'mistral': make_mistral,
          'chatml': make_chatml}


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('checkpoints')
  for name, make in MAKERS.items():
    make(root / name)
  return {name: str(root / name) for name in MAKERS}


@pytest.fixture(scope='module')
def ours(dirs):
  return {name: get_tokenizer(d) for name, d in dirs.items()}


@pytest.fixture(scope='module')
def theirs(dirs):
  return {name: AutoTokenizer.from_pretrained(d) for name, d in dirs.items()}


# ------------------------------------------------------------------------ conversations

SYSTEM_USER = [{'role': 'system', 'content': 'You are a terse assistant.'},
               {'role': 'user', 'content': 'What is the capital of France?'}]
MULTI_TURN = [{'role': 'user', 'content': 'Hi there'},
              # tool_calls=None, as OpenAI-style clients send it, is dropped before rendering
              # (Llama's template would otherwise take this for a tool call).
              {'role': 'assistant', 'content': '  Hello! How can I help?  ', 'tool_calls': None},
              {'role': 'user', 'content': 'Tell me a joke.'}]
REASONING = {'role': 'assistant', 'content': 'ok', 'reasoning': 'because'}
NON_ASCII = [{'role': 'system', 'content': 'Réponds en français — 日本語 🙂'},
             {'role': 'user', 'content': 'héllo wörld <&> "quotes" \\ back\nslash'}]
TOOLS = [{'type': 'function', 'function': {
    'name': 'get_weather', 'description': 'The weather in a city — «quoted» & <tagged>',
    'parameters': {'type': 'object', 'required': ['city'], 'properties': {
        'city': {'type': 'string'}, 'unit': {'type': 'string', 'enum': ['c', 'f']}}}}}]
TOOL_TURN = [
    {'role': 'system', 'content': 'Use tools.'},
    {'role': 'user', 'content': 'Weather in Zürich?'},
    # content None is dropped before rendering, as transformers does.
    {'role': 'assistant', 'content': None, 'tool_calls': [{'type': 'function', 'function': {
        'name': 'get_weather', 'arguments': {'city': 'Zürich', 'unit': 'c'}}}]},
    {'role': 'tool', 'name': 'get_weather', 'content': '{"temperature": 21, "sky": "☀"}'},
    {'role': 'tool', 'name': 'get_weather', 'content': 'second result'}]

CASES = {
    'llama-system': ('llama', SYSTEM_USER, {}),
    'llama-multi': ('llama', MULTI_TURN, {}),
    'llama-non-ascii': ('llama', NON_ASCII, {}),
    'llama-date': ('llama', SYSTEM_USER, {'date_string': '26 Jul 2024'}),
    'llama-tools': ('llama', TOOL_TURN[:4], {'tools': TOOLS}),
    'llama-tools-in-system': ('llama', TOOL_TURN[:4],
                              {'tools': TOOLS, 'tools_in_user_message': False}),
    'qwen-system': ('qwen', SYSTEM_USER, {}),
    'qwen-default-system': ('qwen', MULTI_TURN, {}),
    'qwen-non-ascii': ('qwen', NON_ASCII, {}),
    'qwen-tools': ('qwen', TOOL_TURN, {'tools': TOOLS}),
    'mistral-multi': ('mistral', MULTI_TURN, {}),
    'mistral-non-ascii': ('mistral', NON_ASCII[1:], {}),
    'mistral-kwarg-wins': ('mistral', MULTI_TURN, {'eos_token': '[IMG]'}),
    'mistral-features': ('mistral', [*SYSTEM_USER, *MULTI_TURN, REASONING],
                         {'chat_template': 'features'}),
    'chatml-default': ('chatml', MULTI_TURN, {}),
    'chatml-tool-use': ('chatml', TOOL_TURN, {'tools': TOOLS}),
    'chatml-named': ('chatml', SYSTEM_USER, {'chat_template': 'tool_use'}),
}


@pytest.mark.parametrize('generation_prompt', [False, True])
@pytest.mark.parametrize('case', list(CASES))
def test_text_and_ids_equal_transformers(case, generation_prompt, dirs, ours, theirs):
  family, messages, kwargs = CASES[case]
  expected = theirs[family].apply_chat_template(
      messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)
  text = render_chat(ours[family], messages, add_generation_prompt=generation_prompt, **kwargs)
  assert text == expected
  expected_ids = theirs[family].apply_chat_template(
      messages, tokenize=True, return_dict=False, add_generation_prompt=generation_prompt,
      **kwargs)
  ids = encode_chat(dirs[family], messages, add_generation_prompt=generation_prompt, **kwargs)
  assert ids.dtype == np.int32
  assert ids.tolist() == list(expected_ids)
  # decode drops special tokens, as transformers' skip_special_tokens=True.
  assert ours[family].decode(ids) == theirs[family].decode(expected_ids, skip_special_tokens=True)


def test_template_details(ours):
  """What the comparisons rest on, seen directly: one BOS, today's date, the tool schema as
  unescaped JSON, the feature template's output."""
  llama = ours['llama']
  ids = encode_chat(llama, SYSTEM_USER, add_generation_prompt=True)
  assert ids[0] == llama.bos_id and (ids == llama.bos_id).sum() == 1
  # The trap: the template writes {{ bos_token }} and the tokenizer adds one of its own.
  text = render_chat(llama, SYSTEM_USER)
  doubled = llama._tok.encode(text).ids  # pylint: disable=protected-access
  assert doubled[:2] == [llama.bos_id, llama.bos_id]
  text = render_chat(llama, TOOL_TURN[:4], tools=TOOLS)
  assert '"description": "The weather in a city — «quoted» & <tagged>"' in text
  assert datetime.date.today().strftime('Today Date: %d %b %Y') in text
  features = render_chat(ours['mistral'], [*SYSTEM_USER, *MULTI_TURN, REASONING],
                         chat_template='features')
  # {% continue %} skips the system turn, {% break %} stops at three, a {% set %} inside
  # {% generation %} stays there; dict keeps its order, tojson escapes nothing unless asked;
  # reasoning given under one name is there under all three.
  assert features == (
      'user: What is the capital of France?user: Hi thereassistant:   Hello! How can I help?  '
      '3 assistant False\n{"b": "<&>", "a": "é"} {\n  "x": 1\n}\n{"k":[1,"\\u00fc"]}\n'
      '[IMG]</s> because|because|because')


def test_template_errors_as_transformers(ours, theirs):
  """raise_exception in a template raises jinja2.TemplateError, with the template's message."""
  cases = [('mistral', SYSTEM_USER, {}, 'Conversation roles must alternate'),
           ('mistral', [MULTI_TURN[0], MULTI_TURN[2]], {}, 'Conversation roles must alternate'),
           ('mistral', [MULTI_TURN[0], {'role': 'tool', 'content': 'x'}], {},
            'Only user and assistant roles are supported!'),
           ('llama', SYSTEM_USER[:1], {'tools': TOOLS}, 'when there\'s no first user message!')]
  for family, messages, kwargs, message in cases:
    with pytest.raises(jinja2.TemplateError) as expected:
      theirs[family].apply_chat_template(messages, tokenize=False, **kwargs)
    with pytest.raises(jinja2.TemplateError) as got:
      render_chat(ours[family], messages, **kwargs)
    assert str(got.value) == str(expected.value) and message in str(got.value)
  with pytest.raises(ValueError, match='empty conversation'):
    render_chat(ours['qwen'], [])
  with pytest.raises(TypeError, match='JSON schemas'):
    render_chat(ours['qwen'], SYSTEM_USER, tools=[len])


def test_directory_tokenizer_equals_transformers(dirs, ours, theirs):
  for family, d in dirs.items():
    tok, hf = ours[family], theirs[family]
    assert isinstance(tok, CheckpointTokenizer) and tok.name == d
    assert tok.vocab_size == len(hf), family
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        hf.bos_token_id, hf.eos_token_id, hf.pad_token_id), family
    assert tok.special_tokens == hf.special_tokens_map, family
    with_specials = hf('the cat').input_ids
    assert tok.add_bos == (with_specials[0] == hf.bos_token_id), family
    assert tok.encode('the cat').tolist() == hf('the cat', add_special_tokens=False).input_ids
    assert tok.separator == ((tok.eos_id, tok.bos_id) if tok.add_bos else (tok.eos_id,))
    if family == 'mistral':  # no generation_config.json: transformers derives it from config.json
      generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(d))
    elif family == 'chatml':  # neither file: generation stops at the tokenizer's eos
      assert tok.generation.source is None and tok.eos_ids == (tok.eos_id,)
      continue
    else:
      generation = GenerationConfig.from_pretrained(d)
    eos = generation.eos_token_id
    assert list(tok.eos_ids) == (eos if isinstance(eos, list) else [eos]), family
    assert (tok.generation.bos_id, tok.generation.pad_id) == (
        generation.bos_token_id, generation.pad_token_id), family
  stops = theirs['llama'].convert_tokens_to_ids(['<|end_of_text|>', '<|eom_id|>', '<|eot_id|>'])
  assert ours['llama'].eos_ids == tuple(stops)
  assert ours['llama'].add_bos and ours['llama'].pad_id is None  # special_tokens_map ignored
  assert ours['mistral'].pad_token == '</s>' and not ours['mistral'].add_bos
  assert get_tokenizer(dirs['qwen'], eos_token='<|endoftext|>').eos_id == ours['qwen'].pad_id


def test_packing_puts_eos_then_bos_between_documents(ours, theirs, tmp_path):
  llama, hf = ours['llama'], theirs['llama']
  for i in range(20):
    (tmp_path / f'doc{i:02d}.txt').write_text(f'{TEXT[i % 3]} {i} é', encoding='utf-8')
  corpus = f'text:{tmp_path}/*.txt'
  data = build_data(corpus=corpus, tokenizer=llama, seq_len=4, global_batch_size=2, seed=0,
                    eval_fraction=0.5, eval_batches=1)
  assert llama.separator == (llama.eos_id, llama.bos_id)
  # Behind one BOS, the held-out stream is each document as transformers encodes it (its BOS
  # first), then eos.
  held_out = [d.text for d in load_documents(corpus) if is_held_out(d.name, 0.5)]
  expected = [t for text in held_out for t in hf(text).input_ids + [hf.eos_token_id]]
  assert [llama.bos_id, *data.eval_tokens[:-1].tolist()] == expected
  assert ByteTokenizer().separator == (256,) and ByteTokenizer().eos_ids == (256,)
  # A position saved from a stream separated by eos alone (a workdir written before checkpoint
  # tokenizers added the bos) is a different stream: refused, naming the tokenizer.
  state = data.train.state()
  del state['fingerprint']['separator']
  with pytest.raises(ConfigError, match="separator: saved None") as e:
    data.train.restore(state)
  assert e.value.field == 'data.tokenizer'


def test_bad_directories_name_the_file(dirs, tmp_path):
  def error(path, phrase, **kwargs):
    with pytest.raises(ConfigError) as info:
      get_tokenizer(str(path), **kwargs)
    assert info.value.field == 'data.tokenizer', info.value
    assert phrase in info.value.message, info.value.message

  def copy(name):
    import shutil  # pylint: disable=g-import-not-at-top
    target = tmp_path / name
    shutil.copytree(dirs[name], target)
    return target

  llama = copy('llama')
  (llama / 'tokenizer_config.json').rename(llama / 'tokenizer_config.bak')
  error(llama, 'has no tokenizer_config.json')
  error(llama, 'point data.tokenizer at its tokenizer.json')
  (llama / 'tokenizer_config.bak').rename(llama / 'tokenizer_config.json')
  config = json.loads((llama / 'tokenizer_config.json').read_text())
  write_json(llama / 'tokenizer_config.json', {**config, 'eos_token': '<|im_end|>'})
  error(llama, "eos_token='<|im_end|>' (tokenizer_config.json or special_tokens_map.json) is "
        'not in tokenizer.json')
  decoder = dict(config['added_tokens_decoder'])
  decoder['999'] = decoder.pop(min(decoder, key=int))
  write_json(llama / 'tokenizer_config.json', {**config, 'added_tokens_decoder': decoder})
  error(llama, 'from different checkpoints')
  write_json(llama / 'tokenizer_config.json', {**config, 'chat_template': [{'name': 'x'}]})
  error(llama, 'neither a string nor a list')
  write_json(llama / 'tokenizer_config.json', config)
  get_tokenizer(str(llama))
  (llama / 'generation_config.json').write_text('{"eos_token_id": [1, 100000]}')
  error(llama, 'generation_config.json has eos_token_id=[1, 100000]')
  # An unused pad id out of range (older Llama conversions write -1) is ignored with a warning,
  # as transformers does; the eos ids, which stop generation, stay strict.
  (llama / 'generation_config.json').write_text('{"eos_token_id": 1, "pad_token_id": -1}')
  with pytest.warns(UserWarning, match='pad_token_id=-1 is not a token id'):
    assert get_tokenizer(str(llama)).pad_id is None
  (llama / 'generation_config.json').write_text('{"eos_token_id": ')
  error(llama, 'generation_config.json cannot be read as JSON')

  qwen = copy('qwen')
  (qwen / 'tokenizer.json').unlink()
  error(qwen, 'has no tokenizer.json; a checkpoint directory needs')
  (qwen / 'tokenizer.model').write_bytes(b'')
  error(qwen, 'SentencePiece')
  # Refused before anything is built: the run's config check reads the tokenizer.
  errors = validate.check_run(smoke_config(**{'data.tokenizer': str(qwen)}), num_devices=1,
                             process_count=1, backend='cpu')
  assert [e.field for e in errors] == ['data.tokenizer'] and 'SentencePiece' in errors[0].message


def test_rendering_needs_a_checkpoint_template(dirs, ours, tmp_path):
  with pytest.raises(ConfigError, match='checkpoint directory'):
    render_chat(ByteTokenizer(), SYSTEM_USER)
  with pytest.raises(ConfigError, match='no chat template'):
    render_chat(get_tokenizer(dirs['llama'] + '/tokenizer.json'), SYSTEM_USER)
  bare = tmp_path / 'bare'
  save_tokenizer(bare, QWEN_SPECIALS)
  write_json(bare / 'tokenizer_config.json', {'eos_token': '<|endoftext|>'})
  with pytest.raises(ConfigError, match='has no chat template'):
    render_chat(str(bare), SYSTEM_USER)
  assert render_chat(str(bare), SYSTEM_USER, chat_template=chat_templates.CHATML).startswith(
      '<|im_start|>system\n')
  with pytest.raises(ValueError, match="no chat template named 'tool_us'"):
    render_chat(ours['chatml'], SYSTEM_USER, chat_template='tool_us')
  # apply_chat_template's own options are not template variables: refused, not ignored.
  with pytest.raises(TypeError, match='continue_final_message'):
    render_chat(ours['chatml'], SYSTEM_USER, continue_final_message=True)


def test_templates_run_sandboxed(ours):
  """A template is untrusted code: it may not reach Python internals or change its inputs."""
  for source in ('{% set ns = namespace(_secret=1) %}',
                 '{% set ns = namespace() %}{% set ns._secret = 1 %}',
                 '{{ messages.__class__.__mro__ }}', '{{ dict.__class__.__mro__ }}',
                 '{{ messages.append(1) }}', '{{ messages[0].update(role="x") }}'):
    with pytest.raises(jinja2.exceptions.SecurityError):
      render_chat(ours['chatml'], SYSTEM_USER, chat_template=source)

"""Qwen2 interchange against transformers' own Qwen2ForCausalLM: logits, export and refusals."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from efficientjax.attention.positions import rope_frequencies
from efficientjax.errors import ConfigError
from efficientjax.hf import load_checkpoint, load_qwen2, save_llama, save_qwen2
from efficientjax.model import ModelConfig, YarnConfig
from tests.hf.common import (assert_same_params, copy_with, hf_logits, random_tokens,
                             random_variables, read_config, save_pretrained, transformer_logits,
                             fields_logits as our_logits)

VOCAB, EMBED, HEADS, KV_HEADS, MLP, LENGTH = 128, 64, 4, 2, 96, 24
# std 0.1 (not 0.02), as in test_llama: attention far from uniform, so layout errors show.
INIT_STD = 0.1
# YaRN stretching an 8-token original context 4x: the test sequence (24) runs past it.
YARN = dict(rope_type='yarn', rope_theta=5000.0, factor=4.0, original_max_position_embeddings=8)

CASES = {
    'gqa_untied': dict(tie_word_embeddings=False),
    'gqa_tied': dict(tie_word_embeddings=True),
    'yarn': dict(tie_word_embeddings=False, rope_parameters=YARN, max_position_embeddings=32),
    # Every layer windowed (max_window_layers=0) to 5 keys, well inside the 24-token sequence.
    'sliding': dict(tie_word_embeddings=False, use_sliding_window=True, sliding_window=5,
                    max_window_layers=0),
}


def hf_config(**overrides) -> transformers.Qwen2Config:
  kw = dict(vocab_size=VOCAB, hidden_size=EMBED, num_hidden_layers=2, num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS, intermediate_size=MLP,
            rope_parameters=dict(rope_type='default', rope_theta=5000.0), rms_norm_eps=1e-5,
            initializer_range=INIT_STD)
  return transformers.Qwen2Config(**{**kw, **overrides})


def hf_model(seed: int = 0, **overrides) -> transformers.Qwen2ForCausalLM:
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(hf_config(**overrides)).eval()
  # transformers initialises biases to zero, which would hide a bias loaded wrongly (or not).
  with torch.no_grad():
    for layer in model.model.layers:
      for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        proj.bias.normal_(0.0, 0.5)
  return model


@pytest.fixture(scope='module')
def tokens() -> np.ndarray:
  return random_tokens(VOCAB, LENGTH)


@pytest.fixture(scope='module', params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
  """(case name, torch model, directory written by save_pretrained)."""
  model = hf_model(**CASES[request.param])
  return request.param, model, save_pretrained(model, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope='module')
def gqa_checkpoint(tmp_path_factory):
  model = hf_model(**CASES['gqa_untied'])
  return model, save_pretrained(model, tmp_path_factory.mktemp('gqa'))


# ---------------------------------------------------------------------------------------------
# Import.


@pytest.mark.parametrize('scan_layers', [True, False], ids=['scanned', 'unscanned'])
def test_load_matches_transformers_logits(checkpoint, tokens, scan_layers):
  case, model, path = checkpoint
  fields, params = load_qwen2(path, param_dtype=jnp.float32, scan_layers=scan_layers)
  hf = model.config
  want = dict(
      vocab_size=VOCAB, embed_dim=EMBED, num_layers=2, num_heads=HEADS, num_kv_heads=KV_HEADS,
      head_dim=EMBED // HEADS, mlp_dim=MLP, rope_theta=5000.0, norm_eps=1e-5,
      tie_embeddings=hf.tie_word_embeddings, attention='gqa', position='rope', ffn='dense',
      qkv_bias=True)
  if case == 'yarn':
    want['yarn'] = dict(factor=4.0, original_max_len=8, beta_fast=32.0, beta_slow=1.0,
                        mscale=1.0, mscale_all_dim=0.0, truncate=True)
  if case == 'sliding':
    want['sliding_window'] = 5
  assert fields == want
  assert ('blocks' in params) == scan_layers and ('lm_head' in params) != hf.tie_word_embeddings
  layer0 = params['blocks'] if scan_layers else params['block_0']
  bias = np.asarray(layer0['attn']['k']['bias'])
  assert bias.shape == ((2,) if scan_layers else ()) + (KV_HEADS, EMBED // HEADS)
  torch_bias = model.model.layers[0].self_attn.k_proj.bias.detach().numpy()
  np.testing.assert_array_equal(bias[0] if scan_layers else bias,
                                torch_bias.reshape(KV_HEADS, EMBED // HEADS))
  ref = hf_logits(model, tokens)
  got = our_logits(fields, params, tokens, scan_layers)
  assert np.abs(got - ref).max() < 1e-4


def test_parity_is_sensitive(checkpoint, tokens):
  """Negative controls: without the biases, the YaRN scaling or the window, our logits leave
  transformers' by far more than the tolerance, so the parity test checks each of them."""
  case, model, path = checkpoint
  fields, params = load_qwen2(path)
  ref = hf_logits(model, tokens)
  attn = params['blocks']['attn']
  no_bias = jax.tree.map(lambda a: a, params)
  for name in ('q', 'k', 'v'):
    no_bias['blocks']['attn'][name] = {'kernel': attn[name]['kernel'],
                                       'bias': jnp.zeros_like(attn[name]['bias'])}
  assert np.abs(our_logits(fields, no_bias, tokens) - ref).max() > 1e-2
  if case == 'yarn':
    assert np.abs(our_logits({**fields, 'yarn': {'factor': 1.0}}, params, tokens) - ref
                  ).max() > 1e-2
  if case == 'sliding':
    assert np.abs(our_logits({**fields, 'sliding_window': None}, params, tokens) - ref
                  ).max() > 1e-2


@pytest.mark.parametrize('spelling', ['transformers4', 'deepseek_mscale'])
def test_yarn_config_spellings(gqa_checkpoint, tmp_path, spelling):
  """transformers < 5 writes rope_theta + rope_scaling {type: yarn}; DeepSeek's temperature
  needs both mscale and mscale_all_dim. transformers builds the same frequencies and factor."""
  _, path = gqa_checkpoint
  config = read_config(path)
  config.pop('rope_parameters')
  config['max_position_embeddings'] = 32
  if spelling == 'transformers4':
    config.update(rope_theta=5000.0, rope_scaling={
        'type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 8, 'beta_fast': 16})
    want = YarnConfig(factor=4.0, original_max_len=8, beta_fast=16.0)
  else:
    config.update(rope_parameters={**YARN, 'mscale': 0.8, 'mscale_all_dim': 0.6, 'beta_slow': 0})
    want = YarnConfig(factor=4.0, original_max_len=8, mscale=0.8, mscale_all_dim=0.6)
  # copy_with updates config.json: the transformers-4 spelling must not keep the original's
  # rope_parameters beside its rope_scaling.
  drop = ('rope_parameters',) if spelling == 'transformers4' else ()
  fields, _ = load_qwen2(copy_with(path, tmp_path, config=config, drop_config=drop))
  assert 'rope_parameters' not in read_config(tmp_path) or spelling != 'transformers4'
  assert fields['rope_theta'] == 5000.0 and fields['yarn'] == dataclasses.asdict(want)
  hf = transformers.Qwen2Config.from_pretrained(tmp_path)
  inv_freq, factor = ROPE_INIT_FUNCTIONS['yarn'](hf)
  ours, our_factor = rope_frequencies(ModelConfig.from_config(fields))
  np.testing.assert_array_max_ulp(ours, inv_freq.numpy(), maxulp=4)
  assert our_factor == pytest.approx(factor, rel=1e-12) and factor != 1.0


def test_generic_loader_dispatches_on_model_type(gqa_checkpoint):
  _, path = gqa_checkpoint
  fields, params = load_checkpoint(path)
  assert fields == load_qwen2(path)[0] and 'bias' in params['blocks']['attn']['q']


# ---------------------------------------------------------------------------------------------
# Export.


@pytest.mark.parametrize('scan_layers', [True, False], ids=['scanned', 'unscanned'])
def test_export_loads_in_transformers(checkpoint, tokens, tmp_path, scan_layers):
  _, model, path = checkpoint
  fields, params = load_qwen2(path, scan_layers=scan_layers)
  cfg = ModelConfig.from_config({**fields, 'scan_layers': scan_layers})
  out = save_qwen2(tmp_path / 'export', params, cfg)
  config = read_config(out)
  assert config['architectures'] == ['Qwen2ForCausalLM'] and config['model_type'] == 'qwen2'

  exported = transformers.Qwen2ForCausalLM.from_pretrained(out).eval()
  assert exported.config.layer_types == model.config.layer_types
  assert exported.config.sliding_window == model.config.sliding_window
  got = hf_logits(exported, tokens)
  assert np.abs(got - our_logits(fields, params, tokens, scan_layers)).max() < 1e-4
  np.testing.assert_array_equal(got, hf_logits(model, tokens))

  # load -> save -> load is bit-exact, in the same layout and dtype.
  fields2, params2 = load_qwen2(out, scan_layers=scan_layers)
  assert fields2 == fields
  assert_same_params(params, params2)


def test_export_of_our_own_model(tmp_path, tokens):
  """A model of ours (MQA, YaRN and a sliding window at once, boxed `init` variables) exports
  and runs in transformers."""
  cfg = ModelConfig(vocab_size=VOCAB, embed_dim=EMBED, num_layers=2, num_heads=HEADS,
                    num_kv_heads=1, head_dim=16, mlp_dim=MLP, rope_theta=123.0, norm_eps=1e-6,
                    attention='mqa', qkv_bias=True, sliding_window=7,
                    yarn=YarnConfig(factor=2.5, original_max_len=10, beta_fast=8.0,
                                    mscale=0.9, mscale_all_dim=0.5, truncate=False))
  # Biases as large as hf_model's, so that exporting them wrongly shows.
  variables = random_variables(cfg, INIT_STD, bias_std=0.5)
  out = save_qwen2(tmp_path, variables, cfg, dtype=jnp.float32)
  exported = transformers.Qwen2ForCausalLM.from_pretrained(out).eval()
  assert exported.config.num_key_value_heads == 1
  assert exported.config.layer_types == ['sliding_attention'] * 2
  assert exported.config.rope_parameters['rope_type'] == 'yarn'
  ref = hf_logits(exported, tokens)
  got = transformer_logits(cfg, variables, tokens)
  assert np.abs(got - ref).max() < 1e-4


def test_export_refusals(gqa_checkpoint, tmp_path):
  _, path = gqa_checkpoint
  fields, params = load_qwen2(path)
  for field, value in (('attention', 'mla'), ('position', 'absolute'), ('ffn', 'moe'),
                       ('qk_norm', True), ('qkv_bias', False)):
    with pytest.raises(ConfigError, match='no Qwen2ForCausalLM equivalent') as e:
      save_qwen2(tmp_path, params, fields | {field: value})
    assert e.value.field == f'model.{field}'
  # And a Llama export refuses the biases, naming the Qwen2 export.
  with pytest.raises(ConfigError, match='save_qwen2') as e:
    save_llama(tmp_path, params, fields)
  assert e.value.field == 'model.qkv_bias'
  assert not (tmp_path / 'model.safetensors').exists()


# ---------------------------------------------------------------------------------------------
# Refusals on import.


@pytest.mark.parametrize('change, phrase', [
    # Qwen2's own default: windows from max_window_layers on, full attention below.
    (dict(use_sliding_window=True, sliding_window=5, max_window_layers=1, layer_types=None),
     r'sliding window of 5 on layers \[1\] only .*max_window_layers=1'),
    (dict(use_sliding_window=True, sliding_window=5,
          layer_types=['sliding_attention', 'full_attention']),
     r'on layers \[0\] only'),
    (dict(use_sliding_window=False, layer_types=['sliding_attention'] * 2),
     'use_sliding_window is false'),
    (dict(layer_types=['full_attention']), 'layer_types lists 1 layers'),
    (dict(layer_types=['chunked_attention'] * 2), 'not Qwen2 layer kinds'),
    # (linear and llama3 scalings load, as for Llama: tests/hf/test_llama3.py)
    (dict(rope_parameters={'rope_type': 'longrope', 'rope_theta': 5e3, 'factor': 2.0}),
     "RoPE scaling 'longrope'"),
    (dict(rope_scaling={'type': 'dynamic', 'factor': 2.0}), "RoPE scaling 'dynamic'"),
    (dict(rope_parameters={**YARN, 'attention_factor': 2.0}), 'attention_factor=2.0 differs'),
    (dict(rope_parameters={**YARN, 'factor': 0.5}), 'factor=0.5 is below 1'),
    (dict(rope_parameters={k: v for k, v in YARN.items() if k != 'factor'}),
     'YaRN without a factor'),
    (dict(rope_parameters={'full_attention': {'rope_type': 'default', 'rope_theta': 5e3}}),
     'per layer type'),
    (dict(rope_parameters={'rope_type': 'default', 'rope_theta': 5e3,
                           'partial_rotary_factor': 0.5}), 'partial_rotary_factor=0.5'),
    (dict(hidden_act='gelu'), "hidden_act='gelu' is not supported"),
    (dict(model_type='llama'), "model_type 'llama', not a Qwen2 checkpoint"),
    (dict(architectures=['Qwen2ForSequenceClassification']), 'do not include Qwen2ForCausalLM'),
], ids=lambda x: '-'.join(map(str, x)) if isinstance(x, dict) else None)
def test_config_refusals(gqa_checkpoint, tmp_path, change, phrase):
  path = copy_with(gqa_checkpoint[1], tmp_path, config=change, corrupt_weights=True)
  with pytest.raises(ConfigError, match=phrase) as e:
    load_qwen2(path)
  assert e.value.field == 'model.hf'


def test_tensor_refusals(gqa_checkpoint, tmp_path):
  _, path = gqa_checkpoint
  bias = 'model.layers.1.self_attn.v_proj.bias'
  with pytest.raises(ConfigError, match=f'lacks tensor.* {bias}'):
    load_qwen2(copy_with(path, tmp_path / 'missing', drop_tensors=(bias,)))
  with pytest.raises(ConfigError, match=rf"'{bias}' has shape \[16\], expected \[32\]"):
    load_qwen2(copy_with(path, tmp_path / 'shape', tensors={bias: np.zeros(16, np.float32)}))
  o_bias = 'model.layers.0.self_attn.o_proj.bias'  # Qwen2's o_proj has none
  with pytest.raises(ConfigError, match=f'{o_bias} have no place in the model'):
    load_qwen2(copy_with(path, tmp_path / 'o', tensors={o_bias: np.zeros(EMBED, np.float32)}))


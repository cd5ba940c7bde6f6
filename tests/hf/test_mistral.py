"""Mistral interchange against transformers' own MistralForCausalLM: logits with and without a
sliding window, export, the bit-exact round trip and refusals."""

import numpy as np
import pytest
import torch
import transformers

from efficientjax.errors import ConfigError
from efficientjax.hf import load_checkpoint, load_mistral, save_llama, save_mistral
from efficientjax.hf.mistral import fields_from_hf
from tests.hf.common import (assert_same_params, copy_with, hf_logits, random_tokens, read_config,
                             save_pretrained, fields_logits as our_logits)

VOCAB, EMBED, HEADS, MLP, LENGTH = 128, 64, 4, 96, 24
# std 0.1 (not 0.02), as in test_llama: attention far from uniform, so layout errors show.
INIT_STD = 0.1

CASES = {
    # Every layer windowed to 5 keys, well inside the 24-token sequence.
    'sliding5_gqa': dict(num_key_value_heads=2, sliding_window=5, tie_word_embeddings=False),
    # Mistral v0.2 on (null: full attention); head_dim 32 against 64 / 4 as Nemo's 128 against
    # 5120 / 32; one K/V head, a tied head.
    'full_mqa_head_dim32': dict(num_key_value_heads=1, sliding_window=None, head_dim=32,
                                tie_word_embeddings=True),
}


def hf_config(**overrides) -> transformers.MistralConfig:
  kw = dict(vocab_size=VOCAB, hidden_size=EMBED, num_hidden_layers=2, num_attention_heads=HEADS,
            intermediate_size=MLP, rope_parameters=dict(rope_type='default', rope_theta=5000.0),
            rms_norm_eps=1e-5, initializer_range=INIT_STD)
  return transformers.MistralConfig(**{**kw, **overrides})


def hf_model(**overrides) -> transformers.MistralForCausalLM:
  torch.manual_seed(0)
  model = transformers.MistralForCausalLM(hf_config(**overrides)).eval()
  # transformers sets RMSNorm weights to one, which would hide a norm loaded in the wrong place.
  with torch.no_grad():
    for name, param in model.named_parameters():
      if 'norm' in name:
        param.normal_(1.0, INIT_STD)
  return model


@pytest.fixture(scope='module')
def tokens() -> np.ndarray:
  return random_tokens(VOCAB, LENGTH)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory) -> dict:
  """{case: (torch model, directory written by save_pretrained)}."""
  out = {}
  for case, overrides in CASES.items():
    model = hf_model(**overrides)
    out[case] = model, save_pretrained(model, tmp_path_factory.mktemp(case))
  return out


@pytest.fixture(params=sorted(CASES))
def checkpoint(request, checkpoints):
  """(case name, torch model, directory) per case."""
  return (request.param, *checkpoints[request.param])


# ---------------------------------------------------------------------------------------------
# Import and export.


def test_load_matches_transformers_logits(checkpoint, tokens):
  _, model, path = checkpoint
  fields, params = load_mistral(path)
  hf = model.config
  kv = hf.num_key_value_heads
  want = dict(vocab_size=VOCAB, embed_dim=EMBED, num_layers=2, num_heads=HEADS, num_kv_heads=kv,
              head_dim=hf.head_dim, mlp_dim=MLP, rope_theta=5000.0, norm_eps=1e-5,
              tie_embeddings=hf.tie_word_embeddings, attention='gqa' if kv == 2 else 'mqa',
              position='rope', ffn='dense')
  if hf.sliding_window is not None:
    want['sliding_window'] = hf.sliding_window
  assert fields == want
  ref = hf_logits(model, tokens)
  assert np.abs(our_logits(fields, params, tokens) - ref).max() < 1e-4
  window = hf.sliding_window
  if window is not None:
    # The window changes transformers' own logits here, so the parity above covers it.
    hf.sliding_window = None
    try:
      assert np.abs(hf_logits(model, tokens) - ref).max() > 1e-2
    finally:
      hf.sliding_window = window


def test_export_loads_in_transformers(checkpoint, tokens, tmp_path):
  _, model, path = checkpoint
  fields, params = load_mistral(path)
  out = save_mistral(tmp_path / 'export', params, fields)
  config = read_config(out)
  assert config['architectures'] == ['MistralForCausalLM'] and config['model_type'] == 'mistral'
  assert config['sliding_window'] == model.config.sliding_window
  exported = transformers.MistralForCausalLM.from_pretrained(out).eval()
  assert exported.config.sliding_window == model.config.sliding_window
  got = hf_logits(exported, tokens)
  np.testing.assert_array_equal(got, hf_logits(model, tokens))
  assert np.abs(got - our_logits(fields, params, tokens)).max() < 1e-4

  # load -> save -> load is bit-exact (through the loader that picks the family itself).
  fields2, params2 = load_checkpoint(out)
  assert fields2 == fields
  assert_same_params(params, params2)


def test_config_mapping(checkpoints):
  """The keys transformers' MistralConfig reads and how our fields follow them."""
  hf = read_config(checkpoints['sliding5_gqa'][1])
  # A config.json without the key gets MistralConfig's default window.
  assert fields_from_hf({k: v for k, v in hf.items() if k != 'sliding_window'}
                        )['sliding_window'] == 4096 == transformers.MistralConfig().sliding_window
  # layer_types that say what transformers computes anyway are accepted.
  same = fields_from_hf({**hf, 'layer_types': ['sliding_attention'] * 2})
  assert same == fields_from_hf(hf)
  # Training-time attention dropout does not change the function.
  assert fields_from_hf({**hf, 'attention_dropout': 0.1}) == fields_from_hf(hf)
  # Llama 3.x's RoPE scaling, which transformers' Mistral runs too.
  llama3 = dict(rope_type='llama3', rope_theta=1e6, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=8192)
  assert fields_from_hf({**hf, 'rope_parameters': llama3})['llama3_rope'] == dict(
      factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=8192)


# ---------------------------------------------------------------------------------------------
# Refusals.


@pytest.mark.parametrize('change, phrase', [
    # Ministral's alternation, which transformers' Mistral ignores.
    (dict(layer_types=['sliding_attention', 'full_attention']),
     r"layer_types \['sliding_attention', 'full_attention'\] differ .*Ministral"),
    (dict(layer_types=['full_attention'] * 2), 'sliding_window=5 on every one of the 2 layers'),
    (dict(sliding_window=0), 'sliding_window=0 in config.json is not a window'),
    (dict(rope_parameters={'rope_type': 'dynamic', 'rope_theta': 5e3, 'factor': 2.0}),
     "RoPE scaling 'dynamic' is not supported"),
    (dict(rope_parameters={'sliding_attention': {'rope_type': 'default', 'rope_theta': 5e3}},
          layer_types=['sliding_attention'] * 2), 'RoPE parameters per layer type'),
    (dict(hidden_act='gelu'), "hidden_act='gelu' is not supported"),
    (dict(num_key_value_heads=3), 'not a multiple of num_key_value_heads=3'),
    (dict(model_type='llama'), "model_type 'llama', not a Mistral checkpoint"),
    (dict(architectures=['MistralForSequenceClassification']),
     'do not include MistralForCausalLM'),
], ids=lambda x: '-'.join(map(str, x)) if isinstance(x, dict) else None)
def test_config_refusals(checkpoints, tmp_path, change, phrase):
  path = copy_with(checkpoints['sliding5_gqa'][1], tmp_path, config=change, corrupt_weights=True)
  with pytest.raises(ConfigError, match=phrase) as e:
    load_mistral(path)
  assert e.value.field == 'model.hf'


def test_export_refusals(checkpoints, tmp_path):
  fields, params = load_mistral(checkpoints['sliding5_gqa'][1])
  for field, value in (('qkv_bias', True), ('attention', 'mla'), ('ffn', 'moe')):
    with pytest.raises(ConfigError, match='no MistralForCausalLM equivalent') as e:
      save_mistral(tmp_path, params, fields | {field: value})
    assert e.value.field == f'model.{field}'
  # Llama has no window, and says where one goes.
  with pytest.raises(ConfigError, match='no LlamaForCausalLM equivalent.*save_mistral') as e:
    save_llama(tmp_path, params, fields)
  assert e.value.field == 'model.sliding_window'
  assert not (tmp_path / 'model.safetensors').exists()

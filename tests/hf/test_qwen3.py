"""Qwen3 interchange against transformers' own Qwen3ForCausalLM: q/k norm, head_dim, export."""

import numpy as np
import pytest
import torch
import transformers

from efficientjax.errors import ConfigError
from efficientjax.hf import QWEN3, load_checkpoint, load_qwen3, save_llama, save_qwen3
from efficientjax.model import ModelConfig, YarnConfig
from tests.hf.common import (assert_same_params, copy_with, hf_logits, random_tokens,
                             random_variables, read_config, save_pretrained, transformer_logits,
                             fields_logits as our_logits)

VOCAB, EMBED, HEADS, KV_HEADS, MLP, LENGTH = 128, 64, 4, 2, 96, 24
INIT_STD = 0.1  # as in test_llama: attention far from uniform, so layout errors show
YARN = dict(rope_type='yarn', rope_theta=5000.0, factor=4.0, original_max_position_embeddings=8)

CASES = {
    # No head_dim given: Qwen3Config's default, 128, not hidden / heads = 16.
    'gqa_untied_default_head_dim': dict(tie_word_embeddings=False),
    'tied_head_dim_24': dict(tie_word_embeddings=True, head_dim=24),
    'yarn': dict(tie_word_embeddings=False, head_dim=16, rope_parameters=YARN,
                 max_position_embeddings=32),
    # Every layer windowed (max_window_layers=0) to 5 keys, well inside the 24-token sequence.
    'sliding': dict(tie_word_embeddings=False, head_dim=16, use_sliding_window=True,
                    sliding_window=5, max_window_layers=0),
}


def hf_config(**overrides) -> transformers.Qwen3Config:
  kw = dict(vocab_size=VOCAB, hidden_size=EMBED, num_hidden_layers=2, num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS, intermediate_size=MLP,
            rope_parameters=dict(rope_type='default', rope_theta=5000.0), rms_norm_eps=1e-5,
            initializer_range=INIT_STD)
  return transformers.Qwen3Config(**{**kw, **overrides})


def randomise_norms(model: torch.nn.Module) -> None:
  """transformers sets every RMSNorm weight to 1, which would hide a norm loaded into the wrong
  place (q_norm for k_norm) or not at all."""
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith('norm.weight'):
        param.normal_(1.0, 0.5)


def hf_model(seed: int = 0, **overrides) -> transformers.Qwen3ForCausalLM:
  torch.manual_seed(seed)
  model = transformers.Qwen3ForCausalLM(hf_config(**overrides)).eval()
  randomise_norms(model)
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
def tied_checkpoint(tmp_path_factory):
  model = hf_model(**CASES['tied_head_dim_24'])
  return model, save_pretrained(model, tmp_path_factory.mktemp('tied'))


# ---------------------------------------------------------------------------------------------
# Import.


def test_load_matches_transformers_logits(checkpoint, tokens):
  case, model, path = checkpoint
  fields, params = load_qwen3(path)
  hf = model.config
  want = dict(
      vocab_size=VOCAB, embed_dim=EMBED, num_layers=2, num_heads=HEADS, num_kv_heads=KV_HEADS,
      head_dim=hf.head_dim, mlp_dim=MLP, rope_theta=5000.0, norm_eps=1e-5,
      tie_embeddings=hf.tie_word_embeddings, attention='gqa', position='rope', ffn='dense',
      qk_norm=True)
  if case == 'yarn':
    want['yarn'] = dict(factor=4.0, original_max_len=8, beta_fast=32.0, beta_slow=1.0,
                        mscale=1.0, mscale_all_dim=0.0, truncate=True)
  if case == 'sliding':
    want['sliding_window'] = 5
  assert fields == want
  assert fields['head_dim'] == {'gqa_untied_default_head_dim': 128}.get(case, fields['head_dim'])
  # One norm weight [head_dim] per layer, shared by the heads: transformers' own, in place.
  for name in ('q', 'k'):
    scale = np.asarray(params['blocks']['attn'][f'{name}_norm']['scale'])
    torch_scale = getattr(model.model.layers[1].self_attn, f'{name}_norm').weight
    np.testing.assert_array_equal(scale[1], torch_scale.detach().numpy())
  got = our_logits(fields, params, tokens)
  assert np.abs(got - hf_logits(model, tokens)).max() < 1e-4


def test_unscanned_layout(tied_checkpoint, tokens):
  model, path = tied_checkpoint
  fields, params = load_qwen3(path, scan_layers=False)
  assert 'block_1' in params and 'blocks' not in params
  got = our_logits(fields, params, tokens, scan_layers=False)
  assert np.abs(got - hf_logits(model, tokens)).max() < 1e-4


def test_parity_is_sensitive_to_the_qk_norm(tied_checkpoint, tokens):
  """Negative controls: with q_norm and k_norm swapped, or without the q/k norm at all, the logits
  leave transformers' by far more than the tolerance, so parity checks both."""
  model, path = tied_checkpoint
  fields, params = load_qwen3(path)
  ref = hf_logits(model, tokens)
  attn = params['blocks']['attn']
  swapped = {**params, 'blocks': {**params['blocks'], 'attn': {
      **attn, 'q_norm': attn['k_norm'], 'k_norm': attn['q_norm']}}}
  assert np.abs(our_logits(fields, swapped, tokens) - ref).max() > 1e-2
  no_norm = {**params, 'blocks': {**params['blocks'], 'attn': {
      k: v for k, v in attn.items() if not k.endswith('_norm')}}}
  assert np.abs(our_logits({**fields, 'qk_norm': False}, no_norm, tokens) - ref).max() > 1e-2


def test_head_dim_defaults_to_qwen3s(tied_checkpoint, tmp_path):
  """A config.json without head_dim means Qwen3Config's 128, whatever hidden / heads is: the
  mapping says so, and the head_dim-24 weights then do not fit."""
  _, path = tied_checkpoint
  hf = read_config(path)
  del hf['head_dim']
  assert transformers.Qwen3Config.from_dict(hf).head_dim == 128
  assert QWEN3.fields_from_hf(hf)['head_dim'] == 128
  with pytest.raises(ConfigError, match=r'q_proj.weight.* expected \[512, 64\] from config'):
    load_qwen3(copy_with(path, tmp_path, drop_config=('head_dim',)))


def test_generic_loader_dispatches_on_model_type(tied_checkpoint):
  _, path = tied_checkpoint
  fields, params = load_checkpoint(path)
  assert fields == load_qwen3(path)[0] and 'q_norm' in params['blocks']['attn']


# ---------------------------------------------------------------------------------------------
# Export.


def test_export_loads_in_transformers(checkpoint, tokens, tmp_path):
  _, model, path = checkpoint
  fields, params = load_qwen3(path)
  out = save_qwen3(tmp_path / 'export', params, ModelConfig.from_config(fields))
  config = read_config(out)
  assert config['architectures'] == ['Qwen3ForCausalLM'] and config['model_type'] == 'qwen3'

  exported = transformers.Qwen3ForCausalLM.from_pretrained(out).eval()
  assert exported.config.head_dim == model.config.head_dim
  assert exported.config.layer_types == model.config.layer_types
  assert exported.config.sliding_window == model.config.sliding_window
  got = hf_logits(exported, tokens)
  assert np.abs(got - our_logits(fields, params, tokens)).max() < 1e-4
  np.testing.assert_array_equal(got, hf_logits(model, tokens))

  # load -> save -> load is bit-exact, config included.
  fields2, params2 = load_qwen3(out)
  assert fields2 == fields
  assert_same_params(params, params2)


def test_export_of_our_own_model(tmp_path, tokens):
  """A model of ours (MQA, head_dim 24 against 64 / 4, YaRN and a window, boxed `init`
  variables with random norm scales) exports and runs in transformers."""
  cfg = ModelConfig(vocab_size=VOCAB, embed_dim=EMBED, num_layers=2, num_heads=HEADS,
                    num_kv_heads=1, head_dim=24, mlp_dim=MLP, rope_theta=123.0, norm_eps=1e-6,
                    attention='mqa', qk_norm=True, sliding_window=7,
                    yarn=YarnConfig(factor=2.5, original_max_len=10))
  variables = random_variables(cfg, INIT_STD)
  out = save_qwen3(tmp_path, variables, cfg)
  exported = transformers.Qwen3ForCausalLM.from_pretrained(out).eval()
  assert (exported.config.num_key_value_heads, exported.config.head_dim) == (1, 24)
  assert exported.config.layer_types == ['sliding_attention'] * 2
  got = transformer_logits(cfg, variables, tokens)
  assert np.abs(got - hf_logits(exported, tokens)).max() < 1e-4


def test_export_refusals(tied_checkpoint, tmp_path):
  fields, params = load_qwen3(tied_checkpoint[1])
  for field, value in (('attention', 'mla'), ('position', 'absolute'), ('ffn', 'moe'),
                       ('qkv_bias', True), ('qk_norm', False)):
    with pytest.raises(ConfigError, match='no Qwen3ForCausalLM equivalent') as e:
      save_qwen3(tmp_path, params, fields | {field: value})
    assert e.value.field == f'model.{field}'
  # And a Llama export refuses the q/k norm.
  with pytest.raises(ConfigError, match='no LlamaForCausalLM equivalent') as e:
    save_llama(tmp_path, params, fields)
  assert e.value.field == 'model.qk_norm'
  assert not (tmp_path / 'model.safetensors').exists()


# ---------------------------------------------------------------------------------------------
# Refusals on import, before any weight is read.


@pytest.mark.parametrize('change, phrase', [
    # Qwen3's own default: windows from max_window_layers on, full attention below.
    (dict(use_sliding_window=True, sliding_window=5, max_window_layers=1, layer_types=None),
     r'sliding window of 5 on layers \[1\] only'),
    (dict(attention_bias=True), 'attention_bias=true is not supported'),
    (dict(rope_parameters={'rope_type': 'dynamic', 'rope_theta': 5e3, 'factor': 2.0}),
     "RoPE scaling 'dynamic'"),
    (dict(hidden_act='gelu'), "hidden_act='gelu' is not supported"),
    (dict(model_type='qwen2'), "model_type 'qwen2', not a Qwen3 checkpoint"),
    (dict(architectures=['Qwen3ForSequenceClassification']), 'do not include Qwen3ForCausalLM'),
], ids=lambda x: '-'.join(map(str, x)) if isinstance(x, dict) else None)
def test_config_refusals(tied_checkpoint, tmp_path, change, phrase):
  path = copy_with(tied_checkpoint[1], tmp_path, config=change, corrupt_weights=True)
  with pytest.raises(ConfigError, match=phrase) as e:
    load_qwen3(path)
  assert e.value.field == 'model.hf'

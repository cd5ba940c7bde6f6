"""DeepSeek-V2 (dense MLPs) interchange against transformers' own DeepseekV2ForCausalLM
(MoE layers: test_deepseek_v2_moe.py)."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from efficientjax.errors import ConfigError
from efficientjax.hf import load_checkpoint, load_deepseek_v2, save_deepseek_v2
from efficientjax.hf.deepseek_v2 import rope_order
from efficientjax.model import MLAConfig, ModelConfig
from tests.hf.common import (assert_same_params, copy_with, hf_logits, leaves,
                             prefill_then_decode, random_tokens, random_variables, read_config,
                             save_pretrained, transformer_logits)

VOCAB, EMBED, HEADS, MLP, LAYERS = 128, 64, 4, 96, 2
KV_LORA, NOPE, ROPE, V = 16, 12, 8, 10
# std 0.1 rather than 0.02: with tiny weights attention is near uniform and a wrong RoPE layout
# would move the logits by less than the tolerance (see the sensitivity test).
INIT_STD = 0.1
YARN = {'rope_type': 'yarn', 'rope_theta': 5000.0, 'factor': 4.0,
        'original_max_position_embeddings': 16, 'beta_fast': 8.0, 'beta_slow': 1.0,
        # mscale != mscale_all_dim: the cos/sin factor and the logits' scale both differ from 1.
        'mscale': 1.0, 'mscale_all_dim': 0.8}

CASES = {
    'q_direct_untied': dict(q_lora_rank=None, tie_word_embeddings=False),
    'q_lora_tied': dict(q_lora_rank=24, tie_word_embeddings=True),
    'q_lora_yarn': dict(q_lora_rank=24, tie_word_embeddings=False, rope_parameters=YARN,
                        max_position_embeddings=64),
}


def hf_config(**overrides) -> transformers.DeepseekV2Config:
  """A tiny DeepSeek-V2 whose every layer has a dense MLP: MoE layers start at
  first_k_dense_replace, here = num_hidden_layers (n_routed_experts keeps its default, unused)."""
  kw = dict(vocab_size=VOCAB, hidden_size=EMBED, intermediate_size=MLP, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=HEADS, kv_lora_rank=KV_LORA,
            qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V,
            first_k_dense_replace=LAYERS, rms_norm_eps=1e-5, rope_theta=5000.0,
            initializer_range=INIT_STD)
  return transformers.DeepseekV2Config(**{**kw, **overrides})


def hf_model(seed: int = 0, **overrides) -> transformers.DeepseekV2ForCausalLM:
  torch.manual_seed(seed)
  model = transformers.DeepseekV2ForCausalLM(hf_config(**overrides)).eval()
  assert all(type(layer.mlp).__name__ == 'DeepseekV2MLP' for layer in model.model.layers)
  return model


def model_config(fields: dict, **changes) -> ModelConfig:
  return dataclasses.replace(ModelConfig.from_config(fields), **changes)


def our_logits(fields: dict, params: dict, tokens: np.ndarray, **changes) -> np.ndarray:
  return transformer_logits(model_config(fields, **changes), {'params': params}, tokens)


@pytest.fixture(scope='module')
def tokens() -> np.ndarray:
  # Longer than YaRN's original context (16), so the interpolated frequencies matter.
  return random_tokens(VOCAB, 40)


@pytest.fixture(scope='module', params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
  """(case name, torch model, directory written by save_pretrained)."""
  model = hf_model(**CASES[request.param])
  return request.param, model, save_pretrained(model, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope='module')
def q_lora_checkpoint(tmp_path_factory):
  model = hf_model(**CASES['q_lora_tied'])
  return model, save_pretrained(model, tmp_path_factory.mktemp('q_lora'))


# ---------------------------------------------------------------------------------------------
# Import.


def test_load_matches_transformers_logits(checkpoint, tokens):
  name, model, path = checkpoint
  fields, params = load_deepseek_v2(path)
  hf = model.config
  want = dict(
      vocab_size=VOCAB, embed_dim=EMBED, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=HEADS,
      head_dim=ROPE, mlp_dim=MLP, rope_theta=5000.0, norm_eps=1e-5,
      tie_embeddings=hf.tie_word_embeddings, attention='mla', position='rope', ffn='dense',
      mla=dict(q_lora_rank=hf.q_lora_rank or 0, kv_lora_rank=KV_LORA, qk_nope_head_dim=NOPE,
               qk_rope_head_dim=ROPE, v_head_dim=V))
  if name == 'q_lora_yarn':
    want['yarn'] = dict(factor=4.0, original_max_len=16, beta_fast=8.0, beta_slow=1.0,
                        mscale=1.0, mscale_all_dim=0.8, truncate=True)
  assert fields == want
  attn = params['blocks']['attn']
  assert ('q' in attn) == (hf.q_lora_rank is None) and ('q_b' in attn) != (hf.q_lora_rank is None)
  assert ('lm_head' in params) != hf.tie_word_embeddings
  got = our_logits(fields, params, tokens)
  assert np.abs(got - hf_logits(model, tokens)).max() < 1e-4


def test_unscanned_layout(q_lora_checkpoint, tokens):
  model, path = q_lora_checkpoint
  fields, params = load_deepseek_v2(path, scan_layers=False)
  assert 'block_1' in params and 'blocks' not in params
  got = our_logits(fields, params, tokens, scan_layers=False)
  assert np.abs(got - hf_logits(model, tokens)).max() < 1e-4


def test_prefill_and_absorbed_decode_match_transformers(q_lora_checkpoint, tokens):
  """The cache form (latent scores, values expanded after the weighted sum) on the loaded
  weights gives transformers' logits: prefill 30 tokens, then one at a time."""
  model, path = q_lora_checkpoint
  fields, params = load_deepseek_v2(path)
  got = prefill_then_decode(model_config(fields), params, tokens, prefill=30)
  assert np.abs(got - hf_logits(model, tokens)).max() < 1e-4


def test_parity_is_sensitive_to_rope_layout_and_yarn_scale(checkpoint, tokens):
  """Negative controls: loading the RoPE features in the checkpoint's interleaved order (no
  permutation), or dropping DeepSeek's YaRN logit scale, breaks parity clearly; so the parity
  test really checks both."""
  name, model, path = checkpoint
  fields, params = load_deepseek_v2(path)
  ref = hf_logits(model, tokens)
  attn = params['blocks']['attn']
  undo = lambda a, prefix: a[..., np.argsort(rope_order(prefix, ROPE))]
  q = 'q' if 'q' in attn else 'q_b'
  attn[q]['kernel'] = undo(attn[q]['kernel'], NOPE)
  attn['kv_a']['kernel'] = undo(attn['kv_a']['kernel'], KV_LORA)
  assert np.abs(our_logits(fields, params, tokens) - ref).max() > 1e-2
  if name == 'q_lora_yarn':
    _, params = load_deepseek_v2(path)
    unscaled = fields | {'yarn': fields['yarn'] | {'mscale_all_dim': 0.0, 'mscale': 0.0}}
    assert np.abs(our_logits(unscaled, params, tokens) - ref).max() > 1e-2


def test_transformers4_config_spelling(tmp_path):
  """transformers < 5 and DeepSeek's own code write rope_theta and rope_scaling {type: yarn}."""
  model = hf_model(**CASES['q_lora_yarn'])
  save_pretrained(model, tmp_path)
  fields5, _ = load_deepseek_v2(tmp_path)
  config = read_config(tmp_path)
  rope = config.pop('rope_parameters')
  config['rope_theta'] = rope.pop('rope_theta')
  config['rope_scaling'] = {'type': rope.pop('rope_type'), **rope}
  (tmp_path / 'config.json').write_text(json.dumps(config))
  fields4, _ = load_deepseek_v2(tmp_path)
  assert fields4 == fields5


def test_generic_loader_dispatches_on_model_type(q_lora_checkpoint):
  _, path = q_lora_checkpoint
  fields, params = load_checkpoint(path)
  fields2, params2 = load_deepseek_v2(path)
  assert fields == fields2 and leaves(params).keys() == leaves(params2).keys()


# ---------------------------------------------------------------------------------------------
# Export.


def test_export_loads_in_transformers(checkpoint, tokens, tmp_path):
  name, model, path = checkpoint
  fields, params = load_deepseek_v2(path)
  out = save_deepseek_v2(tmp_path / 'export', params, model_config(fields))
  config = read_config(out)
  assert config['architectures'] == ['DeepseekV2ForCausalLM']
  assert config['model_type'] == 'deepseek_v2'
  assert config['first_k_dense_replace'] == LAYERS  # every layer dense
  if name == 'q_lora_yarn':
    # Both spellings: transformers 4.x reads rope_scaling, DeepSeek's own code its 'type'.
    assert config['rope_scaling']['rope_type'] == config['rope_scaling']['type'] == 'yarn'
    assert config['rope_scaling'] == config['rope_parameters'] | {'type': 'yarn'}
    assert config['max_position_embeddings'] == 64  # original context 16 x factor 4
  else:
    assert config['rope_scaling'] is None

  exported = transformers.DeepseekV2ForCausalLM.from_pretrained(out).eval()
  assert all(type(layer.mlp).__name__ == 'DeepseekV2MLP' for layer in exported.model.layers)
  got = hf_logits(exported, tokens)
  np.testing.assert_array_equal(got, hf_logits(model, tokens))  # the same weights, bit for bit
  assert np.abs(got - our_logits(fields, params, tokens)).max() < 1e-4

  # load -> save -> load is bit-exact.
  fields2, params2 = load_deepseek_v2(out)
  assert fields2 == fields
  assert_same_params(params, params2)


@pytest.mark.parametrize('q_lora_rank', [0, 20])
def test_export_of_our_own_model(tmp_path, tokens, q_lora_rank):
  """A model of ours (random weights on `init`'s shapes, boxed) exports and runs in transformers:
  the export's inverse permutation is checked on its own, not only as load's inverse."""
  cfg = ModelConfig(vocab_size=VOCAB, embed_dim=EMBED, num_layers=LAYERS, num_heads=HEADS,
                    num_kv_heads=HEADS, head_dim=ROPE, mlp_dim=MLP, rope_theta=321.0,
                    norm_eps=1e-6, attention='mla',
                    mla=MLAConfig(q_lora_rank=q_lora_rank, kv_lora_rank=KV_LORA,
                                  qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V))
  variables = random_variables(cfg, INIT_STD)
  out = save_deepseek_v2(tmp_path, variables, cfg, dtype=jnp.float32)
  exported = transformers.DeepseekV2ForCausalLM.from_pretrained(out).eval()
  assert exported.config.q_lora_rank == (q_lora_rank or None)
  got = transformer_logits(cfg, variables, tokens)
  assert np.abs(got - hf_logits(exported, tokens)).max() < 1e-4


def test_export_refusals(q_lora_checkpoint, tmp_path):
  _, path = q_lora_checkpoint
  fields, params = load_deepseek_v2(path)
  for field, value in (('attention', 'mha'), ('position', 'none'), ('sliding_window', 8)):
    with pytest.raises(ConfigError, match='no DeepseekV2ForCausalLM equivalent') as e:
      save_deepseek_v2(tmp_path, params, fields | {field: value})
    assert e.value.field == f'model.{field}'
  # RoPE scalings other than YaRN: DeepSeek's configs (and its transformers class) have none.
  for field, change in (('llama3_rope.factor', {'llama3_rope': {'factor': 8.0}}),
                        ('linear_rope_factor', {'linear_rope_factor': 2.0})):
    with pytest.raises(ConfigError, match='has no DeepSeek equivalent') as e:
      save_deepseek_v2(tmp_path, params, fields | change)
    assert e.value.field == f'model.{field}'
  assert not (tmp_path / 'model.safetensors').exists()


# ---------------------------------------------------------------------------------------------
# Refusals on import, all before any weight is read.


@pytest.mark.parametrize('change, drop, phrase', [
    # MoE layers (tests/hf/test_deepseek_v2_moe.py) need their top-k, which this config lacks.
    (dict(first_k_dense_replace=1, n_routed_experts=4), (),
     "config.json has no 'num_experts_per_tok'"),
    # transformers' defaults (first_k_dense_replace 0, n_routed_experts 64) make every layer MoE.
    ({}, ('first_k_dense_replace', 'n_routed_experts'),
     "config.json has no 'num_experts_per_tok'"),
    (dict(hidden_act='gelu'), (), "hidden_act='gelu' is not supported"),
    (dict(attention_bias=True), (), 'attention_bias=true is not supported'),
    (dict(mlp_bias=True), (), 'mlp_bias=true is not supported'),
    (dict(rope_parameters={'rope_type': 'linear', 'rope_theta': 5000.0, 'factor': 2.0}), (),
     "RoPE scaling 'linear' is not supported"),
    (dict(rope_parameters={**YARN, 'attention_factor': 1.5}), (),
     'explicit attention_factor=1.5'),
    (dict(num_key_value_heads=2), (), 'num_key_value_heads=2 differs'),
    (dict(qk_rope_head_dim=7), (), 'qk_rope_head_dim=7 is odd'),
    (dict(quantization_config={'quant_method': 'fp8'}), (), 'quantized checkpoints'),
    (dict(model_type='llama'), (), "model_type 'llama', not a DeepSeek-V2 checkpoint"),
], ids=lambda x: '-'.join(map(str, x)) if isinstance(x, (dict, tuple)) and x else None)
def test_config_refusals(q_lora_checkpoint, tmp_path, change, drop, phrase):
  path = copy_with(q_lora_checkpoint[1], tmp_path, config=change, drop_config=drop,
                   corrupt_weights=True)
  with pytest.raises(ConfigError, match=phrase.replace('(', r'\(').replace('.', r'\.')) as e:
    load_deepseek_v2(path)
  assert e.value.field == 'model.hf'


def test_rope_is_read_as_transformers_reads_it(q_lora_checkpoint):
  """A 4.x rope_scaling wins over rope_parameters (as transformers 5.x and the other families
  read them); YaRN's original context falls back to max_position_embeddings."""
  from efficientjax.hf.deepseek_v2 import fields_from_hf  # pylint: disable=g-import-not-at-top
  hf = read_config(q_lora_checkpoint[1])
  both = {**hf, 'rope_scaling': YARN, 'rope_parameters': {'rope_type': 'default',
                                                          'rope_theta': 10.0}}
  fields = fields_from_hf(both)
  assert fields['rope_theta'] == 5000.0 and fields['yarn']['factor'] == 4.0
  no_original = {k: v for k, v in YARN.items() if k != 'original_max_position_embeddings'}
  fields = fields_from_hf({**hf, 'rope_parameters': no_original, 'max_position_embeddings': 32})
  assert fields['yarn']['original_max_len'] == 32

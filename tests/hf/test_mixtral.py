"""Mixtral interchange against transformers' own MixtralForCausalLM: routing, experts, layouts."""

import shutil

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
import transformers

from efficientjax.errors import ConfigError
from efficientjax.hf import load_checkpoint, load_mixtral, save_mixtral
from efficientjax.model import ModelConfig, MoEConfig
from tests.hf.common import (assert_same_params, copy_with, hf_logits, leaves, moe_model_config,
                             prefill_then_decode, random_tokens, random_variables, read_config,
                             save_pretrained, tensor_names, transformer_logits)

VOCAB, EMBED, HEADS, EXPERT, LAYERS, EXPERTS = 128, 64, 4, 48, 2, 4
# std 0.1 rather than 0.02: sharper router probabilities and larger expert outputs, so a wrong
# expert choice or weighting moves the logits far past the tolerance (see the sensitivity test).
INIT_STD = 0.1

CASES = {
    'gqa_top2_untied': dict(num_key_value_heads=2, num_experts_per_tok=2,
                            tie_word_embeddings=False),
    # A window shorter than the sequence, so the sliding-window mask matters; top-1 routing.
    'mha_top1_tied_window': dict(num_key_value_heads=HEADS, num_experts_per_tok=1,
                                 tie_word_embeddings=True, sliding_window=8),
}


def hf_config(**overrides) -> transformers.MixtralConfig:
  kw = dict(vocab_size=VOCAB, hidden_size=EMBED, intermediate_size=EXPERT,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_local_experts=EXPERTS,
            rope_theta=5000.0, rms_norm_eps=1e-5, initializer_range=INIT_STD,
            router_aux_loss_coef=0.02)
  return transformers.MixtralConfig(**{**kw, **overrides})


def hf_model(seed: int = 0, **overrides) -> transformers.MixtralForCausalLM:
  torch.manual_seed(seed)
  return transformers.MixtralForCausalLM(hf_config(**overrides)).eval()


def our_logits(fields: dict, params: dict, tokens: np.ndarray, dispatch: str = 'dropless',
               **changes) -> np.ndarray:
  cfg = moe_model_config(fields, dispatch, **changes)
  return transformer_logits(cfg, {'params': params}, tokens)


@pytest.fixture(scope='module')
def tokens() -> np.ndarray:
  return random_tokens(VOCAB, 24)


@pytest.fixture(scope='module', params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
  """(case name, torch model, directory written by save_pretrained)."""
  model = hf_model(**CASES[request.param])
  return request.param, model, save_pretrained(model, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope='module')
def top2_checkpoint(tmp_path_factory):
  model = hf_model(**CASES['gqa_top2_untied'])
  return model, save_pretrained(model, tmp_path_factory.mktemp('top2'))


# ---------------------------------------------------------------------------------------------
# Import.


def test_save_pretrained_writes_one_tensor_per_expert(top2_checkpoint):
  """What transformers 5.x writes (its modules hold the experts fused; save_pretrained reverts
  to the original Mixtral names), i.e. the layout our export must write too."""
  names = tensor_names(top2_checkpoint[1])
  assert 'model.layers.0.block_sparse_moe.experts.3.w2.weight' in names
  assert 'model.layers.0.block_sparse_moe.gate.weight' in names
  assert not any('gate_up_proj' in n for n in names)


@pytest.mark.parametrize('dispatch', ['dense', 'dropless'])
def test_load_matches_transformers_logits(checkpoint, tokens, dispatch):
  name, model, path = checkpoint
  fields, params = load_mixtral(path)
  hf = model.config
  k = hf.num_experts_per_tok
  assert fields == dict(
      vocab_size=VOCAB, embed_dim=EMBED, num_layers=LAYERS, num_heads=HEADS,
      num_kv_heads=hf.num_key_value_heads, head_dim=EMBED // HEADS, mlp_dim=EXPERT,
      rope_theta=5000.0, norm_eps=1e-5, tie_embeddings=hf.tie_word_embeddings,
      attention='gqa' if hf.num_key_value_heads == 2 else 'mha', position='rope', ffn='moe',
      sliding_window=hf.sliding_window,
      moe=dict(num_experts=EXPERTS, top_k=k, expert_dim=EXPERT, num_shared_experts=0,
               first_dense_layers=0, router='softmax', norm_topk_prob=True,
               routed_scaling_factor=1.0, num_groups=1, topk_groups=1,
               aux_loss_coef=0.02 * k / LAYERS, z_loss_coef=0.0, seq_aux_loss_coef=0.0,
               aux_free=False))
  mlp = params['blocks']['mlp']
  assert mlp['gate'].shape == mlp['up'].shape == (LAYERS, EXPERTS, EMBED, EXPERT)
  assert mlp['down'].shape == (LAYERS, EXPERTS, EXPERT, EMBED)
  assert mlp['router'].shape == (LAYERS, EMBED, EXPERTS)
  got = our_logits(fields, params, tokens, dispatch)
  assert np.abs(got - hf_logits(model, tokens)).max() < 1e-4


def test_unscanned_layout(top2_checkpoint, tokens):
  model, path = top2_checkpoint
  fields, params = load_mixtral(path, scan_layers=False)
  assert 'block_1' in params and 'blocks' not in params
  got = our_logits(fields, params, tokens, scan_layers=False)
  assert np.abs(got - hf_logits(model, tokens)).max() < 1e-4


def test_parity_is_sensitive_to_routing_and_expert_layout(top2_checkpoint, tokens):
  """Negative controls: without Mixtral's renormalisation, or with gate and up swapped (w1 and
  w3 confused), the logits move far past the tolerance; so parity checks both."""
  model, path = top2_checkpoint
  fields, params = load_mixtral(path)
  ref = hf_logits(model, tokens)
  unnormalised = fields | {'moe': fields['moe'] | {'norm_topk_prob': False}}
  assert np.abs(our_logits(unnormalised, params, tokens) - ref).max() > 1e-2
  mlp = params['blocks']['mlp']
  mlp['gate'], mlp['up'] = mlp['up'], mlp['gate']
  assert np.abs(our_logits(fields, params, tokens) - ref).max() > 1e-2


def test_fused_expert_layout(top2_checkpoint, tmp_path, tokens):
  """transformers' own parameter names (`mlp.experts.gate_up_proj` [E, 2f, d], `down_proj`
  [E, d, f], `mlp.gate`), which its loader takes as they are, load to the same params."""
  model, path = top2_checkpoint
  shutil.copy(path / 'config.json', tmp_path)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  assert state['model.layers.0.mlp.experts.gate_up_proj'].shape == (EXPERTS, 2 * EXPERT, EMBED)
  safetensors.torch.save_file(state, tmp_path / 'model.safetensors', metadata={'format': 'pt'})
  np.testing.assert_array_equal(
      hf_logits(transformers.MixtralForCausalLM.from_pretrained(tmp_path).eval(), tokens),
      hf_logits(model, tokens))
  _, fused = load_mixtral(tmp_path)
  _, per_expert = load_mixtral(path)
  assert_same_params(fused, per_expert)


def test_mixed_or_incomplete_expert_layouts_refused(top2_checkpoint, tmp_path):
  _, path = top2_checkpoint
  with safetensors.safe_open(path / 'model.safetensors', framework='pt') as f:
    state = {k: f.get_tensor(k) for k in f.keys()}
  mixed = dict(state)
  mixed['model.layers.1.mlp.experts.down_proj'] = torch.zeros(EXPERTS, EMBED, EXPERT)
  for name, tensors, phrase in (
      ('mixed', mixed, "tensor\\(s\\) model.layers.1.mlp.experts.down_proj have no place"),
      ('incomplete', {k: v for k, v in state.items() if 'experts.3.w2' not in k},
       'lacks tensor\\(s\\) model.layers.0.block_sparse_moe.experts.3.w2.weight, '
       'model.layers.1.block_sparse_moe.experts.3.w2.weight')):
    (tmp_path / name).mkdir()
    shutil.copy(path / 'config.json', tmp_path / name)
    safetensors.torch.save_file(tensors, tmp_path / name / 'model.safetensors')
    with pytest.raises(ConfigError, match=phrase):
      load_mixtral(tmp_path / name)


def test_prefill_and_decode_match_transformers(checkpoint, tokens):
  """Prefill 16 tokens, then one at a time, against transformers' full forward (with the
  window case, past the window)."""
  _, model, path = checkpoint
  fields, params = load_mixtral(path)
  got = prefill_then_decode(moe_model_config(fields), params, tokens, prefill=16)
  assert np.abs(got - hf_logits(model, tokens)).max() < 1e-4


def test_generic_loader_dispatches_on_model_type(top2_checkpoint):
  fields, params = load_checkpoint(top2_checkpoint[1])
  fields2, params2 = load_mixtral(top2_checkpoint[1])
  assert fields == fields2 and leaves(params).keys() == leaves(params2).keys()


# ---------------------------------------------------------------------------------------------
# Export.


def test_export_loads_in_transformers(checkpoint, tokens, tmp_path):
  _, model, path = checkpoint
  fields, params = load_mixtral(path)
  out = save_mixtral(tmp_path / 'export', params, moe_model_config(fields))
  config = read_config(out)
  assert config['architectures'] == ['MixtralForCausalLM'] and config['model_type'] == 'mixtral'
  assert config['router_aux_loss_coef'] == pytest.approx(0.02)
  # The names save_pretrained writes (tied heads leave out lm_head.weight in both).
  assert tensor_names(out) == tensor_names(path)

  exported = transformers.MixtralForCausalLM.from_pretrained(out).eval()
  assert exported.config.sliding_window == model.config.sliding_window
  np.testing.assert_array_equal(hf_logits(exported, tokens), hf_logits(model, tokens))

  # load -> save -> load is bit-exact, config included.
  fields2, params2 = load_mixtral(out)
  assert fields2 == fields
  assert_same_params(params, params2)


def test_export_of_our_own_model(tmp_path, tokens):
  """A model of ours (random weights on `init`'s shapes, scanned, boxed) runs in transformers:
  the per-expert split and the router's transpose are checked on their own, not only as
  load's inverse."""
  cfg = ModelConfig(vocab_size=VOCAB, embed_dim=EMBED, num_layers=LAYERS, num_heads=HEADS,
                    num_kv_heads=1, head_dim=16, mlp_dim=96, rope_theta=321.0, norm_eps=1e-6,
                    attention='mqa', ffn='moe',
                    moe=MoEConfig(num_experts=3, top_k=2, expert_dim=40, dispatch='dense'))
  variables = random_variables(cfg, INIT_STD)
  out = save_mixtral(tmp_path, variables, cfg)
  exported = transformers.MixtralForCausalLM.from_pretrained(out).eval()
  assert (exported.config.num_local_experts, exported.config.intermediate_size) == (3, 40)
  got = transformer_logits(cfg, variables, tokens)
  assert np.abs(got - hf_logits(exported, tokens)).max() < 1e-4


@pytest.mark.parametrize('field, value', [
    ('attention', 'mla'), ('ffn', 'dense'), ('qkv_bias', True), ('moe.router', 'sigmoid'),
    ('moe.norm_topk_prob', False), ('moe.routed_scaling_factor', 2.0), ('moe.num_groups', 2),
    ('moe.num_shared_experts', 1), ('moe.first_dense_layers', 1), ('moe.aux_free', True),
])
def test_export_refusals(top2_checkpoint, tmp_path, field, value):
  fields, params = load_mixtral(top2_checkpoint[1])
  if field.startswith('moe.'):
    fields = fields | {'moe': fields['moe'] | {field.removeprefix('moe.'): value}}
  else:
    fields = fields | {field: value}
  with pytest.raises(ConfigError, match='no MixtralForCausalLM equivalent') as e:
    save_mixtral(tmp_path, params, fields)
  assert e.value.field == f'model.{field}'
  assert not (tmp_path / 'model.safetensors').exists()


# ---------------------------------------------------------------------------------------------
# Refusals on import, before any weight is read.


@pytest.mark.parametrize('change, phrase', [
    (dict(num_experts_per_tok=5), 'num_experts_per_tok=5 must be between 1 and '
     'num_local_experts=4'),
    (dict(sliding_window=0), 'sliding_window=0 in config.json is not a window'),
    (dict(hidden_act='gelu'), "hidden_act='gelu' is not supported"),
    (dict(rope_parameters={'rope_type': 'dynamic', 'rope_theta': 5000.0, 'factor': 2.0}),
     "RoPE scaling 'dynamic' is not supported"),
    (dict(model_type='llama'), "model_type 'llama', not a Mixtral checkpoint"),
], ids=lambda x: '-'.join(map(str, x)) if isinstance(x, dict) else None)
def test_config_refusals(top2_checkpoint, tmp_path, change, phrase):
  path = copy_with(top2_checkpoint[1], tmp_path, config=change, corrupt_weights=True)
  with pytest.raises(ConfigError, match=phrase) as e:
    load_mixtral(path)
  assert e.value.field == 'model.hf'


def test_router_jitter_noise_is_training_only(top2_checkpoint, tmp_path):
  """Accepted and dropped: transformers applies it only in training mode."""
  path = copy_with(top2_checkpoint[1], tmp_path, config={'router_jitter_noise': 0.1})
  assert load_mixtral(path)[0] == load_mixtral(top2_checkpoint[1])[0]

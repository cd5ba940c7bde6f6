"""DeepSeek-V2 with MoE layers (MLA + DeepSeekMoE) against transformers' DeepseekV2ForCausalLM:
a dense first layer, routed experts (greedy and group-limited), shared experts, scaling."""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from efficientjax.errors import ConfigError
from efficientjax.hf import load_deepseek_v2, save_deepseek_v2
from efficientjax.model import MLAConfig, ModelConfig, MoEConfig
from tests.hf.common import (assert_same_params, copy_with, hf_logits, moe_model_config,
                             random_tokens, random_variables, read_config, save_pretrained,
                             tensor_names, transformer_logits)

VOCAB, EMBED, HEADS, MLP, EXPERT, LAYERS, EXPERTS = 128, 64, 4, 96, 32, 3, 8
KV_LORA, NOPE, ROPE, V = 16, 12, 8, 10
# std 0.1: sharp enough routing that a wrong expert choice or weight shows (sensitivity test).
INIT_STD = 0.1

CASES = {
    'greedy_top2': dict(topk_method='greedy', num_experts_per_tok=2, routed_scaling_factor=1.0,
                        q_lora_rank=24, tie_word_embeddings=False),
    # Two groups of 4, one kept: the top-3 come from the best group only; weights scaled.
    'group_limited_top3': dict(topk_method='group_limited_greedy', n_group=2, topk_group=1,
                               num_experts_per_tok=3, routed_scaling_factor=2.5,
                               q_lora_rank=None, tie_word_embeddings=True),
}


def hf_config(**overrides) -> transformers.DeepseekV2Config:
  """Layer 0 dense (intermediate_size), layers 1-2 MoE: 8 routed experts of width 32, 2 shared."""
  kw = dict(vocab_size=VOCAB, hidden_size=EMBED, intermediate_size=MLP, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=HEADS, kv_lora_rank=KV_LORA,
            qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V,
            first_k_dense_replace=1, n_routed_experts=EXPERTS, n_shared_experts=2,
            moe_intermediate_size=EXPERT, rms_norm_eps=1e-5, rope_theta=5000.0,
            initializer_range=INIT_STD)
  return transformers.DeepseekV2Config(**{**kw, **overrides})


def hf_model(seed: int = 0, **overrides) -> transformers.DeepseekV2ForCausalLM:
  torch.manual_seed(seed)
  model = transformers.DeepseekV2ForCausalLM(hf_config(**overrides)).eval()
  kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
  assert kinds == ['DeepseekV2MLP', 'DeepseekV2Moe', 'DeepseekV2Moe']
  return model


def our_logits(fields: dict, params: dict, tokens: np.ndarray, dispatch: str = 'dropless',
               **changes) -> np.ndarray:
  cfg = moe_model_config(fields, dispatch, **changes)
  return transformer_logits(cfg, {'params': params}, tokens)


def with_moe(fields: dict, **changes) -> dict:
  return fields | {'moe': fields['moe'] | changes}


@pytest.fixture(scope='module')
def tokens() -> np.ndarray:
  return random_tokens(VOCAB, 24)


@pytest.fixture(scope='module', params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
  """(case name, torch model, directory written by save_pretrained)."""
  model = hf_model(**CASES[request.param])
  return request.param, model, save_pretrained(model, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope='module')
def grouped_checkpoint(tmp_path_factory):
  model = hf_model(**CASES['group_limited_top3'])
  return model, save_pretrained(model, tmp_path_factory.mktemp('grouped'))


@pytest.fixture(scope='module')
def greedy_checkpoint(tmp_path_factory):
  model = hf_model(**CASES['greedy_top2'])
  return model, save_pretrained(model, tmp_path_factory.mktemp('greedy'))


# ---------------------------------------------------------------------------------------------
# Import.


@pytest.mark.parametrize('dispatch', ['dense', 'dropless'])
def test_load_matches_transformers_logits(checkpoint, tokens, dispatch):
  name, model, path = checkpoint
  fields, params = load_deepseek_v2(path)
  hf = model.config
  grouped = hf.topk_method == 'group_limited_greedy'
  assert fields['ffn'] == 'moe' and fields['mlp_dim'] == MLP
  assert fields['moe'] == dict(
      num_experts=EXPERTS, top_k=hf.num_experts_per_tok, expert_dim=EXPERT, num_shared_experts=2,
      first_dense_layers=1, router='softmax', norm_topk_prob=False,
      routed_scaling_factor=hf.routed_scaling_factor, num_groups=2 if grouped else 1,
      topk_groups=1, aux_free=False)
  # Layer 0 (dense) and layers 1-2 (MoE) are two scanned stacks.
  assert params['dense_blocks']['mlp']['gate']['kernel'].shape == (1, EMBED, MLP)
  mlp = params['blocks']['mlp']
  assert mlp['gate'].shape == (LAYERS - 1, EXPERTS, EMBED, EXPERT)
  assert mlp['shared']['down']['kernel'].shape == (LAYERS - 1, 2 * EXPERT, EMBED)
  got = our_logits(fields, params, tokens, dispatch)
  assert np.abs(got - hf_logits(model, tokens)).max() < 1e-4


def test_unscanned_layout(grouped_checkpoint, tokens):
  model, path = grouped_checkpoint
  fields, params = load_deepseek_v2(path, scan_layers=False)
  assert 'kernel' in params['block_0']['mlp']['gate'] and 'router' in params['block_1']['mlp']
  got = our_logits(fields, params, tokens, scan_layers=False)
  assert np.abs(got - hf_logits(model, tokens)).max() < 1e-4


def test_parity_is_sensitive_to_routing(grouped_checkpoint, tokens):
  """Negative controls: greedy routing over all experts instead of the best group's, or no
  shared experts, break parity clearly (so the group-limited parity is not luck)."""
  model, path = grouped_checkpoint
  fields, params = load_deepseek_v2(path)
  ref = hf_logits(model, tokens)
  assert np.abs(our_logits(with_moe(fields, num_groups=1), params, tokens) - ref).max() > 1e-2
  shared = params['blocks']['mlp']['shared']['down']
  shared['kernel'] = jnp.zeros_like(shared['kernel'])
  assert np.abs(our_logits(fields, params, tokens) - ref).max() > 1e-2


def test_fused_expert_layout(greedy_checkpoint, tmp_path, tokens):
  """transformers' own parameter names (`mlp.experts.gate_up_proj` [E, 2f, d], `down_proj`
  [E, d, f]), which its loader takes as they are, load to the same params."""
  model, path = greedy_checkpoint
  assert 'model.layers.1.mlp.experts.7.down_proj.weight' in tensor_names(path)
  shutil.copy(path / 'config.json', tmp_path)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  assert state['model.layers.1.mlp.experts.gate_up_proj'].shape == (EXPERTS, 2 * EXPERT, EMBED)
  safetensors.torch.save_file(state, tmp_path / 'model.safetensors', metadata={'format': 'pt'})
  np.testing.assert_array_equal(
      hf_logits(transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path).eval(), tokens),
      hf_logits(model, tokens))
  assert_same_params(load_deepseek_v2(tmp_path)[1], load_deepseek_v2(path)[1])


def test_no_shared_experts(tmp_path, tokens):
  """n_shared_experts=0: transformers builds (and saves) an empty MLP; we have none."""
  model = transformers.DeepseekV2ForCausalLM(hf_config(
      n_shared_experts=0, num_experts_per_tok=2, q_lora_rank=None)).eval()
  save_pretrained(model, tmp_path)
  fields, params = load_deepseek_v2(tmp_path)
  assert fields['moe']['num_shared_experts'] == 0 and 'shared' not in params['blocks']['mlp']
  assert np.abs(our_logits(fields, params, tokens) - hf_logits(model, tokens)).max() < 1e-4


@pytest.mark.parametrize('seq_aux', [True, False])
def test_balancing_loss_keys(greedy_checkpoint, tmp_path, seq_aux):
  """DeepSeek's config.json spells its balance loss aux_loss_alpha (+ seq_aux)."""
  path = copy_with(greedy_checkpoint[1], tmp_path,
                   config=dict(aux_loss_alpha=0.003, seq_aux=seq_aux))
  moe = load_deepseek_v2(path)[0]['moe']
  assert (moe['aux_loss_coef'], moe['seq_aux_loss_coef']) == ((0, 0.003) if seq_aux else
                                                              (0.003, 0))


# ---------------------------------------------------------------------------------------------
# Export.


def test_export_loads_in_transformers(checkpoint, tokens, tmp_path):
  _, model, path = checkpoint
  fields, params = load_deepseek_v2(path)
  out = save_deepseek_v2(tmp_path / 'export', params, moe_model_config(fields))
  config = read_config(out)
  hf = model.config
  for key in ('first_k_dense_replace', 'n_routed_experts', 'num_experts_per_tok',
              'moe_intermediate_size', 'n_shared_experts', 'routed_scaling_factor',
              'topk_method', 'n_group', 'topk_group', 'norm_topk_prob', 'intermediate_size'):
    assert config[key] == getattr(hf, key), key
  # The names save_pretrained writes: one tensor per expert.
  assert tensor_names(out) == tensor_names(path)

  exported = transformers.DeepseekV2ForCausalLM.from_pretrained(out).eval()
  np.testing.assert_array_equal(hf_logits(exported, tokens), hf_logits(model, tokens))

  # load -> save -> load is bit-exact; the run's balancing coefficient travels as aux_loss_alpha.
  fields2, params2 = load_deepseek_v2(out)
  assert fields2 == with_moe(fields, aux_loss_coef=0.01, seq_aux_loss_coef=0.0)
  assert_same_params(params, params2)


def test_export_of_our_own_model(tmp_path, tokens):
  """A model of ours (random weights on `init`'s shapes) runs in transformers: two dense
  layers, group-limited top-2 of 6 experts in 3 groups, one shared expert, scaled weights."""
  cfg = ModelConfig(vocab_size=VOCAB, embed_dim=EMBED, num_layers=4, num_heads=HEADS,
                    num_kv_heads=HEADS, head_dim=ROPE, mlp_dim=80, rope_theta=321.0,
                    norm_eps=1e-6, attention='mla', ffn='moe',
                    mla=MLAConfig(q_lora_rank=20, kv_lora_rank=KV_LORA, qk_nope_head_dim=NOPE,
                                  qk_rope_head_dim=ROPE, v_head_dim=V),
                    moe=MoEConfig(num_experts=6, top_k=2, expert_dim=24, num_shared_experts=1,
                                  first_dense_layers=2, norm_topk_prob=False,
                                  routed_scaling_factor=1.7, num_groups=3, topk_groups=2,
                                  dispatch='dense'))
  variables = random_variables(cfg, INIT_STD)
  assert set(variables['params']) >= {'dense_blocks', 'blocks'}
  out = save_deepseek_v2(tmp_path, variables, cfg)
  exported = transformers.DeepseekV2ForCausalLM.from_pretrained(out).eval()
  assert [type(layer.mlp).__name__ for layer in exported.model.layers] == (
      ['DeepseekV2MLP'] * 2 + ['DeepseekV2Moe'] * 2)
  got = transformer_logits(cfg, variables, tokens)
  assert np.abs(got - hf_logits(exported, tokens)).max() < 1e-4


@pytest.mark.parametrize('field, value', [
    ('router', 'sigmoid'), ('norm_topk_prob', True), ('aux_free', True)])
def test_export_refusals(greedy_checkpoint, tmp_path, field, value):
  fields, params = load_deepseek_v2(greedy_checkpoint[1])
  with pytest.raises(ConfigError, match='no DeepseekV2ForCausalLM equivalent') as e:
    save_deepseek_v2(tmp_path, params, with_moe(fields, **{field: value}))
  assert e.value.field == f'model.moe.{field}'
  assert not (tmp_path / 'model.safetensors').exists()


@pytest.mark.parametrize('field, value', [('shared_expert_gate', True), ('shared_expert_dim', 48)])
def test_qwen_style_shared_experts_are_refused_on_export(greedy_checkpoint, tmp_path, field,
                                                         value):
  fields, params = load_deepseek_v2(greedy_checkpoint[1])
  with pytest.raises(ConfigError) as e:
    save_deepseek_v2(tmp_path, params, with_moe(fields, **{field: value}))
  assert e.value.field == f'model.moe.{field}'
  assert not (tmp_path / 'model.safetensors').exists()


# ---------------------------------------------------------------------------------------------
# Refusals on import, before any weight is read.


@pytest.mark.parametrize('change, phrase', [
    (dict(moe_layer_freq=2), 'moe_layer_freq=2 is not supported'),
    (dict(scoring_func='sigmoid'), "scoring_func='sigmoid' is not DeepSeek-V2's softmax"),
    (dict(topk_method='noaux_tc'), "topk_method='noaux_tc' is not supported"),
    (dict(norm_topk_prob=True), 'norm_topk_prob=true is not supported'),
    (dict(num_experts_per_tok=None), "config.json has no 'num_experts_per_tok'"),
    (dict(num_experts_per_tok=9), 'num_experts_per_tok=9 must be between 1 and '
     'n_routed_experts=8'),
    (dict(topk_method='group_limited_greedy', n_group=3, topk_group=1),
     'n_group=3 does not divide n_routed_experts=8'),
    (dict(topk_method='group_limited_greedy', n_group=2, topk_group=3),
     'topk_group=3 must be between 1 and n_group=2'),
    (dict(topk_method='group_limited_greedy', n_group=8, topk_group=1),
     'topk_group=1 groups of 1 experts hold fewer than num_experts_per_tok=2'),
], ids=lambda x: '-'.join(map(str, x.values())) if isinstance(x, dict) else None)
def test_config_refusals(greedy_checkpoint, tmp_path, change, phrase):
  path = copy_with(greedy_checkpoint[1], tmp_path, config=change, corrupt_weights=True)
  with pytest.raises(ConfigError, match=phrase) as e:
    load_deepseek_v2(path)
  assert e.value.field == 'model.hf'

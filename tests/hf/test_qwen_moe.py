"""Qwen3-MoE and Qwen2-MoE interchange against transformers' own Qwen3MoeForCausalLM and
Qwen2MoeForCausalLM: routing (norm_topk_prob either way), dense first layers, Qwen2-MoE's gated
shared expert, both expert layouts, export, and the refusals."""

import dataclasses
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from efficientjax.errors import ConfigError
from efficientjax.hf import (QWEN2_MOE, QWEN3_MOE, load_checkpoint, load_qwen2_moe,
                             load_qwen3_moe, save_mixtral, save_qwen2_moe, save_qwen3_moe)
from efficientjax.model import ModelConfig, MoEConfig
from tests.hf.common import (assert_same_params, copy_with, hf_logits, leaves, moe_model_config,
                             random_tokens, random_variables, read_config, save_pretrained,
                             tensor_names, transformer_logits)

VOCAB, EMBED, HEADS, KV_HEADS, MLP, LAYERS = 128, 64, 4, 2, 96, 2
EXPERT, SHARED, EXPERTS = 48, 40, 4  # the shared width is not a multiple of the experts'
# std 0.1 rather than 0.02: sharp router probabilities and large expert outputs, so a wrong
# expert choice, weighting or gate moves the logits far past the tolerance.
INIT_STD = 0.1


@dataclasses.dataclass(frozen=True)
class Kind:
  family: object
  config: type
  model: type
  load: object
  save: object


QWEN3 = Kind(QWEN3_MOE, transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
             load_qwen3_moe, save_qwen3_moe)
QWEN2 = Kind(QWEN2_MOE, transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
             load_qwen2_moe, save_qwen2_moe)
KINDS = {'qwen3': QWEN3, 'qwen2': QWEN2}

CASES = {
    # Layer 0 dense (width intermediate_size), layer 1 sparse; head_dim 24, not 64 / 4.
    'qwen3_dense_first': ('qwen3', dict(mlp_only_layers=[0], norm_topk_prob=True, head_dim=24,
                                        tie_word_embeddings=False)),
    # Every layer sparse, unnormalised top-k (the default), a 5-key window on every layer.
    'qwen3_window_tied': ('qwen3', dict(norm_topk_prob=False, tie_word_embeddings=True,
                                        use_sliding_window=True, sliding_window=5)),
    'qwen2_dense_first': ('qwen2', dict(mlp_only_layers=[0], norm_topk_prob=False,
                                        tie_word_embeddings=False)),
    # No q/k/v biases, renormalised top-k, every layer windowed (listed: Qwen2-MoE's own rule
    # would window the even layers only).
    'qwen2_window_nobias': ('qwen2', dict(qkv_bias=False, norm_topk_prob=True,
                                          tie_word_embeddings=True, use_sliding_window=True,
                                          sliding_window=5,
                                          layer_types=['sliding_attention'] * LAYERS)),
}


def hf_model(kind: Kind, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
  kw = dict(vocab_size=VOCAB, hidden_size=EMBED, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, intermediate_size=MLP,
            moe_intermediate_size=EXPERT, num_experts=EXPERTS, num_experts_per_tok=2,
            rope_parameters=dict(rope_type='default', rope_theta=5000.0), rms_norm_eps=1e-5,
            initializer_range=INIT_STD, router_aux_loss_coef=0.02)
  if kind is QWEN2:
    kw['shared_expert_intermediate_size'] = SHARED
  torch.manual_seed(seed)
  model = kind.model(kind.config(**{**kw, **overrides})).eval()
  # transformers sets norm weights to 1 and biases to 0, which would hide them loaded wrongly.
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith('norm.weight'):
        param.normal_(1.0, 0.5)
      elif name.endswith('.bias'):
        param.normal_(0.0, 0.5)
      elif name.endswith('shared_expert_gate.weight'):
        param.normal_(0.0, 0.5)  # gates spread over (0, 1), far from a constant 1/2
  return model


def our_logits(fields: dict, params: dict, tokens: np.ndarray, dispatch: str = 'dropless',
               **changes) -> np.ndarray:
  cfg = moe_model_config(fields, dispatch, **changes)
  return transformer_logits(cfg, {'params': params}, tokens)


def with_moe(fields: dict, **moe) -> dict:
  return fields | {'moe': fields['moe'] | moe}


@pytest.fixture(scope='module')
def tokens() -> np.ndarray:
  return random_tokens(VOCAB, 24)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """{case: (kind, torch model, directory written by save_pretrained)}, built once."""
  out = {}
  for case, (kind, overrides) in CASES.items():
    model = hf_model(KINDS[kind], **overrides)
    out[case] = KINDS[kind], model, save_pretrained(model, tmp_path_factory.mktemp(case))
  return out


@pytest.fixture(scope='module')
def loaded(checkpoints):
  """{case: (fields, params)} as our loader reads each checkpoint."""
  return {case: kind.load(path) for case, (kind, _, path) in checkpoints.items()}


# ---------------------------------------------------------------------------------------------
# Import.


def test_save_pretrained_writes_one_tensor_per_expert(checkpoints):
  """What transformers 5.x writes (its modules hold the experts fused): the layout our export
  writes too."""
  names = tensor_names(checkpoints['qwen2_dense_first'][2])
  assert 'model.layers.1.mlp.experts.3.down_proj.weight' in names
  assert 'model.layers.1.mlp.shared_expert_gate.weight' in names
  assert 'model.layers.0.mlp.gate_proj.weight' in names  # the dense first layer
  assert not any('gate_up_proj' in n for n in names)


@pytest.mark.parametrize('case', sorted(CASES))
def test_load_matches_transformers_logits(checkpoints, loaded, tokens, case):
  kind, model, _ = checkpoints[case]
  fields, params = loaded[case]
  hf = model.config
  dense_first = case.endswith('dense_first')
  sparse_layers = LAYERS - dense_first
  moe = dict(num_experts=EXPERTS, top_k=2, expert_dim=EXPERT, num_shared_experts=0,
             shared_expert_dim=None, shared_expert_gate=False, first_dense_layers=int(dense_first),
             router='softmax', norm_topk_prob=hf.norm_topk_prob, routed_scaling_factor=1.0,
             num_groups=1, topk_groups=1, aux_loss_coef=0.02 * 2 / sparse_layers,
             z_loss_coef=0.0, seq_aux_loss_coef=0.0, aux_free=False)
  if kind is QWEN2:
    moe.update(num_shared_experts=1, shared_expert_dim=SHARED, shared_expert_gate=True)
  want = dict(
      vocab_size=VOCAB, embed_dim=EMBED, num_layers=LAYERS, num_heads=HEADS,
      num_kv_heads=KV_HEADS, head_dim=getattr(hf, 'head_dim', EMBED // HEADS), mlp_dim=MLP,
      rope_theta=5000.0, norm_eps=1e-5, tie_embeddings=hf.tie_word_embeddings, attention='gqa',
      position='rope', ffn='moe', moe=moe)
  if kind is QWEN3:
    want['qk_norm'] = True
  else:
    want['qkv_bias'] = hf.qkv_bias
  if 'window' in case:
    want['sliding_window'] = 5
  assert fields == want
  if dense_first:
    assert params['dense_blocks']['mlp']['gate']['kernel'].shape == (1, EMBED, MLP)
  mlp = params['blocks']['mlp']
  assert mlp['gate'].shape == (sparse_layers, EXPERTS, EMBED, EXPERT)
  got = our_logits(fields, params, tokens)
  assert np.abs(got - hf_logits(model, tokens)).max() < 1e-4


def test_dense_dispatch_unscanned(checkpoints, tokens):
  """The `dense` strategy (every expert on every token) in the per-layer layout agrees too."""
  _, model, path = checkpoints['qwen2_dense_first']
  fields, flat = load_qwen2_moe(path, scan_layers=False)
  assert sorted(k for k in flat if k.startswith('block_')) == ['block_0', 'block_1']
  got = our_logits(fields, flat, tokens, 'dense', scan_layers=False)
  assert np.abs(got - hf_logits(model, tokens)).max() < 1e-4


def test_parity_is_sensitive(checkpoints, loaded, tokens):
  """Negative controls: with norm_topk_prob flipped, with gate and up swapped, and without the
  shared expert's gate, the logits leave transformers' by far more than the tolerance; so
  parity checks each (the routing and expert rules are the two families' shared code)."""
  _, model, _ = checkpoints['qwen2_window_nobias']
  fields, params = loaded['qwen2_window_nobias']
  ref = hf_logits(model, tokens)
  flipped = with_moe(fields, norm_topk_prob=not fields['moe']['norm_topk_prob'])
  assert np.abs(our_logits(flipped, params, tokens) - ref).max() > 1e-2
  mlp = params['blocks']['mlp']
  swapped = {**params, 'blocks': {**params['blocks'], 'mlp': {
      **mlp, 'gate': mlp['up'], 'up': mlp['gate']}}}
  assert np.abs(our_logits(fields, swapped, tokens) - ref).max() > 1e-2
  ungated = {**params, 'blocks': {**params['blocks'], 'mlp': {
      k: v for k, v in mlp.items() if k != 'shared_gate'}}}
  got = our_logits(with_moe(fields, shared_expert_gate=False), ungated, tokens)
  assert np.abs(got - ref).max() > 1e-2


@pytest.mark.parametrize('case', ['qwen3_dense_first', 'qwen2_dense_first'])
def test_fused_expert_layout(checkpoints, loaded, tmp_path, case):
  """transformers' own parameter names (`mlp.experts.gate_up_proj` [E, 2f, d], `down_proj`
  [E, d, f]), which its loader takes as they are, load to the same params."""
  kind, model, path = checkpoints[case]
  shutil.copy(path / 'config.json', tmp_path)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  assert state['model.layers.1.mlp.experts.gate_up_proj'].shape == (EXPERTS, 2 * EXPERT, EMBED)
  safetensors.torch.save_file(state, tmp_path / 'model.safetensors', metadata={'format': 'pt'})
  assert_same_params(kind.load(tmp_path)[1], loaded[case][1])


def test_sparse_step_giving_the_same_layers_loads_alike(checkpoints):
  """decoder_sparse_step 2 over 2 layers makes layer 1 sparse: mlp_only_layers [0] again."""
  hf = read_config(checkpoints['qwen3_dense_first'][2])
  step = QWEN3_MOE.fields_from_hf(hf | {'mlp_only_layers': [], 'decoder_sparse_step': 2})
  assert step == QWEN3_MOE.fields_from_hf(hf)


def test_no_sparse_layer_loads_as_a_dense_model(tmp_path):
  dense = hf_model(QWEN3, mlp_only_layers=[0, 1])
  fields, params = load_qwen3_moe(save_pretrained(dense, tmp_path))
  assert fields['ffn'] == 'dense' and 'moe' not in fields and fields['mlp_dim'] == MLP
  assert set(params['blocks']['mlp']) == {'gate', 'up', 'down'}


def test_generic_loader_dispatches_on_model_type(checkpoints, loaded):
  for case in ('qwen3_window_tied', 'qwen2_window_nobias'):
    fields, params = load_checkpoint(checkpoints[case][2])
    assert fields == loaded[case][0]
    assert leaves(params).keys() == leaves(loaded[case][1]).keys()


# ---------------------------------------------------------------------------------------------
# Export.


@pytest.mark.parametrize('case', sorted(CASES))
def test_export_loads_in_transformers(checkpoints, loaded, tokens, tmp_path, case):
  kind, model, path = checkpoints[case]
  fields, params = loaded[case]
  out = kind.save(tmp_path / 'export', params, moe_model_config(fields))
  config = read_config(out)
  assert config['architectures'] == [kind.family.architecture]
  assert config['router_aux_loss_coef'] == pytest.approx(0.02)
  # The names save_pretrained writes (tied heads leave out lm_head.weight in both).
  assert tensor_names(out) == tensor_names(path)

  exported = kind.model.from_pretrained(out).eval()
  assert exported.config.num_experts == EXPERTS
  assert exported.config.mlp_only_layers == model.config.mlp_only_layers
  assert exported.config.sliding_window == model.config.sliding_window
  np.testing.assert_array_equal(hf_logits(exported, tokens), hf_logits(model, tokens))

  # load -> save -> load is bit-exact, config included.
  fields2, params2 = kind.load(out)
  assert fields2 == fields
  assert_same_params(params, params2)


def test_export_of_our_own_qwen2_moe(tmp_path, tokens):
  """A model of ours (random weights on `init`'s shapes): MQA, a dense first layer, two shared
  experts of summed width 2 x 20 (one Qwen2-MoE shared expert of 40), gated; the gate's
  [d] -> [1, d] layout and the widths are checked on their own, not only as load's inverse."""
  cfg = ModelConfig(vocab_size=VOCAB, embed_dim=EMBED, num_layers=LAYERS, num_heads=HEADS,
                    num_kv_heads=1, head_dim=16, mlp_dim=MLP, rope_theta=321.0, norm_eps=1e-6,
                    attention='mqa', ffn='moe', qkv_bias=True,
                    moe=MoEConfig(num_experts=3, top_k=2, expert_dim=20, num_shared_experts=2,
                                  shared_expert_gate=True, first_dense_layers=1,
                                  norm_topk_prob=False, dispatch='dense'))
  variables = random_variables(cfg, INIT_STD, bias_std=0.5)
  out = save_qwen2_moe(tmp_path, variables, cfg)
  exported = QWEN2.model.from_pretrained(out).eval()
  config = exported.config
  assert (config.num_experts, config.moe_intermediate_size) == (3, 20)
  assert (config.shared_expert_intermediate_size, config.mlp_only_layers) == (40, [0])
  got = transformer_logits(cfg, variables, tokens)
  assert np.abs(got - hf_logits(exported, tokens)).max() < 1e-4


@pytest.mark.parametrize('case, field, value', [
    ('qwen3_dense_first', 'qk_norm', False), ('qwen3_dense_first', 'qkv_bias', True),
    ('qwen3_dense_first', 'moe.num_shared_experts', 1),
    ('qwen3_dense_first', 'moe.router', 'sigmoid'), ('qwen3_dense_first', 'ffn', 'dense'),
    ('qwen2_dense_first', 'qk_norm', True), ('qwen2_dense_first', 'moe.shared_expert_gate', False),
    ('qwen2_dense_first', 'moe.num_shared_experts', 0),
    ('qwen2_dense_first', 'moe.routed_scaling_factor', 2.0),
    ('qwen2_dense_first', 'moe.num_groups', 2), ('qwen2_dense_first', 'moe.aux_free', True),
])
def test_export_refusals(checkpoints, loaded, tmp_path, case, field, value):
  kind = checkpoints[case][0]
  fields, params = loaded[case]
  if field.startswith('moe.'):
    fields = with_moe(fields, **{field.removeprefix('moe.'): value})
  else:
    fields = fields | {field: value}
  with pytest.raises(ConfigError, match=f'no {kind.family.architecture} equivalent') as e:
    kind.save(tmp_path, params, fields)
  assert e.value.field == f'model.{field}'
  assert not (tmp_path / 'model.safetensors').exists()


def test_other_families_refuse_the_shared_expert(loaded, tmp_path):
  fields, params = loaded['qwen2_window_nobias']
  with pytest.raises(ConfigError, match='no MixtralForCausalLM equivalent') as e:
    save_mixtral(tmp_path, params, fields)
  assert e.value.field == 'model.moe.num_shared_experts'


# ---------------------------------------------------------------------------------------------
# Refusals on import, before any weight is read.


@pytest.mark.parametrize('case, change, phrase', [
    ('qwen3_dense_first', dict(mlp_only_layers=[1]),
     r'makes layers \[0\] of 2 sparse and the others dense'),
    ('qwen3_dense_first', dict(mlp_only_layers=[], decoder_sparse_step=2, num_hidden_layers=4),
     r'decoder_sparse_step=2 with mlp_only_layers=\[\] makes layers \[1, 3\] of 4 sparse'),
    ('qwen3_dense_first', dict(decoder_sparse_step=0),
     'decoder_sparse_step=0 must be a positive number'),
    ('qwen3_dense_first', dict(decoder_sparse_step=True),
     'decoder_sparse_step=True must be a positive number'),
    ('qwen3_dense_first', dict(num_experts_per_tok=5),
     'num_experts_per_tok=5 must be between 1 and num_experts=4'),
    ('qwen3_dense_first', dict(num_experts=8), 'num_experts=8 and num_local_experts=4'),
    ('qwen3_dense_first', dict(attention_bias=True), 'attention_bias=true is not supported'),
    ('qwen3_window_tied', dict(sliding_window=0),
     'sliding_window=0 in config.json is not a window'),
    ('qwen2_dense_first', dict(shared_expert_intermediate_size=0),
     'shared_expert_intermediate_size=0'),
    ('qwen2_dense_first', dict(shared_expert_intermediate_size=True),
     'shared_expert_intermediate_size=True'),
    # Qwen2-MoE's own rule: the even layers below max_window_layers.
    ('qwen2_dense_first', dict(use_sliding_window=True, sliding_window=5, layer_types=None),
     r'use_sliding_window=true windows layers \[0\] only'),
    ('qwen2_window_nobias', dict(layer_types=['sliding_attention', 'full_attention']),
     r'sliding window of 5 on layers \[0\] only'),
    ('qwen2_dense_first', dict(hidden_act='gelu'), "hidden_act='gelu' is not supported"),
    ('qwen2_dense_first', dict(model_type='qwen3_moe'),
     "model_type 'qwen3_moe', not a Qwen2-MoE checkpoint"),
], ids=lambda x: '-'.join(map(str, x)) if isinstance(x, dict) else None)
def test_config_refusals(checkpoints, tmp_path, case, change, phrase):
  kind, _, path = checkpoints[case]
  path = copy_with(path, tmp_path, config=change, corrupt_weights=True)
  with pytest.raises(ConfigError, match=phrase) as e:
    kind.load(path)
  assert e.value.field == 'model.hf'


def test_training_only_settings_are_accepted(checkpoints, loaded, tmp_path):
  """output_router_logits (whether transformers adds the balancing loss) changes no logits."""
  path = copy_with(checkpoints['qwen3_window_tied'][2], tmp_path,
                   config={'output_router_logits': True})
  assert load_qwen3_moe(path)[0] == loaded['qwen3_window_tied'][0]

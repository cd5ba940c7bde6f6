"""DeepSeek-V3 interchange against transformers' own DeepseekV3ForCausalLM: MLA (q_lora, YaRN,
interleaved RoPE), a dense first layer, the sigmoid router with group limits, renormalisation
and scaling, a shared expert, the score-correction bias as our `moe_state`, multi-token-
prediction layers skipped, and block-wise fp8 weights dequantised on load.

One compiled model serves every logits comparison (the checkpoints differ in weights only).
"""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
import transformers

from efficientjax.errors import ConfigError
from efficientjax.hf import load_checkpoint, load_deepseek_v3, save_deepseek_v3
from efficientjax.hf import safetensors_io
from efficientjax.model import MLAConfig, ModelConfig
from tests.hf.common import (assert_same_params, copy_with, hf_logits, moe_model_config,
                             random_tokens, random_variables, read_config, save_pretrained,
                             tensor_names, transformer_logits)

VOCAB, EMBED, HEADS, MLP, EXPERT, LAYERS, EXPERTS = 128, 64, 4, 96, 32, 3, 8
Q_LORA, KV_LORA, NOPE, ROPE, V = 24, 16, 12, 8, 10
INIT_STD = 0.1  # sharp enough routing that a wrong expert choice or weight shows
YARN = {'rope_type': 'yarn', 'rope_theta': 5000.0, 'factor': 4.0,
        'original_max_position_embeddings': 16, 'beta_fast': 8.0, 'beta_slow': 1.0,
        'mscale': 1.0, 'mscale_all_dim': 0.8}
# Blocks smaller than DeepSeek's 128 x 128, so that the tiny matrices span several (and some end
# in a partial one: kv_b_proj is [88, 16], q_b_proj [80, 24]).
FP8_BLOCK = [32, 32]
FP8_CONFIG = {'quant_method': 'fp8', 'fmt': 'e4m3', 'weight_block_size': FP8_BLOCK,
              'activation_scheme': 'dynamic'}
BIAS = 'model.layers.{}.mlp.gate.e_score_correction_bias'


def hf_config(**overrides) -> transformers.DeepseekV3Config:
  """Layer 0 dense, layers 1-2 MoE: 8 experts in 4 groups of 2, the best 2 groups kept, top-4,
  renormalised and scaled by 2.5; one shared expert; queries through a LoRA; YaRN."""
  kw = dict(vocab_size=VOCAB, hidden_size=EMBED, intermediate_size=MLP, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=HEADS, q_lora_rank=Q_LORA,
            kv_lora_rank=KV_LORA, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V,
            first_k_dense_replace=1, n_routed_experts=EXPERTS, n_shared_experts=1,
            moe_intermediate_size=EXPERT, n_group=4, topk_group=2, num_experts_per_tok=4,
            norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-5,
            rope_parameters=YARN, max_position_embeddings=64, initializer_range=INIT_STD)
  return transformers.DeepseekV3Config(**{**kw, **overrides})


@pytest.fixture(scope='module')
def model() -> transformers.DeepseekV3ForCausalLM:
  """Random weights; norm scales N(1, 0.1) where transformers makes ones, and a score-correction
  bias N(0, 0.2) (transformers zeroes it), large enough to change which experts are picked."""
  torch.manual_seed(0)
  model = transformers.DeepseekV3ForCausalLM(hf_config()).eval()
  assert [type(layer.mlp).__name__ for layer in model.model.layers] == (
      ['DeepseekV3MLP'] + ['DeepseekV3MoE'] * 2)
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):
        p.add_(0.1 * torch.randn(p.shape, generator=g))
    for layer in model.model.layers[1:]:
      bias = layer.mlp.gate.e_score_correction_bias
      bias.copy_(0.2 * torch.randn(bias.shape, generator=g))
  return model


@pytest.fixture(scope='module')
def checkpoint(model, tmp_path_factory):
  return save_pretrained(model, tmp_path_factory.mktemp('v3'))


@pytest.fixture(scope='module')
def loaded(checkpoint):
  return load_deepseek_v3(checkpoint)


@pytest.fixture(scope='module')
def tokens() -> np.ndarray:
  return random_tokens(VOCAB, 24)  # longer than YaRN's original context (16)


@pytest.fixture(scope='module')
def reference(model, tokens) -> np.ndarray:
  return hf_logits(model, tokens)


def our_logits(fields: dict, variables: dict, tokens: np.ndarray) -> np.ndarray:
  return transformer_logits(moe_model_config(fields), variables, tokens)


# ---------------------------------------------------------------------------------------------
# Import.


def test_load_matches_transformers_logits(model, loaded, tokens, reference):
  fields, variables = loaded
  assert fields['moe'] == dict(
      num_experts=EXPERTS, top_k=4, expert_dim=EXPERT, num_shared_experts=1,
      first_dense_layers=1, router='sigmoid', norm_topk_prob=True, routed_scaling_factor=2.5,
      num_groups=4, topk_groups=2, aux_free=True)
  assert fields['mla']['q_lora_rank'] == Q_LORA and fields['yarn']['factor'] == 4.0
  assert set(variables) == {'params', 'moe_state'}
  # The bias is the non-trained state, scanned like the params (layers 1-2), float32.
  bias = variables['moe_state']['blocks']['mlp']['bias']
  assert bias.dtype == np.float32
  np.testing.assert_array_equal(bias, np.stack([
      model.model.layers[i].mlp.gate.e_score_correction_bias.numpy() for i in (1, 2)]))
  assert 'bias' not in variables['params']['blocks']['mlp']
  assert np.abs(our_logits(fields, variables, tokens) - reference).max() < 1e-4

  # The bias matters: without it other experts are picked (the weights do not use it).
  unbiased = {**variables, 'moe_state': jax.tree.map(np.zeros_like, variables['moe_state'])}
  assert np.abs(our_logits(fields, unbiased, tokens) - reference).max() > 1e-2


def test_unscanned_layout_and_collections(checkpoint, loaded, tmp_path):
  """Per layer, the bias sits at moe_state/block_i; load_checkpoint without collections=True
  refuses a checkpoint whose params alone would route differently, before reading weights."""
  _, variables = loaded
  fields, per_layer = load_deepseek_v3(checkpoint, scan_layers=False)
  assert set(per_layer['moe_state']) == {'block_1', 'block_2'}
  for i in (1, 2):
    np.testing.assert_array_equal(per_layer['moe_state'][f'block_{i}']['mlp']['bias'],
                                  variables['moe_state']['blocks']['mlp']['bias'][i - 1])
  assert load_checkpoint(checkpoint, collections=True)[0] == fields
  with pytest.raises(ConfigError, match="collections=True, which returns the variables"):
    load_checkpoint(copy_with(checkpoint, tmp_path, corrupt_weights=True))


def test_mtp_layer_is_skipped_with_a_warning(checkpoint, loaded, tmp_path, tokens, reference):
  """DeepSeek-V3 stores its multi-token-prediction module as layer num_hidden_layers: a full
  decoder layer (here a copy of layer 2) plus enorm, hnorm, eh_proj and a shared head."""
  state = safetensors.numpy.load_file(checkpoint / 'model.safetensors')
  prefix = f'model.layers.{LAYERS}.'
  mtp = {k.replace('model.layers.2.', prefix): v
         for k, v in state.items() if k.startswith('model.layers.2.')}
  rng = np.random.default_rng(3)
  for name, shape in (('enorm.weight', [EMBED]), ('hnorm.weight', [EMBED]),
                      ('eh_proj.weight', [EMBED, 2 * EMBED]),
                      ('embed_tokens.weight', [VOCAB, EMBED]),
                      ('shared_head.norm.weight', [EMBED]),
                      ('shared_head.head.weight', [VOCAB, EMBED])):
    mtp[prefix + name] = rng.normal(size=shape).astype(np.float32)
  path = copy_with(checkpoint, tmp_path / 'mtp', config={'num_nextn_predict_layers': 1},
                   tensors=mtp)
  with pytest.warns(UserWarning, match=rf'skipped {len(mtp)} tensor\(s\) \({prefix}.*'
                    r'multi-token-prediction \(MTP\) layers .* not used for the next-token'):
    fields, variables = load_deepseek_v3(path)
  assert fields == loaded[0]
  assert_same_params(variables, loaded[1])
  np.testing.assert_array_equal(our_logits(fields, variables, tokens),
                                our_logits(*loaded, tokens))

  # Only the declared MTP layers are skipped: with none declared, or one layer further on,
  # those tensors have no place in the model.
  with pytest.raises(ConfigError, match=rf"{prefix}.* have no place in the model"):
    load_deepseek_v3(copy_with(path, tmp_path / 'none', config={'num_nextn_predict_layers': 0}))
  stray = {f'model.layers.{LAYERS + 1}.enorm.weight': np.ones(EMBED, np.float32)}
  with pytest.raises(ConfigError, match=rf"layers\.{LAYERS + 1}\.enorm.* have no place"):
    load_deepseek_v3(copy_with(path, tmp_path / 'stray', tensors=stray))


# ---------------------------------------------------------------------------------------------
# Block-wise fp8.


def quantise(weight: torch.Tensor, block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
  """DeepSeek-V3's block-wise e4m3 quantisation: per block, scale_inv = amax / 448 (e4m3's
  largest value) and w_fp8 = w / scale_inv, the last blocks cut short."""
  out, inp = weight.shape
  rows, cols = -(-out // block[0]), -(-inp // block[1])
  padded = torch.zeros(rows * block[0], cols * block[1])
  padded[:out, :inp] = weight
  amax = padded.reshape(rows, block[0], cols, block[1]).abs().amax(dim=(1, 3))
  scale_inv = (amax / 448.0).clamp(min=1e-12)
  full = scale_inv.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:out, :inp]
  return (weight / full).to(torch.float8_e4m3fn), scale_inv


def is_quantised(name: str, tensor: torch.Tensor) -> bool:
  """The release's choice: the layers' linear weights, not the router (mlp.gate), the norms,
  the embeddings or the head."""
  return (name.startswith('model.layers.') and name.endswith('.weight') and tensor.ndim == 2
          and not name.endswith('.gate.weight'))


@pytest.fixture(scope='module')
def fp8_checkpoint(checkpoint, tmp_path_factory):
  """(fp8 checkpoint dir, transformers model holding the dequantised weights)."""
  path = copy_with(checkpoint, tmp_path_factory.mktemp('fp8'),
                   config={'quantization_config': FP8_CONFIG})
  state = safetensors.torch.load_file(checkpoint / 'model.safetensors')
  stored, dequantised = {}, {}
  for name, tensor in state.items():
    if is_quantised(name, tensor):
      w, scale_inv = quantise(tensor, FP8_BLOCK)
      stored[name], stored[name + '_scale_inv'] = w, scale_inv
      full = scale_inv.repeat_interleave(FP8_BLOCK[0], 0).repeat_interleave(FP8_BLOCK[1], 1)
      dequantised[name] = w.float() * full[:tensor.shape[0], :tensor.shape[1]]
    else:
      stored[name] = dequantised[name] = tensor
  assert stored['model.layers.1.self_attn.kv_b_proj.weight_scale_inv'].shape == (3, 1)
  assert stored['model.layers.0.mlp.down_proj.weight_scale_inv'].shape == (2, 3)
  safetensors.torch.save_file(stored, path / 'model.safetensors', metadata={'format': 'pt'})
  # Quantisation moved the weights far more than the parity tolerance.
  assert max((dequantised[k] - state[k]).abs().max() for k in state) > 1e-3
  # transformers' model of the dequantised weights, loaded as save_pretrained names them.
  plain = copy_with(checkpoint, tmp_path_factory.mktemp('dequantised'))
  safetensors.torch.save_file(dequantised, plain / 'model.safetensors', metadata={'format': 'pt'})
  return path, transformers.DeepseekV3ForCausalLM.from_pretrained(plain).eval()


def test_fp8_checkpoint_is_dequantised(fp8_checkpoint, loaded, tokens, reference):
  path, dequantised_model = fp8_checkpoint
  with safetensors.safe_open(path / 'model.safetensors', framework='numpy') as f:
    assert f.get_slice('model.layers.1.mlp.experts.3.up_proj.weight').get_dtype() == 'F8_E4M3'
  fields, variables = load_deepseek_v3(path)
  assert fields == loaded[0]
  want = hf_logits(dequantised_model, tokens)
  assert np.abs(want - reference).max() > 1e-3  # the fp8 model is a different one
  assert np.abs(our_logits(fields, variables, tokens) - want).max() < 1e-4


def test_fp8_refusals_come_before_any_weight(fp8_checkpoint, tmp_path, monkeypatch):
  """Scales missing or of the wrong shape, or float8 weights without a quantization_config, are
  refused from the headers: no fp8 tensor is read."""
  path, _ = fp8_checkpoint
  read = lambda *a: pytest.fail('an fp8 weight was read before the refusal')
  monkeypatch.setattr(safetensors_io, '_read_fp8', read)
  q = 'model.layers.0.self_attn.q_a_proj.weight'
  state = safetensors.torch.load_file(path / 'model.safetensors')
  del state[q + '_scale_inv']
  drop = copy_with(path, tmp_path / 'drop')
  safetensors.torch.save_file(state, drop / 'model.safetensors', metadata={'format': 'pt'})
  with pytest.raises(ConfigError, match=f"fp8 tensor '{q}' has no '{q}_scale_inv' beside it"):
    load_deepseek_v3(drop)
  for where, change, phrase in [
      ('block', {'quantization_config': {**FP8_CONFIG, 'weight_block_size': [64, 64]}},
       r"scale '.*_scale_inv' has shape \[\d+, \d+\], expected \[\d+, \d+\]"),
      ('plain', {'quantization_config': None}, 'is stored as F8_E4M3: quantised checkpoints '
       'are not supported')]:
    with pytest.raises(ConfigError, match=phrase):
      load_deepseek_v3(copy_with(path, tmp_path / where, config=change))


# ---------------------------------------------------------------------------------------------
# Export.


def test_export_loads_in_transformers_and_round_trips(checkpoint, loaded, tmp_path, model,
                                                      tokens, reference):
  fields, variables = loaded
  out = save_deepseek_v3(tmp_path / 'export', variables, moe_model_config(fields))
  config, hf = read_config(out), model.config
  for key in ('first_k_dense_replace', 'n_routed_experts', 'num_experts_per_tok', 'n_group',
              'topk_group', 'norm_topk_prob', 'routed_scaling_factor', 'n_shared_experts',
              'moe_intermediate_size', 'q_lora_rank', 'rope_interleave'):
    assert config[key] == getattr(hf, key), key
  assert config['rope_parameters'] == hf.rope_parameters | {'truncate': True}  # YaRN's default
  # transformers 4.x reads rope_scaling, DeepSeek's own code its 'type'.
  assert config['rope_scaling'] == config['rope_parameters'] | {'type': 'yarn'}
  assert (config['topk_method'], config['scoring_func'], config['num_nextn_predict_layers']) == (
      'noaux_tc', 'sigmoid', 0)
  # save_pretrained's names; the bias stays float32 even in a bfloat16 export.
  assert tensor_names(out) == tensor_names(checkpoint)
  exported = transformers.DeepseekV3ForCausalLM.from_pretrained(out).eval()
  np.testing.assert_array_equal(hf_logits(exported, tokens), reference)

  # load -> save -> load is bit-exact, the bias included.
  fields2, variables2 = load_deepseek_v3(out)
  assert fields2 == fields | {'moe': fields['moe'] | dict(aux_loss_coef=0.01,
                                                          seq_aux_loss_coef=0.0)}
  assert_same_params(variables, variables2)

  bf16 = save_deepseek_v3(tmp_path / 'bf16', variables, moe_model_config(fields), 'bfloat16')
  with safetensors.safe_open(bf16 / 'model.safetensors', framework='numpy') as f:
    assert f.get_slice(BIAS.format(1)).get_dtype() == 'F32'
    assert f.get_slice('model.layers.1.mlp.gate.weight').get_dtype() == 'BF16'
  assert read_config(bf16)['dtype'] == 'bfloat16'


def test_export_without_aux_free_writes_a_zero_bias(loaded, tmp_path, tokens):
  """A sigmoid-routed model trained without the bias routes as V3 does with a zero one."""
  fields, variables = loaded
  cfg = moe_model_config(fields)
  plain = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, aux_free=False))
  out = save_deepseek_v3(tmp_path, variables['params'], plain)
  exported = transformers.DeepseekV3ForCausalLM.from_pretrained(out).eval()
  assert not exported.model.layers[1].mlp.gate.e_score_correction_bias.any()
  zero = {**variables, 'moe_state': jax.tree.map(np.zeros_like, variables['moe_state'])}
  assert np.abs(hf_logits(exported, tokens) - our_logits(fields, zero, tokens)).max() < 1e-4
  # With aux_free the bias must come along: params alone would drop it.
  with pytest.raises(ValueError, match=r"non-trained state \(moe_state.*pass the variables"):
    save_deepseek_v3(tmp_path / 'no_state', variables['params'], cfg)


def test_dense_model_round_trips(tmp_path):
  """An MLA model without MoE layers is a DeepSeek-V3 whose dense layers reach the last one
  (its logits are DeepSeek-V2's, tested there): no bias, variables {'params'} only."""
  cfg = ModelConfig(vocab_size=VOCAB, embed_dim=EMBED, num_layers=2, num_heads=HEADS,
                    num_kv_heads=HEADS, head_dim=ROPE, mlp_dim=MLP, attention='mla',
                    mla=MLAConfig(q_lora_rank=Q_LORA, kv_lora_rank=KV_LORA,
                                  qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V))
  variables = {'params': nn.unbox(random_variables(cfg, INIT_STD)['params'])}
  out = save_deepseek_v3(tmp_path, variables, cfg)
  assert read_config(out)['first_k_dense_replace'] == 2
  exported = transformers.DeepseekV3ForCausalLM.from_pretrained(out)
  assert [type(layer.mlp).__name__ for layer in exported.model.layers] == ['DeepseekV3MLP'] * 2
  fields, loaded = load_deepseek_v3(out)
  assert fields['ffn'] == 'dense' and set(loaded) == {'params'}
  assert_same_params(variables, loaded)


@pytest.mark.parametrize('change, field', [
    (dict(router='softmax'), 'router'),
    (dict(shared_expert_gate=True), 'shared_expert_gate'),
    (dict(shared_expert_dim=48), 'shared_expert_dim'),
    (dict(num_groups=8, topk_groups=4), 'num_groups'),
    (dict(top_k=1, num_groups=1, topk_groups=1), 'norm_topk_prob'),
], ids=lambda x: '-'.join(map(str, x)) if isinstance(x, dict) else None)
def test_export_refusals(loaded, tmp_path, change, field):
  fields, variables = loaded
  cfg = moe_model_config(fields)
  cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **change))
  with pytest.raises(ConfigError) as e:
    save_deepseek_v3(tmp_path, variables, cfg)
  assert e.value.field == f'model.moe.{field}'
  assert not (tmp_path / 'model.safetensors').exists()


# ---------------------------------------------------------------------------------------------
# Refusals on import, before any weight is read.


@pytest.mark.parametrize('change, phrase', [
    (dict(topk_method='group_limited_greedy'), "topk_method='group_limited_greedy' is not "
     'supported'),
    (dict(scoring_func='softmax'), "scoring_func='softmax' is not supported"),
    (dict(moe_layer_freq=2), 'moe_layer_freq=2 is not supported'),
    (dict(n_group=None), 'n_group=None, topk_group=2'),
    (dict(n_group=8, topk_group=4), 'n_group=8 leaves one expert per group'),
    (dict(n_group=3), 'n_group=3 does not divide n_routed_experts=8'),
    (dict(topk_group=1), 'topk_group=1 groups of 2 experts hold fewer than '
     'num_experts_per_tok=4'),
    (dict(num_experts_per_tok=1), 'norm_topk_prob=true with num_experts_per_tok=1'),
    (dict(rope_interleave=False), 'rope_interleave=false'),
    (dict(num_nextn_predict_layers=-1), 'num_nextn_predict_layers=-1'),
    (dict(quantization_config={'quant_method': 'gptq', 'bits': 4}),
     "quant_method='gptq' is not supported"),
    (dict(quantization_config={**FP8_CONFIG, 'activation_scheme': 'static'}),
     "activation_scheme='static' is not supported"),
    (dict(quantization_config={**FP8_CONFIG, 'fmt': 'e5m2'}), "fmt='e5m2' is not supported"),
    (dict(quantization_config={**FP8_CONFIG, 'weight_block_size': [0, 128]}),
     'weight_block_size=\\[0, 128\\] is not supported'),
    (dict(model_type='deepseek_v2'), "model_type 'deepseek_v2', not a DeepSeek-V3"),
], ids=lambda x: '-'.join(map(str, x)) if isinstance(x, dict) else None)
def test_config_refusals(checkpoint, tmp_path, change, phrase):
  path = copy_with(checkpoint, tmp_path, config=change, corrupt_weights=True)
  with pytest.raises(ConfigError, match=phrase) as e:
    load_deepseek_v3(path)
  assert e.value.field == 'model.hf'


def test_transformers_defaults_and_deepseek_spelling(checkpoint, loaded, tmp_path):
  """DeepSeek's own config.json spells the MoE and MTP keys transformers drops or renames."""
  extra = dict(topk_method='noaux_tc', scoring_func='sigmoid', moe_layer_freq=1,
               aux_loss_alpha=0.001, seq_aux=True, num_nextn_predict_layers=1)
  fields, _ = load_deepseek_v3(copy_with(checkpoint, tmp_path, config=extra))
  assert fields == loaded[0] | {'moe': loaded[0]['moe'] | dict(aux_loss_coef=0.0,
                                                               seq_aux_loss_coef=0.001)}
  config = json.loads((checkpoint / 'config.json').read_text())
  assert 'topk_method' not in config and 'scoring_func' not in config  # transformers' own

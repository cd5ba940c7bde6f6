"""Adapters in peft's file format (efficientjax/peft/interchange.py) against peft itself.

Both directions on tiny transformers models (Llama; Qwen2 with q/k/v biases; DeepSeek-V2 with
MLA, whose RoPE features are permuted between the layouts): our adapters saved with
save_adapter and loaded by `peft.PeftModel.from_pretrained` give our adapted model's logits;
adapters peft made (random non-zero B, DoRA magnitudes moved off their init) and saved with
save_pretrained give peft's logits when load_adapter reads them; load(save(x)) is bit-exact;
merged weights exported through the family's writer give the adapted logits in transformers;
PiSSA both ways peft allows; and what cannot be represented is refused by name.
"""

import copy
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

from efficientjax.errors import ConfigError
from efficientjax.hf import (DEEPSEEK_V2, LLAMA, PHI3, QWEN2, load_checkpoint,
                             save_checkpoint)
from efficientjax.model import ModelConfig
from efficientjax.peft import METHODS, FinetuneConfig
from efficientjax.peft.interchange import CONFIG_FILE, WEIGHTS_FILE, load_adapter, save_adapter
from tests.hf.common import hf_logits, random_tokens, save_pretrained, transformer_logits
from tests.hf.test_deepseek_v2 import hf_model as deepseek_model

VOCAB, EMBED, LAYERS, HEADS, KV_HEADS, MLP = 128, 64, 2, 4, 2, 96
INIT_STD = 0.1  # as the family tests: attention far from uniform, so layout errors show
RANK, ALPHA = 4, 8.0
ATOL = 1e-5  # float32 on both sides; the largest difference seen is ~3e-6


class Base(NamedTuple):
  """A transformers model, its checkpoint, and our fields and (scanned) params of it."""
  hf: Any
  path: Path
  fields: dict
  params: dict
  family: Any


def _base(model, path: Path, family) -> Base:
  save_pretrained(model, path)
  fields, params = load_checkpoint(path, param_dtype=jnp.float32)
  return Base(model, path, fields, params, family)


@pytest.fixture(scope='module')
def tokens() -> np.ndarray:
  return random_tokens(VOCAB, 8)


@pytest.fixture(scope='module')
def llama(tmp_path_factory) -> Base:
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=EMBED, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
      num_key_value_heads=KV_HEADS, intermediate_size=MLP, initializer_range=INIT_STD)).eval()
  return _base(model, tmp_path_factory.mktemp('llama'), LLAMA)


@pytest.fixture(scope='module')
def qwen2(tmp_path_factory) -> Base:
  torch.manual_seed(1)
  model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=VOCAB, hidden_size=EMBED, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
      num_key_value_heads=KV_HEADS, intermediate_size=MLP, initializer_range=INIT_STD,
      tie_word_embeddings=False)).eval()
  with torch.no_grad():  # transformers starts biases at zero, which would hide them
    for layer in model.model.layers:
      for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        proj.bias.normal_(0.0, 0.5)
  return _base(model, tmp_path_factory.mktemp('qwen2'), QWEN2)


@pytest.fixture(scope='module')
def deepseek(tmp_path_factory) -> Base:
  model = deepseek_model(q_lora_rank=24, tie_word_embeddings=False)
  return _base(model, tmp_path_factory.mktemp('deepseek'), DEEPSEEK_V2)


@pytest.fixture(scope='module')
def bases(request) -> dict:
  return {name: request.getfixturevalue(name) for name in ('llama', 'qwen2', 'deepseek')}


def method_and_config(base: Base, ft: FinetuneConfig, **changes):
  cfg = dataclasses.replace(ModelConfig.from_config(base.fields), **changes)
  method = METHODS.get(ft.method)(cfg, ft)
  return method, dataclasses.replace(cfg, adapter=method.settings())


def random_adapters(method, seed: int) -> dict:
  """Trained-looking adapters of the method's projections: A at kaiming's scale, B non-zero,
  DoRA's magnitude around a kernel column's norm (positive), all float32."""
  rng = np.random.default_rng(seed)
  tree: dict = {}
  for p in method.chosen:
    lead = (len(p.layers),) if p.stacked else ()
    fan_in = int(np.prod(p.in_shape))
    leaf = {'lora_a': rng.normal(0, fan_in ** -0.5, lead + p.in_shape + (RANK,)),
            'lora_b': rng.normal(0, 0.05, lead + (RANK,) + p.out_shape)}
    if method.dora:
      leaf['magnitude'] = INIT_STD * fan_in ** 0.5 * rng.uniform(0.7, 1.3, lead + p.out_shape)
    node = tree
    for k in p.path:
      node = node.setdefault(k, {})
    node.update({k: jnp.asarray(v, jnp.float32) for k, v in leaf.items()})
  return tree


def our_logits(cfg: ModelConfig, params: dict, adapters: dict, tokens: np.ndarray) -> np.ndarray:
  return transformer_logits(cfg, {'params': params, 'adapters': adapters}, tokens)


def peft_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens)).logits.float().numpy()


def leaves(tree: dict) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_bit_equal(a: dict, b: dict):
  a, b = leaves(a), leaves(b)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------
# Export: ours -> peft.

EXPORTS = {
    'llama_lora_all_linear': ('llama', 'lora', 'all-linear'),
    'llama_dora': ('llama', 'dora', 'q_proj,v_proj,o_proj,down_proj'),
    # MLA with RoPE features permuted on q_b and kv_a; lm_head too. (Not its MLPs: peft 0.21
    # reads DeepSeek's gate/up/down_proj as the routed experts, huggingface/peft#3711.)
    'deepseek_dora': ('deepseek', 'dora', 'q_a_proj,q_b_proj,kv_a_proj_with_mqa,kv_b_proj,'
                      'o_proj,lm_head'),
}


class Exported(NamedTuple):
  base: Base
  ft: FinetuneConfig
  cfg: ModelConfig
  adapters: dict
  logits: np.ndarray
  path: Path


@pytest.fixture(scope='module', params=sorted(EXPORTS))
def exported(request, tokens, tmp_path_factory) -> Exported:
  name, method_name, targets = EXPORTS[request.param]
  base = request.getfixturevalue(name)
  ft = FinetuneConfig(method=method_name, target_modules=targets, rank=RANK, alpha=ALPHA)
  method, cfg = method_and_config(base, ft)
  adapters = random_adapters(method, seed=len(request.param))
  path = tmp_path_factory.mktemp(request.param) / 'adapter'
  save_adapter(path, adapters, cfg, ft, base_model_name_or_path=str(base.path))
  return Exported(base, ft, cfg, adapters, our_logits(cfg, base.params, adapters, tokens), path)


def test_export_loads_in_peft_with_our_logits(exported, tokens):
  e = exported
  model = peft.PeftModel.from_pretrained(copy.deepcopy(e.base.hf), e.path).eval()
  theirs = peft_logits(model, tokens)
  np.testing.assert_allclose(theirs, e.logits, atol=ATOL, rtol=0)
  # The adapter matters: without it the logits are far off.
  assert np.abs(hf_logits(e.base.hf, tokens) - e.logits).max() > 0.1


def test_exported_config_is_peft_lora_config(exported):
  config = json.loads((exported.path / CONFIG_FILE).read_text())
  method = METHODS.get(exported.ft.method)(exported.cfg, exported.ft)
  assert config['peft_type'] == 'LORA' and config['task_type'] == 'CAUSAL_LM'
  assert (config['r'], config['lora_alpha'], config['lora_dropout']) == (RANK, ALPHA, 0.0)
  assert (config['use_rslora'], config['use_dora']) == (method.rslora, method.dora)
  assert config['init_lora_weights'] is True and config['bias'] == 'none'
  # peft's own class reads every field (an unknown one would raise).
  peft.LoraConfig.from_pretrained(str(exported.path))
  # The HF module names actually adapted, each present on every layer.
  keys = safetensors.numpy.load_file(exported.path / WEIGHTS_FILE).keys()
  names = {k.removeprefix('base_model.model.').split('.lora_')[0].rsplit('.', 1)[-1] for k in keys}
  assert set(config['target_modules']) == names


def test_round_trip_is_bit_exact(exported):
  e = exported
  fields, adapters = load_adapter(e.path, e.cfg)
  assert_bit_equal(adapters, e.adapters)
  ft = FinetuneConfig(**fields)
  assert (ft.method, ft.rank, ft.alpha, ft.dropout) == (e.ft.method, RANK, ALPHA, 0.0)
  chosen = lambda f: [p.path for p in METHODS.get(f.method)(e.cfg, f).chosen]
  assert chosen(ft) == chosen(e.ft)


@pytest.mark.parametrize('exported', ['llama_dora'], indirect=True)
def test_per_layer_layout_reads_and_writes_the_same_file(exported, tmp_path):
  # The same file, read as per-layer adapters (scan_layers=False) and written again.
  e = exported
  flat_cfg = dataclasses.replace(e.cfg, scan_layers=False)
  _, per_layer = load_adapter(e.path, flat_cfg)
  for path, leaf in leaves(e.adapters).items():
    if path.startswith("['blocks']"):
      for i in range(LAYERS):
        assert np.array_equal(leaves(per_layer)[path.replace('blocks', f'block_{i}')], leaf[i])
  save_adapter(tmp_path / 'again', per_layer, flat_cfg, e.ft)
  assert ((tmp_path / 'again' / WEIGHTS_FILE).read_bytes()
          == (e.path / WEIGHTS_FILE).read_bytes())


@pytest.mark.parametrize('exported', ['llama_dora'], indirect=True)
def test_merged_export_loads_in_transformers(exported, tokens, tmp_path):
  e = exported
  method = METHODS.get(e.ft.method)(e.cfg, e.ft)
  merged = jax.jit(method.merged)(e.adapters, e.base.params)  # jit: eager costs seconds here
  save_checkpoint(tmp_path, merged, e.cfg, e.base.family)
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  np.testing.assert_allclose(hf_logits(model, tokens), e.logits, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# Import: peft -> ours.

IMPORTS = {
    'llama_dora_all_linear': ('llama', dict(target_modules='all-linear', use_dora=True)),
    'qwen2_rslora': ('qwen2', dict(target_modules=['v_proj', 'down_proj'], use_rslora=True)),
    'deepseek_lora': ('deepseek', dict(target_modules=['q_b_proj', 'kv_a_proj_with_mqa',
                                                       'kv_b_proj', 'lm_head'])),
}


def peft_adapter(base: Base, path: Path, seed: int = 0, **config) -> Any:
  """A peft model with trained-looking adapters (B random, DoRA magnitudes moved), saved."""
  torch.manual_seed(seed)
  config = dict(r=RANK, lora_alpha=ALPHA, task_type='CAUSAL_LM') | config
  model = peft.get_peft_model(copy.deepcopy(base.hf), peft.LoraConfig(**config)).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if 'lora_B' in name:
        param.normal_(0.0, 0.05)
      elif 'lora_magnitude_vector' in name:
        param.mul_(1 + 0.2 * torch.randn_like(param))
  model.save_pretrained(path)
  return model


@pytest.mark.parametrize('case', sorted(IMPORTS))
def test_import_from_peft_gives_peft_logits(case, bases, tokens, tmp_path):
  name, config = IMPORTS[case]
  base = bases[name]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    model = peft_adapter(base, tmp_path, **config)
    fields, adapters = load_adapter(tmp_path, ModelConfig.from_config(base.fields))
  # peft keeps a targeted lm_head's base weight in the file; it is checked and left.
  head = 'lm_head' in config['target_modules']
  assert any('base weight of the adapted lm_head' in str(w.message) for w in caught) == head
  ft = FinetuneConfig(**fields)
  method, cfg = method_and_config(base, ft)
  assert ft.method == ('dora' if config.get('use_dora') else
                       'rslora' if config.get('use_rslora') else 'lora')
  ours = our_logits(cfg, base.params, adapters, tokens)
  np.testing.assert_allclose(ours, peft_logits(model, tokens), atol=ATOL, rtol=0)
  assert np.abs(hf_logits(base.hf, tokens) - ours).max() > 0.1
  # And what we read is what we write (peft's file, bit for bit in its tensors).
  save_adapter(tmp_path / 'ours', adapters, cfg, ft)
  theirs = safetensors.numpy.load_file(tmp_path / WEIGHTS_FILE)
  again = safetensors.numpy.load_file(tmp_path / 'ours' / WEIGHTS_FILE)
  theirs.pop('base_model.model.lm_head.base_layer.weight', None)
  assert theirs.keys() == again.keys()
  for k in theirs:
    assert np.array_equal(theirs[k], again[k]), k


# ------------------------------------------------------------------------------------------------
# PiSSA: our adapter applies to the residual base.


@pytest.fixture(scope='module')
def pissa(llama, tokens):
  ft = FinetuneConfig(method='pissa', target_modules='q_proj,v_proj,down_proj', rank=RANK,
                      alpha=ALPHA)
  method, cfg = method_and_config(llama, ft)
  initial, residual = jax.jit(method.prepare)(llama.params, jax.random.key(0))
  rng = np.random.default_rng(3)
  trained = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32),
                         initial)
  return ft, cfg, initial, residual, trained, our_logits(cfg, residual, trained, tokens)


def test_pissa_converted_for_the_pretrained_base(pissa, llama, tokens, tmp_path):
  ft, cfg, initial, _, trained, logits = pissa
  save_adapter(tmp_path, trained, cfg, ft, initial=initial)
  config = json.loads((tmp_path / CONFIG_FILE).read_text())
  assert (config['r'], config['lora_alpha'], config['init_lora_weights']) == (2 * RANK, 16, True)
  model = peft.PeftModel.from_pretrained(copy.deepcopy(llama.hf), tmp_path).eval()
  np.testing.assert_allclose(peft_logits(model, tokens), logits, atol=ATOL, rtol=0)


def test_pissa_as_lora_on_the_residual_base(pissa, tokens, tmp_path):
  ft, cfg, _, residual, trained, logits = pissa
  save_adapter(tmp_path / 'adapter', trained, cfg, ft)
  save_checkpoint(tmp_path / 'residual', residual, cfg, LLAMA)
  base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'residual').eval()
  model = peft.PeftModel.from_pretrained(base, tmp_path / 'adapter').eval()
  np.testing.assert_allclose(peft_logits(model, tokens), logits, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# Refusals.


@pytest.mark.parametrize('config, field', [
    (dict(target_modules=['q_proj', 'v_proj'], rank_pattern={'q_proj': 8}), 'rank_pattern'),
    (dict(target_modules=['q_proj'], alpha_pattern={'q_proj': 4}), 'alpha_pattern'),
    (dict(target_modules=['q_proj'], modules_to_save=['lm_head']), 'modules_to_save'),
    (dict(target_modules=['q_proj'], bias='all'), 'bias'),
    (dict(target_modules=['q_proj'], layers_to_transform=[1]), 'layers_to_transform'),
    (dict(target_modules=['q_proj'], init_lora_weights='pissa'), 'init_lora_weights'),
])
def test_refuses_settings_it_cannot_represent(llama, tmp_path, config, field):
  peft_adapter(llama, tmp_path, **config)
  with pytest.raises(ConfigError) as e:
    load_adapter(tmp_path, ModelConfig.from_config(llama.fields))
  assert e.value.field == f'adapter_config.{field}'


def test_refuses_targets_the_model_lacks(llama, tmp_path):
  # lm_head on a peft model; our model ties its head to the embedding: no such projection.
  peft_adapter(llama, tmp_path / 'head', target_modules=['q_proj', 'lm_head'])
  tied = dataclasses.replace(ModelConfig.from_config(llama.fields), tie_embeddings=True)
  with pytest.raises(ValueError, match=r"lm_head.lora_A.weight' adapts 'lm_head', which is not"):
    load_adapter(tmp_path / 'head', tied)
  # LoRA on the embedding.
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    peft_adapter(llama, tmp_path / 'embed', target_modules=['embed_tokens'])
  with pytest.raises(ValueError, match='LoRA on embeddings'):
    load_adapter(tmp_path / 'embed', ModelConfig.from_config(llama.fields))


def test_refuses_another_architecture_or_size(llama, qwen2, tmp_path):
  # Without a task_type peft records the base class (auto_mapping): a Llama adapter, not Qwen2's.
  peft_adapter(llama, tmp_path / 'a', target_modules=['q_proj'], task_type=None)
  with pytest.raises(ConfigError) as e:
    load_adapter(tmp_path / 'a', ModelConfig.from_config(qwen2.fields))
  assert e.value.field == 'adapter_config.auto_mapping' and 'LlamaForCausalLM' in str(e.value)
  # The same names on a model of another width: the shapes say so.
  peft_adapter(llama, tmp_path / 'b', target_modules=['up_proj'])
  wider = dataclasses.replace(ModelConfig.from_config(llama.fields), mlp_dim=2 * MLP)
  with pytest.raises(ValueError, match=r"mlp.up_proj.lora_B.weight' has shape \[96, 4\], "
                                       r'expected \[192, 4\]'):
    load_adapter(tmp_path / 'b', wider)


def test_refuses_tensors_that_are_not_lora_factors(llama, tmp_path):
  peft_adapter(llama, tmp_path, target_modules=['q_proj'])
  cfg = ModelConfig.from_config(llama.fields)
  tensors = safetensors.numpy.load_file(tmp_path / WEIGHTS_FILE)
  for extra, phrase in (('base_model.model.model.norm.weight', 'not a LoRA factor'),
                        ('model.layers.0.self_attn.q_proj.lora_A.weight', 'does not start with')):
    safetensors.numpy.save_file({**tensors, extra: np.zeros(3, np.float32)},
                                tmp_path / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=phrase):
      load_adapter(tmp_path, cfg)
  # One layer's B missing.
  del tensors['base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight']
  safetensors.numpy.save_file(tensors, tmp_path / WEIGHTS_FILE)
  with pytest.raises(ValueError, match=r'layers.1.self_attn.q_proj.lora_B.weight\' is missing'):
    load_adapter(tmp_path, cfg)
  # A whole module missing that target_modules names.
  peft_adapter(llama, tmp_path / 'qv', target_modules=['q_proj', 'v_proj'])
  tensors = safetensors.numpy.load_file(tmp_path / 'qv' / WEIGHTS_FILE)
  safetensors.numpy.save_file({k: v for k, v in tensors.items() if 'v_proj' not in k},
                              tmp_path / 'qv' / WEIGHTS_FILE)
  with pytest.raises(ValueError, match=r"layers.0.self_attn.v_proj.lora_A.weight' is missing: "
                                       r"target_modules=\['q_proj', 'v_proj'\]"):
    load_adapter(tmp_path / 'qv', cfg)


def test_refuses_fused_projections(llama, tmp_path):
  # Phi-3 stores q, k and v in one qkv_proj: one peft module, one lora_A for all three.
  ft = FinetuneConfig(method='lora', target_modules='q_proj', rank=RANK, alpha=ALPHA)
  method, cfg = method_and_config(llama, ft)
  with pytest.raises(ConfigError, match='qkv_proj') as e:
    save_adapter(tmp_path / 'a', random_adapters(method, 0), cfg, ft, family=PHI3)
  assert e.value.field == 'finetune.target_modules'
  # o_proj is its own module in Phi-3 too.
  ft = dataclasses.replace(ft, target_modules='o_proj')
  method, cfg = method_and_config(llama, ft)
  save_adapter(tmp_path / 'b', random_adapters(method, 0), cfg, ft, family=PHI3)


def test_refuses_to_overwrite(llama, tmp_path):
  ft = FinetuneConfig(method='lora', target_modules='v_proj', rank=RANK, alpha=ALPHA)
  method, cfg = method_and_config(llama, ft)
  first, second = random_adapters(method, 0), random_adapters(method, 1)
  save_adapter(tmp_path, first, cfg, ft)  # an empty directory is fine
  with pytest.raises(FileExistsError, match='overwrite=True'):
    save_adapter(tmp_path, second, cfg, ft)
  assert_bit_equal(load_adapter(tmp_path, cfg)[1], first)
  save_adapter(tmp_path, second, cfg, ft, overwrite=True)
  assert_bit_equal(load_adapter(tmp_path, cfg)[1], second)
  # No temporary directory left beside it.
  assert [p.name for p in tmp_path.parent.iterdir() if '.tmp-' in p.name or '.old-' in p.name] == []


def test_warns_where_peft_reads_mlp_names_as_experts(deepseek, tmp_path):
  # peft 0.21 + transformers 5 turn DeepSeek's gate/up/down_proj targets into the routed
  # experts' parameters (huggingface/peft#3711): the file is right, peft drops these adapters.
  ft = FinetuneConfig(method='lora', target_modules='q_b_proj,down_proj', rank=RANK, alpha=ALPHA)
  method, cfg = method_and_config(deepseek, ft)
  with pytest.warns(UserWarning, match=r'down_proj .*huggingface/peft#3711'):
    save_adapter(tmp_path, random_adapters(method, 0), cfg, ft)

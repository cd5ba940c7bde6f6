"""Qwen-MoE checkpoints: Qwen3-MoE (`Qwen3MoeForCausalLM`) and Qwen2-MoE (`Qwen2MoeForCausalLM`,
Qwen1.5-MoE and Qwen2-57B-A14B).

Both are a Qwen attention (Qwen3's with q/k norm, efficientjax.hf.qwen3; Qwen2's with q/k/v
biases, efficientjax.hf.qwen2) over our `moe` FFN. A sparse block routes each token by a
softmax over num_experts router logits to its num_experts_per_tok best SwiGLU experts of width
moe_intermediate_size, weighted by their probabilities, renormalised to sum 1 only when
norm_topk_prob (transformers' default is false for both); no scaling, no groups. Qwen2-MoE adds
one shared expert, a SwiGLU of width shared_expert_intermediate_size that every token uses,
scaled per token by sigmoid(x · shared_expert_gate) (ours: `moe.num_shared_experts=1`,
`moe.shared_expert_dim`, `moe.shared_expert_gate`); Qwen3-MoE has none.

Which layers are sparse. transformers makes layer i sparse when i is not in mlp_only_layers and
(i + 1) % decoder_sparse_step == 0; the others get a dense MLP of intermediate_size. Our model
has dense layers first and MoE after (`moe.first_dense_layers`, `model.mlp_dim` their width),
so a checkpoint loads when its sparse layers are the last ones (decoder_sparse_step 1 with
mlp_only_layers [0, ..., k-1], the released configs' [] included); one with no sparse layer
loads as a dense model. Interleaved patterns are refused, naming the layers.

Expert weights come in two layouts, both read (`OneOf`), the first written: one tensor per
expert, `mlp.experts.{j}.gate_proj/up_proj/down_proj.weight`, which the released checkpoints
have and transformers 5.x `save_pretrained` writes; and transformers 5.x's own modules,
`mlp.experts.gate_up_proj` [E, 2f, d] (gate rows, then up) and `mlp.experts.down_proj`
[E, d, f]. The router is `mlp.gate.weight` [E, d] in both.

Sliding windows: Qwen3-MoE windows every layer when use_sliding_window (our
`model.sliding_window`); transformers 5.x ignores max_window_layers and layer_types for it.
Qwen2-MoE windows the layers layer_types marks, by default the even layers below
max_window_layers; it loads only when that is every layer or none.

Training-only settings, which do not change the logits: `router_aux_loss_coef` becomes
`moe.aux_loss_coef` = router_aux_loss_coef · num_experts_per_tok / (number of sparse layers), as
for Mixtral (efficientjax.hf.mixtral: transformers pools every sparse layer's routing into one
loss with per-token fractions, we add a per-layer one with per-assignment fractions);
`output_router_logits` (whether transformers adds that loss) is accepted and dropped.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from efficientjax.errors import ConfigError
from efficientjax.hf import llama, qwen2, qwen3
from efficientjax.hf.safetensors_io import (Family, OneOf, Params, Redundant, TensorRule,
                                            load_checkpoint, max_positions, refuse_if, register,
                                            require, save_checkpoint, window_value)
from efficientjax.hf.writer import DEFAULT_MAX_SHARD_BYTES
from efficientjax.model import ModelConfig
from efficientjax.moe.layer import shared_width

# transformers' Qwen3MoeConfig / Qwen2MoeConfig defaults, for keys a config.json leaves out.
_QWEN3_MOE_DEFAULTS = dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                           sliding_window=4096)
_QWEN2_MOE_DEFAULTS = dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                           shared_expert_intermediate_size=5632, max_window_layers=28)
_DEFAULT_AUX_LOSS_COEF = 0.001
_DEFAULT_MAX_POSITIONS = 32768


def _num_experts(hf: Mapping[str, Any], default: int) -> int:
  """num_experts, which transformers' Qwen3MoeConfig saves as num_local_experts (its
  attribute_map); the released configs write num_experts."""
  names = [k for k in ('num_experts', 'num_local_experts') if hf.get(k) is not None]
  refuse_if(len(names) == 2 and hf['num_experts'] != hf['num_local_experts'],
            f'config.json has num_experts={hf.get("num_experts")} and num_local_experts='
            f'{hf.get("num_local_experts")}, two different expert counts; keep one')
  return int(hf[names[0]]) if names else default


def moe_fields(hf: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
  """{'ffn': 'moe', 'moe': {...}} for the sparse layers of a Qwen-MoE config.json, or
  {'ffn': 'dense'} when it has none; refuses sparse layers that are not the last ones."""
  num_layers = int(require(hf, 'num_hidden_layers'))
  experts = _num_experts(hf, defaults['num_experts'])
  step = hf.get('decoder_sparse_step', 1)
  # bool is an int to Python: `true` must not pass as a step of 1.
  refuse_if(isinstance(step, bool) or not isinstance(step, int) or step < 1,
            f'decoder_sparse_step={step!r} must be a positive number of layers')
  mlp_only = list(hf.get('mlp_only_layers') or [])
  sparse = [i for i in range(num_layers)
            if experts > 0 and i not in mlp_only and (i + 1) % step == 0]
  if not sparse:
    return dict(ffn='dense')  # every layer a dense MLP of intermediate_size
  first = sparse[0]
  refuse_if(sparse != list(range(first, num_layers)),
            f'decoder_sparse_step={step} with mlp_only_layers={mlp_only} makes layers {sparse} '
            f'of {num_layers} sparse and the others dense; our model can only have its dense '
            'layers first and sparse layers from model.moe.first_dense_layers on, so use a '
            'checkpoint with decoder_sparse_step 1 and mlp_only_layers [0, ..., k-1]')
  top_k = int(hf.get('num_experts_per_tok', defaults['num_experts_per_tok']))
  refuse_if(not 1 <= top_k <= experts,
            f'num_experts_per_tok={top_k} must be between 1 and num_experts={experts}')
  coef = float(hf.get('router_aux_loss_coef', _DEFAULT_AUX_LOSS_COEF))
  moe = dict(num_experts=experts, top_k=top_k,
             expert_dim=int(hf.get('moe_intermediate_size', defaults['moe_intermediate_size'])),
             num_shared_experts=0, shared_expert_dim=None, shared_expert_gate=False,
             first_dense_layers=first, router='softmax',
             norm_topk_prob=bool(hf.get('norm_topk_prob', False)), routed_scaling_factor=1.0,
             num_groups=1, topk_groups=1, aux_loss_coef=coef * top_k / len(sparse),
             z_loss_coef=0.0, seq_aux_loss_coef=0.0, aux_free=False)
  return dict(ffn='moe', moe=moe)


# What both export as our `moe` FFN; the shared expert is each family's own.
_MOE_FIELDS = {'ffn': 'moe', 'moe.router': 'softmax', 'moe.routed_scaling_factor': 1.0,
               'moe.num_groups': 1, 'moe.aux_free': False}
_MOE_HINTS = {
    'ffn': ' (a model without MoE layers exports as a dense Qwen3 or Qwen2)',
    'moe.router': ' (Qwen-MoE routes by a softmax over the experts)',
    'moe.aux_free': (' (the auxiliary-loss-free bias changes which experts are chosen, and '
                     'Qwen-MoE has no such bias)'),
}


def moe_config(cfg: ModelConfig) -> dict[str, Any]:
  """config.json's MoE keys for our `moe` fields (checked against `_MOE_FIELDS` already)."""
  moe = cfg.moe
  sparse = cfg.num_layers - moe.first_dense_layers
  return dict(
      num_experts=moe.num_experts,
      num_experts_per_tok=moe.top_k,
      moe_intermediate_size=moe.expert_dim,
      norm_topk_prob=moe.norm_topk_prob,
      # The dense layers first (their width: intermediate_size, our mlp_dim), then sparse ones.
      decoder_sparse_step=1,
      mlp_only_layers=list(range(moe.first_dense_layers)),
      router_aux_loss_coef=moe.aux_loss_coef * sparse / moe.top_k,
      output_router_logits=False,
  )


def moe_rules(shared: bool) -> list[TensorRule | OneOf]:
  """The feed-forward tensors: dense layers' MLP, sparse layers' router, experts (either
  layout) and, with `shared`, Qwen2-MoE's gated shared expert."""
  mlp = 'model.layers.{layer}.mlp.'
  names = ('gate', 'up', 'down')
  moe = lambda name, param, **kw: TensorRule(mlp + name, param, linear_in_dims=1, ffn='moe', **kw)
  rules: list[TensorRule | OneOf] = [
      TensorRule(mlp + f'{name}_proj.weight', ('mlp', name, 'kernel'), linear_in_dims=1,
                 ffn='dense') for name in names]
  rules += [
      moe('gate.weight', ('mlp', 'router')),
      OneOf((
          tuple(moe(f'experts.{{expert}}.{name}_proj.weight', ('mlp', name)) for name in names),
          (moe('experts.gate_up_proj', ('mlp', 'gate'), batch_dims=1, part=(0, 2)),
           moe('experts.gate_up_proj', ('mlp', 'up'), batch_dims=1, part=(1, 2)),
           moe('experts.down_proj', ('mlp', 'down'), batch_dims=1)),
      )),
  ]
  if shared:
    rules += [moe(f'shared_expert.{name}_proj.weight', ('mlp', 'shared', name, 'kernel'))
              for name in names]
    # [1, d]: one output feature; our gate is the vector [d].
    rules.append(moe('shared_expert_gate.weight', ('mlp', 'shared_gate', 'kernel')))
  return rules


def _attention_rules(cfg: ModelConfig) -> list[TensorRule | Redundant]:
  """Llama's tensors but the MLP: embeddings, attention, norms, head."""
  return [r for r in llama.tensor_rules(cfg)
          if not (isinstance(r, TensorRule) and r.param[0] == 'mlp')]


# --------------------------------------------------------------------------------------------
# Qwen3-MoE.


def qwen3_moe_fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """`config.json` -> our `model` fields, refusing what the model cannot compute."""
  # Qwen3MoeConfig has no head_dim default: without one, transformers takes hidden / heads.
  fields = qwen3.attention_fields(hf)
  if hf.get('use_sliding_window', False):
    fields['sliding_window'] = window_value(hf, _QWEN3_MOE_DEFAULTS['sliding_window'])
  fields.update(moe_fields(hf, _QWEN3_MOE_DEFAULTS))
  return fields


QWEN3_MOE_FIELDS = {**qwen3.QWEN3_FIELDS, **_MOE_FIELDS, 'moe.num_shared_experts': 0,
                    'moe.shared_expert_gate': False}
_QWEN3_MOE_HINTS = {
    **qwen3.HINTS, **_MOE_HINTS,
    'qkv_bias': ' (Qwen3-MoE has no q/k/v biases: export with save_qwen2_moe)',
    'moe.num_shared_experts': (' (Qwen3-MoE has no shared expert: a gated one is Qwen2-MoE\'s, '
                               'save_qwen2_moe; ungated ones DeepSeek\'s, save_deepseek_v2)'),
}


def qwen3_moe_hf_from_config(cfg: ModelConfig) -> dict[str, Any]:
  """Our config -> `config.json` keys of a `Qwen3MoeConfig`, refusing what it cannot express."""
  llama.refuse_inexpressible(cfg, 'Qwen3MoeForCausalLM', QWEN3_MOE_FIELDS, hints=_QWEN3_MOE_HINTS)
  window = cfg.sliding_window
  return dict(
      **llama.decoder_config(cfg),
      attention_bias=False,
      max_position_embeddings=max_positions(cfg, _DEFAULT_MAX_POSITIONS),
      use_sliding_window=window is not None,
      sliding_window=window,
      **moe_config(cfg),
  )


def qwen3_moe_tensor_rules(cfg: ModelConfig) -> list[TensorRule | OneOf | Redundant]:
  return _attention_rules(cfg) + qwen3.qk_norm_rules() + moe_rules(shared=False)


QWEN3_MOE = register(Family(
    name='Qwen3-MoE',
    model_types=('qwen3_moe',),
    architecture='Qwen3MoeForCausalLM',
    fields_from_hf=qwen3_moe_fields_from_hf,
    hf_from_config=qwen3_moe_hf_from_config,
    tensor_rules=qwen3_moe_tensor_rules,
))


def load_qwen3_moe(path: str | Path, param_dtype: Any = jnp.float32, scan_layers: bool = True
                   ) -> tuple[dict[str, Any], Params]:
  """Reads a `Qwen3MoeForCausalLM` checkpoint directory (config.json + *.safetensors, either
  expert layout) as (model_fields, params), like `load_llama`; `model_fields['moe']` is a dict
  of the nested config, and scanned, dense first layers are under `dense_blocks`. Raises
  `ConfigError` for a checkpoint the model cannot express, before reading any weight."""
  return load_checkpoint(path, QWEN3_MOE, param_dtype=param_dtype, scan_layers=scan_layers)


def save_qwen3_moe(path: str | Path, params: Mapping[str, Any],
                   model: ModelConfig | Mapping[str, Any], dtype: Any = None, *,
                   extra_config: Mapping[str, Any] | None = None,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
  """Writes a `qk_norm` model with a softmax-routed `moe` FFN (no shared experts) as a
  `Qwen3MoeForCausalLM` checkpoint, experts one tensor each as save_pretrained writes them,
  that `from_pretrained` loads; arguments as `save_llama`."""
  return save_checkpoint(path, params, model, QWEN3_MOE, dtype=dtype, extra_config=extra_config,
                         max_shard_bytes=max_shard_bytes)


# --------------------------------------------------------------------------------------------
# Qwen2-MoE.


def _qwen2_moe_window(hf: Mapping[str, Any]) -> int | None:
  """The window every layer uses (None: full attention), as Qwen2MoeConfig marks the layers."""
  num_layers = int(require(hf, 'num_hidden_layers'))
  use = bool(hf.get('use_sliding_window', False))
  layer_types = hf.get('layer_types')
  if layer_types is None:
    first = hf.get('max_window_layers', _QWEN2_MOE_DEFAULTS['max_window_layers'])
    sliding = [i for i in range(num_layers) if use and (i + 1) % 2 and i < first]
    refuse_if(0 < len(sliding) < num_layers,
              f'use_sliding_window=true windows layers {sliding} only (Qwen2-MoE windows the '
              f'even layers below max_window_layers={first}); our model has one window for '
              'every layer, so list layer_types with every layer "sliding_attention", or set '
              'use_sliding_window false')
    layer_types = ['sliding_attention' if i in sliding else 'full_attention'
                   for i in range(num_layers)]
  # Qwen2's checks of an explicit list (lengths, kinds, one window for all layers or none).
  return qwen2.sliding_window({**hf, 'layer_types': layer_types})


def qwen2_moe_fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """`config.json` -> our `model` fields, refusing what the model cannot compute."""
  window = _qwen2_moe_window(hf)
  # Qwen2's attention; its window rule is not Qwen2-MoE's, so the window is read above.
  fields = qwen2.fields_from_hf({**hf, 'use_sliding_window': False, 'layer_types': None})
  fields.pop('sliding_window', None)
  # Qwen2-MoE's q/k/v biases are optional (qkv_bias, default true).
  fields['qkv_bias'] = bool(hf.get('qkv_bias', True))
  if window is not None:
    fields['sliding_window'] = window
  fields.update(moe_fields(hf, _QWEN2_MOE_DEFAULTS))
  if fields['ffn'] == 'moe':
    width = hf.get('shared_expert_intermediate_size',
                   _QWEN2_MOE_DEFAULTS['shared_expert_intermediate_size'])
    refuse_if(isinstance(width, bool) or not isinstance(width, int) or width < 1,
              f'shared_expert_intermediate_size={width!r}: a Qwen2-MoE needs its shared expert '
              '(a positive width; without one its gate would scale nothing)')
    fields['moe'].update(num_shared_experts=1, shared_expert_dim=width, shared_expert_gate=True)
  return fields


QWEN2_MOE_FIELDS = {k: v for k, v in {**llama.LLAMA_FIELDS, **_MOE_FIELDS,
                                        'moe.shared_expert_gate': True}.items()
                    if k not in ('sliding_window', 'qkv_bias')}  # expressible
_QWEN2_MOE_HINTS = {
    **_MOE_HINTS,
    'qk_norm': ' (q/k norm is Qwen3-MoE\'s: export with save_qwen3_moe)',
    'moe.shared_expert_gate': (' (Qwen2-MoE scales its shared expert by a sigmoid gate; without '
                               'one, export with save_deepseek_v2, or save_qwen3_moe without '
                               'shared experts)'),
}


def qwen2_moe_hf_from_config(cfg: ModelConfig) -> dict[str, Any]:
  """Our config -> `config.json` keys of a `Qwen2MoeConfig`, refusing what it cannot express."""
  llama.refuse_inexpressible(cfg, 'Qwen2MoeForCausalLM', QWEN2_MOE_FIELDS,
                             hints=_QWEN2_MOE_HINTS)
  if cfg.moe.num_shared_experts < 1:
    raise ConfigError('model.moe.num_shared_experts', '0 has no Qwen2MoeForCausalLM equivalent '
                      '(Qwen2-MoE always has a gated shared expert); a Qwen2-MoE export needs '
                      'model.moe.num_shared_experts >= 1 (export a model without one with '
                      'save_qwen3_moe)')
  return dict(
      **llama.decoder_config(cfg),
      qkv_bias=cfg.qkv_bias,
      max_position_embeddings=max_positions(cfg, _DEFAULT_MAX_POSITIONS),
      # One window for all layers or none, listed per layer: Qwen2-MoE's default rule would
      # window only the even layers.
      **(qwen2.window_config(cfg) | {'max_window_layers': cfg.num_layers}),
      # Our shared experts are one SwiGLU of their summed width: Qwen2-MoE's one shared expert.
      shared_expert_intermediate_size=shared_width(cfg.moe),
      **moe_config(cfg),
  )


def qwen2_moe_tensor_rules(cfg: ModelConfig) -> list[TensorRule | OneOf | Redundant]:
  rules = _attention_rules(cfg) + moe_rules(shared=True)
  if cfg.qkv_bias:
    attn = 'model.layers.{layer}.self_attn.'
    rules += [TensorRule(attn + f'{name}_proj.bias', ('attn', name, 'bias'), linear_in_dims=0)
              for name in ('q', 'k', 'v')]
  return rules


QWEN2_MOE = register(Family(
    name='Qwen2-MoE',
    model_types=('qwen2_moe',),
    architecture='Qwen2MoeForCausalLM',
    fields_from_hf=qwen2_moe_fields_from_hf,
    hf_from_config=qwen2_moe_hf_from_config,
    tensor_rules=qwen2_moe_tensor_rules,
))


def load_qwen2_moe(path: str | Path, param_dtype: Any = jnp.float32, scan_layers: bool = True
                   ) -> tuple[dict[str, Any], Params]:
  """Reads a `Qwen2MoeForCausalLM` checkpoint directory (config.json + *.safetensors, either
  expert layout) as (model_fields, params), like `load_qwen3_moe`; the shared expert is
  `moe.num_shared_experts=1` of width `moe.shared_expert_dim`, gated (`moe.shared_expert_gate`).
  Raises `ConfigError` for a checkpoint the model cannot express, before reading any weight."""
  return load_checkpoint(path, QWEN2_MOE, param_dtype=param_dtype, scan_layers=scan_layers)


def save_qwen2_moe(path: str | Path, params: Mapping[str, Any],
                   model: ModelConfig | Mapping[str, Any], dtype: Any = None, *,
                   extra_config: Mapping[str, Any] | None = None,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
  """Writes a softmax-routed `moe` model with a gated shared expert (`moe.shared_expert_gate`)
  as a `Qwen2MoeForCausalLM` checkpoint, experts one tensor each, that `from_pretrained` loads;
  arguments as `save_llama`."""
  return save_checkpoint(path, params, model, QWEN2_MOE, dtype=dtype, extra_config=extra_config,
                         max_shard_bytes=max_shard_bytes)

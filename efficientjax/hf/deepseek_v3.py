"""DeepSeek-V3 (`DeepseekV3ForCausalLM`) checkpoints: DeepSeek-V2's MLA blocks with the sigmoid
router, its auxiliary-loss-free bias, multi-token-prediction layers and fp8 weights.

Attention, norms, the dense first layers, the experts (one tensor each, or transformers' fused
layout) and the shared experts are DeepSeek-V2's, read by `deepseek_v2` (interleaved RoPE pairs
permuted to our half-split ones, YaRN). What V3 changes:

Routing (transformers 5.24's DeepseekV3TopkRouter, which `efficientjax.moe.router`'s `sigmoid`
router computes): affinities s = sigmoid(logits) in fp32; choice scores s + b, b the
`mlp.gate.e_score_correction_bias` [E]; n_group groups each scored by the sum of its two best
choice scores, the topk_group best kept, the rest masked to -inf; the num_experts_per_tok best
choice scores picked; their weights are the unbiased s, divided by their sum (+1e-20) when
norm_topk_prob, then times routed_scaling_factor. Ours: router 'sigmoid', num_groups /
topk_groups, norm_topk_prob, routed_scaling_factor, aux_free=True.

The bias is not a trained parameter: DeepSeek-V3 moves it after each step towards the experts
the step under-used (arXiv 2412.19437 §2.1.2). Ours is `moe_state`/.../`mlp`/`bias`, the
auxiliary-loss-free bias our training step updates (model.moe.bias_update_rate); so
`load_deepseek_v3` returns the variables {'params', 'moe_state'} and `save_deepseek_v3` takes
them. A sigmoid-routed model trained without aux_free exports with a zero bias.

Multi-token prediction: num_nextn_predict_layers (transformers: num_mtp_layers) extra modules
stored as layers num_hidden_layers, ... (DeepSeek-V3: model.layers.61.*). They are a
training-time auxiliary head (also usable as a speculative-decoding draft), not part of the
next-token logits, and transformers does not build them either: their tensors are skipped with
a warning; export writes none (num_nextn_predict_layers 0).

fp8: the release's block-wise float8 weights (quantization_config quant_method 'fp8') are
dequantised on load by `safetensors_io` (a float8 `X.weight` times its `X.weight_scale_inv`
per 128 x 128 block). Export writes float weights.

Refused, before any weight is read (besides what DeepSeek-V2 refuses): topk_method other than
noaux_tc, scoring_func other than sigmoid, moe_layer_freq != 1, groups of one expert (both
transformers and DeepSeek's code take the top two of each group), too few experts in the kept
groups for num_experts_per_tok, norm_topk_prob with one expert per token (transformers
normalises its weight to 1, DeepSeek's code only normalises when top_k > 1), and
rope_interleave=false (transformers' half-split alternative, which no DeepSeek checkpoint uses;
our tensor rules do not see config.json to skip the RoPE permutation).

Known difference from DeepSeek's own code, not from transformers: DeepSeek's MoEGate fills the
masked groups' choice scores with 0.0 rather than -inf, which only matters when a kept expert's
biased score is negative and too few kept experts score above 0.
"""

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from efficientjax.errors import ConfigError
from efficientjax.hf import deepseek_v2
from efficientjax.hf.safetensors_io import (Family, OneOf, Params, Redundant, TensorRule,
                                            load_checkpoint, refuse_if, register, require,
                                            save_checkpoint)
from efficientjax.hf.writer import DEFAULT_MAX_SHARD_BYTES
from efficientjax.model import ModelConfig
from efficientjax.moe.layer import STATE

# transformers' DeepseekV3Config defaults (5.24) for the keys V3 reads beyond V2's attention
# (whose defaults are the same in both); DeepSeek's own config spells these too.
_HF_DEFAULTS = dict(n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
                    moe_intermediate_size=2048, routed_scaling_factor=2.5, n_group=8,
                    topk_group=4, first_k_dense_replace=3, norm_topk_prob=True,
                    topk_method='noaux_tc', scoring_func='sigmoid', rope_interleave=True,
                    num_nextn_predict_layers=1)


def _get(hf: Mapping[str, Any], key: str) -> Any:
  return hf[key] if key in hf else _HF_DEFAULTS[key]


def _mtp_layers(hf: Mapping[str, Any]) -> int:
  # transformers 5.24 renames DeepSeek's num_nextn_predict_layers to num_mtp_layers.
  n = hf.get('num_nextn_predict_layers', hf.get('num_mtp_layers',
                                                _HF_DEFAULTS['num_nextn_predict_layers']))
  refuse_if(not isinstance(n, int) or n < 0,
            f'num_nextn_predict_layers={n!r} must be a count of layers (0 or more)')
  return n


def _moe_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
  """Our `moe` fields for a checkpoint with MoE layers (module docstring)."""
  for key, want, why in (
      ('topk_method', 'noaux_tc', "DeepSeek-V3's routing; greedy and group_limited_greedy are "
       "DeepSeek-V2's (load it with load_deepseek_v2)"),
      ('scoring_func', 'sigmoid', "DeepSeek-V3's router scores by sigmoid; softmax is "
       "DeepSeek-V2's")):
    refuse_if(_get(hf, key) != want, f'{key}={_get(hf, key)!r} is not supported: {why}')
  deepseek_v2.refuse_moe_layer_freq(hf)
  experts = int(_get(hf, 'n_routed_experts'))
  top_k = int(_get(hf, 'num_experts_per_tok'))
  refuse_if(not 1 <= top_k <= experts,
            f'num_experts_per_tok={top_k} must be between 1 and n_routed_experts={experts}')
  groups, topk_groups = _get(hf, 'n_group'), _get(hf, 'topk_group')
  refuse_if(groups is None or topk_groups is None,
            f'n_group={groups}, topk_group={topk_groups}: DeepSeek-V3 routes within groups '
            'and needs both (1 and 1 for no group limit)')
  groups, topk_groups = int(groups), int(topk_groups)
  deepseek_v2.refuse_bad_groups(experts, groups, topk_groups, top_k)
  refuse_if(experts // groups < 2,
            f'n_group={groups} leaves one expert per group; a group is scored by its two best '
            'experts (transformers and DeepSeek\'s code fail on fewer)')
  norm = bool(_get(hf, 'norm_topk_prob'))
  refuse_if(norm and top_k == 1,
            'norm_topk_prob=true with num_experts_per_tok=1 has no single meaning: transformers '
            "normalises the one weight to 1, DeepSeek's code only normalises when top_k > 1")
  moe = dict(num_experts=experts, top_k=top_k, expert_dim=int(_get(hf, 'moe_intermediate_size')),
             # DeepSeek's code reads None as no shared experts; 0 builds an empty MLP.
             num_shared_experts=int(_get(hf, 'n_shared_experts') or 0),
             first_dense_layers=int(_get(hf, 'first_k_dense_replace')),
             router='sigmoid', norm_topk_prob=norm,
             routed_scaling_factor=float(_get(hf, 'routed_scaling_factor')),
             num_groups=groups, topk_groups=topk_groups, aux_free=True)
  moe.update(deepseek_v2.aux_from_hf(hf))
  return moe


def fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """`config.json` -> our `model` fields, refusing what the model cannot compute."""
  num_layers = int(require(hf, 'num_hidden_layers'))
  refuse_if(not _get(hf, 'rope_interleave'),
            'rope_interleave=false (RoPE on half-split features, a transformers option no '
            'DeepSeek checkpoint uses) is not supported; DeepSeek-V3 loads with interleaved '
            'RoPE pairs')
  _mtp_layers(hf)
  # Attention, norms, RoPE/YaRN and the embeddings are DeepSeek-V2's (the same defaults); its
  # reading sees a model of dense layers (MoE from first_k_dense_replace = num_layers), and the
  # quantization_config is safetensors_io's to dequantise.
  dense = {k: v for k, v in hf.items() if k != 'quantization_config'}
  fields = deepseek_v2.fields_from_hf({**dense, 'first_k_dense_replace': num_layers})
  experts = _get(hf, 'n_routed_experts')
  # transformers makes layers >= first_k_dense_replace MoE; none when that is past the last.
  if experts and _get(hf, 'first_k_dense_replace') < num_layers:
    fields.update(ffn='moe', moe=_moe_fields(hf))
  return fields


def hf_from_config(cfg: ModelConfig) -> dict[str, Any]:
  """Our config -> `config.json` keys of a `DeepseekV3Config`, refusing what it cannot
  express."""
  moe = cfg.moe
  if cfg.ffn == 'moe':
    for field, value, want, why in (
        ('router', moe.router, 'sigmoid', 'DeepSeek-V3 routes by sigmoid affinities'),
        ('aux_free', moe.aux_free, True,
         "DeepSeek-V3's router always adds its bias; save_deepseek_v3 writes a zero one for a "
         'model without it')):
      if value != want:
        raise ConfigError(f'model.moe.{field}', f'{value!r} has no DeepseekV3ForCausalLM '
                          f'equivalent ({why}); a DeepSeek-V3 export needs model.moe.{field}='
                          f'{want!r}')
    if moe.num_experts // moe.num_groups < 2:
      raise ConfigError('model.moe.num_groups', f'{moe.num_groups} groups of '
                        f'{moe.num_experts // moe.num_groups} expert: DeepSeek-V3 scores a '
                        'group by its two best experts; use groups of 2 or more')
    if moe.norm_topk_prob and moe.top_k == 1:
      raise ConfigError('model.moe.norm_topk_prob', 'true with top_k=1 has no single '
                        "DeepSeek-V3 meaning (transformers normalises, DeepSeek's code does "
                        'not); set it false')
  # V2 writes the attention, RoPE and dense keys; the MoE keys are V3's.
  out = deepseek_v2.hf_from_config(dataclasses.replace(cfg, ffn='dense'))
  out.pop('mlp_bias')  # not a DeepseekV3Config key
  out.update(rope_interleave=True, num_nextn_predict_layers=0)
  if cfg.ffn == 'dense':
    return out
  out.update(
      **deepseek_v2.moe_to_hf(moe, 'DeepSeek-V3'),
      n_group=moe.num_groups,
      topk_group=moe.topk_groups,
      norm_topk_prob=moe.norm_topk_prob,
      # DeepSeek's own code reads these; transformers keeps them.
      topk_method='noaux_tc',
      scoring_func='sigmoid',
  )
  return out


def tensor_rules(cfg: ModelConfig) -> list[TensorRule | OneOf | Redundant]:
  rules = deepseek_v2.tensor_rules(cfg)
  if cfg.ffn == 'moe':
    rules.append(TensorRule('model.layers.{layer}.mlp.gate.e_score_correction_bias',
                            ('mlp', 'bias'), ffn='moe', collection=STATE))
  return rules


def skipped(hf: Mapping[str, Any]) -> dict[str, str]:
  """The multi-token-prediction layers' tensors, with why they are not loaded."""
  n = _mtp_layers(hf)
  if not n:
    return {}
  first = int(hf['num_hidden_layers'])
  layers = '|'.join(str(i) for i in range(first, first + n))
  return {rf'model\.layers\.({layers})\..+': (
      f'multi-token-prediction (MTP) layers (num_nextn_predict_layers={n}) are a training-time '
      'auxiliary head, not used for the next-token logits; the model has none, so they are '
      'not loaded')}


DEEPSEEK_V3 = register(Family(
    name='DeepSeek-V3',
    model_types=('deepseek_v3',),
    architecture='DeepseekV3ForCausalLM',
    fields_from_hf=fields_from_hf,
    hf_from_config=hf_from_config,
    tensor_rules=tensor_rules,
    skipped=skipped,
))


def load_deepseek_v3(path: str | Path, param_dtype: Any = jnp.float32, scan_layers: bool = True
                     ) -> tuple[dict[str, Any], Params]:
  """Reads a `DeepseekV3ForCausalLM` checkpoint directory (config.json + *.safetensors; bf16,
  fp32 or the release's block-wise fp8) as (model_fields, variables): variables is
  {'params': ..., 'moe_state': ...} with MoE layers (the routing bias, float32, laid out as the
  params: scanned, `moe_state`/`blocks`/`mlp`/`bias` [layers, E]), {'params': ...} without;
  `Transformer.apply` takes it as it is. Multi-token-prediction layers are skipped with a
  warning. Raises `ConfigError` for a checkpoint the model cannot express, before reading any
  weight."""
  return load_checkpoint(path, DEEPSEEK_V3, param_dtype=param_dtype, scan_layers=scan_layers,
                         collections=True)


def save_deepseek_v3(path: str | Path, variables: Mapping[str, Any],
                     model: ModelConfig | Mapping[str, Any], dtype: Any = None, *,
                     extra_config: Mapping[str, Any] | None = None,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
  """Writes an `mla` model with the sigmoid-routed `moe` FFN as a `DeepseekV3ForCausalLM`
  checkpoint that transformers' `from_pretrained` loads (experts one tensor each, as
  save_pretrained writes them). `variables`: {'params', 'moe_state'} for model.moe.aux_free
  (the bias is written as e_score_correction_bias, float32); for a model without aux_free, the
  params (or {'params'}), and the bias written is zero. Other arguments as `save_llama`."""
  cfg = model if isinstance(model, ModelConfig) else ModelConfig.from_config(model)
  if cfg.ffn == 'moe' and not cfg.moe.aux_free:
    # No bias routes exactly as a zero one; V3's router always has one.
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, aux_free=True))
    params = variables['params'] if 'params' in variables else variables
    zero = np.zeros((cfg.moe.num_experts,), np.float32)
    state = {f'block_{i}': {'mlp': {'bias': zero}}
             for i in range(cfg.moe.first_dense_layers, cfg.num_layers)}
    variables = {'params': params, STATE: state}
  return save_checkpoint(path, variables, cfg, DEEPSEEK_V3, dtype=dtype,
                         extra_config=extra_config, max_shard_bytes=max_shard_bytes)

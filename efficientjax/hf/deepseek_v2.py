"""DeepSeek-V2 (`DeepseekV2ForCausalLM`) checkpoints: our `mla` + `rope` + `moe` (or `dense`).

The blocks are Llama's (pre-norm RMSNorm, SwiGLU, no biases) with multi-head latent attention
(efficientjax.attention.mla) and, from layer first_k_dense_replace on, DeepSeekMoE (our `moe`
FFN; the first layers keep a dense MLP of intermediate_size, `moe.first_dense_layers`). The
tensors map one to one onto ours but for one layout detail:

RoPE pairs. DeepSeek's code, and transformers' port of it, rotates consecutive features
(2i, 2i + 1) as one complex number (`view_as_complex`); our RoPE pairs feature i with
i + d/2 (the GPT-NeoX / HF Llama layout). With P the permutation that lists the even features,
then the odd ones, interleaved RoPE of x, permuted by P, equals half-split RoPE of x permuted by
P, at every position; and a score q·k is unchanged when q and k are permuted alike. So the
output features that become RoPE features - the last qk_rope_head_dim of each head of q_proj /
q_b_proj, and the last qk_rope_head_dim of kv_a_proj_with_mqa (the shared key) - are permuted
by P at load time (and by P's inverse at export), and the logits are identical. Nothing else
reads those features: the cached k_rope is in our order, produced and consumed by us.

MoE layers. n_routed_experts experts of width moe_intermediate_size, num_experts_per_tok per
token, the softmax router (scoring_func 'softmax'); topk_method 'greedy' or
'group_limited_greedy' (n_group groups, a group scored by its best expert, topk_group kept:
our num_groups / topk_groups); each chosen probability times routed_scaling_factor, not
renormalised; n_shared_experts always-on experts, one SwiGLU of n_shared_experts ·
moe_intermediate_size (ours: `mlp/shared`). Experts load from one tensor each
(`mlp.experts.{j}.gate_proj.weight`, what save_pretrained writes and export writes) or from
transformers' fused `mlp.experts.gate_up_proj` [E, 2f, d] / `down_proj` [E, d, f].

Balancing losses (training only): DeepSeek's own config.json carries aux_loss_alpha and seq_aux;
with seq_aux its per-layer loss is exactly our sequence-wise one (moe.seq_aux_loss_coef =
alpha), without it the expert-level E·Σᵢ fᵢ·Pᵢ (moe.aux_loss_coef = alpha), both summed over
layers as DeepSeek's code does. A config without them (transformers' own, which trains no
balancing loss for V2) leaves the run's coefficients alone.

Refused, before any weight is read: biases, non-silu activations, RoPE scalings other than YaRN,
grouped K/V heads (MLA has one set per query head), and of MoE: moe_layer_freq != 1 (DeepSeek's
code would interleave dense layers, transformers' would not), scoring_func other than softmax
(V3's sigmoid is another architecture), topk_method other than the two above, and
norm_topk_prob=true: transformers' DeepseekV2TopkRouter ignores it (it always scales and never
renormalises) while DeepSeek's code renormalises and then does not scale, so the checkpoint has
no single meaning (every released V2 / V2-Lite / V2.5 config sets it false).
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from efficientjax.attention.positions import rope_scaling
from efficientjax.errors import ConfigError
from efficientjax.hf.safetensors_io import (Family, OneOf, Params, Redundant, TensorRule,
                                            load_checkpoint, max_positions, refuse_if, register,
                                            require, rope_config, save_checkpoint)
from efficientjax.hf.writer import DEFAULT_MAX_SHARD_BYTES
from efficientjax.model import ModelConfig
from efficientjax.moe.layer import shared_width

# transformers' DeepseekV2Config defaults (5.x), for keys a config.json leaves out: the model
# transformers would build from it is the one we must match.
_HF_DEFAULTS = dict(rms_norm_eps=1e-6, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=0,
                    n_routed_experts=64, rope_theta=10000.0, n_shared_experts=2,
                    moe_intermediate_size=1407, routed_scaling_factor=1.0, topk_method='greedy',
                    norm_topk_prob=False)
_TOPK_METHODS = ('greedy', 'group_limited_greedy')
_DEFAULT_MAX_POSITIONS = 2048


def _get(hf: Mapping[str, Any], key: str) -> Any:
  return hf[key] if key in hf else _HF_DEFAULTS[key]


def _rope_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
  """`rope_theta` and, for YaRN, our `yarn` fields, from either config spelling (transformers
  5.x: `rope_parameters`; 4.x and DeepSeek's own code: `rope_theta` + `rope_scaling`)."""
  # As transformers 5.x reads it (and safetensors_io.rope_fields): a 4.x rope_scaling dict wins
  # over rope_parameters, a rope_theta inside it over the top-level key.
  spec = dict(hf.get('rope_scaling') or hf.get('rope_parameters') or {})
  theta = float(spec.get('rope_theta', hf.get('rope_theta', _HF_DEFAULTS['rope_theta'])))
  kind = spec.get('rope_type', spec.get('type', 'default'))
  refuse_if(kind not in ('default', 'yarn'),
            f'RoPE scaling {kind!r} is not supported (rope_scaling / rope_parameters = {spec}); '
            'DeepSeek checkpoints load with plain RoPE or YaRN')
  factor = spec.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))
  refuse_if(factor != 1.0, f'partial_rotary_factor={factor} is not supported; MLA rotates all '
            'qk_rope_head_dim features')
  fields: dict[str, Any] = {'rope_theta': theta}
  if kind == 'yarn':
    refuse_if(spec.get('factor') is None, 'YaRN without a factor (derived from '
              'max_position_embeddings, as DeepSeek-V3 configs do) is not supported; set '
              'rope_parameters.factor')
    attention_factor = spec.get('attention_factor')
    refuse_if(attention_factor is not None,
              f'YaRN with an explicit attention_factor={attention_factor} is not supported; we '
              'derive it from factor, mscale and mscale_all_dim as DeepSeek does')
    # transformers' order: a top-level original context, the dict's, max_position_embeddings.
    original = (hf.get('original_max_position_embeddings')
                or spec.get('original_max_position_embeddings')
                or hf.get('max_position_embeddings'))
    refuse_if(original is None, 'YaRN needs original_max_position_embeddings (the pretraining '
              'context) in rope_parameters, or max_position_embeddings')
    fields['yarn'] = dict(
        factor=float(spec['factor']),
        original_max_len=int(original),
        # transformers' truthiness rules: unset (or 0) beta_fast/beta_slow take 32/1, and an
        # unset mscale / mscale_all_dim drops DeepSeek's form of the temperature.
        beta_fast=float(spec.get('beta_fast') or 32.0),
        beta_slow=float(spec.get('beta_slow') or 1.0),
        mscale=float(spec.get('mscale') or 0.0),
        mscale_all_dim=float(spec.get('mscale_all_dim') or 0.0),
        truncate=bool(spec.get('truncate', True)))
  return fields


def refuse_moe_layer_freq(hf: Mapping[str, Any]) -> None:
  """DeepSeek (V2, V3): every layer from first_k_dense_replace on is MoE, as transformers
  builds them; DeepSeek's own code would make only every moe_layer_freq-th one MoE."""
  freq = hf.get('moe_layer_freq', 1)
  refuse_if(freq != 1, f'moe_layer_freq={freq} is not supported: every layer from '
            'first_k_dense_replace on must be MoE (DeepSeek\'s code would make only every '
            f'{freq}th one MoE, transformers\' every one)')


def refuse_bad_groups(experts: int, groups: int, topk_groups: int, top_k: int) -> None:
  """Group-limited routing (V2's group_limited_greedy, V3's noaux_tc) that our router runs."""
  refuse_if(groups < 1 or experts % groups != 0,
            f'n_group={groups} does not divide n_routed_experts={experts} into equal groups')
  refuse_if(not 1 <= topk_groups <= groups,
            f'topk_group={topk_groups} must be between 1 and n_group={groups}')
  # With fewer kept experts than top_k, transformers would pick masked (V3: -inf) or
  # zero-weight (V2) experts, which we do not model.
  refuse_if(topk_groups * (experts // groups) < top_k,
            f'topk_group={topk_groups} groups of {experts // groups} experts hold fewer than '
            f'num_experts_per_tok={top_k}')


def aux_from_hf(hf: Mapping[str, Any]) -> dict[str, float]:
  """DeepSeek's one aux_loss_alpha: on the sequence-wise loss with seq_aux (its configuration
  default), else on the batch one; {} when unset (the run's own coefficients stay)."""
  if hf.get('aux_loss_alpha') is None:
    return {}
  alpha, seq = float(hf['aux_loss_alpha']), bool(hf.get('seq_aux', True))
  return dict(aux_loss_coef=0.0 if seq else alpha, seq_aux_loss_coef=alpha if seq else 0.0)


def moe_to_hf(moe: Any, family: str) -> dict[str, Any]:
  """config.json's MoE keys both DeepSeek versions write the same way (routing keys are each
  version's), refusing Qwen2-MoE's shared-expert options, which DeepSeek cannot express."""
  if moe.shared_expert_gate:
    raise ConfigError('model.moe.shared_expert_gate', 'True has no DeepSeek equivalent (its '
                      'shared experts are not gated; Qwen2-MoE\'s is: export with '
                      f'save_qwen2_moe); a {family} export needs model.moe.shared_expert_gate='
                      'False')
  if moe.num_shared_experts and shared_width(moe) != moe.num_shared_experts * moe.expert_dim:
    raise ConfigError('model.moe.shared_expert_dim', f'{moe.shared_expert_dim} is not '
                      f'num_shared_experts x expert_dim = {moe.num_shared_experts} x '
                      f'{moe.expert_dim}: DeepSeek sizes its shared experts so; unset it')
  out = dict(
      first_k_dense_replace=moe.first_dense_layers,
      n_routed_experts=moe.num_experts,
      num_experts_per_tok=moe.top_k,
      moe_intermediate_size=moe.expert_dim,
      n_shared_experts=moe.num_shared_experts,
      routed_scaling_factor=moe.routed_scaling_factor,
      moe_layer_freq=1,  # DeepSeek's own code reads it; transformers keeps it
  )
  # One aux_loss_alpha, on the sequence-wise loss or the batch one (aux_from_hf's inverse).
  if not (moe.aux_loss_coef and moe.seq_aux_loss_coef):
    out.update(aux_loss_alpha=moe.aux_loss_coef or moe.seq_aux_loss_coef,
               seq_aux=not moe.aux_loss_coef)
  return out


def _moe_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
  """Our `moe` fields for a checkpoint with MoE layers (module docstring)."""
  experts = int(_get(hf, 'n_routed_experts'))
  refuse_moe_layer_freq(hf)
  scoring = hf.get('scoring_func', 'softmax')
  refuse_if(scoring != 'softmax', f'scoring_func={scoring!r} is not DeepSeek-V2\'s softmax '
            'router (sigmoid scoring is DeepSeek-V3, a different architecture)')
  method = _get(hf, 'topk_method')
  refuse_if(method not in _TOPK_METHODS, f'topk_method={method!r} is not supported; '
            f'DeepSeek-V2 routes with {" or ".join(map(repr, _TOPK_METHODS))}')
  refuse_if(bool(_get(hf, 'norm_topk_prob')),
            'norm_topk_prob=true is not supported: transformers ignores it for DeepSeek-V2 (it '
            'scales the top-k probabilities by routed_scaling_factor and never renormalises) '
            'while DeepSeek\'s own code renormalises and then does not scale, so the '
            'checkpoint has no single meaning; every released DeepSeek-V2 sets it false')
  top_k = int(require(hf, 'num_experts_per_tok'))
  refuse_if(not 1 <= top_k <= experts,
            f'num_experts_per_tok={top_k} must be between 1 and n_routed_experts={experts}')
  groups = topk_groups = 1
  if method == 'group_limited_greedy':
    groups, topk_groups = int(require(hf, 'n_group')), int(require(hf, 'topk_group'))
    refuse_bad_groups(experts, groups, topk_groups, top_k)
  # DeepSeek's code reads None as no shared experts; 0 builds an empty MLP in transformers.
  shared = int(_get(hf, 'n_shared_experts') or 0)
  moe = dict(num_experts=experts, top_k=top_k, expert_dim=int(_get(hf, 'moe_intermediate_size')),
             num_shared_experts=shared,
             first_dense_layers=int(_get(hf, 'first_k_dense_replace')),
             router='softmax', norm_topk_prob=False,
             routed_scaling_factor=float(_get(hf, 'routed_scaling_factor')),
             num_groups=groups, topk_groups=topk_groups, aux_free=False)
  moe.update(aux_from_hf(hf))
  return moe


def fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """`config.json` -> our `model` fields, refusing what the model cannot compute."""
  num_layers = int(require(hf, 'num_hidden_layers'))
  experts = _get(hf, 'n_routed_experts')
  # transformers makes layers >= first_k_dense_replace MoE; none when that is past the last.
  moe_layers = bool(experts) and _get(hf, 'first_k_dense_replace') < num_layers
  act = hf.get('hidden_act', 'silu')
  refuse_if(act not in ('silu', 'swish'),
            f'hidden_act={act!r} is not supported: our dense FFN is SwiGLU (silu); use a '
            'checkpoint with hidden_act "silu"')
  for key in ('attention_bias', 'mlp_bias'):
    refuse_if(bool(hf.get(key, False)),
              f'{key}=true is not supported: our projections have no biases; use a checkpoint '
              f'with {key} false')
  refuse_if(hf.get('quantization_config') is not None,
            'quantized checkpoints (quantization_config set) are not supported for DeepSeek-V2; '
            'load the bfloat16/float16/float32 checkpoint (block-wise fp8 is read for '
            'DeepSeek-V3 only, by load_deepseek_v3)')
  num_heads = int(require(hf, 'num_attention_heads'))
  num_kv_heads = hf.get('num_key_value_heads') or num_heads
  # transformers would repeat the per-head keys and values that kv_b_proj already gives every
  # head; no DeepSeek checkpoint does that, and MLA has no K/V head count.
  refuse_if(num_kv_heads != num_heads,
            f'num_key_value_heads={num_kv_heads} differs from num_attention_heads={num_heads}; '
            'MLA expands keys and values for every query head, so they must be equal')
  rope = int(_get(hf, 'qk_rope_head_dim'))
  refuse_if(rope % 2 != 0, f'qk_rope_head_dim={rope} is odd; RoPE rotates pairs of features')
  q_lora_rank = _get(hf, 'q_lora_rank')
  ffn = dict(ffn='moe', moe=_moe_fields(hf)) if moe_layers else dict(ffn='dense')
  return dict(
      vocab_size=int(require(hf, 'vocab_size')),
      embed_dim=int(require(hf, 'hidden_size')),
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=num_heads,
      # transformers sets head_dim to the rotated width (what its RoPE is computed for); MLA
      # reads its own widths from `mla`.
      head_dim=rope,
      mlp_dim=int(require(hf, 'intermediate_size')),
      norm_eps=float(_get(hf, 'rms_norm_eps')),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      attention='mla',
      position='rope',
      **ffn,
      mla=dict(q_lora_rank=int(q_lora_rank or 0),
               kv_lora_rank=int(_get(hf, 'kv_lora_rank')),
               qk_nope_head_dim=int(_get(hf, 'qk_nope_head_dim')),
               qk_rope_head_dim=rope,
               v_head_dim=int(_get(hf, 'v_head_dim'))),
      **_rope_fields(hf),
  )


def _moe_config(cfg: ModelConfig) -> dict[str, Any]:
  """`config.json`'s MoE keys: every layer dense, or our `moe` as DeepSeek-V2 routes."""
  if cfg.ffn == 'dense':
    # MoE layers start at first_k_dense_replace, here past the last layer.
    return dict(first_k_dense_replace=cfg.num_layers, n_routed_experts=0)
  moe = cfg.moe
  for field, value, want, why in (
      ('router', moe.router, 'softmax', 'DeepSeek-V2 routes by softmax (sigmoid is V3)'),
      ('norm_topk_prob', moe.norm_topk_prob, False,
       "transformers' DeepseekV2TopkRouter never renormalises the top-k probabilities"),
      ('aux_free', moe.aux_free, False,
       'the auxiliary-loss-free bias changes which experts are chosen, and V2 has no such bias')):
    if value != want:
      raise ConfigError(f'model.moe.{field}', f'{value!r} has no DeepseekV2ForCausalLM '
                        f'equivalent ({why}); a DeepSeek-V2 export needs model.moe.{field}='
                        f'{want!r}')
  groups = moe.num_groups > 1
  return dict(
      **moe_to_hf(moe, 'DeepSeek-V2'),
      topk_method='group_limited_greedy' if groups else 'greedy',
      n_group=moe.num_groups if groups else None,
      topk_group=moe.topk_groups if groups else None,
      norm_topk_prob=False,
      scoring_func='softmax',  # DeepSeek's own code reads it; transformers keeps it
  )


def hf_from_config(cfg: ModelConfig) -> dict[str, Any]:
  """Our config -> `config.json` keys of a `DeepseekV2Config`, refusing what it cannot
  express."""
  for field, value, want in (('attention', cfg.attention, 'mla'),
                             ('position', cfg.position, 'rope'),
                             ('ffn', cfg.ffn, 'moe' if cfg.ffn == 'moe' else 'dense'),
                             ('qkv_bias', cfg.qkv_bias, False), ('qk_norm', cfg.qk_norm, False),
                             ('sliding_window', cfg.sliding_window, None)):
    if value != want:
      raise ConfigError(f'model.{field}', f'{value!r} has no DeepseekV2ForCausalLM equivalent; a '
                        f'DeepSeek-V2 export needs model.{field}={want!r}')
  if cfg.num_kv_heads != cfg.num_heads:
    raise ConfigError('model.num_kv_heads', 'MLA has no K/V head count; leave it unset')
  scaling = rope_scaling(cfg)
  if scaling not in (None, 'yarn'):
    field = 'llama3_rope.factor' if scaling == 'llama3' else 'linear_rope_factor'
    raise ConfigError(f'model.{field}', f'RoPE scaling {scaling!r} has no DeepSeek equivalent '
                      f'(its configs scale RoPE by YaRN only); an export needs model.{field}=1')
  m = cfg.mla
  # Both spellings: transformers 5.x reads rope_parameters, 4.x rope_theta and rope_scaling.
  rope = rope_config(cfg)
  if rope['rope_scaling'] is not None:
    # DeepSeek's own modelling code (trust_remote_code) reads rope_scaling['type'].
    rope['rope_scaling']['type'] = rope['rope_scaling']['rope_type']
  return dict(
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.embed_dim,
      intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_heads,
      q_lora_rank=m.q_lora_rank or None,  # null: queries projected directly (q_proj)
      kv_lora_rank=m.kv_lora_rank,
      qk_nope_head_dim=m.qk_nope_head_dim,
      qk_rope_head_dim=m.qk_rope_head_dim,
      v_head_dim=m.v_head_dim,
      head_dim=m.qk_rope_head_dim,
      hidden_act='silu',
      rms_norm_eps=cfg.norm_eps,
      **rope,
      attention_bias=False,
      mlp_bias=False,
      attention_dropout=0.0,
      tie_word_embeddings=cfg.tie_embeddings,
      initializer_range=cfg.init_std,
      max_position_embeddings=max_positions(cfg, _DEFAULT_MAX_POSITIONS),
      use_cache=True,
      **_moe_config(cfg),
  )


def rope_order(prefix: int, rope: int) -> tuple[int, ...]:
  """Our order of an output axis whose last `rope` features are DeepSeek's interleaved RoPE
  pairs: the first `prefix` kept, then each pair's first feature, then each pair's second."""
  return (tuple(range(prefix)) + tuple(range(prefix, prefix + rope, 2)) +
          tuple(range(prefix + 1, prefix + rope, 2)))


def tensor_rules(cfg: ModelConfig) -> list[TensorRule | OneOf | Redundant]:
  m = cfg.mla
  layer = 'model.layers.{layer}.'
  attn = layer + 'self_attn.'
  q_order = rope_order(m.qk_nope_head_dim, m.qk_rope_head_dim)  # per head, of [heads, nope+rope]
  rules = [
      TensorRule('model.embed_tokens.weight', ('embed', 'embedding')),
      TensorRule(layer + 'input_layernorm.weight', ('attn_norm', 'scale')),
      TensorRule(attn + 'kv_a_proj_with_mqa.weight', ('attn', 'kv_a', 'kernel'), linear_in_dims=1,
                 permute=rope_order(m.kv_lora_rank, m.qk_rope_head_dim)),
      TensorRule(attn + 'kv_a_layernorm.weight', ('attn', 'kv_norm', 'scale')),
      TensorRule(attn + 'kv_b_proj.weight', ('attn', 'kv_b', 'kernel'), linear_in_dims=1),
      TensorRule(attn + 'o_proj.weight', ('attn', 'o', 'kernel'), linear_in_dims=2),
      TensorRule(layer + 'post_attention_layernorm.weight', ('mlp_norm', 'scale')),
      TensorRule('model.norm.weight', ('final_norm', 'scale')),
  ]
  mlp = layer + 'mlp.'
  rules += [TensorRule(mlp + f'{name}_proj.weight', ('mlp', name, 'kernel'), linear_in_dims=1,
                       ffn='dense') for name in ('gate', 'up', 'down')]
  if cfg.ffn == 'moe':
    rules += _moe_rules(cfg)
  if m.q_lora_rank:
    rules += [
        TensorRule(attn + 'q_a_proj.weight', ('attn', 'q_a', 'kernel'), linear_in_dims=1),
        TensorRule(attn + 'q_a_layernorm.weight', ('attn', 'q_norm', 'scale')),
        TensorRule(attn + 'q_b_proj.weight', ('attn', 'q_b', 'kernel'), linear_in_dims=1,
                   permute=q_order),
    ]
  else:
    rules.append(TensorRule(attn + 'q_proj.weight', ('attn', 'q', 'kernel'), linear_in_dims=1,
                            permute=q_order))
  if cfg.tie_embeddings:
    rules.append(Redundant('lm_head.weight', lambda cfg, read: read('model.embed_tokens.weight'),
                           hint='the head is not tied: set tie_word_embeddings false in '
                                'config.json'))
  else:
    rules.append(TensorRule('lm_head.weight', ('lm_head', 'kernel'), linear_in_dims=1))
  return rules


def _moe_rules(cfg: ModelConfig) -> list[TensorRule | OneOf | Redundant]:
  """The MoE layers' tensors: router, routed experts (either layout), shared experts."""
  mlp = 'model.layers.{layer}.mlp.'
  moe = lambda name, param, **kw: TensorRule(mlp + name, param, linear_in_dims=1, ffn='moe', **kw)
  names = ('gate', 'up', 'down')
  rules: list[TensorRule | OneOf | Redundant] = [
      moe('gate.weight', ('mlp', 'router')),
      OneOf((
          tuple(moe(f'experts.{{expert}}.{name}_proj.weight', ('mlp', name)) for name in names),
          (moe('experts.gate_up_proj', ('mlp', 'gate'), batch_dims=1, part=(0, 2)),
           moe('experts.gate_up_proj', ('mlp', 'up'), batch_dims=1, part=(1, 2)),
           moe('experts.down_proj', ('mlp', 'down'), batch_dims=1)),
      )),
  ]
  if cfg.moe.num_shared_experts:
    rules += [moe(f'shared_experts.{name}_proj.weight', ('mlp', 'shared', name, 'kernel'))
              for name in names]
  else:
    # transformers builds an MLP of width 0 for n_shared_experts=0 and saves its empty weights.
    rules += [Redundant(mlp + f'shared_experts.{name}_proj.weight',
                        lambda cfg, read, name=name: np.zeros(
                            (cfg.embed_dim, 0) if name == 'down' else (0, cfg.embed_dim)),
                        hint='the checkpoint has shared experts: set n_shared_experts in '
                             'config.json')
              for name in names]
  return rules


DEEPSEEK_V2 = register(Family(
    name='DeepSeek-V2',
    model_types=('deepseek_v2',),
    architecture='DeepseekV2ForCausalLM',
    fields_from_hf=fields_from_hf,
    hf_from_config=hf_from_config,
    tensor_rules=tensor_rules,
))


def load_deepseek_v2(path: str | Path, param_dtype: Any = jnp.float32, scan_layers: bool = True
                     ) -> tuple[dict[str, Any], Params]:
  """Reads a `DeepseekV2ForCausalLM` checkpoint directory (config.json + *.safetensors) as
  (model_fields, params), like `load_llama`; `model_fields['mla']` (`['moe']` with MoE layers,
  `['yarn']` for YaRN checkpoints) are dicts of the nested config. Scanned, the dense first
  layers are under `dense_blocks`. Raises `ConfigError` for a checkpoint the model cannot
  express, before reading any weight."""
  return load_checkpoint(path, DEEPSEEK_V2, param_dtype=param_dtype, scan_layers=scan_layers)


def save_deepseek_v2(path: str | Path, params: Mapping[str, Any],
                     model: ModelConfig | Mapping[str, Any], dtype: Any = None, *,
                     extra_config: Mapping[str, Any] | None = None,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
  """Writes an `mla` model (`dense` or softmax-routed `moe` FFN) as a `DeepseekV2ForCausalLM`
  checkpoint that transformers' `from_pretrained` loads, experts one tensor each as
  save_pretrained writes them; arguments as `save_llama`."""
  return save_checkpoint(path, params, model, DEEPSEEK_V2, dtype=dtype, extra_config=extra_config,
                         max_shard_bytes=max_shard_bytes)

"""Mixtral (`MixtralForCausalLM`) checkpoints: Llama's attention blocks with a sparse MoE FFN.

Our `mha`/`gqa`/`mqa` + `rope` + `moe` model with the softmax router, renormalised top-k weights
(norm_topk_prob) and no shared experts is Mixtral's architecture: every layer routes each token
to num_experts_per_tok of num_local_experts SwiGLU experts of width intermediate_size, weighted
by the softmax probabilities of the chosen experts divided by their sum (MixtralTopKRouter).
Attention, norms, embeddings and RoPE map as for Llama (efficientjax.hf.llama); one
`sliding_window` for every layer maps to `model.sliding_window` (the same "keys per query,
itself included": transformers keeps key j for query i when j > i - window).

Expert weights come in two layouts, both read (`OneOf`), the first written:
- one tensor per expert, `block_sparse_moe.experts.{j}.w1/w3/w2.weight` ([f, d], [f, d],
  [d, f]: gate, up, down) and the router `block_sparse_moe.gate.weight` [E, d] - the original
  Mixtral release and what transformers 5.x `save_pretrained` still writes;
- transformers 5.x's own modules, `mlp.experts.gate_up_proj` [E, 2f, d] (gate rows, then up)
  and `mlp.experts.down_proj` [E, d, f], router `mlp.gate.weight`, which its loader also takes.

Training-only settings: `router_jitter_noise` (a multiplicative uniform noise on the MoE input
while training) is accepted and dropped: it does not change what the checkpoint computes, and
our model has no such noise (as attention_dropout). `router_aux_loss_coef` becomes
`moe.aux_loss_coef` = router_aux_loss_coef · num_experts_per_tok / num_hidden_layers: transformers'
Mixtral loss pools all layers' routing into one E·Σᵢ f̄ᵢ·P̄ᵢ with fᵢ per token (k times our
per-assignment share, efficientjax.moe.balance) and adds it once, where we add one loss per
layer; the two agree exactly when every layer routes alike, and in scale otherwise.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from efficientjax.hf import llama
from efficientjax.hf.safetensors_io import (Family, OneOf, Params, Redundant, TensorRule,
                                            load_checkpoint, max_positions, refuse_if, register,
                                            save_checkpoint, window_value)
from efficientjax.hf.writer import DEFAULT_MAX_SHARD_BYTES
from efficientjax.model import ModelConfig

# transformers' MixtralConfig defaults, for keys a config.json leaves out.
_DEFAULT_EXPERTS = 8
_DEFAULT_TOP_K = 2
_DEFAULT_AUX_LOSS_COEF = 0.001
_DEFAULT_RMS_NORM_EPS = 1e-5
_DEFAULT_ROPE_THETA = 1e6
_DEFAULT_MAX_POSITIONS = 4096 * 32


def fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """`config.json` -> our `model` fields, refusing what the model cannot compute."""
  # Llama's mapping (activation, biases, heads, head_dim, RoPE and its scaling), with
  # MixtralConfig's defaults.
  fields = llama.fields_from_hf(hf, default_eps=_DEFAULT_RMS_NORM_EPS,
                                default_theta=_DEFAULT_ROPE_THETA)
  experts = int(hf.get('num_local_experts', _DEFAULT_EXPERTS))
  top_k = int(hf.get('num_experts_per_tok', _DEFAULT_TOP_K))
  refuse_if(not 1 <= top_k <= experts,
            f'num_experts_per_tok={top_k} must be between 1 and num_local_experts={experts}')
  window = window_value(hf, None)  # MixtralConfig's default: full attention
  coef = float(hf.get('router_aux_loss_coef', _DEFAULT_AUX_LOSS_COEF))
  fields.update(
      ffn='moe',
      sliding_window=window,
      moe=dict(num_experts=experts, top_k=top_k, expert_dim=fields['mlp_dim'],
               num_shared_experts=0, first_dense_layers=0, router='softmax',
               norm_topk_prob=True, routed_scaling_factor=1.0, num_groups=1, topk_groups=1,
               aux_loss_coef=coef * top_k / fields['num_layers'], z_loss_coef=0.0,
               seq_aux_loss_coef=0.0, aux_free=False))
  return fields


# What a MixtralForCausalLM computes besides a K/V-head-family attention, a window and RoPE's
# scalings.
MIXTRAL_FIELDS = {**llama.LLAMA_FIELDS, 'ffn': 'moe', 'moe.router': 'softmax',
                  'moe.norm_topk_prob': True, 'moe.routed_scaling_factor': 1.0,
                  'moe.num_groups': 1, 'moe.num_shared_experts': 0, 'moe.first_dense_layers': 0,
                  'moe.aux_free': False}
del MIXTRAL_FIELDS['sliding_window']  # expressible
_HINTS = {
    'moe.norm_topk_prob': ' (Mixtral always renormalises the top-k probabilities)',
    'moe.aux_free': (' (the auxiliary-loss-free bias changes which experts are chosen, and '
                     'Mixtral has no such bias)'),
    'moe.num_shared_experts': ' (shared experts are DeepSeek\'s: export with save_deepseek_v2)',
    'moe.first_dense_layers': ' (every Mixtral layer is MoE)',
}


def hf_from_config(cfg: ModelConfig) -> dict[str, Any]:
  """Our config -> `config.json` keys of a `MixtralConfig`, refusing what Mixtral cannot
  express."""
  llama.refuse_inexpressible(cfg, 'MixtralForCausalLM', MIXTRAL_FIELDS, hints=_HINTS)
  moe = cfg.moe
  return {
      **llama.decoder_config(cfg),
      # The experts' width; Mixtral has no dense FFN, so model.mlp_dim is not exported.
      'intermediate_size': moe.expert_dim,
  } | dict(
      max_position_embeddings=max_positions(cfg, _DEFAULT_MAX_POSITIONS),
      sliding_window=cfg.sliding_window,
      num_local_experts=moe.num_experts,
      num_experts_per_tok=moe.top_k,
      router_aux_loss_coef=moe.aux_loss_coef * cfg.num_layers / moe.top_k,
      router_jitter_noise=0.0,
      output_router_logits=False,
  )


def tensor_rules(cfg: ModelConfig) -> list[TensorRule | OneOf | Redundant]:
  # Llama's embeddings, attention, norms and head; its dense-MLP tensors are the experts here.
  rules = [r for r in llama.tensor_rules(cfg)
           if not (isinstance(r, TensorRule) and r.param[0] == 'mlp')]
  layer = 'model.layers.{layer}.'
  legacy = layer + 'block_sparse_moe.'
  per_expert = tuple(
      TensorRule(legacy + f'experts.{{expert}}.{w}.weight', ('mlp', name), linear_in_dims=1)
      for w, name in (('w1', 'gate'), ('w3', 'up'), ('w2', 'down')))
  fused = layer + 'mlp.'
  return rules + [OneOf((
      (TensorRule(legacy + 'gate.weight', ('mlp', 'router'), linear_in_dims=1),) + per_expert,
      (TensorRule(fused + 'gate.weight', ('mlp', 'router'), linear_in_dims=1),
       TensorRule(fused + 'experts.gate_up_proj', ('mlp', 'gate'), linear_in_dims=1,
                  batch_dims=1, part=(0, 2)),
       TensorRule(fused + 'experts.gate_up_proj', ('mlp', 'up'), linear_in_dims=1,
                  batch_dims=1, part=(1, 2)),
       TensorRule(fused + 'experts.down_proj', ('mlp', 'down'), linear_in_dims=1,
                  batch_dims=1)),
  ))]


MIXTRAL = register(Family(
    name='Mixtral',
    model_types=('mixtral',),
    architecture='MixtralForCausalLM',
    fields_from_hf=fields_from_hf,
    hf_from_config=hf_from_config,
    tensor_rules=tensor_rules,
))


def load_mixtral(path: str | Path, param_dtype: Any = jnp.float32, scan_layers: bool = True
                 ) -> tuple[dict[str, Any], Params]:
  """Reads a `MixtralForCausalLM` checkpoint directory (config.json + *.safetensors, either
  expert layout) as (model_fields, params), like `load_llama`; `model_fields['moe']` is a dict
  of the nested config. Raises `ConfigError` for a checkpoint the model cannot express, before
  reading any weight."""
  return load_checkpoint(path, MIXTRAL, param_dtype=param_dtype, scan_layers=scan_layers)


def save_mixtral(path: str | Path, params: Mapping[str, Any],
                 model: ModelConfig | Mapping[str, Any], dtype: Any = None, *,
                 extra_config: Mapping[str, Any] | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
  """Writes a softmax-routed `moe` model as a `MixtralForCausalLM` checkpoint (experts one
  tensor each, as transformers' save_pretrained writes them) that `from_pretrained` loads;
  arguments as `save_llama`."""
  return save_checkpoint(path, params, model, MIXTRAL, dtype=dtype, extra_config=extra_config,
                         max_shard_bytes=max_shard_bytes)

"""Llama (`LlamaForCausalLM`) checkpoints: the config mapping and the weight-name mapping.

Our `mha` + `rope` + `dense` model is Llama's architecture: pre-norm RMSNorm blocks, grouped
K/V heads, half-split RoPE, a SwiGLU MLP, no biases. Weights map one to one; torch `Linear`
stores [out, in], our kernels [in..., out...]. RoPE's scaling maps both ways: Llama 3.1-3.3's
`llama3` (`model.llama3_rope`), `linear` (`model.linear_rope_factor`) and YaRN (`model.yarn`),
each of which transformers' Llama runs (`ROPE_INIT_FUNCTIONS`).
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from efficientjax.attention import kv_head_variant
from efficientjax.attention.positions import rope_frequencies
from efficientjax.errors import ConfigError
from efficientjax.hf.safetensors_io import (Family, Params, Redundant, TensorRule, load_checkpoint,
                                            max_positions, refuse_if, register, require,
                                            rope_config, rope_fields, save_checkpoint)
from efficientjax.hf.writer import DEFAULT_MAX_SHARD_BYTES
from efficientjax.model import ModelConfig

# transformers' LlamaConfig defaults, for keys an older config.json leaves out.
_DEFAULT_RMS_NORM_EPS = 1e-6
_DEFAULT_ROPE_THETA = 10000.0
_DEFAULT_MAX_POSITIONS = 2048


def fields_from_hf(hf: Mapping[str, Any], *, default_eps: float = _DEFAULT_RMS_NORM_EPS,
                   default_theta: float = _DEFAULT_ROPE_THETA) -> dict[str, Any]:
  """`config.json` -> our `model` fields, refusing what the model cannot compute.

  `default_eps` and `default_theta`: the rms_norm_eps and rope_theta a config.json without them
  means, its transformers config class's defaults (Llama's here; Mixtral's and Phi-3's differ).
  """
  act = hf.get('hidden_act', 'silu')
  refuse_if(act not in ('silu', 'swish'),
            f'hidden_act={act!r} is not supported: our dense FFN is SwiGLU (silu); use a '
            'checkpoint with hidden_act "silu"')
  for key in ('attention_bias', 'mlp_bias'):
    refuse_if(bool(hf.get(key, False)),
              f'{key}=true is not supported: our projections have no biases; use a checkpoint '
              f'with {key} false')
  refuse_if(hf.get('quantization_config') is not None,
            'quantized checkpoints (quantization_config set) are not supported for this family; '
            'load the bfloat16/float16/float32 checkpoint (the one quantised format read is '
            "DeepSeek-V3's block-wise fp8, by load_deepseek_v3)")
  rope = rope_fields(hf, default_theta)  # refuses what our RoPE cannot compute

  embed_dim = int(require(hf, 'hidden_size'))
  num_heads = int(require(hf, 'num_attention_heads'))
  num_kv_heads = int(hf.get('num_key_value_heads') or num_heads)
  refuse_if(num_heads % num_kv_heads != 0,
            f'num_attention_heads={num_heads} is not a multiple of '
            f'num_key_value_heads={num_kv_heads}; the checkpoint config is inconsistent')
  # Newer configs carry head_dim explicitly (and it may differ from hidden_size / heads).
  head_dim = hf.get('head_dim')
  if head_dim is None:
    refuse_if(embed_dim % num_heads != 0,
              f'hidden_size={embed_dim} is not divisible by num_attention_heads={num_heads} and '
              'config.json has no head_dim; add head_dim to config.json')
    head_dim = embed_dim // num_heads
  head_dim = int(head_dim)
  refuse_if(head_dim % 2 != 0, f'head_dim={head_dim} is odd; RoPE rotates pairs of features, so '
            'it needs an even head_dim')
  return dict(
      vocab_size=int(require(hf, 'vocab_size')),
      embed_dim=embed_dim,
      num_layers=int(require(hf, 'num_hidden_layers')),
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      mlp_dim=int(require(hf, 'intermediate_size')),
      **rope,
      norm_eps=float(hf.get('rms_norm_eps', default_eps)),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      attention=kv_head_variant(num_heads, num_kv_heads),
      position='rope',
      ffn='dense',
  )


# What a Llama export fixes besides a K/V-head-family attention (`refuse_inexpressible`); RoPE's
# scalings (YaRN, llama3, linear) are all expressible, transformers' Llama runs each. The other
# Llama-style families start from these, dropping what they express (Mistral: the window).
LLAMA_FIELDS = {'position': 'rope', 'ffn': 'dense', 'qkv_bias': False, 'qk_norm': False,
                'sliding_window': None}


def refuse_inexpressible(cfg: ModelConfig, architecture: str, fields: Mapping[str, Any],
                         hints: Mapping[str, str] | None = None) -> None:
  """Raises a `ConfigError` for the first thing `architecture` cannot express: an attention
  outside the K/V-head family (mha/gqa/mqa), or a field of `cfg` ('yarn.factor' for a nested
  one) that differs from its value in `fields`. `hints` add a sentence per field."""
  family = architecture.removesuffix('ForCausalLM')
  # Any name of the K/V-head family: the head counts are what the export writes.
  wants = {'attention': cfg.attention if cfg.attention in ('mha', 'gqa', 'mqa') else 'mha',
           **fields}
  for field, want in wants.items():
    value = cfg
    for part in field.split('.'):
      value = getattr(value, part)
    if value != want:
      hint = (hints or {}).get(field, '')
      raise ConfigError(f'model.{field}', f'{value!r} has no {architecture} equivalent; a '
                        f'{family} export needs model.{field}={want!r}{hint}')


def decoder_config(cfg: ModelConfig) -> dict[str, Any]:
  """The `config.json` keys Llama-style decoders share (Llama, Mistral, Mixtral, Qwen2, Qwen3,
  Qwen-MoE, Phi-3), RoPE's included (rope_theta / rope_parameters / rope_scaling)."""
  return dict(
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.embed_dim,
      intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim,
      hidden_act='silu',
      rms_norm_eps=cfg.norm_eps,
      attention_dropout=0.0,
      tie_word_embeddings=cfg.tie_embeddings,
      initializer_range=cfg.init_std,
      use_cache=True,
      **rope_config(cfg),
  )


def hf_from_config(cfg: ModelConfig) -> dict[str, Any]:
  """Our config -> `config.json` keys of a `LlamaConfig`, refusing what Llama cannot express."""
  refuse_inexpressible(cfg, 'LlamaForCausalLM', LLAMA_FIELDS,
                       hints={'qkv_bias': ' (Qwen2 has q/k/v biases: export with save_qwen2)',
                              'sliding_window': ' (Mistral has one window for every layer: '
                                                'export with save_mistral)'})
  return dict(
      **decoder_config(cfg),
      attention_bias=False,
      mlp_bias=False,
      max_position_embeddings=max_positions(cfg, _DEFAULT_MAX_POSITIONS),
      pretraining_tp=1,
  )


def _inv_freq(cfg: ModelConfig, read) -> np.ndarray:
  del read
  return rope_frequencies(cfg)[0]


def tensor_rules(cfg: ModelConfig) -> list[TensorRule | Redundant]:
  layer = 'model.layers.{layer}.'
  rules = [
      TensorRule('model.embed_tokens.weight', ('embed', 'embedding')),
      TensorRule(layer + 'input_layernorm.weight', ('attn_norm', 'scale')),
      TensorRule(layer + 'self_attn.q_proj.weight', ('attn', 'q', 'kernel'), linear_in_dims=1),
      TensorRule(layer + 'self_attn.k_proj.weight', ('attn', 'k', 'kernel'), linear_in_dims=1),
      TensorRule(layer + 'self_attn.v_proj.weight', ('attn', 'v', 'kernel'), linear_in_dims=1),
      TensorRule(layer + 'self_attn.o_proj.weight', ('attn', 'o', 'kernel'), linear_in_dims=2),
      TensorRule(layer + 'post_attention_layernorm.weight', ('mlp_norm', 'scale')),
      TensorRule(layer + 'mlp.gate_proj.weight', ('mlp', 'gate', 'kernel'), linear_in_dims=1),
      TensorRule(layer + 'mlp.up_proj.weight', ('mlp', 'up', 'kernel'), linear_in_dims=1),
      TensorRule(layer + 'mlp.down_proj.weight', ('mlp', 'down', 'kernel'), linear_in_dims=1),
      TensorRule('model.norm.weight', ('final_norm', 'scale')),
      # Older exports (e.g. Llama 2) saved RoPE's frequencies (scaled ones under a scaling); a
      # mismatch means a scaling the config does not state. rtol covers a bf16/fp16 buffer.
      Redundant(layer + 'self_attn.rotary_emb.inv_freq', _inv_freq, rtol=1e-2,
                hint="config.json's rope_scaling is missing or wrong for these weights"),
  ]
  if cfg.tie_embeddings:
    # Some exports keep the tied head's copy; it must be the embedding table itself.
    rules.append(Redundant('lm_head.weight', lambda cfg, read: read('model.embed_tokens.weight'),
                           hint='the head is not tied: set tie_word_embeddings false in '
                                'config.json'))
  else:
    rules.append(TensorRule('lm_head.weight', ('lm_head', 'kernel'), linear_in_dims=1))
  return rules


LLAMA = register(Family(
    name='Llama',
    model_types=('llama',),
    architecture='LlamaForCausalLM',
    fields_from_hf=fields_from_hf,
    hf_from_config=hf_from_config,
    tensor_rules=tensor_rules,
))


def load_llama(path: str | Path, param_dtype: Any = jnp.float32, scan_layers: bool = True
               ) -> tuple[dict[str, Any], Params]:
  """Reads a `LlamaForCausalLM` checkpoint directory (config.json + *.safetensors).

  Returns (model_fields, params): values for the run config's `model` section (dtype,
  param_dtype and scan_layers are the run's choice and not included), and the params tree to
  pass as `{'params': params}` to `Transformer.apply` — scanned `blocks` unless scan_layers=False
  (then `block_i`, for a model built with scan_layers=False). Raises `ConfigError` for a
  checkpoint the model cannot express, before reading any weight.
  """
  return load_checkpoint(path, LLAMA, param_dtype=param_dtype, scan_layers=scan_layers)


def save_llama(path: str | Path, params: Mapping[str, Any],
               model: ModelConfig | Mapping[str, Any], dtype: Any = None, *,
               extra_config: Mapping[str, Any] | None = None,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
  """Writes params as a `LlamaForCausalLM` checkpoint that transformers' `from_pretrained` loads.

  `params` may be scanned or per-layer; `model` is the `ModelConfig` or the `model` fields;
  `dtype` None keeps the params' dtype (a bit-exact round trip with `load_llama`);
  `extra_config` adds keys to config.json (bos/eos token ids, max_position_embeddings).
  """
  return save_checkpoint(path, params, model, LLAMA, dtype=dtype, extra_config=extra_config,
                         max_shard_bytes=max_shard_bytes)

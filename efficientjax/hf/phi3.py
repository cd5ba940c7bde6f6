"""Phi-3 (`Phi3ForCausalLM`) checkpoints: Llama's maths in fused projections.

`model_type` phi3 covers Phi-3-mini/medium, Phi-3.5-mini and Phi-4 (14B). Its blocks are
Llama's (efficientjax.hf.llama): pre-norm RMSNorm, grouped K/V heads, half-split RoPE, a SwiGLU
MLP, no biases. What differs is how the weights are stored, and the config:

- `self_attn.qkv_proj.weight` [(H + 2·KV)·hd, d] is q_proj, k_proj and v_proj stacked on the
  output features, in that order (transformers slices q = [:H·hd], k = the next KV·hd, v the
  rest), so under GQA the three parts differ in size (`TensorRule.part`). Within each part the
  heads are in Llama's order (head-major, then head_dim), so nothing is permuted;
- `mlp.gate_up_proj.weight` [2f, d] is gate then up (transformers `chunk`s it in two);
- `sliding_window` applies to every layer (Phi3Model builds one sliding mask for all of them,
  keeping key j for query i when j > i - window): it maps to `model.sliding_window`, which
  counts keys the same way. Phi-3-mini-4k ships sliding_window=2047;
- defaults that differ from Llama's: rms_norm_eps 1e-5;
- accepted and dropped, as they change nothing at inference: `resid_pdrop`, `embd_pdrop` and
  `attention_dropout` (dropout), `pad_token_id` (only the embedding's padding_idx, which
  zeroes that row at init and stops its gradient in torch; the stored row is used as is),
  `original_max_position_embeddings` (read by LongRoPE only, and by generate() to drop the
  cache when LongRoPE switches factors).

Refused, before any weight is read:
- LongRoPE (`rope_scaling` of type longrope, or su / yarn, which Phi3Config renames longrope:
  Phi-3-*-128k, Phi-3.5-mini, Phi-4-mini). transformers picks short_factor or long_factor for a
  whole forward by its largest position (long beyond original_max_position_embeddings), and
  generate() recomputes the cache when a sequence crosses over; it also scales cos and sin by
  sqrt(1 + ln(factor) / ln(original)) at every length. Our RoPE has one set of frequencies per
  model, fixed by the config, so a LongRoPE checkpoint cannot be run exactly (dropping its
  rope_scaling would not be the same model even on short sequences: short_factor is not 1);
- `partial_rotary_factor` < 1 (Phi-4-mini rotates 3/4 of each head; ours rotates all of it);
- any other RoPE scaling (linear, llama3, ...), which Phi3Config refuses too; on export, our
  YaRN, llama3 and linear scalings, which have no Phi-3 spelling;
- biases (`attention_bias`/`mlp_bias` true), activations other than silu, quantised weights,
  as for Llama.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from efficientjax.hf import llama
from efficientjax.hf.safetensors_io import (Family, Params, Redundant, TensorRule, load_checkpoint,
                                            refuse_if, register, save_checkpoint, window_value)
from efficientjax.hf.writer import DEFAULT_MAX_SHARD_BYTES
from efficientjax.model import ModelConfig

# transformers' Phi3Config defaults, for keys a config.json leaves out.
_DEFAULT_RMS_NORM_EPS = 1e-5
_DEFAULT_MAX_POSITIONS = 4096
# RoPE types Phi3Config reads as LongRoPE ('su' and 'yarn' are its older names there).
_LONGROPE = ('longrope', 'su', 'yarn')


def _refuse_rope(hf: Mapping[str, Any]) -> None:
  """Refuses partial rotation and every RoPE scaling, LongRoPE with its reasons (before
  `rope_fields`, which would read Phi-3's 'yarn', LongRoPE here, as YaRN)."""
  # Read as Phi3Config reads them: rope_scaling (4.x) over rope_parameters (5.x).
  spec = dict(hf.get('rope_scaling') or hf.get('rope_parameters') or {})
  partial = spec.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))
  refuse_if(partial != 1.0, f'partial_rotary_factor={partial} (RoPE on part of each head, as '
            'Phi-4-mini) is not supported: our RoPE rotates the whole head_dim; use a checkpoint '
            'that rotates whole heads (Phi-3-mini/medium-4k, Phi-4)')
  kind = spec.get('rope_type', spec.get('type', 'default'))
  original = hf.get('original_max_position_embeddings',
                    spec.get('original_max_position_embeddings'))
  refuse_if(kind in _LONGROPE, f'RoPE scaling {kind!r} (LongRoPE, rope_scaling / '
            f'rope_parameters = {{rope_type: {kind!r}, ...}}) is not supported: transformers '
            'uses short_factor or long_factor frequencies depending on how long each forward is '
            f'(long beyond original_max_position_embeddings={original}) and scales cos/sin by '
            'sqrt(1 + ln(factor) / ln(original)) at every length, while our RoPE has one fixed '
            'set of frequencies; removing rope_scaling would change the model. Use a 4k-context '
            'checkpoint (Phi-3-mini-4k-instruct, Phi-3-medium-4k-instruct) or Phi-4, whose RoPE '
            'is plain')
  # Phi3Config itself refuses every other scaling (ours would otherwise read linear, llama3).
  refuse_if(kind != 'default', f'RoPE scaling {kind!r} is not a Phi-3 RoPE: Phi3ForCausalLM '
            'runs plain RoPE or LongRoPE only; fix rope_scaling / rope_parameters')


def fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """`config.json` -> our `model` fields, refusing what the model cannot compute."""
  _refuse_rope(hf)
  window = window_value(hf, None)  # Phi3Config's default: full attention
  # Llama's mapping (activation, biases, heads, head_dim, and RoPE, plain by now: its theta),
  # with Phi3Config's rms_norm_eps.
  fields = llama.fields_from_hf(hf, default_eps=_DEFAULT_RMS_NORM_EPS)
  if window is not None:
    fields['sliding_window'] = window
  return fields


# What a Phi3ForCausalLM computes besides a K/V-head-family attention and a window: plain RoPE
# (Phi3Config takes no scaling but LongRoPE, which we do not have).
PHI3_FIELDS = {**llama.LLAMA_FIELDS, 'yarn.factor': 1.0, 'llama3_rope.factor': 1.0,
               'linear_rope_factor': 1.0}
del PHI3_FIELDS['sliding_window']  # expressible
_NO_SCALING = ' (Phi3Config takes no RoPE scaling but LongRoPE; export with save_llama)'
_HINTS = {
    'yarn.factor': (' (Phi3Config reads a yarn rope_scaling as LongRoPE, so YaRN has no Phi-3 '
                    'spelling; export with save_llama)'),
    'llama3_rope.factor': _NO_SCALING,
    'linear_rope_factor': _NO_SCALING,
    'qkv_bias': ' (Phi-3 has no biases; Qwen2 has q/k/v biases: export with save_qwen2)',
}


def hf_from_config(cfg: ModelConfig) -> dict[str, Any]:
  """Our config -> `config.json` keys of a `Phi3Config`, refusing what Phi-3 cannot express."""
  llama.refuse_inexpressible(cfg, 'Phi3ForCausalLM', PHI3_FIELDS, hints=_HINTS)
  return dict(
      **llama.decoder_config(cfg),
      # RoPE has no length limit; transformers only uses these to size caches and warn (and
      # LongRoPE, which is off).
      max_position_embeddings=_DEFAULT_MAX_POSITIONS,
      original_max_position_embeddings=_DEFAULT_MAX_POSITIONS,
      sliding_window=cfg.sliding_window,
      resid_pdrop=0.0,
      embd_pdrop=0.0,
      # Phi3Config's defaults are Phi-3-mini's tokens (pad 32000 would not even fit a smaller
      # vocabulary's embedding); the tokenizer's ids go in with extra_config.
      pad_token_id=None,
      bos_token_id=None,
      eos_token_id=None,
  )


def tensor_rules(cfg: ModelConfig) -> list[TensorRule | Redundant]:
  # Llama's embeddings, norms, o_proj, down_proj and head; q/k/v and gate/up are fused here.
  fused = {('attn', name, 'kernel') for name in ('q', 'k', 'v')} | {
      ('mlp', name, 'kernel') for name in ('gate', 'up')}
  rules = [r for r in llama.tensor_rules(cfg)
           if not (isinstance(r, TensorRule) and r.param in fused)]
  layer = 'model.layers.{layer}.'
  rules += [TensorRule(layer + 'self_attn.qkv_proj.weight', ('attn', name, 'kernel'),
                       linear_in_dims=1, part=(i, 3)) for i, name in enumerate('qkv')]
  rules += [TensorRule(layer + 'mlp.gate_up_proj.weight', ('mlp', name, 'kernel'),
                       linear_in_dims=1, part=(i, 2)) for i, name in enumerate(('gate', 'up'))]
  return rules


PHI3 = register(Family(
    name='Phi-3',
    model_types=('phi3',),
    architecture='Phi3ForCausalLM',
    fields_from_hf=fields_from_hf,
    hf_from_config=hf_from_config,
    tensor_rules=tensor_rules,
))


def load_phi3(path: str | Path, param_dtype: Any = jnp.float32, scan_layers: bool = True
              ) -> tuple[dict[str, Any], Params]:
  """Reads a `Phi3ForCausalLM` checkpoint directory (config.json + *.safetensors: Phi-3-mini/
  medium-4k, Phi-4) as (model_fields, params), like `load_llama`; the fields include
  `sliding_window` where the checkpoint has one. Raises `ConfigError` for a checkpoint the model
  cannot express (LongRoPE, partial rotation), before reading any weight."""
  return load_checkpoint(path, PHI3, param_dtype=param_dtype, scan_layers=scan_layers)


def save_phi3(path: str | Path, params: Mapping[str, Any],
              model: ModelConfig | Mapping[str, Any], dtype: Any = None, *,
              extra_config: Mapping[str, Any] | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
  """Writes params as a `Phi3ForCausalLM` checkpoint (fused qkv_proj and gate_up_proj) that
  transformers' `from_pretrained` loads; arguments as `save_llama` (give the tokenizer's
  bos/eos/pad token ids in extra_config)."""
  return save_checkpoint(path, params, model, PHI3, dtype=dtype, extra_config=extra_config,
                         max_shard_bytes=max_shard_bytes)

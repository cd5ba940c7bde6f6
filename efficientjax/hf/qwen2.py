"""Qwen2 (`Qwen2ForCausalLM`) checkpoints: Llama with biases on the q, k and v projections.

Our `mha`/`gqa`/`mqa` + `rope` + `dense` model with `qkv_bias=True` is Qwen2's architecture (Qwen2,
Qwen2.5): Llama's blocks, plus a bias on q_proj, k_proj and v_proj (not o_proj). The config and
weight mappings are Llama's (efficientjax.hf.llama), RoPE's scalings included (YaRN, as Qwen2.5's
long-context configs use, llama3 and linear: `rope_fields`), with two additions:

- the biases: torch stores [heads * head_dim], ours are [heads, head_dim] (`Linear`'s `bias`);
- the sliding window. Qwen2 makes layers i >= max_window_layers sliding-window layers when
  use_sliding_window is true (or lists each layer's kind in layer_types); we have one window for
  every layer, so a checkpoint loads only when the window applies to all layers or to none.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from efficientjax.hf import llama
from efficientjax.hf.safetensors_io import (Family, Params, Redundant, TensorRule, load_checkpoint,
                                            max_positions, refuse_if, register, require,
                                            save_checkpoint, window_value)
from efficientjax.hf.writer import DEFAULT_MAX_SHARD_BYTES
from efficientjax.model import ModelConfig

# transformers' Qwen2Config defaults, for keys a config.json leaves out.
_DEFAULT_SLIDING_WINDOW = 4096
_DEFAULT_MAX_WINDOW_LAYERS = 28
_DEFAULT_MAX_POSITIONS = 32768
_LAYER_TYPES = ('full_attention', 'sliding_attention')


def sliding_window(hf: Mapping[str, Any]) -> int | None:
  """The window every layer uses, as transformers' Qwen2 decides it per layer (None: full
  attention), refusing a mix of windowed and full layers."""
  num_layers = int(require(hf, 'num_hidden_layers'))
  use = bool(hf.get('use_sliding_window', False))
  # Qwen2Config drops the window unless use_sliding_window is set (Qwen2-MoE's then saves 0).
  window = window_value(hf, _DEFAULT_SLIDING_WINDOW) if use else None
  layer_types = hf.get('layer_types')
  if layer_types is None:
    first = hf.get('max_window_layers', _DEFAULT_MAX_WINDOW_LAYERS)
    layer_types = ['sliding_attention' if window is not None and i >= first else 'full_attention'
                   for i in range(num_layers)]
  refuse_if(len(layer_types) != num_layers,
            f'layer_types lists {len(layer_types)} layers but num_hidden_layers={num_layers}; '
            'the checkpoint config is inconsistent')
  unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
  refuse_if(bool(unknown), f'layer_types {unknown} are not Qwen2 layer kinds '
            f'({", ".join(_LAYER_TYPES)})')
  sliding = [i for i, kind in enumerate(layer_types) if kind == 'sliding_attention']
  if not sliding:
    return None
  refuse_if(window is None, f'layer_types marks layers {sliding} as sliding_attention but '
            'use_sliding_window is false or sliding_window unset, which transformers cannot run '
            'either; fix config.json')
  refuse_if(len(sliding) != num_layers,
            f'a sliding window of {window} on layers {sliding} only (max_window_layers='
            f'{hf.get("max_window_layers", _DEFAULT_MAX_WINDOW_LAYERS)}, use_sliding_window=true) '
            'is not supported: our model has one window for every layer; use a config with '
            'use_sliding_window false, or max_window_layers 0 (every layer windowed)')
  return window


def fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """`config.json` -> our `model` fields, refusing what the model cannot compute."""
  window = sliding_window(hf)
  # Llama's mapping: activation, heads, head_dim, RoPE and its scaling.
  fields = llama.fields_from_hf(hf)
  fields['qkv_bias'] = True
  if window is not None:
    fields['sliding_window'] = window
  return fields


QWEN2_FIELDS = {**llama.LLAMA_FIELDS, 'qkv_bias': True}
del QWEN2_FIELDS['sliding_window']  # expressible


def window_config(cfg: ModelConfig) -> dict[str, Any]:
  """config.json's sliding-window keys for one window on every layer, or none (Qwen2, Qwen3)."""
  window = cfg.sliding_window
  return dict(
      use_sliding_window=window is not None,
      sliding_window=window,
      # Layers i >= max_window_layers are windowed: all of them or none.
      max_window_layers=0 if window is not None else cfg.num_layers,
      layer_types=[('sliding' if window is not None else 'full') + '_attention'] * cfg.num_layers,
  )


def hf_from_config(cfg: ModelConfig) -> dict[str, Any]:
  """Our config -> `config.json` keys of a `Qwen2Config`, refusing what Qwen2 cannot express."""
  llama.refuse_inexpressible(
      cfg, 'Qwen2ForCausalLM', QWEN2_FIELDS,
      hints={'qkv_bias': ' (Qwen2 always has q/k/v biases; without them export with save_llama)'})
  return dict(**llama.decoder_config(cfg),
              max_position_embeddings=max_positions(cfg, _DEFAULT_MAX_POSITIONS),
              **window_config(cfg))


def tensor_rules(cfg: ModelConfig) -> list[TensorRule | Redundant]:
  attn = 'model.layers.{layer}.self_attn.'
  return llama.tensor_rules(cfg) + [
      TensorRule(attn + f'{name}_proj.bias', ('attn', name, 'bias'), linear_in_dims=0)
      for name in ('q', 'k', 'v')]


QWEN2 = register(Family(
    name='Qwen2',
    model_types=('qwen2',),
    architecture='Qwen2ForCausalLM',
    fields_from_hf=fields_from_hf,
    hf_from_config=hf_from_config,
    tensor_rules=tensor_rules,
))


def load_qwen2(path: str | Path, param_dtype: Any = jnp.float32, scan_layers: bool = True
               ) -> tuple[dict[str, Any], Params]:
  """Reads a `Qwen2ForCausalLM` checkpoint directory (config.json + *.safetensors).

  Returns (model_fields, params) as `load_llama` does; the fields include `qkv_bias=True` and,
  where the checkpoint has them, RoPE's scaling (`yarn`, `llama3_rope`, `linear_rope_factor`)
  and `sliding_window`. Raises `ConfigError` for a checkpoint the model cannot express (sliding
  windows on some layers only, length-dependent RoPE scalings, ...), before reading any
  weight.
  """
  return load_checkpoint(path, QWEN2, param_dtype=param_dtype, scan_layers=scan_layers)


def save_qwen2(path: str | Path, params: Mapping[str, Any],
               model: ModelConfig | Mapping[str, Any], dtype: Any = None, *,
               extra_config: Mapping[str, Any] | None = None,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
  """Writes params (a model with `qkv_bias=True`) as a `Qwen2ForCausalLM` checkpoint that
  transformers' `from_pretrained` loads; arguments as `save_llama`."""
  return save_checkpoint(path, params, model, QWEN2, dtype=dtype, extra_config=extra_config,
                         max_shard_bytes=max_shard_bytes)


"""Mistral (`MistralForCausalLM`) checkpoints: Llama's weights, with one sliding window.

Our `mha`/`gqa`/`mqa` + `rope` + `dense` model is Mistral's architecture (Mistral 7B, Nemo,
Small): Llama's blocks and tensor names (efficientjax.hf.llama), and a config that differs in
three ways:

- `sliding_window` applies to every layer when set (Mistral 7B v0.1's 4096; later releases
  write null: full attention) and maps to `model.sliding_window`, with the same meaning (keys
  per query, itself included: transformers keeps key j for query i when j > i - window). A key
  the config leaves out is MistralConfig's default, 4096.
- transformers' Mistral ignores `layer_types` (it warns, and windows every layer), so a
  checkpoint whose `layer_types` say something else (Ministral's alternating windows) was made
  for another model and is refused, as is one whose kinds disagree with the window.
- `head_dim` may differ from hidden_size / num_attention_heads (Nemo: 128 against 5120 / 32),
  which our `model.head_dim` expresses.

RoPE (plain, YaRN, llama3, linear) maps as for Llama; `attention_dropout` is a training-time
setting that does not change what the checkpoint computes, and is accepted and dropped (our model
has no attention dropout), as Mixtral does.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from efficientjax.hf import llama
from efficientjax.hf.safetensors_io import (Family, Params, load_checkpoint, max_positions,
                                            refuse_if, register, require, save_checkpoint,
                                            window_value)
from efficientjax.hf.writer import DEFAULT_MAX_SHARD_BYTES
from efficientjax.model import ModelConfig

# transformers' MistralConfig defaults, for keys a config.json leaves out.
_DEFAULT_SLIDING_WINDOW = 4096
_DEFAULT_MAX_POSITIONS = 4096 * 32


def sliding_window(hf: Mapping[str, Any]) -> int | None:
  """The window every layer uses, as transformers' Mistral applies it (None: full attention),
  refusing `layer_types` that say otherwise."""
  window = window_value(hf, _DEFAULT_SLIDING_WINDOW)
  layer_types = hf.get('layer_types')
  if layer_types is not None:
    num_layers = int(require(hf, 'num_hidden_layers'))
    kind = 'full_attention' if window is None else 'sliding_attention'
    refuse_if(list(layer_types) != [kind] * num_layers,
              f'layer_types {list(layer_types)} differ from what transformers\' Mistral computes '
              f'(sliding_window={window} on every one of the {num_layers} layers: all '
              f'{kind}): it ignores layer_types, so the checkpoint was made for another model '
              '(Ministral alternates windowed and full layers); our model has one window for '
              'every layer')
  return window


def fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """`config.json` -> our `model` fields, refusing what the model cannot compute."""
  window = sliding_window(hf)
  # Llama's mapping: activation, biases, heads, head_dim, RoPE and its scaling.
  fields = llama.fields_from_hf(hf)
  if window is not None:
    fields['sliding_window'] = window
  return fields


# What a MistralForCausalLM computes besides a K/V-head-family attention, a window and RoPE.
MISTRAL_FIELDS = {k: v for k, v in llama.LLAMA_FIELDS.items() if k != 'sliding_window'}


def hf_from_config(cfg: ModelConfig) -> dict[str, Any]:
  """Our config -> `config.json` keys of a `MistralConfig`, refusing what Mistral cannot
  express."""
  llama.refuse_inexpressible(
      cfg, 'MistralForCausalLM', MISTRAL_FIELDS,
      hints={'qkv_bias': ' (Qwen2 has q/k/v biases: export with save_qwen2)'})
  return dict(
      **llama.decoder_config(cfg),
      max_position_embeddings=max_positions(cfg, _DEFAULT_MAX_POSITIONS),
      # null is full attention; MistralConfig's default (4096) applies only to a missing key.
      sliding_window=cfg.sliding_window,
  )


MISTRAL = register(Family(
    name='Mistral',
    model_types=('mistral',),
    architecture='MistralForCausalLM',
    fields_from_hf=fields_from_hf,
    hf_from_config=hf_from_config,
    # The same tensors as Llama's, under the same names.
    tensor_rules=llama.tensor_rules,
))


def load_mistral(path: str | Path, param_dtype: Any = jnp.float32, scan_layers: bool = True
                 ) -> tuple[dict[str, Any], Params]:
  """Reads a `MistralForCausalLM` checkpoint directory (config.json + *.safetensors).

  Returns (model_fields, params) as `load_llama` does; the fields include `sliding_window`
  where the checkpoint sets one. Raises `ConfigError` for a checkpoint the model cannot express
  (layer_types that disagree with the window, length-dependent RoPE scalings, ...), before
  reading any weight.
  """
  return load_checkpoint(path, MISTRAL, param_dtype=param_dtype, scan_layers=scan_layers)


def save_mistral(path: str | Path, params: Mapping[str, Any],
                 model: ModelConfig | Mapping[str, Any], dtype: Any = None, *,
                 extra_config: Mapping[str, Any] | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
  """Writes params as a `MistralForCausalLM` checkpoint that transformers' `from_pretrained`
  loads (`model.sliding_window` as its window; None writes null, full attention); arguments as
  `save_llama`."""
  return save_checkpoint(path, params, model, MISTRAL, dtype=dtype, extra_config=extra_config,
                         max_shard_bytes=max_shard_bytes)

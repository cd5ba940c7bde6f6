"""Qwen3 (`Qwen3ForCausalLM`) checkpoints: Llama with an RMSNorm on each query and key head.

Our `mha`/`gqa`/`mqa` + `rope` + `dense` model with `qk_norm=True` is Qwen3's architecture:
Llama's blocks, no biases, and `self_attn.q_norm` / `k_norm`, one RMSNorm weight [head_dim]
each, shared by the heads, applied to every head's query and key after the projection and
before RoPE, with the model's rms_norm_eps (ours: `attn/q_norm`, `attn/k_norm`, the same place).
The config and weight mappings are Llama's (efficientjax.hf.llama) with three more:

- head_dim: Qwen3 states it, and it may differ from hidden / heads (the small Qwen3 models
  have 128-wide heads on a narrower model); transformers' Qwen3Config defaults it to 128, not
  hidden / heads, when config.json leaves it out, and so do we;
- RoPE's scaling (YaRN, llama3, linear: `rope_fields`) and the sliding window, read and
  written as for Qwen2 (efficientjax.hf.qwen2): one window on every layer or none;
- attention_bias=true is refused: Qwen3 then puts biases on q, k, v and o, and our o has none.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from efficientjax.hf import llama, qwen2
from efficientjax.hf.safetensors_io import (Family, Params, Redundant, TensorRule, load_checkpoint,
                                            max_positions, register, save_checkpoint)
from efficientjax.hf.writer import DEFAULT_MAX_SHARD_BYTES
from efficientjax.model import ModelConfig

# transformers' Qwen3Config defaults, for keys a config.json leaves out.
_DEFAULT_HEAD_DIM = 128
_DEFAULT_MAX_POSITIONS = 32768


def attention_fields(hf: Mapping[str, Any], default_head_dim: int | None = None
                     ) -> dict[str, Any]:
  """Qwen3's attention (Llama's blocks with q/k norm, RoPE as `rope_fields` reads it) as our
  fields, without the window, refusing what the model cannot compute; Qwen3-MoE's is the same.
  `default_head_dim`: the head_dim a config.json without one means (None: hidden / heads)."""
  # Llama's mapping (activation, biases, heads, RoPE and its scaling), with Qwen3's head_dim.
  if hf.get('head_dim') is None and default_head_dim is not None:
    hf = {**hf, 'head_dim': default_head_dim}
  fields = llama.fields_from_hf(hf)
  fields['qk_norm'] = True
  return fields


def fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """`config.json` -> our `model` fields, refusing what the model cannot compute."""
  fields = attention_fields(hf, _DEFAULT_HEAD_DIM)
  window = qwen2.sliding_window(hf)  # Qwen3Config decides the windowed layers as Qwen2Config
  if window is not None:
    fields['sliding_window'] = window
  return fields


QWEN3_FIELDS = {**llama.LLAMA_FIELDS, 'qk_norm': True}
del QWEN3_FIELDS['sliding_window']  # expressible
HINTS = {
    'qk_norm': ' (without q/k norm export with save_llama, or save_qwen2 with q/k/v biases)',
    'qkv_bias': (' (Qwen3 has no q/k/v biases; its attention_bias would put one on o_proj too; '
                 'export with save_qwen2)'),
}


def hf_from_config(cfg: ModelConfig) -> dict[str, Any]:
  """Our config -> `config.json` keys of a `Qwen3Config`, refusing what Qwen3 cannot express."""
  llama.refuse_inexpressible(cfg, 'Qwen3ForCausalLM', QWEN3_FIELDS, hints=HINTS)
  return dict(**llama.decoder_config(cfg), attention_bias=False,
              max_position_embeddings=max_positions(cfg, _DEFAULT_MAX_POSITIONS),
              **qwen2.window_config(cfg))


def qk_norm_rules() -> list[TensorRule]:
  attn = 'model.layers.{layer}.self_attn.'
  return [TensorRule(attn + f'{name}_norm.weight', ('attn', f'{name}_norm', 'scale'))
          for name in ('q', 'k')]


def tensor_rules(cfg: ModelConfig) -> list[TensorRule | Redundant]:
  return llama.tensor_rules(cfg) + qk_norm_rules()


QWEN3 = register(Family(
    name='Qwen3',
    model_types=('qwen3',),
    architecture='Qwen3ForCausalLM',
    fields_from_hf=fields_from_hf,
    hf_from_config=hf_from_config,
    tensor_rules=tensor_rules,
))


def load_qwen3(path: str | Path, param_dtype: Any = jnp.float32, scan_layers: bool = True
               ) -> tuple[dict[str, Any], Params]:
  """Reads a `Qwen3ForCausalLM` checkpoint directory (config.json + *.safetensors).

  Returns (model_fields, params) as `load_llama` does; the fields include `qk_norm=True` and,
  where the checkpoint has them, RoPE's scaling and `sliding_window`. Raises `ConfigError` for a
  checkpoint the model cannot express (attention biases, sliding windows on some layers only,
  length-dependent RoPE scalings, ...), before reading any weight.
  """
  return load_checkpoint(path, QWEN3, param_dtype=param_dtype, scan_layers=scan_layers)


def save_qwen3(path: str | Path, params: Mapping[str, Any],
               model: ModelConfig | Mapping[str, Any], dtype: Any = None, *,
               extra_config: Mapping[str, Any] | None = None,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
  """Writes params (a model with `qk_norm=True`, no biases) as a `Qwen3ForCausalLM` checkpoint
  that transformers' `from_pretrained` loads; arguments as `save_llama`."""
  return save_checkpoint(path, params, model, QWEN3, dtype=dtype, extra_config=extra_config,
                         max_shard_bytes=max_shard_bytes)

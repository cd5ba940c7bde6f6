"""Hugging Face safetensors checkpoints in and out, shared by every model family.

A family (`llama.py`, ...) is a `Family`: how its `config.json` maps onto our `model` fields and
back, and one rule per checkpoint tensor. The rest — finding the files, checking every tensor's
name, shape and dtype before any weight is read, converting layouts, (un)scanning the layers and
writing — lives here, so adding a family is a small file.

Mixture-of-Experts checkpoints store each expert's matrices either one tensor per expert
(`...experts.{expert}.w1.weight`, what transformers' `save_pretrained` writes) or fused over the
experts (`...experts.gate_up_proj` [E, 2f, d], what transformers' modules hold); a `TensorRule`
can stack the former (`{expert}`) or split the latter (`batch_dims`, `part`), and `OneOf` lets
a family accept both.

Besides weights a checkpoint may hold non-trained model state (DeepSeek-V3's routing bias): a
rule with `collection='moe_state'` maps it, `load_checkpoint(..., collections=True)` returns it
in the variables dict and `save_checkpoint` takes it from one. Block-wise fp8 weights
(quantization_config quant_method 'fp8', DeepSeek-V3's release) are dequantised on load for any
family that accepts the quantization_config; a family's `skipped` tensors (V3's multi-token-
prediction layers) are left unread with a warning.
"""

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
# Registers bfloat16 (and the float8s) with numpy by name: safetensors' numpy reader looks dtypes
# up by name, so without this a bf16 checkpoint fails with "data type 'bfloat16' not understood".
import ml_dtypes
import numpy as np
import safetensors

from efficientjax.attention.positions import rope_scaling, yarn_attention_factor
from efficientjax.errors import ConfigError
from efficientjax.hf import writer
from efficientjax.model import ModelConfig, Transformer, layer_stacks
from efficientjax.moe.layer import STATE
from efficientjax.registry import Registry

FIELD = 'model.hf'
CONFIG_FILE = 'config.json'
WEIGHTS_FILE = writer.WEIGHTS_FILE
INDEX_FILE = writer.INDEX_FILE
# Storage dtypes of plain weights; anything else (I8, U8, F8_*) is a quantised format we cannot map.
FLOAT_DTYPES = ('F64', 'F32', 'F16', 'BF16')
# Weight dtypes an export may use; the names are the same in jnp and torch.
EXPORT_DTYPES = ('float32', 'bfloat16', 'float16')
# Non-trained collections a checkpoint may hold (efficientjax.train.state keeps the same ones):
# the auxiliary-loss-free routing bias. Flat per-layer paths put the collection first.
STATE_COLLECTIONS = (STATE,)
# Block-wise fp8 weights (DeepSeek-V3's release): each `X` stored as float8 beside the float
# `X_scale_inv` [..., ceil(out/b0), ceil(in/b1)]; the weight is X · scale, per b0 x b1 block.
# numpy has no float8 by name, so these are read from their bytes as ml_dtypes' types.
FP8_DTYPES = {'F8_E4M3': ml_dtypes.float8_e4m3fn}
FP8_SCALE_SUFFIX = '_scale_inv'

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TensorRule:
  """One checkpoint tensor and the parameter it becomes.

  Attributes:
    hf_name: the tensor's name in the checkpoint; `{layer}` in it marks a per-layer tensor, and
      `{expert}` one tensor per expert: the param's axis 0 indexes the experts and each tensor
      is one slice of it, converted as the other attributes say (Mixtral's
      `experts.{expert}.w1.weight` [f, d] -> our gate [E, d, f]).
    param: our param path, relative to the layer's block for per-layer tensors, else to the root.
    linear_in_dims: for a torch `Linear` weight (stored [out, in]), how many leading dims of our
      kernel ([in..., out...]) are inputs; None for tensors stored in our layout already.
    permute: for features whose order differs by a fixed permutation (DeepSeek's interleaved
      RoPE pairs against our half-split ones): the param's last axis, in our layout, takes the
      checkpoint's features in this order (ours[..., i] = theirs[..., permute[i]]); export
      applies the inverse. None keeps the order.
    batch_dims: leading axes the tensor and the param share, kept as they are (the experts of a
      fused [E, out, in] tensor); `linear_in_dims` applies to the axes after them.
    part: (i, n): the param is the i-th of n consecutive slices of the tensor's features, for
      one tensor holding several params (transformers' fused `gate_up_proj` [E, 2f, d] is gate
      then up along its output features; Phi-3's `qkv_proj` [(H + 2·KV)·hd, d] is q, k, then
      v). The features are a `Linear`'s output features (our kernel's output dims flattened),
      else our layout's last axis; each slice is as wide as its param there, so the slices may
      differ (q against k and v under GQA). Export concatenates the n rules that share the
      `hf_name`, in order of i. None: the param is the whole tensor.
    ffn: per-layer tensors only: the rule applies to the layers whose feed-forward is this kind
      (`efficientjax.model.layer_stacks`; DeepSeek's first layers are dense, the rest MoE).
      None: every layer.
    collection: the variable collection `param` lives in: 'params', or a non-trained one kept
      with the train state (`STATE_COLLECTIONS`: DeepSeek-V3's routing bias is
      `moe_state`/.../`mlp`/`bias`).
  """
  hf_name: str
  param: tuple[str, ...]
  linear_in_dims: int | None = None
  permute: tuple[int, ...] | None = None
  batch_dims: int = 0
  part: tuple[int, int] | None = None
  ffn: str | None = None
  collection: str = 'params'


@dataclasses.dataclass(frozen=True)
class OneOf:
  """The same params stored in one of several layouts (MoE experts one tensor each, or fused).

  Import takes, layer by layer, the first layout whose tensors are all in the checkpoint (or,
  when none is complete, the most complete one, to name what is missing); tensors of the other
  layouts then have no place and are refused, so a checkpoint cannot mix two for one param.
  Export writes the first layout.
  """
  layouts: tuple[tuple[TensorRule, ...], ...]


@dataclasses.dataclass(frozen=True)
class Redundant:
  """A tensor some checkpoints carry that holds nothing the params do not (a tied head's copy,
  RoPE's inv_freq buffer): it is checked against what it must equal, then dropped.

  `expected(config, read)` gives the value it must have; `read(name)` reads another checkpoint
  tensor. Exact unless `rtol` is set. `hint`, when set, says how to fix a mismatch (added to
  the refusal).
  """
  hf_name: str
  expected: Callable[[ModelConfig, Callable[[str], np.ndarray]], np.ndarray]
  rtol: float | None = None
  hint: str | None = None


@dataclasses.dataclass(frozen=True)
class Family:
  """A transformers architecture: its config mapping and its weight-name mapping.

  Attributes:
    name: what the user calls it, for messages.
    model_types: the `model_type` values in `config.json` this family reads.
    architecture: the transformers class written into `config.json` and expected in one.
    fields_from_hf: `config.json` -> our `model` fields; raises `ConfigError` for anything the
      model cannot express, before any weight is read.
    hf_from_config: our resolved `ModelConfig` -> `config.json` (without `architectures`,
      `model_type` and `dtype`, which are filled in here); raises `ConfigError` likewise.
    tensor_rules: every tensor of the checkpoint, given the config.
    skipped: `config.json` -> {regex: reason}: tensors the model deliberately does without
      (DeepSeek-V3's multi-token-prediction layers). Those no rule maps whose names match a
      regex (fullmatch) are not read, and the loader warns once per reason; any other unknown
      tensor is still refused.
  """
  name: str
  model_types: tuple[str, ...]
  architecture: str
  fields_from_hf: Callable[[Mapping[str, Any]], dict[str, Any]]
  hf_from_config: Callable[[ModelConfig], dict[str, Any]]
  tensor_rules: Callable[[ModelConfig], Sequence[TensorRule | OneOf | Redundant]]
  skipped: Callable[[Mapping[str, Any]], Mapping[str, str]] = lambda hf: {}


# Keyed by `model_type`, so an unknown one fails listing the ones we read.
FAMILIES: Registry[Family] = Registry(FIELD)


def register(family: Family) -> Family:
  for model_type in family.model_types:
    FAMILIES.register(model_type)(family)
  return family


# --------------------------------------------------------------------------------------------
# config.json helpers shared by families.


def read_hf_config(path: str | Path) -> dict[str, Any]:
  """The checkpoint directory's `config.json`, or a `ConfigError` saying what is missing."""
  path = Path(path)
  if not path.is_dir():
    raise ConfigError(FIELD, f'{str(path)!r} is not a directory; give the directory that holds '
                      f'{CONFIG_FILE} and the *.safetensors files (e.g. from save_pretrained)')
  config_file = path / CONFIG_FILE
  if not config_file.is_file():
    raise ConfigError(FIELD, f'{str(config_file)!r} is missing; a Hugging Face checkpoint '
                      'directory needs the config.json written by save_pretrained')
  try:
    with open(config_file) as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(FIELD, f'cannot read {str(config_file)!r}: {e}') from e
  if not isinstance(hf, dict):
    raise ConfigError(FIELD, f'{str(config_file)!r} is not a JSON object')
  return hf


def require(hf: Mapping[str, Any], key: str) -> Any:
  if hf.get(key) is None:
    raise ConfigError(FIELD, f'config.json has no {key!r}; it is required to build the model')
  return hf[key]


def refuse_if(condition: bool, message: str) -> None:
  if condition:
    raise ConfigError(FIELD, message)


def window_value(hf: Mapping[str, Any], default: int | None) -> int | None:
  """config.json's `sliding_window` (keys per query, itself included), `default` when the key
  is absent, None for null (full attention). Refuses what is not a window, as transformers'
  configs do: `true` (a bool, not a window of 1), other non-integers, and values below 1."""
  window = hf.get('sliding_window', default)
  refuse_if(window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                    or window < 1),
            f'sliding_window={window!r} in config.json is not a window: set it to the number of '
            'keys each query attends to (an integer, 1 or more), or to null for full attention')
  return window


# RoPE scalings refused by name, with why: each makes a position's rotation depend on how long
# the input is, where ours is one fixed function of the position (one compiled step serves
# every length, and cached keys keep the rotation they were cached with).
_LENGTH_DEPENDENT_ROPE = {
    'dynamic': 'dynamic NTK scaling recomputes every frequency from the input\'s length once it '
               'runs past max_position_embeddings',
    'longrope': 'LongRoPE (Phi-3) switches from its short_factor to its long_factor frequencies '
                'once the input runs past original_max_position_embeddings',
}
# What we read, as named in messages.
_ROPE_SCALINGS = {'yarn': 'YaRN', 'llama3': 'llama3', 'linear': 'linear'}


def rope_fields(hf: Mapping[str, Any], default_theta: float = 10000.0) -> dict[str, Any]:
  """RoPE's base and its frequency scaling as our fields: {'rope_theta'}, plus `yarn` (a dict)
  under YaRN, `llama3_rope` (a dict) under Llama 3.1's `llama3`, `linear_rope_factor` under
  `linear` (position interpolation).

  Read as transformers 5.x reads config.json: a 4.x `rope_scaling` dict takes precedence over
  `rope_parameters`, a `rope_theta` inside it over the top-level key; the original context of
  YaRN and llama3 is a top-level `original_max_position_embeddings`, else the dict's, else
  `max_position_embeddings`; YaRN's optional keys take transformers' values (beta_fast/beta_slow:
  32/1 when unset or 0; mscale/mscale_all_dim: used only when both are set; truncate: True).
  `dynamic` and `longrope` (length-dependent), other scalings, per-layer-type RoPE and partial
  rotation are refused.
  """
  spec = dict(hf.get('rope_scaling') or hf.get('rope_parameters') or {})
  nested = sorted(set(spec) & set(hf.get('layer_types') or ()))
  refuse_if(bool(nested), f'RoPE parameters per layer type ({", ".join(nested)}) are not '
            'supported; every layer of our model rotates alike')
  kind = spec.get('rope_type', spec.get('type', 'default'))
  supported = 'use a checkpoint with plain RoPE or YaRN, llama3 or linear scaling'
  if kind in _LENGTH_DEPENDENT_ROPE:
    raise ConfigError(FIELD, f'RoPE scaling {kind!r} is not supported: '
                      f'{_LENGTH_DEPENDENT_ROPE[kind]}, so a position\'s rotation depends on the '
                      'length of the input, and ours is one fixed function of the position (one '
                      'compiled step for every length, cached keys keep their rotation); '
                      f'{supported}')
  refuse_if(kind != 'default' and kind not in _ROPE_SCALINGS,
            f'RoPE scaling {kind!r} is not supported (rope_scaling / rope_parameters = {spec}); '
            f'{supported}')
  partial = spec.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))
  refuse_if(partial != 1.0, f'partial_rotary_factor={partial} (RoPE on part of each head) is '
            'not supported; our RoPE rotates the whole head_dim')
  fields: dict[str, Any] = {
      'rope_theta': float(spec.get('rope_theta', hf.get('rope_theta', default_theta)))}
  if kind == 'default':
    return fields
  name, factor = _ROPE_SCALINGS[kind], spec.get('factor')
  # transformers 5.x refuses it too (for YaRN its compute function would derive it).
  refuse_if(factor is None, f'{name} without a factor is not supported; set the factor in '
            'rope_parameters')
  refuse_if(factor < 1.0, f'{name} factor={factor} is below 1; the scaling extends a context, '
            'it does not shrink it')
  if kind == 'linear':
    fields['linear_rope_factor'] = float(factor)
    return fields
  original = (hf.get('original_max_position_embeddings')
              or spec.get('original_max_position_embeddings')
              or hf.get('max_position_embeddings'))
  refuse_if(original is None, f'{name} needs original_max_position_embeddings (the pretraining '
            'context) in rope_parameters, or max_position_embeddings')
  if kind == 'llama3':
    missing = [k for k in ('low_freq_factor', 'high_freq_factor') if spec.get(k) is None]
    refuse_if(bool(missing), f'llama3 RoPE scaling needs {" and ".join(missing)} in '
              'rope_parameters (transformers requires them too)')
    low, high = float(spec['low_freq_factor']), float(spec['high_freq_factor'])
    # transformers only warns, then divides by zero (equal) or turns the band inside out.
    refuse_if(not high > low > 0, f'llama3 high_freq_factor={high} and low_freq_factor={low} '
              'need high > low > 0 (original_max_position_embeddings over each bounds the '
              'smoothed band); fix rope_parameters')
    fields['llama3_rope'] = dict(factor=float(factor), low_freq_factor=low,
                                 high_freq_factor=high, original_max_len=int(original))
    return fields
  both = bool(spec.get('mscale') and spec.get('mscale_all_dim'))
  yarn = dict(factor=float(factor), original_max_len=int(original),
              beta_fast=float(spec.get('beta_fast') or 32.0),
              beta_slow=float(spec.get('beta_slow') or 1.0),
              mscale=float(spec['mscale']) if both else 1.0,
              mscale_all_dim=float(spec['mscale_all_dim']) if both else 0.0,
              truncate=bool(spec.get('truncate', True)))
  given = spec.get('attention_factor')
  derived = yarn_attention_factor(yarn['factor'], yarn['mscale'], yarn['mscale_all_dim'])
  refuse_if(given is not None and not math.isclose(given, derived, rel_tol=1e-9),
            f'YaRN attention_factor={given} differs from the {derived} that factor, mscale and '
            'mscale_all_dim give; an explicit attention_factor is not supported')
  fields['yarn'] = yarn
  return fields


def rope_config(cfg: ModelConfig) -> dict[str, Any]:
  """config.json's RoPE keys for `cfg` (plain, YaRN, llama3 or linear), in both spellings:
  transformers 5.x reads `rope_parameters`, 4.x `rope_theta` and `rope_scaling`."""
  rope: dict[str, Any] = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
  scaling = rope_scaling(cfg)
  yarn, llama3 = cfg.yarn, cfg.llama3_rope
  if scaling == 'yarn':
    rope = {'rope_type': 'yarn', 'rope_theta': cfg.rope_theta, 'factor': yarn.factor,
            'original_max_position_embeddings': yarn.original_max_len,
            'beta_fast': yarn.beta_fast, 'beta_slow': yarn.beta_slow, 'mscale': yarn.mscale,
            'mscale_all_dim': yarn.mscale_all_dim, 'truncate': yarn.truncate}
  elif scaling == 'llama3':
    rope = {'rope_type': 'llama3', 'rope_theta': cfg.rope_theta, 'factor': llama3.factor,
            'low_freq_factor': llama3.low_freq_factor,
            'high_freq_factor': llama3.high_freq_factor,
            'original_max_position_embeddings': llama3.original_max_len}
  elif scaling == 'linear':
    rope = {'rope_type': 'linear', 'rope_theta': cfg.rope_theta,
            'factor': cfg.linear_rope_factor}
  return dict(rope_theta=cfg.rope_theta, rope_scaling=None if scaling is None else dict(rope),
              rope_parameters=rope)


def max_positions(cfg: ModelConfig, default: int) -> int:
  """config.json's `max_position_embeddings` for `cfg`: the scaled context, original context x
  factor, under YaRN or llama3 (transformers warns when YaRN's factor disagrees with the two
  lengths, and when llama3's original context is not below it), else `default` (RoPE itself has
  no length limit; transformers only sizes caches by it)."""
  scaling = rope_scaling(cfg)
  if scaling == 'yarn':
    return round(cfg.yarn.original_max_len * cfg.yarn.factor)
  if scaling == 'llama3':
    return round(cfg.llama3_rope.original_max_len * cfg.llama3_rope.factor)
  return default


def hf_dtype_name(dtype: Any) -> str:
  name = jnp.dtype(dtype).name
  if name not in EXPORT_DTYPES:
    raise ConfigError(FIELD, f'cannot export weights as {name}; use one of '
                      f'{", ".join(EXPORT_DTYPES)}')
  return name


# --------------------------------------------------------------------------------------------
# Reading.


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
  file: Path
  shape: tuple[int, ...]
  dtype: str  # safetensors' name: F32, BF16 ...


def checkpoint_files(path: Path) -> list[Path]:
  """The safetensors files of a checkpoint: the index's shards, or the single file(s)."""
  index = path / INDEX_FILE
  if index.is_file():
    try:
      with open(index) as f:
        content = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, bad UTF-8
      raise ConfigError(FIELD, f'cannot read {str(index)!r} ({e}); it is damaged or incomplete: '
                        're-download the checkpoint') from e
    weight_map = content.get('weight_map') if isinstance(content, dict) else None
    refuse_if(not isinstance(weight_map, dict) or
              not all(isinstance(v, str) for v in weight_map.values()),
              f'{str(index)!r} has no weight_map object (tensor name -> shard file); it is '
              'damaged or not a safetensors index: re-download the checkpoint')
    files = sorted({path / name for name in weight_map.values()})
    missing = [f.name for f in files if not f.is_file()]
    refuse_if(bool(missing), f'{INDEX_FILE} names shard(s) that are missing: {", ".join(missing)}; '
              're-download the checkpoint')
    refuse_if(not files, f'{INDEX_FILE} in {str(path)!r} has an empty weight_map')
    return files
  files = sorted(path.glob('*.safetensors'))
  if not files:
    others = sorted(p.name for p in path.iterdir() if p.suffix in ('.bin', '.pt', '.pth', '.ckpt'))
    hint = (f'found only {", ".join(others)}: convert it with transformers (from_pretrained, then '
            'save_pretrained(..., safe_serialization=True))' if others else
            'save the model with save_pretrained(..., safe_serialization=True)')
    raise ConfigError(FIELD, f'no *.safetensors weights in {str(path)!r}; {hint}')
  return files


def _read_headers(files: Sequence[Path]) -> dict[str, _TensorInfo]:
  """Every tensor's file, shape and dtype, reading headers only."""
  infos = {}
  for file in files:
    try:
      f = safetensors.safe_open(file, framework='numpy')
    except Exception as e:  # safetensors raises its own error types for a bad header
      raise ConfigError(FIELD, f'{str(file)!r} is not a readable safetensors file ({e}); '
                        're-download or re-save the checkpoint') from e
    with f:
      for name in f.keys():
        if name in infos:
          raise ConfigError(FIELD, f'tensor {name!r} is stored twice ({infos[name].file.name} and '
                            f'{file.name}); the checkpoint is inconsistent')
        s = f.get_slice(name)
        infos[name] = _TensorInfo(file, tuple(s.get_shape()), s.get_dtype())
  return infos


def _expected_params(cfg: ModelConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """Our params, per-layer layout, as {path: shape}: the model's own definition is the spec.
  The model's non-trained state (`STATE_COLLECTIONS`) is there too, its paths led by the
  collection's name."""
  cfg = dataclasses.replace(cfg, scan_layers=False)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.key(0), t), tokens)
  trees = {(): shapes['params'], **{(c,): shapes[c] for c in STATE_COLLECTIONS if c in shapes}}
  return {prefix + tuple(k.key for k in path): leaf for prefix, tree in trees.items()
          for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(tree))[0]}


@dataclasses.dataclass(frozen=True)
class _Piece:
  """One param, or one expert's slice of it (`{expert}` rules), filled from a checkpoint tensor."""
  param: tuple[str, ...]  # per-layer layout
  rule: TensorRule
  expert: int | None = None  # the index on the param's axis 0
  # A part's (offset, the whole tensor's width) on the tensor's features (`TensorRule.part`),
  # set by `_expand` once it knows all the tensor's parts.
  span: tuple[int, int] | None = None

  def shape(self, expected: Mapping[tuple[str, ...], Any]) -> tuple[int, ...]:
    """The piece's shape: the param's, less the expert axis."""
    shape = tuple(expected[self.param].shape)
    return shape[1:] if self.expert is not None else shape

  def frame(self, expected: Mapping[tuple[str, ...], Any]) -> tuple[int, ...]:
    """The piece's shape less its features (`TensorRule.part`), which all parts share."""
    shape, rule = self.shape(expected), self.rule
    if rule.linear_in_dims is None:
      return shape[:-1]
    return shape[:rule.batch_dims + rule.linear_in_dims]

  def width(self, expected: Mapping[tuple[str, ...], Any]) -> int:
    """How many of its tensor's features the piece holds."""
    return math.prod(self.shape(expected)[len(self.frame(expected)):])

  def tensor_shape(self, expected: Mapping[tuple[str, ...], Any]) -> tuple[int, ...]:
    """The whole tensor's shape in our layout; with parts, its features flattened."""
    if self.rule.part is None:
      return self.shape(expected)
    return self.frame(expected) + (self.span[1],)


def _layer_name(name: str, layer: int | None) -> str:
  return name if layer is None else name.replace('{layer}', str(layer))


def _expand(rules: Sequence[TensorRule | OneOf | Redundant], cfg: ModelConfig,
            expected: Mapping[tuple[str, ...], Any], present: set[str] | None = None
            ) -> tuple[dict[str, list[_Piece]], dict[str, Redundant]]:
  """Rules with `{layer}` and `{expert}` expanded: {hf name: the pieces it fills} and
  {hf name: redundant}. `present`, the checkpoint's tensor names, picks each `OneOf`'s layout
  (None: the first, what export writes)."""
  ffn_of = {i: s.ffn for s in layer_stacks(cfg)
            for i in range(s.first_layer, s.first_layer + s.num_layers)}

  def expand(rule: TensorRule, layer: int | None, out: dict[str, list[_Piece]]) -> None:
    if '{layer}' not in rule.hf_name:
      layer = None
    if rule.ffn is not None and (layer is None or ffn_of[layer] != rule.ffn):
      return
    name = _layer_name(rule.hf_name, layer)
    path = rule.param if layer is None else (f'block_{layer}',) + rule.param
    if rule.collection != 'params':
      path = (rule.collection,) + path
    if '{expert}' not in name:
      out.setdefault(name, []).append(_Piece(path, rule))
      return
    # A path the model lacks gets one piece, for _check_pieces to report.
    experts = expected[path].shape[0] if path in expected else 1
    for j in range(experts):
      out.setdefault(name.replace('{expert}', str(j)), []).append(_Piece(path, rule, j))

  mapped: dict[str, list[_Piece]] = {}
  redundant: dict[str, Redundant] = {}
  for entry in rules:
    if isinstance(entry, Redundant):
      layers = range(cfg.num_layers) if '{layer}' in entry.hf_name else [None]
      redundant.update({_layer_name(entry.hf_name, i): entry for i in layers})
      continue
    layouts = entry.layouts if isinstance(entry, OneOf) else ((entry,),)
    per_layer = any('{layer}' in rule.hf_name for layout in layouts for rule in layout)
    for layer in range(cfg.num_layers) if per_layer else [None]:
      options = []
      for layout in layouts:
        out: dict[str, list[_Piece]] = {}
        for rule in layout:
          expand(rule, layer, out)
        options.append(out)
      chosen = options[0]
      if present is not None and len(options) > 1:
        complete = [o for o in options if set(o) <= present]
        chosen = complete[0] if complete else max(options, key=lambda o: len(set(o) & present))
      for name, pieces in chosen.items():
        mapped.setdefault(name, []).extend(pieces)
  for name, pieces in mapped.items():
    # Each part starts where the parts before it end (params the model lacks: _check_pieces).
    if any(p.rule.part for p in pieces) and all(p.param in expected for p in pieces):
      pieces = sorted(pieces, key=lambda p: p.rule.part or (0, 1))
      ends = np.cumsum([p.width(expected) for p in pieces]).tolist()
      mapped[name] = [dataclasses.replace(p, span=(end - p.width(expected), ends[-1]))
                      for p, end in zip(pieces, ends)]
  return mapped, redundant


def _hf_shape(rule: TensorRule, shape: Sequence[int]) -> tuple[int, ...]:
  """The checkpoint shape of a tensor whose shape in our layout is `shape`."""
  if rule.linear_in_dims is None:
    return tuple(shape)
  b, n = rule.batch_dims, rule.linear_in_dims
  lead, shape = tuple(shape[:b]), shape[b:]
  return lead + (math.prod(shape[n:]),) + ((math.prod(shape[:n]),) if n else ())


def _to_ours(tensor: np.ndarray, piece: _Piece, expected: Mapping[tuple[str, ...], Any]
             ) -> np.ndarray:
  rule, shape = piece.rule, piece.shape(expected)
  if rule.linear_in_dims is not None and tensor.ndim == rule.batch_dims + 2:
    tensor = np.swapaxes(tensor, -1, -2)  # torch's [out, in] -> [in, out]
  array = tensor.reshape(piece.tensor_shape(expected))
  if rule.part is not None:
    offset = piece.span[0]
    array = array[..., offset:offset + piece.width(expected)].reshape(shape)
  if rule.permute is not None:
    if sorted(rule.permute) != list(range(shape[-1])):
      raise ValueError(f'{rule.hf_name}: permute is not a permutation of {shape[-1]} features')
    array = array[..., list(rule.permute)]
  return array


def _to_hf(pieces: Sequence[_Piece], flat: Mapping[tuple[str, ...], '_Lazy'],
           dtype: Any = None) -> np.ndarray:
  """One checkpoint tensor from the params its pieces hold (parts concatenated in order)."""
  arrays = []
  for piece in sorted(pieces, key=lambda p: p.rule.part or (0, 1)):
    lazy = flat[piece.param] if piece.expert is None else flat[piece.param][piece.expert]
    array = lazy.host() if isinstance(lazy, _Lazy) else np.asarray(lazy)
    # No copy when the dtype stays: the writer makes the one contiguous copy a tensor needs.
    if dtype is not None:
      array = array.astype(jnp.dtype(dtype), copy=False)
    if piece.rule.permute is not None:
      array = array[..., list(np.argsort(piece.rule.permute))]
    if piece.rule.part is not None and piece.rule.linear_in_dims is not None:
      # The output dims flattened: the parts lie side by side on the output features.
      b, n = piece.rule.batch_dims, piece.rule.linear_in_dims
      array = array.reshape(array.shape[:b + n] + (-1,))
    arrays.append(array)
  array = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=-1)
  rule = pieces[0].rule
  if rule.linear_in_dims is None:
    return array
  b, n = rule.batch_dims, rule.linear_in_dims
  lead = array.shape[:b]
  if n == 0:
    return array.reshape(lead + (-1,))
  return np.swapaxes(array.reshape(lead + (math.prod(array.shape[b:b + n]), -1)), -1, -2)


def _check_pieces(family: Family, mapped: Mapping[str, Sequence[_Piece]],
                  expected: Mapping[tuple[str, ...], Any]) -> None:
  """Every param filled exactly once, every shared tensor split into whole parts."""
  # A mismatch here is a bug in the family file (or a model change), not the user's to fix.
  bug = lambda msg: ValueError(f'{family.name} tensor rules do not match the model: {msg}')
  filled: dict[tuple[tuple[str, ...], int | None], str] = {}
  for name, pieces in mapped.items():
    parts = sorted(p.rule.part or (0, 1) for p in pieces)
    if parts != [(i, len(pieces)) for i in range(len(pieces))]:
      raise bug(f'tensor {name!r} is claimed by rules that are not its parts 0..n-1 '
                f'({parts})')
    if len({(p.rule.linear_in_dims, p.rule.batch_dims) for p in pieces}) > 1:
      raise bug(f'the parts of tensor {name!r} disagree on its layout')
    for piece in pieces:
      key = (piece.param, piece.expert)
      if key in filled:
        raise bug(f'param {"/".join(piece.param)} (expert {piece.expert}) is filled by both '
                  f'{filled[key]!r} and {name!r}')
      filled[key] = name
  paths = {path for path, _ in filled}
  unmapped = sorted('/'.join(p) for p in set(expected) - paths)
  unknown = sorted('/'.join(p) for p in paths - set(expected))
  if unmapped or unknown:
    raise bug(f'params without a checkpoint tensor {unmapped}, rules for params the model '
              f'lacks {unknown}')
  whole = sorted('/'.join(path) for path, expert in filled
                 if expert is not None and (path, None) in filled)
  if whole:
    raise bug(f'params {whole} are filled both whole and per expert')
  for name, pieces in mapped.items():
    # Parts lie side by side on the features only: every other axis must agree.
    frames = sorted({p.frame(expected) for p in pieces})
    if len(frames) > 1:
      raise bug(f'the parts of tensor {name!r} disagree on its shape outside the features '
                f'they split ({frames})')


def _first(names: Sequence[str], n: int = 5) -> str:
  names = sorted(names)
  more = f' (and {len(names) - n} more)' if len(names) > n else ''
  return ', '.join(names[:n]) + more


# --------------------------------------------------------------------------------------------
# A family's mapping, one param at a time, for files laid out like a checkpoint's tensors
# without being checkpoints (efficientjax/peft/interchange.py: LoRA adapters, whose factors
# follow the layout of the kernel they adapt). Additive: the loader and writer do not use these.


def param_tensors(family: Family, cfg: ModelConfig
                  ) -> dict[tuple[str, ...], tuple[str, TensorRule]]:
  """{param path in the per-layer layout (`block_3/attn/q/kernel`): (the checkpoint tensor that
  holds it, the rule that converts it)}, as an export writes them. A param that shares its
  tensor with others carries its `part` in the rule; a per-expert param maps to its first
  expert's tensor (`TensorRule.hf_name` still says `{expert}`)."""
  expected = _expected_params(cfg)
  mapped, _ = _expand(family.tensor_rules(cfg), cfg, expected)
  out: dict[tuple[str, ...], tuple[str, TensorRule]] = {}
  for name, pieces in mapped.items():
    for piece in pieces:
      out.setdefault(piece.param, (name, piece.rule))
  return out


def _whole(rule: TensorRule) -> None:
  if rule.part is not None or '{expert}' in rule.hf_name:
    raise ValueError(f'{rule.hf_name}: the tensor holds several params (part {rule.part}); '
                     'convert it with save_checkpoint / load_checkpoint')


def rule_hf_shape(rule: TensorRule, shape: Sequence[int]) -> tuple[int, ...]:
  """The checkpoint shape `rule` gives an array of shape `shape` in our layout."""
  _whole(rule)
  return _hf_shape(rule, shape)


def rule_to_hf(rule: TensorRule, array: np.ndarray) -> np.ndarray:
  """An array in our layout -> the tensor `rule` stores (transposed, permuted, reshaped as the
  rule says); a rule for a whole tensor only."""
  _whole(rule)
  return _to_hf([_Piece(('',), rule)], {('',): array})


def rule_to_ours(rule: TensorRule, tensor: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """The inverse of `rule_to_hf`: a stored tensor -> our layout, of shape `shape`."""
  _whole(rule)
  expected = {('',): jax.ShapeDtypeStruct(tuple(shape), tensor.dtype)}
  return _to_ours(tensor, _Piece(('',), rule), expected)


# --------------------------------------------------------------------------------------------
# Block-wise fp8 weights, dequantised on load (any family).


def fp8_block(hf: Mapping[str, Any]) -> tuple[int, int] | None:
  """The weight block (b0, b1) of a block-wise fp8 checkpoint, None without a
  quantization_config. Read as transformers' FineGrainedFP8Config reads it (its defaults: block
  [128, 128], dynamic activations, float scales); other quant_methods, and fp8 settings that
  dequantised weights would not reproduce, are refused by name."""
  quant = hf.get('quantization_config')
  if quant is None:
    return None
  refuse_if(not isinstance(quant, Mapping), f'config.json quantization_config={quant!r} is not '
            'an object')
  method = quant.get('quant_method')
  refuse_if(method != 'fp8', f'quantization_config.quant_method={method!r} is not supported: '
            "only block-wise fp8 (quant_method 'fp8', as DeepSeek-V3 ships) is dequantised on "
            'load; use a float16/bfloat16/float32 checkpoint')
  for key, default, why in (
      ('fmt', 'e4m3', 'weights stored as float8 e4m3'),
      ('activation_scheme', 'dynamic', "static activation scales are part of the model's "
       'computation, which dequantised weights do not reproduce'),
      ('scale_fmt', 'float', "float scales; ue8m0 is DeepSeek-V4's"),
      ('expert_dtype', 'fp8', "fp8 experts; fp4-packed ones are DeepSeek-V4's")):
    value = quant.get(key, default)
    refuse_if(value != default, f'quantization_config.{key}={value!r} is not supported; fp8 '
              f'checkpoints load with {key} {default!r} ({why})')
  block = quant.get('weight_block_size', (128, 128))
  ok = (isinstance(block, (list, tuple)) and len(block) == 2 and
        all(type(b) is int and b > 0 for b in block))
  refuse_if(not ok, f'quantization_config.weight_block_size={block!r} is not supported; '
            'block-wise fp8 needs two positive block sizes (DeepSeek-V3: [128, 128])')
  return block[0], block[1]


def _fp8_scales(infos: Mapping[str, _TensorInfo], block: tuple[int, int] | None
                ) -> dict[str, str]:
  """{fp8 tensor: its scale tensor}, each pair checked on the headers: a float8 `X` needs a
  float `X_scale_inv` of shape [..., ceil(out/b0), ceil(in/b1)]; without a block (no
  quantization_config) a float8 tensor is refused."""
  scales = {}
  for name, info in infos.items():
    if info.dtype not in FP8_DTYPES:
      continue
    refuse_if(block is None, f'tensor {name!r} is stored as {info.dtype}: quantised checkpoints '
              'are not supported without a quantization_config (block-wise fp8 needs '
              "quant_method 'fp8' and its weight_block_size); use a float16/bfloat16/float32 "
              'checkpoint')
    scale = name + FP8_SCALE_SUFFIX
    refuse_if(scale not in infos, f'fp8 tensor {name!r} has no {scale!r} beside it; the '
              'checkpoint is incomplete')
    refuse_if(len(info.shape) < 2, f'fp8 tensor {name!r} has shape {list(info.shape)}; '
              'block-wise scales need a matrix')
    (out, inp), other = info.shape[-2:], infos[scale]
    want = info.shape[:-2] + (-(-out // block[0]), -(-inp // block[1]))
    refuse_if(other.dtype not in FLOAT_DTYPES, f'fp8 scale {scale!r} is stored as '
              f'{other.dtype}; only float scales are supported')
    refuse_if(other.shape != want, f'fp8 scale {scale!r} has shape {list(other.shape)}, '
              f'expected {list(want)}: {name!r} {list(info.shape)} in blocks of {list(block)} '
              '(quantization_config.weight_block_size)')
    scales[name] = scale
  return scales


def _read_fp8(file: Path, name: str, headers: dict[Path, Any]) -> np.ndarray:
  """A float8 tensor, from its bytes: safetensors' numpy reader cannot name the dtype. Each
  file's header is parsed once per load (`headers`)."""
  if file not in headers:
    with open(file, 'rb') as f:
      size = int.from_bytes(f.read(8), 'little')
      headers[file] = (8 + size, json.loads(f.read(size)))
  start, header = headers[file]
  entry = header[name]
  begin, end = entry['data_offsets']
  with open(file, 'rb') as f:
    f.seek(start + begin)
    data = f.read(end - begin)
  return np.frombuffer(data, FP8_DTYPES[entry['dtype']]).reshape(entry['shape'])


def _dequantize(weight: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
  """float32 weight · scale, each scale covering one b0 x b1 block (the last ones cut short)."""
  out, inp = weight.shape[-2:]
  scale = np.repeat(np.repeat(scale.astype(np.float32), block[0], axis=-2), block[1], axis=-1)
  return weight.astype(np.float32) * scale[..., :out, :inp]


def load_checkpoint(path: str | Path, family: Family | None = None, *,
                    param_dtype: Any = jnp.float32, scan_layers: bool = True,
                    collections: bool = False, host: bool = False
                    ) -> tuple[dict[str, Any], Params]:
  """Reads a Hugging Face checkpoint directory into our `model` fields and params.

  Block-wise fp8 weights (quantization_config quant_method 'fp8': a float8 `X` beside its
  `X_scale_inv`) are dequantised here, for any family whose `fields_from_hf` accepts the
  quantization_config; the family's `skipped` tensors are not read, with a warning.

  Args:
    path: the directory with `config.json` and `*.safetensors` (single or sharded).
    family: the architecture to expect; None picks it by `model_type`.
    param_dtype: dtype of the returned params (weights are cast once, on the host).
    scan_layers: the scanned layout (axis 0 = layer within each of the model's
      `layer_stacks`: `blocks`, and `dense_blocks` for DeepSeek's dense first layers) or the
      per-layer `block_i` one.
    collections: return the variables dict instead of the params: {'params': ...} plus the
      model's non-trained state when it has one ({'moe_state': ...}: DeepSeek-V3's routing
      bias, float32, in the same layout). A checkpoint holding such state is refused without
      it, since params alone would route differently.
    host: return numpy arrays in host memory (a caller that places them on a mesh itself:
      jnp arrays would first gather the whole model on one device).

  Returns:
    (model_fields, params): fields for the run config's `model` section, and the params tree
    (what goes under 'params' in `Transformer.apply`), as jnp arrays; with `collections`,
    (model_fields, variables), what `Transformer.apply` takes as it is (training: the params
    and the rest as the train state's `model_state`).
  """
  path = Path(path)
  hf = read_hf_config(path)
  model_type = hf.get('model_type')
  if family is None:
    family = FAMILIES.get(model_type)
  elif model_type not in family.model_types:
    raise ConfigError(FIELD, f'config.json has model_type {model_type!r}, not a {family.name} '
                      f'checkpoint; this loader reads model_type '
                      f'{", ".join(map(repr, family.model_types))} (all families: '
                      f'{", ".join(FAMILIES)})')
  archs = hf.get('architectures') or [family.architecture]
  refuse_if(family.architecture not in archs,
            f'config.json architectures {archs} do not include {family.architecture}; only the '
            'causal-LM checkpoint (with its lm_head) can be loaded')
  fields = family.fields_from_hf(hf)
  block = fp8_block(hf)
  cfg = ModelConfig.from_config({**fields, 'param_dtype': param_dtype, 'scan_layers': False})

  expected = _expected_params(cfg)
  state = sorted({p[0] for p in expected if p[0] in STATE_COLLECTIONS})
  refuse_if(bool(state) and not collections,
            f'a {family.name} with this config.json keeps non-trained state ({", ".join(state)}: '
            'the routing bias) beside its params, and params alone would route differently; '
            "load with collections=True, which returns the variables {'params': ..., "
            f'{", ".join(map(repr, state))}: ...}} for Transformer.apply')

  # Names, shapes and dtypes, all before any weight is read.
  infos = _read_headers(checkpoint_files(path))
  mapped, redundant = _expand(family.tensor_rules(cfg), cfg, expected, present=set(infos))
  _check_pieces(family, mapped, expected)
  missing = set(mapped) - set(infos)
  refuse_if(bool(missing), f'checkpoint lacks tensor(s) {_first(missing)} that a {family.name} '
            'with this config.json needs; the checkpoint is incomplete or its config does not '
            'match it')
  # Tensors the family does without by design: not read, and said so below.
  skip = family.skipped(hf)
  skipped: dict[str, list[str]] = {}
  for name in sorted(set(infos) - set(mapped) - set(redundant)):
    reason = next((r for pattern, r in skip.items() if re.fullmatch(pattern, name)), None)
    if reason is not None:
      skipped.setdefault(reason, []).append(name)
  kept = {n: info for n, info in infos.items()
          if not any(n in names for names in skipped.values())}
  scales = _fp8_scales(kept, block)
  unused = set(kept) - set(mapped) - set(redundant) - set(scales.values())
  refuse_if(bool(unused), f'checkpoint tensor(s) {_first(unused)} have no place in the model; '
            f'the checkpoint has weights a {family.name} does not (a different architecture, '
            'biases, adapters?)')
  for name, pieces in mapped.items():
    want = _hf_shape(pieces[0].rule, pieces[0].tensor_shape(expected))
    info = infos[name]
    refuse_if(info.shape != want, f'tensor {name!r} has shape {list(info.shape)}, expected '
              f'{list(want)} from config.json')
  for name in kept:
    refuse_if(kept[name].dtype not in FLOAT_DTYPES and name not in scales,
              f'tensor {name!r} is stored as {kept[name].dtype}: quantised checkpoints are not '
              'supported; use a float16/bfloat16/float32 checkpoint')
  for reason, names in skipped.items():
    warnings.warn(f'{family.name} checkpoint {str(path)!r}: skipped {len(names)} tensor(s) '
                  f'({_first(names, 2)}): {reason}', stacklevel=2)

  dtype = jnp.dtype(param_dtype)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  by_file: dict[Path, list[str]] = {}
  for name in mapped:
    by_file.setdefault(infos[name].file, []).append(name)
  headers: dict[Path, Any] = {}

  def get(f: Any, name: str) -> np.ndarray:
    """A tensor of the open file `f`; fp8 ones dequantised to float32."""
    if name not in scales:
      return f.get_tensor(name)
    return _dequantize(_read_fp8(infos[name].file, name, headers), read(scales[name]), block)

  def read(name: str) -> np.ndarray:
    with safetensors.safe_open(infos[name].file, framework='numpy') as f:
      return get(f, name)

  # The redundant tensors (a tied head's copy, RoPE's inv_freq), checked before the bulk read:
  # a checkpoint they show to contradict its config is refused having read only them and
  # what they must equal (the embedding); each rule's value is computed once.
  values: dict[Redundant, np.ndarray] = {}
  for name, rule in redundant.items():
    if name not in infos:
      continue
    if rule not in values:
      values[rule] = np.asarray(rule.expected(cfg, read), np.float32)
    value, fix = values[rule], f'; {rule.hint}' if rule.hint else ''
    refuse_if(infos[name].shape != value.shape, f'tensor {name!r} has shape '
              f'{list(infos[name].shape)}, expected {list(value.shape)} from config.json (it '
              f'should repeat other weights or follow from the config){fix}')
    got = read(name).astype(np.float32)
    ok = (np.array_equal(got, value) if rule.rtol is None else
          np.allclose(got, value, rtol=rule.rtol, atol=0))
    refuse_if(not ok, f'tensor {name!r} does not match what config.json implies (it should '
              f'repeat other weights or follow from the config); config and weights disagree{fix}')

  for file, names in by_file.items():
    with safetensors.safe_open(file, framework='numpy') as f:
      for name in names:
        tensor = get(f, name)
        for piece in mapped[name]:
          # The non-trained state keeps its own dtype (the routing bias is float32).
          want = expected[piece.param].dtype if piece.param[0] in STATE_COLLECTIONS else dtype
          # Cast in numpy (ml_dtypes) so a bf16 -> f32 upcast is exact and no device sees f64.
          array = _to_ours(tensor, piece, expected).astype(want)
          if piece.expert is None:
            flat[piece.param] = array
          else:
            if piece.param not in flat:
              flat[piece.param] = np.empty(expected[piece.param].shape, want)
            flat[piece.param][piece.expert] = array

  variables = _nest(flat, cfg, scan_layers)
  if not host:
    variables = jax.tree.map(jnp.asarray, variables)
  if not collections:
    return fields, variables
  params = {k: v for k, v in variables.items() if k not in STATE_COLLECTIONS}
  return fields, {'params': params, **{c: variables[c] for c in state}}


def _nest(flat: Mapping[tuple[str, ...], np.ndarray], cfg: ModelConfig, scan_layers: bool
          ) -> Params:
  """Flat {path: array} in the per-layer layout -> nested params; scanned, layer i goes to its
  stack's params (`blocks`, or `dense_blocks` for DeepSeek's dense first layers) at i less the
  stack's first layer."""
  stack_of = {i: s for s in layer_stacks(cfg)
              for i in range(s.first_layer, s.first_layer + s.num_layers)}
  params: Params = {}
  stacked: dict[tuple[str, ...], np.ndarray] = {}
  for path, array in flat.items():
    # A state collection's name leads its paths (left at the top); its layers stack alike.
    lead, rest = (path[:1], path[1:]) if path[0] in STATE_COLLECTIONS else ((), path)
    if scan_layers and rest[0].startswith('block_'):
      layer = int(rest[0].removeprefix('block_'))
      stack = stack_of[layer]
      sub = lead + (stack.name,) + rest[1:]
      if sub not in stacked:
        stacked[sub] = np.empty((stack.num_layers,) + array.shape, array.dtype)
      stacked[sub][layer - stack.first_layer] = array
    else:
      stacked[path] = array
  for path, array in stacked.items():
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = array
  return params


# --------------------------------------------------------------------------------------------
# Writing.


class _Lazy:
  """A param, or a slice of one (a layer of a scanned stack, an expert), brought to the host
  only by `host()`: an export converts one tensor at a time, and device params (or a stack's
  other layers) must not all come over first."""

  def __init__(self, array: Any, index: tuple[int, ...] = ()):
    self.array, self.index = array, index

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.array.shape[len(self.index):])

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.array.dtype)

  def __getitem__(self, i: int) -> '_Lazy':
    return _Lazy(self.array, self.index + (i,))

  def host(self) -> np.ndarray:
    # Sliced where the array lives (a device slice, or a numpy view), then brought over.
    return np.asarray(self.array[self.index] if self.index else self.array)


def _flatten_params(params: Mapping[str, Any], cfg: ModelConfig
                    ) -> dict[tuple[str, ...], '_Lazy']:
  """Params in either layout -> {path: the param, not yet on the host} in the per-layer layout;
  from a variables dict, the non-trained state too (paths led by the collection's name)."""
  params = nn.unbox(dict(params))
  trees = {(): params}
  if 'params' in params:  # a variables dict (from `init`, or load_checkpoint(collections=True))
    # Of its other collections only the non-trained state (the routing bias) is checkpoint
    # data; the MoE losses and stats are not.
    trees = {(): params['params'], **{(c,): params[c] for c in STATE_COLLECTIONS if c in params}}
  stacks = {s.name: s for s in layer_stacks(cfg)}
  flat = {}
  for lead, tree in trees.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      keys = tuple(k.key for k in path)
      array = _Lazy(leaf)
      stack = stacks.get(keys[0])
      if stack is not None:
        if array.shape[:1] != (stack.num_layers,):
          raise ValueError(f'param {"/".join(lead + keys)} has shape {array.shape}; scanned '
                           f'params need the {stack.num_layers} layers of {stack.name} on axis 0')
        for j in range(stack.num_layers):
          flat[lead + (f'block_{stack.first_layer + j}',) + keys[1:]] = array[j]
      else:
        flat[lead + keys] = array
  return flat


def save_checkpoint(path: str | Path, params: Mapping[str, Any],
                    model: ModelConfig | Mapping[str, Any], family: Family, *,
                    dtype: Any = None, extra_config: Mapping[str, Any] | None = None,
                    max_shard_bytes: int = writer.DEFAULT_MAX_SHARD_BYTES) -> Path:
  """Writes params as a transformers checkpoint: `config.json` and `model.safetensors`, or
  shards of at most `max_shard_bytes` with their index as `save_pretrained` writes them; one
  converted tensor at a time (efficientjax.hf.writer), so the export's own host memory is that
  of the largest tensor, beside the params.

  Args:
    path: the directory to write (created if needed).
    params: the params tree, scanned or per-layer, or a variables dict ({'params': ...}, from
      `init` or `load_checkpoint(..., collections=True)`): a model with non-trained state that
      the checkpoint stores (DeepSeek-V3's routing bias) needs it, {'params', 'moe_state'}.
    model: the `ModelConfig`, or the run config's `model` section.
    family: the architecture to write.
    dtype: storage dtype of the weights; None keeps each param's own dtype (exact round trip).
      The state keeps its own (float32).
    extra_config: keys added to / overriding `config.json` (token ids, max_position_embeddings).
    max_shard_bytes: the largest weight file (transformers' default, 5 GB).

  Returns:
    The directory written.
  """
  cfg = model if isinstance(model, ModelConfig) else ModelConfig.from_config(model)
  hf = family.hf_from_config(cfg)  # refuses what the architecture cannot express
  expected = _expected_params(cfg)
  flat = _flatten_params(params, cfg)
  absent = sorted({p[0] for p in set(expected) - set(flat) if p[0] in STATE_COLLECTIONS})
  if absent:
    raise ValueError(f'the {family.name} model keeps non-trained state ({", ".join(absent)}: '
                     'the routing bias) that its checkpoint stores; pass the variables '
                     f"{{'params': ..., {', '.join(map(repr, absent))}: ...}} (what "
                     "load_checkpoint(..., collections=True) returns, or the train state's "
                     'params with its model_state)')
  extra = sorted('/'.join(p) for p in set(flat) - set(expected))
  missing = sorted('/'.join(p) for p in set(expected) - set(flat))
  if extra or missing:
    raise ValueError(f'params do not match the {family.name} model: missing {missing}, not part '
                     f'of it {extra} (merge adapters / dequantise before exporting)')
  for p, want in expected.items():
    if flat[p].shape != want.shape:
      raise ValueError(f'param {"/".join(p)} has shape {flat[p].shape}, expected {want.shape} '
                       'from the model config')

  mapped, _ = _expand(family.tensor_rules(cfg), cfg, expected)
  _check_pieces(family, mapped, expected)
  is_state = {name: pieces[0].param[0] in STATE_COLLECTIONS for name, pieces in mapped.items()}

  def out_dtype(name: str) -> np.dtype:
    # The state keeps its own dtype (float32), the weights the export's.
    keep = is_state[name] or dtype is None
    return np.dtype(flat[mapped[name][0].param].dtype if keep else jnp.dtype(dtype))
  # Each tensor's shape and dtype, known before any is made: the writer puts them in the
  # file's header, then makes, writes and drops one tensor at a time.
  specs = [(name, _hf_shape(pieces[0].rule, pieces[0].tensor_shape(expected)), out_dtype(name))
           for name, pieces in mapped.items()]
  stored = {d for name, _, d in specs if not is_state[name]}
  # transformers reads `dtype` (5.x) or `torch_dtype` (4.x) as the checkpoint's dtype.
  dtype_name = hf_dtype_name(max(stored, key=lambda d: d.itemsize))
  hf = {'architectures': [family.architecture], 'model_type': family.model_types[0], **hf,
        'dtype': dtype_name, 'torch_dtype': dtype_name, **(extra_config or {})}

  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  writer.write_checkpoint(
      path, specs, lambda name: _to_hf(mapped[name], flat, None if is_state[name] else dtype),
      max_shard_bytes=max_shard_bytes)
  # Last, once the weights are in place: a failed export leaves the earlier config with the
  # earlier weights.
  tmp = path / (CONFIG_FILE + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(hf, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path / CONFIG_FILE)
  return path

"""LoRA-family adapters in Hugging Face peft's file format, both ways.

`save_adapter` writes our adapters as the directory `peft.PeftModel.save_pretrained` writes, so
`peft.PeftModel.from_pretrained(transformers_model, path)` applies them to the transformers
model; `load_adapter` reads such a directory (ours, or one peft wrote) back into our layout.

The directory (peft 0.21, a LoraConfig):
- `adapter_config.json`: LoraConfig's fields: peft_type 'LORA', r, lora_alpha, target_modules,
  lora_dropout, use_rslora, use_dora, init_lora_weights, bias, task_type ...;
- `adapter_model.safetensors`: for each adapted module M (its dotted name in the transformers
  model, `model.layers.3.self_attn.q_proj`), `base_model.model.M.lora_A.weight` [r, in],
  `base_model.model.M.lora_B.weight` [out, r] and, with DoRA,
  `base_model.model.M.lora_magnitude_vector` [out]. (`base_model.model.` is PeftModel ->
  LoraModel -> the transformers model. peft holds
  the factors per adapter name, `lora_A.default.weight`, and the magnitude as a module,
  `lora_magnitude_vector.default.weight`; saving strips the adapter name, and `.weight` from the
  magnitude.)

Layouts go through the family's own tensor rules (efficientjax/hf), so whatever a family does
to a kernel's output features on the way to `M.weight` [out, in] (head layouts flattened,
DeepSeek's RoPE-pair permutation) is done to the adapter alike: lora_b [r, out...] converts as a
kernel with one input dim (the rank), lora_a [in..., r] as a kernel whose outputs are the rank
(its input dims flattened as the kernel's are; no family reorders inputs), DoRA's magnitude
[out...] as a kernel with no input dim. A projection a family stores fused with others in one
tensor (Phi-3's qkv_proj, gate_up_proj) is one peft module with one lora_A for all its parts,
which our per-projection adapters are not: such adapters are refused both ways.
"""

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import safetensors
from flax import traverse_util

from efficientjax.errors import ConfigError
from efficientjax.hf import writer
from efficientjax.hf.safetensors_io import (FAMILIES, Family, TensorRule, param_tensors,
                                            read_hf_config, rule_hf_shape, rule_to_hf,
                                            rule_to_ours)
from efficientjax.model import ModelConfig
from efficientjax.peft import targets
from efficientjax.peft.methods import METHODS, FinetuneConfig, LoRA
from efficientjax.peft.targets import Projection

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'
# peft's key suffix -> our adapter variable.
SUFFIXES = {'.lora_A.weight': 'lora_a', '.lora_B.weight': 'lora_b',
            '.lora_magnitude_vector': 'magnitude'}
# peft's save_embedding_layers: the base weight of an adapted embedding-like layer (lm_head).
BASE_COPY = '.base_layer.weight'
FIELD = 'adapter_config'  # ConfigErrors about the file name its key: adapter_config.rank_pattern

# adapter_config.json as peft 0.21's save_pretrained writes it for a plain LoRA (every field of
# LoraConfig at its default); save_adapter sets the ones that say what the adapter is.
_PEFT_DEFAULTS: dict[str, Any] = {
    'alora_invocation_tokens': None, 'alpha_pattern': {}, 'arrow_config': None,
    'auto_mapping': None, 'base_model_name_or_path': None, 'bias': 'none', 'corda_config': None,
    'ensure_weight_tying': False, 'eva_config': None, 'exclude_modules': None,
    'fan_in_fan_out': False, 'inference_mode': True, 'init_lora_weights': True,
    'kasa_config': None, 'layer_replication': None, 'layers_pattern': None,
    'layers_to_transform': None, 'loftq_config': {}, 'lora_alpha': 8, 'lora_bias': False,
    'lora_dropout': 0.0, 'lora_ga_config': None, 'megatron_config': None,
    'megatron_core': 'megatron.core', 'modules_to_save': None, 'monteclora_config': None,
    'peft_type': 'LORA', 'qalora_group_size': 16, 'r': 8, 'rank_pattern': {}, 'revision': None,
    'target_modules': None, 'target_parameters': None, 'task_type': 'CAUSAL_LM',
    'trainable_token_indices': None, 'use_bdlora': None, 'use_dora': False, 'use_qalora': False,
    'use_rslora': False, 'velora_config': None,
}
# Keys load_adapter reads itself.
_READ = ('peft_type', 'task_type', 'auto_mapping', 'base_model_name_or_path', 'r', 'lora_alpha',
         'lora_dropout', 'use_rslora', 'use_dora', 'target_modules', 'init_lora_weights', 'bias')
# Keys that do not change what the adapter computes, whatever their value: bookkeeping, options
# of init methods that init_lora_weights does not select, fan_in_fan_out (peft resets it for
# torch Linear layers, all we map), which modules were excluded (the tensors say which are
# adapted), and layers_pattern (used only with layers_to_transform).
_IGNORED = ('peft_version', 'revision', 'inference_mode', 'runtime_config', 'megatron_core',
            'qalora_group_size', 'loftq_config', 'eva_config', 'corda_config', 'lora_ga_config',
            'fan_in_fan_out', 'exclude_modules', 'layers_pattern', 'ensure_weight_tying')
# init_lora_weights whose adapter applies to the base model as it is (the others, PiSSA, OLoRA,
# CorDA, LoftQ..., change the base when peft loads the adapter).
_PLAIN_INITS = (True, False, 'gaussian', 'orthogonal')
# peft 0.21 with transformers 5 reads the target names gate_proj / up_proj / down_proj of these
# model types as the routed experts' fused parameters and drops them from target_modules, so it
# leaves a dense or shared-expert MLP's adapter unloaded (huggingface/peft#3711): our file is
# right, that peft misreads it.
_PEFT_EXPERT_NAMES = ('deepseek_v2', 'deepseek_v3', 'qwen3_moe')
_MLP_NAMES = ('gate_proj', 'up_proj', 'down_proj')


# ------------------------------------------------------------------------------------------------
# Where each adapter goes in the family's checkpoint.


@dataclasses.dataclass(frozen=True)
class _Site:
  """One projection at one layer: the peft module its adapter is."""
  projection: Projection
  index: int | None  # the layer on a scanned stack's leading axis; None: no such axis
  module: str        # the module's dotted name in the transformers model
  rule: TensorRule   # the family's rule for the kernel

  def rules(self) -> dict[str, TensorRule]:
    """The rule of each adapter variable, derived from the kernel's (see the module doc)."""
    n = len(self.projection.in_shape)
    return {'lora_a': dataclasses.replace(self.rule, linear_in_dims=n, permute=None),
            'lora_b': dataclasses.replace(self.rule, linear_in_dims=1),
            'magnitude': dataclasses.replace(self.rule, linear_in_dims=0)}

  def shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
    """Each adapter variable's shape at this layer, in our layout."""
    p = self.projection
    return {'lora_a': p.in_shape + (rank,), 'lora_b': (rank,) + p.out_shape,
            'magnitude': p.out_shape}

  def key(self, variable: str) -> str:
    return PREFIX + self.module + next(s for s, v in SUFFIXES.items() if v == variable)

  def signature(self) -> tuple:
    return (self.projection.path, self.index, self.module, self.rule.permute)


def _layers(p: Projection) -> list[tuple[int | None, int | None]]:
  """(index on the stack's axis or None, the model's layer or None) per layer p covers."""
  if p.stacked:
    return list(enumerate(p.layers))
  return [(None, p.layers[0] if p.layers else None)]


@functools.lru_cache(maxsize=16)
def _param_tensors(family: Family, cfg: ModelConfig) -> dict:
  return param_tensors(family, cfg)  # traces the model: once per family and model


@functools.lru_cache(maxsize=16)
def _projections(cfg: ModelConfig) -> tuple[Projection, ...]:
  return tuple(targets.projections(cfg))


def _plain(cfg: ModelConfig) -> ModelConfig:
  """The model without adapter settings (they change no param), for the caches above."""
  return dataclasses.replace(cfg, adapter=None)


def _sites(family: Family, cfg: ModelConfig, chosen: Sequence[Projection]
           ) -> tuple[list[_Site], dict[str, str]]:
  """The sites of `chosen`'s layers, and {module: why an adapter there cannot be expressed} for
  the projections whose kernel is not a torch Linear weight of its own."""
  tensors = _param_tensors(family, _plain(cfg))
  sites, refused = [], {}
  for p in chosen:
    for index, layer in _layers(p):
      where = p.path if layer is None else (f'block_{layer}',) + p.path[1:]
      param = where + ('kernel',)
      if param not in tensors:  # a Linear whose weight the family stores otherwise (a router)
        refused['/'.join(param)] = f'{family.name} has no tensor of its own for our {p.name}'
        continue
      name, rule = tensors[param]
      module = name.removesuffix('.weight')
      if rule.part is not None or rule.batch_dims or '{expert}' in name:
        others = sorted('/'.join(k) for k, (n, _) in tensors.items() if n == name and k != param)
        refused[module] = (
            f'{family.name} stores our {p.name} in one tensor {name!r} with {", ".join(others)}: '
            f'one peft module, {module}, with one lora_A for all of them, where our adapters '
            f'have their own per projection; leave {"/".join(p.module)} out of '
            'finetune.target_modules (or merge the adapters and export the weights)')
      elif rule.linear_in_dims != len(p.in_shape) or not name.endswith('.weight'):
        refused[module] = (f'{family.name} does not store our {p.name} as a torch Linear weight '
                           f'({name!r}), which is what peft adapts')
      else:
        sites.append(_Site(p, index, module, rule))
  return sites, refused


def families_for(cfg: ModelConfig, family: Family | None = None) -> list[Family]:
  """`family`, or every family that can express the model (its hf_from_config accepts it)."""
  if family is not None:
    family.hf_from_config(cfg)  # a ConfigError naming the model field it cannot express
    return [family]
  import efficientjax.hf  # noqa: F401 (registers every family)
  found: list[Family] = []
  for name in FAMILIES:
    f = FAMILIES.get(name)
    if f in found:
      continue
    try:
      f.hf_from_config(cfg)
    except ConfigError:
      continue
    found.append(f)
  if not found:
    raise ConfigError('model', 'no Hugging Face family can express this model, so there is no '
                      'peft module to name its adapters by')
  return found


def _resolve(cfg: ModelConfig, family: Family | None, chosen: Sequence[Projection]
             ) -> tuple[Family, list[_Site]]:
  """The family (given, or the one every able candidate agrees on) and the sites of `chosen`."""
  able, refusals = [], []
  for f in families_for(cfg, family):
    sites, refused = _sites(f, cfg, chosen)
    if refused:
      refusals.append(next(iter(refused.values())))
    else:
      able.append((f, sites))
  if not able:
    raise ConfigError('finetune.target_modules', refusals[0])
  first = [s.signature() for s in able[0][1]]
  differ = [f.name for f, sites in able[1:] if [s.signature() for s in sites] != first]
  if differ:
    raise ValueError(f'{able[0][0].name} and {", ".join(differ)} name or lay out these adapters '
                     'differently; pass family= to say which model the adapter is for')
  return able[0]


def _linear_modules(family: Family, cfg: ModelConfig) -> set[str]:
  """The names of the family's torch Linear modules (of a tensor `M.weight` [out, in])."""
  tensors = _param_tensors(family, _plain(cfg)).values()
  return {name.removesuffix('.weight') for name, rule in tensors
          if rule.linear_in_dims is not None and name.endswith('.weight')}


def _peft_selects(spec: Any, module: str) -> bool:
  """Whether peft's target_modules (or exclude_modules) `spec` names `module`: a list by
  whole names or dotted suffixes, a string as a regex over the whole name, and 'all-linear'
  every linear layer but the output head."""
  if _empty(spec):
    return False
  if isinstance(spec, str):
    if spec == targets.ALL_LINEAR:
      return module != 'lm_head'
    return re.fullmatch(spec, module) is not None
  return any(module == t or module.endswith('.' + t) for t in spec)


def _module_targets(family: Family, cfg: ModelConfig, adapted: set[str]) -> list[str]:
  """peft's target_modules that select exactly the `adapted` modules.

  peft adapts a module whose dotted name equals a listed name or ends with '.' + it. The short
  names (`q_proj`) are used where they select no module outside `adapted` among the model's
  linear layers, longer suffixes (`mlp.gate_proj`, `3.self_attn.q_proj`) where needed."""
  every = _linear_modules(family, cfg) | adapted
  chosen: set[str] = set()
  left = set(adapted)
  depth = 1
  while left:  # ends: a module's whole name selects only itself
    if depth > max(len(m.split('.')) for m in left):
      raise ValueError(f'no peft target_modules name {sorted(left)[0]} without another module')
    for module in sorted(left):
      name = '.'.join(module.split('.')[-depth:])
      hits = {m for m in every if m == name or m.endswith('.' + name)}
      if module in left and hits <= adapted:
        chosen.add(name)
        left -= hits
    depth += 1
  return sorted(chosen)


# ------------------------------------------------------------------------------------------------
# Export.


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(nn.unbox(dict(tree))) if tree else {}


def _check_tree(flat: Mapping[tuple[str, ...], Any], chosen: Sequence[Projection], rank: int,
                dora: bool, what: str) -> None:
  """The adapters tree holds exactly the chosen projections' variables, in their shapes."""
  names = ('lora_a', 'lora_b') + (('magnitude',) if dora else ())
  want = {}
  for p in chosen:
    lead = (len(p.layers),) if p.stacked else ()
    shapes = {'lora_a': p.in_shape + (rank,), 'lora_b': (rank,) + p.out_shape,
              'magnitude': p.out_shape}
    want.update({p.path + (n,): lead + shapes[n] for n in names})
  missing = sorted('/'.join(k) for k in set(want) - set(flat))
  extra = sorted('/'.join(k) for k in set(flat) - set(want))
  if missing or extra:
    raise ValueError(f'{what} do not match finetune.method/target_modules/rank: missing '
                     f'{missing}, not expected {extra}')
  for k, shape in want.items():
    if tuple(flat[k].shape) != shape:
      raise ValueError(f'{what}: {"/".join(k)} has shape {tuple(flat[k].shape)}, expected '
                       f'{shape} (finetune.rank={rank})')


def save_adapter(path: str | Path, adapters: Any, model_cfg: ModelConfig, ft: FinetuneConfig, *,
                 family: Family | None = None, base_model_name_or_path: str | None = None,
                 initial: Any = None, overwrite: bool = False) -> Path:
  """Writes `adapters` as a peft LoRA adapter directory (adapter_config.json and
  adapter_model.safetensors) for the transformers model of `family`.

  Args:
    path: the directory to write. It is written under a temporary name beside it and renamed
      into place once complete; an existing non-empty directory is refused unless `overwrite`
      (then it is replaced as a whole).
    adapters: the trainable tree of a LoRA-family method (`method.prepare`, then training):
      `lora_a`, `lora_b` (and DoRA's `magnitude`) per chosen projection, scanned or per layer
      as `model_cfg.scan_layers` says.
    model_cfg: the model (its `adapter` settings are not read: `ft` is the truth).
    ft: the finetune section: method (lora, lora_plus, rslora, dora, pissa), rank, alpha,
      target_modules, dropout, init.
    family: the transformers architecture the adapter is for; None: every family that can
      express the model, which must agree on the module names and layouts (Llama and Mistral
      do; where the adapters cannot be written for one, such as Phi-3's fused q/k/v, the others
      decide).
    base_model_name_or_path: written to the config (peft's AutoPeftModel loads that base).
    initial: PiSSA only: the adapters as `prepare` made them, to write the adapter for the
      original base (see below).
    overwrite: replace a non-empty `path`.

  Returns:
    The directory written.

  LoRA+ trains a plain LoRA (only its learning rates differ) and is saved as one; RSLoRA sets
  use_rslora, DoRA use_dora. init_lora_weights is True (peft's kaiming default) or 'gaussian'.

  PiSSA: our PiSSA adapter applies to the *residual* base W - s·A₀B₀ (the frozen tree
  `prepare` returned), not to the pretrained W. Without `initial` it is saved as a plain LoRA
  (init_lora_weights True, so peft does not redo PiSSA's SVD on load) that is correct only on
  that residual base: export the frozen tree with the family's save function, load the adapter
  onto that checkpoint (base_model_name_or_path can name it), or merge. (peft's own PiSSA
  save writes init_lora_weights 'pissa', and its from_pretrained then recomputes the residual
  from the pretrained base, which a randomised pissa_niter_K cannot reproduce exactly.) With
  `initial`, the adapter is converted for the pretrained W as peft's own
  `save_pretrained(..., path_initial_model_for_weight_conversion=...)` does: since
  W_res + s·AB = W + s·(AB - A₀B₀), it is the rank-2r LoRA A' = [A | A₀], B' = [B ; -B₀] with
  r and lora_alpha doubled (alpha ×√2 under use_rslora), which keeps the scaling s.
  """
  method = METHODS.get(ft.method)(model_cfg, ft)
  if not isinstance(method, LoRA):
    raise ConfigError('finetune.method', f'{ft.method!r} trains no adapter; save the params it '
                      "trains with the family's save function (efficientjax.hf: method.merged "
                      'gives them)')
  errors = method.check()
  if errors:
    raise errors[0]
  chosen, dora, rank, alpha = method.chosen, method.dora, ft.rank, float(ft.alpha)
  flat = _flat(adapters)
  _check_tree(flat, chosen, rank, dora, 'adapters')
  pissa = method.init_name.startswith('pissa')
  if initial is not None:
    if not pissa:
      raise ValueError(f'initial= converts a PiSSA adapter for the pretrained base; finetune.init '
                       f'is {method.init_name!r}, whose adapter applies to the base as it is')
    if dora:
      raise ValueError('a DoRA adapter cannot be converted for the pretrained base (its '
                       'magnitude rescales the whole weight, not only the low-rank update); '
                       'merge it and export the weights')
    first = _flat(initial)
    _check_tree(first, chosen, rank, dora, 'initial adapters')
    for p in chosen:  # [A | A₀], [B ; -B₀] along the rank axis
      lead = 1 if p.stacked else 0
      a, a0 = np.asarray(flat[p.path + ('lora_a',)]), np.asarray(first[p.path + ('lora_a',)])
      b, b0 = np.asarray(flat[p.path + ('lora_b',)]), np.asarray(first[p.path + ('lora_b',)])
      flat[p.path + ('lora_a',)] = np.concatenate([a, a0.astype(a.dtype)], axis=-1)
      flat[p.path + ('lora_b',)] = np.concatenate([b, -b0.astype(b.dtype)], axis=lead)
    rank, alpha = 2 * rank, alpha * (math.sqrt(2) if method.rslora else 2)

  family, sites = _resolve(model_cfg, family, chosen)
  if set(family.model_types) & set(_PEFT_EXPERT_NAMES):
    mlp = sorted({s.module.rsplit('.', 1)[-1] for s in sites} & set(_MLP_NAMES))
    if mlp:
      warnings.warn(f'peft 0.21 with transformers 5 loads {family.architecture} adapters on '
                    f'{", ".join(mlp)} as adapters of the routed experts and leaves these dense / '
                    'shared-expert MLP adapters out (huggingface/peft#3711); the file is right, '
                    'but check the logits after PeftModel.from_pretrained', stacklevel=2)
  names = ('lora_a', 'lora_b') + (('magnitude',) if dora else ())
  produce, specs = {}, []
  for site in sites:
    rules, shapes = site.rules(), site.shapes(rank)
    for n in names:
      leaf = flat[site.projection.path + (n,)]
      dtype = np.dtype(leaf.dtype)
      specs.append((site.key(n), rule_hf_shape(rules[n], shapes[n]), dtype))
      produce[site.key(n)] = (leaf, site.index, rules[n])

  def tensor(key: str) -> np.ndarray:
    leaf, index, rule = produce[key]
    return rule_to_hf(rule, np.asarray(leaf if index is None else leaf[index]))

  init = method.init_name
  config = dict(_PEFT_DEFAULTS)
  config.update(
      base_model_name_or_path=base_model_name_or_path, r=rank,
      lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
      lora_dropout=ft.dropout, use_rslora=method.rslora, use_dora=dora,
      init_lora_weights='gaussian' if init == 'gaussian' else True,
      target_modules=_module_targets(family, model_cfg, {s.module for s in sites}))

  def write(directory: Path) -> None:
    writer.write_file(directory / WEIGHTS_FILE, sorted(specs), tensor, {'format': 'pt'})
    with open(directory / CONFIG_FILE, 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)
      f.write('\n')

  return _write_atomically(Path(path), write, overwrite)


def _write_atomically(path: Path, write, overwrite: bool) -> Path:
  """`write(tmp)` into a fresh directory beside `path`, then renamed to `path`: a failed save
  leaves no partial adapter, and an earlier one (with `overwrite`) as it was."""
  if path.exists():
    if not path.is_dir():
      raise FileExistsError(f'{str(path)!r} exists and is not a directory')
    if any(path.iterdir()) and not overwrite:
      raise FileExistsError(f'{str(path)!r} exists and is not empty; pass overwrite=True to '
                            'replace it, or choose another directory')
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'.{path.name}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    write(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if path.exists():
    old = path.parent / f'.{path.name}.old-{os.getpid()}'
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old)
  else:
    os.replace(tmp, path)
  return path


# ------------------------------------------------------------------------------------------------
# Import.


def _empty(value: Any) -> bool:
  return value is None or value is False or value == {} or value == [] or value == ''


def _read_config(path: Path) -> dict[str, Any]:
  """adapter_config.json, refusing every setting our adapters cannot represent."""
  file = path / CONFIG_FILE
  if not path.is_dir() or not file.is_file():
    raise ConfigError(FIELD, f'{str(file)!r} is missing; give the directory peft\'s '
                      'save_pretrained (or save_adapter) wrote')
  try:
    config = json.loads(file.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(FIELD, f'cannot read {str(file)!r}: {e}') from e
  if not isinstance(config, dict):
    raise ConfigError(FIELD, f'{str(file)!r} is not a JSON object')

  def refuse(key: str, why: str) -> ConfigError:
    return ConfigError(f'{FIELD}.{key}', f'{config.get(key)!r}: {why}')

  if config.get('peft_type') != 'LORA':
    raise refuse('peft_type', 'only LoRA adapters (and their DoRA / RSLoRA variants) load')
  if config.get('task_type') not in (None, 'CAUSAL_LM'):
    raise refuse('task_type', 'our model is a causal LM; an adapter for another task has '
                 'heads it does not')
  r = config.get('r', _PEFT_DEFAULTS['r'])
  if not isinstance(r, int) or isinstance(r, bool) or r < 1:
    raise refuse('r', 'the rank must be a positive integer')
  alpha = config.get('lora_alpha', _PEFT_DEFAULTS['lora_alpha'])
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
    raise refuse('lora_alpha', 'must be a number')
  if config.get('bias', 'none') != 'none':
    raise refuse('bias', "trained biases are not part of our adapters; use bias 'none' (or "
                 'merge the adapter in peft and load the weights)')
  init = config.get('init_lora_weights', True)
  if init not in _PLAIN_INITS:
    raise refuse('init_lora_weights', 'this initialisation changes the base weights when peft '
                 'loads the adapter (PiSSA, OLoRA, CorDA, LoftQ...), which load_adapter does not '
                 'do; convert it to a plain LoRA in peft (save_pretrained(..., '
                 'path_initial_model_for_weight_conversion=...)) and load that')
  if config.get('use_dora') and config.get('use_rslora'):
    raise refuse('use_rslora', 'DoRA with rank-stabilised scaling is not one of our methods '
                 '(finetune.method is dora or rslora)')
  for key, value in config.items():
    if key in _READ or key in _IGNORED or _empty(value):
      continue
    if key in _PEFT_DEFAULTS:
      why = {'rank_pattern': 'per-module ranks are not supported: one rank for every adapter',
             'alpha_pattern': 'per-module alphas are not supported: one alpha for every adapter',
             'modules_to_save': 'fully trained copies of modules are not part of our adapters',
             'layers_to_transform': 'our adapters cover every layer of a targeted projection',
             'lora_bias': "a bias on lora_B is not part of our adapters",
             'target_parameters': 'adapters on nn.Parameters (MoE experts) are not supported',
             'trainable_token_indices': 'trainable embedding rows are not supported',
             'layer_replication': 'replicated layers are not supported',
             'alora_invocation_tokens': 'activated LoRA (aLoRA) is not supported'}.get(
                 key, 'this LoRA variant is not supported')
      raise refuse(key, why)
    raise refuse(key, f'{key!r} is not a LoRA setting this loader knows (peft 0.21); it may '
                 'change what the adapter computes')
  return config


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
  file = path / WEIGHTS_FILE
  if not file.is_file():
    other = path / 'adapter_model.bin'
    hint = (': found adapter_model.bin; re-save it with safe_serialization=True'
            if other.is_file() else '')
    raise ConfigError(FIELD, f'{str(file)!r} is missing{hint}')
  try:
    with safetensors.safe_open(file, framework='numpy') as f:
      return {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises its own error types for a bad file
    raise ConfigError(FIELD, f'{str(file)!r} is not a readable safetensors file ({e})') from e


def _check_base(config: Mapping[str, Any], families: list[Family],
                family_given: bool) -> list[Family]:
  """The candidates whose architecture the adapter names, where it names one (auto_mapping, or
  the config.json of a base_model_name_or_path that is a local directory)."""
  named = []
  mapping = config.get('auto_mapping')
  if isinstance(mapping, Mapping) and mapping.get('base_model_class'):
    named.append(('auto_mapping', str(mapping['base_model_class'])))
  base = config.get('base_model_name_or_path')
  if isinstance(base, str) and base and (Path(base) / 'config.json').is_file():
    archs = read_hf_config(Path(base)).get('architectures') or []
    named.extend(('base_model_name_or_path', a) for a in archs[:1])
  for key, arch in named:
    keep = [f for f in families if f.architecture == arch]
    if not keep:
      which = families[0].name if family_given else ', '.join(f.name for f in families)
      raise ConfigError(f'{FIELD}.{key}', f'the adapter was made for a {arch}; this model is a '
                        f'{which} ({", ".join(f.architecture for f in families)})')
    families = keep
  return families


def load_adapter(path: str | Path, model_cfg: ModelConfig, *, family: Family | None = None
                 ) -> tuple[dict[str, Any], Any]:
  """Reads a peft LoRA adapter directory onto our model.

  Args:
    path: the directory (adapter_config.json, adapter_model.safetensors), written by peft's
      save_pretrained or by `save_adapter`.
    model_cfg: the model it applies to; the adapters come back scanned or per layer as its
      `scan_layers` says.
    family: the transformers architecture; None: every family that can express the model (the
      adapter's auto_mapping, where it has one, must name one of them).

  Returns:
    (ft_fields, adapters): the `finetune` fields the adapter implies (method 'lora', 'rslora'
    or 'dora'; rank, alpha, target_modules, dropout), and the adapters tree (what goes under
    'adapters' in `Transformer.apply`, the trainable tree of the method those fields make), in
    the dtype the file stores.

  Raises:
    ConfigError (field `adapter_config.<key>`) for a setting our adapters cannot represent:
    rank_pattern / alpha_pattern, modules_to_save, bias other than 'none', layers_to_transform,
    inits that change the base (PiSSA...), other LoRA variants, unknown keys, an architecture
    other than the model's. ValueError naming the tensor for what the weights get wrong: keys
    that are not LoRA factors of our projections (embeddings' lora_embedding_A/B included),
    missing factors, shapes, layers left out.
  """
  path = Path(path)
  config = _read_config(path)
  tensors = _read_tensors(path)
  rank, dora = config.get('r', _PEFT_DEFAULTS['r']), bool(config.get('use_dora'))

  embedding = sorted(k for k in tensors if 'lora_embedding_' in k)
  if embedding:  # peft saves the embedding's own weights beside these: name the cause
    raise ValueError(f'adapter tensor {embedding[0]!r}: LoRA on embeddings is not supported '
                     '(ours adapt Linear projections)')
  by_module: dict[str, dict[str, str]] = {}
  base_copies: dict[str, str] = {}
  for key in sorted(tensors):
    if not key.startswith(PREFIX):
      raise ValueError(f'adapter tensor {key!r} does not start with {PREFIX!r}: not a '
                       'PeftModel adapter of a transformers model')
    if key.endswith(BASE_COPY):
      base_copies[key[len(PREFIX):-len(BASE_COPY)]] = key
      continue
    suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
    if suffix is None:
      raise ValueError(f'adapter tensor {key!r}: not a LoRA factor (lora_A, lora_B) or DoRA '
                       'magnitude of a module (modules_to_save, biases?)')
    module = key[len(PREFIX):-len(suffix)]
    by_module.setdefault(module, {})[SUFFIXES[suffix]] = key
  if not by_module:
    raise ValueError(f'{str(path / WEIGHTS_FILE)!r} holds no adapter tensor')

  every = _projections(_plain(model_cfg))
  families = _check_base(config, families_for(model_cfg, family), family is not None)
  found = []
  for f in families:
    sites, refused = _sites(f, model_cfg, every)
    site_of = {s.module: s for s in sites}
    unknown = sorted(set(by_module) - set(site_of))
    found.append((f, site_of, refused, unknown))
  complete = [x for x in found if not x[3]]
  if not complete:
    f, _, refused, unknown = found[0]
    module = unknown[0]
    if module in refused:
      raise ValueError(f'adapter tensor {next(iter(by_module[module].values()))!r}: '
                       f'{refused[module]}')
    raise ValueError(f'adapter tensor {next(iter(by_module[module].values()))!r} adapts '
                     f'{module!r}, which is not a projection of this {f.name} model (a '
                     'different architecture or size, or a module we do not adapt)')
  f, site_of, _, _ = complete[0]
  for other, other_sites, _, _ in complete[1:]:
    if any(site_of[m].signature() != other_sites[m].signature() for m in by_module):
      raise ValueError(f'{f.name} and {other.name} read this adapter differently; pass family=')

  for module, key in base_copies.items():
    site = site_of.get(module) if module in by_module else None
    p = site and site.projection
    if site is None or tuple(tensors[key].shape) != rule_hf_shape(site.rule,
                                                                 p.in_shape + p.out_shape):
      raise ValueError(f'adapter tensor {key!r} is a base weight that is not the same shape as '
                       'an adapted projection of this model (a resized vocabulary?); base '
                       'weights are not part of our adapters')
    warnings.warn(f'{key!r}: peft saved the base weight of the adapted {module} (as it does for '
                  "embedding-like layers); load_adapter leaves it: the model's own is used, and "
                  'must be the same', stacklevel=2)

  # The file holds what its config says peft adapted: no more, no fewer modules.
  named = {m for m in _linear_modules(f, model_cfg) | set(site_of)
           if _peft_selects(config.get('target_modules'), m)
           and not _peft_selects(config.get('exclude_modules'), m)}
  spec = config.get('target_modules')
  if isinstance(spec, list):
    spec = sorted(spec)  # peft writes a set: its order is the hash seed's
  if named - set(by_module):
    module = sorted(named - set(by_module))[0]
    key = site_of[module].key('lora_a') if module in site_of else PREFIX + module
    raise ValueError(f'adapter tensor {key!r} is missing: target_modules={spec!r} selects '
                     f'{module} (the file is incomplete, or for another model)')
  if set(by_module) - named:
    module = sorted(set(by_module) - named)[0]
    raise ValueError(f'adapter tensor {next(iter(by_module[module].values()))!r} adapts '
                     f'{module}, which target_modules={spec!r} does not select')

  names = ('lora_a', 'lora_b') + (('magnitude',) if dora else ())
  for module, keys in by_module.items():
    site = site_of[module]
    for n in set(keys) - set(names):  # magnitude without use_dora
      raise ValueError(f'adapter tensor {keys[n]!r} is a DoRA magnitude but use_dora is false')
    missing = [site.key(n) for n in names if n not in keys]
    if missing:
      raise ValueError(f'adapter tensor {missing[0]!r} is missing (use_dora='
                       f'{str(dora).lower()}, every adapted module needs it)')
    rules, shapes = site.rules(), site.shapes(rank)
    for n in names:
      want = rule_hf_shape(rules[n], shapes[n])
      got = tuple(tensors[keys[n]].shape)
      if got != want:
        raise ValueError(f'adapter tensor {keys[n]!r} has shape {list(got)}, expected '
                         f'{list(want)} for r={rank} on this model (a different base model?)')

  # Whole projections only: every layer of a stack (or every block of a name) or none.
  sites_of: dict[tuple[str, ...], list[_Site]] = {}
  for module in by_module:
    sites_of.setdefault(site_of[module].projection.path, []).append(site_of[module])
  every_site = {}
  for s in site_of.values():
    every_site.setdefault(s.projection.path, []).append(s)
  adapted = [p for p in every if p.path in sites_of]
  for p in adapted:
    if len(sites_of[p.path]) != len(every_site[p.path]):
      have = sorted(s.module for s in sites_of[p.path])
      lack = sorted(set(s.module for s in every_site[p.path]) - set(have))
      raise ValueError(f'the adapter leaves out {", ".join(lack)} but adapts {", ".join(have)}: '
                       'our adapters cover every layer of a targeted projection (peft\'s '
                       'layers_to_transform)')
  target_modules = _our_targets(model_cfg, every, {p.path for p in adapted})

  adapters: dict = {}
  for p in adapted:
    sites = sorted(sites_of[p.path], key=lambda s: s.index or 0)
    for n in names:
      arrays = [rule_to_ours(s.rules()[n], tensors[by_module[s.module][n]], s.shapes(rank)[n])
                for s in sites]
      value = np.stack(arrays) if p.stacked else arrays[0]
      node = adapters
      for k in p.path:
        node = node.setdefault(k, {})
      node[n] = jnp.asarray(value)
  method = 'dora' if dora else 'rslora' if config.get('use_rslora') else 'lora'
  alpha = config.get('lora_alpha', _PEFT_DEFAULTS['lora_alpha'])
  fields = dict(method=method, rank=rank, alpha=float(alpha), target_modules=target_modules,
                dropout=float(config.get('lora_dropout', 0.0)))
  return fields, adapters


def _our_targets(cfg: ModelConfig, every: Sequence[Projection],
                 adapted: set[tuple[str, ...]]) -> str:
  """finetune.target_modules naming exactly the `adapted` projections: 'all-linear', else
  peft's names (q_proj, ...) where each selects only adapted ones, else our own parent/name
  (mlp/gate where gate_proj would also pick the shared experts')."""
  if {p.path for p in targets.select(cfg, targets.ALL_LINEAR)} == adapted:
    return targets.ALL_LINEAR
  names, covered = [], set()
  for name, modules in targets.HF_NAMES.items():
    hits = {p.path for p in every if p.module in modules}
    if hits and hits <= adapted:
      names.append(name)
      covered |= hits
  for p in every:
    if p.path in adapted and p.path not in covered:
      ours = '/'.join(p.module).strip('/')
      hits = {q.path for q in every if q.module == p.module}
      if not hits <= adapted:
        left = sorted(q.name for q in every if q.path in hits - adapted)
        raise ValueError(f'the adapter adapts {p.name} but not {", ".join(left)}; our '
                         f'target_modules name every layer of {ours} or none')
      names.append(ours)
      covered |= hits
  chosen = {p.path for p in targets.select(cfg, names)}
  if chosen != adapted:  # a bug here, not the file's
    raise AssertionError(f'target_modules {names} select {sorted(chosen)}, not {sorted(adapted)}')
  return ','.join(names)

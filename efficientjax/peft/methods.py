"""The fine-tuning methods (`finetune.method`): what trains, what it starts from, how the
model sees it, and its learning rates.

A method turns the base params into (trainable, frozen) trees. The optimizer sees only the
trainable one, so frozen weights get no gradient and no optimizer state; `variables` rebuilds
what the model applies (params, and adapters in their own collection) inside the step.

- full: everything trains; frozen is empty.
- freeze: the chosen layers (last/first N, and within them all or some modules) and extra
  top-level modules train; the rest is frozen (LLaMA-Factory's freeze tuning).
- lora, rslora, dora, pissa, lora_plus: a LoRA adapter per targeted projection, the base
  frozen (peft's LoraConfig with use_rslora / use_dora / init_lora_weights='pissa...'; LoRA+
  is LoRA trained with B's learning rate ×`lora_plus_ratio`, peft's create_loraplus_optimizer).
"""

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from efficientjax.errors import ConfigError
from efficientjax.model import ModelConfig, layer_stacks
from efficientjax.nn.linear import AdapterSettings
from efficientjax.peft import lora, targets
from efficientjax.registry import Registry

METHODS = Registry('finetune.method')

TOP_LEVEL = ('embed', 'lm_head', 'final_norm', 'position')  # modules outside the layers


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """The `finetune` section, resolved."""
  method: str = 'lora'
  target_modules: str = targets.ALL_LINEAR  # comma-separated peft names, ours, or all-linear
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  init: str | None = None           # None: the method's own (kaiming; pissa for pissa)
  lora_plus_ratio: float = 16.0
  freeze_layers: int = 2            # freeze: the last N layers train (-N: the first N)
  freeze_modules: str = 'all'       # freeze: 'all' or comma-separated names within a layer
  freeze_extra: str = ''            # freeze: top-level modules that also train (embed, lm_head...)
  base_dtype: str | None = None     # the frozen base's dtype; None: model.param_dtype
  export: str = 'adapter'           # after the run: adapter (peft files) | merged | none

  @classmethod
  def from_config(cls, ft: Mapping[str, Any]) -> 'FinetuneConfig':
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(ft).items() if k in names})

  @property
  def targets(self) -> str | list[str]:
    t = self.target_modules.strip()
    return t if t == targets.ALL_LINEAR else [n.strip() for n in t.split(',') if n.strip()]


class Method:
  """The interface every entry of METHODS provides, bound to a model and a `finetune`
  section (`METHODS.get(name)(cfg, ft)`); the defaults are full fine-tuning's."""

  def __init__(self, cfg: ModelConfig, ft: FinetuneConfig):
    self.cfg, self.ft = cfg, ft

  def settings(self) -> AdapterSettings | None:
    """The adapters' static settings the model's Linear layers need (None: no adapters)."""
    return None

  def check(self) -> list[ConfigError]:
    return []

  def prepare(self, params: Any, key: jax.Array) -> tuple[Any, Any]:
    """(trainable, frozen) from the base params (jit- and eval_shape-able)."""
    return params, {}

  def variables(self, trainable: Any, frozen: Any) -> tuple[Any, Any]:
    """(params, adapters) the model applies; adapters {} when there are none."""
    return trainable, {}

  def logical_axes(self, param_axes: Any) -> tuple[Any, Any]:
    """(trainable, frozen) trees of logical axis names (PartitionSpecs), from the params'."""
    return param_axes, {}

  def lr_multipliers(self, trainable: Any) -> Any | None:
    """A tree of per-parameter learning-rate factors, or None for one rate."""
    return None

  def merged(self, trainable: Any, frozen: Any) -> Any:
    """Plain params with whatever was trained folded in (for export and serving)."""
    return self.variables(trainable, frozen)[0]


METHODS.register('full')(Method)


def _cast(tree: Any, dtype: str | None) -> Any:
  if dtype is None:
    return tree
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)


# ---------------------------------------------------------------------------------------- freeze

def _freeze_plan(cfg: ModelConfig, ft: FinetuneConfig) -> tuple[dict[str, tuple[int, int]],
                                                                  list[str], tuple[str, ...]]:
  """({stack or block name: (first, count) of its layers that train}, module names within a
  layer that train (empty: all), top-level modules that train)."""
  chosen = set(freeze_layers(cfg, ft))
  plan: dict[str, tuple[int, int]] = {}
  if cfg.scan_layers:
    for s in layer_stacks(cfg):
      mine = sorted(i - s.first_layer for i in chosen if s.first_layer <= i < s.first_layer
                    + s.num_layers)
      if mine:
        plan[s.name] = (mine[0], len(mine))
  else:
    plan = {f'block_{i}': (0, 1) for i in sorted(chosen)}
  modules = ([] if ft.freeze_modules.strip() == 'all' else
             [m.strip() for m in ft.freeze_modules.split(',') if m.strip()])
  extra = tuple(m.strip() for m in ft.freeze_extra.split(',') if m.strip())
  return plan, modules, extra


def freeze_layers(cfg: ModelConfig, ft: FinetuneConfig) -> list[int]:
  """The layers `freeze` trains: the last freeze_layers, or the first -freeze_layers."""
  n = ft.freeze_layers
  return list(range(cfg.num_layers - n, cfg.num_layers) if n >= 0 else range(0, -n))


def layer_module_trains(path: tuple[str, ...], modules: list[str]) -> bool:
  """Whether a leaf under a layer (path below the stack/block name) is in `modules`, given as
  peft names (q_proj, ...), our parent/name, or whole parts (attn, mlp, attn_norm)."""
  if not modules:
    return True
  for m in modules:
    if m in targets.HF_NAMES:
      if any(path[:len(pair)] == pair or path[-3:-1] == pair for pair in targets.HF_NAMES[m]):
        return True
    elif tuple(m.split('/')) == path[:len(m.split('/'))]:
      return True
  return False


@METHODS.register('freeze')
class Freeze(Method):
  """Train the last (or first) `freeze_layers` layers, optionally only `freeze_modules` in
  them, plus `freeze_extra` top-level modules; the rest of the model is frozen. In a scanned
  stack the trained layers are a contiguous slice of each stacked leaf, written back into the
  frozen stack inside the step (one copy of the stack's leaves it touches per step)."""

  def check(self):
    cfg, ft = self.cfg, self.ft
    errors = []
    n = ft.freeze_layers
    if n == 0 or abs(n) > cfg.num_layers:
      errors.append(ConfigError('finetune.freeze_layers', f'{n}: must be 1..{cfg.num_layers} '
                                '(the last N layers train) or -1..-num_layers (the first N)'))
    bad = [m for m in _freeze_plan(cfg, ft)[2] if m not in TOP_LEVEL]
    if bad:
      errors.append(ConfigError('finetune.freeze_extra', f'{bad}: valid names are '
                                f'{", ".join(TOP_LEVEL)}'))
    return errors

  def _split(self, tree, take_slice):
    cfg, ft = self.cfg, self.ft
    plan, modules, extra = _freeze_plan(cfg, ft)
    flat = traverse_util.flatten_dict(tree)
    trainable = {}
    for path, leaf in flat.items():
      top = path[0]
      if top in plan and layer_module_trains(path[1:], modules):
        first, count = plan[top]
        trainable[path] = take_slice(leaf, first, count) if cfg.scan_layers else leaf
      elif top in extra:
        trainable[path] = leaf
    if not trainable:
      raise ConfigError('finetune.freeze_modules', f'{ft.freeze_modules!r} selects no '
                        'parameter of the chosen layers')
    return traverse_util.unflatten_dict(trainable)

  def prepare(self, params, key):
    trainable = self._split(params, lambda x, f, n: x[f:f + n])
    return trainable, _cast(params, self.ft.base_dtype)

  def variables(self, trainable, frozen):
    flat = traverse_util.flatten_dict(frozen)
    for path, leaf in traverse_util.flatten_dict(trainable).items():
      base = flat[path]
      if leaf.shape == base.shape:
        flat[path] = leaf
      else:  # a slice of a scanned stack: where it sits is in the plan, not in the leaf
        flat[path] = jax.lax.dynamic_update_slice_in_dim(
            base, leaf.astype(base.dtype), self._plan[path[0]][0], axis=0)
    return traverse_util.unflatten_dict(flat), {}

  def logical_axes(self, param_axes):
    return self._split(param_axes, lambda x, f, n: x), param_axes

  @property
  def _plan(self):
    return _freeze_plan(self.cfg, self.ft)[0]


# ------------------------------------------------------------------------------------ LoRA family

class LoRA(Method):
  """A low-rank adapter on each targeted projection, the base frozen (and kept in
  `finetune.base_dtype`)."""
  rslora = False
  dora = False
  default_init = 'kaiming'
  plus = False  # LoRA+: B (and every 1-D trainable) at lora_plus_ratio × the rate

  @property
  def scale(self) -> float:
    return lora.scaling(self.ft.alpha, self.ft.rank, self.rslora)

  @functools.cached_property
  def chosen(self) -> list[targets.Projection]:
    """The adapted projections (found once: it traces the model)."""
    return targets.select(self.cfg, self.ft.targets)

  def settings(self):
    return AdapterSettings(scaling=self.scale, dropout=self.ft.dropout)

  @property
  def init_name(self):
    return self.ft.init or self.default_init

  def check(self):
    ft = self.ft
    errors = []
    if ft.rank < 1:
      errors.append(ConfigError('finetune.rank', f'{ft.rank}: must be a positive integer (e.g. 8)'))
    init = self.init_name
    pissa = init == 'pissa' or (init.startswith('pissa_niter_')
                                and init[len('pissa_niter_'):].isdigit())
    if init not in ('kaiming', 'gaussian') and not pissa:
      errors.append(ConfigError('finetune.init', f'{init!r}: use kaiming, gaussian, pissa or '
                                'pissa_niter_K (a randomised SVD with K iterations)'))
    try:
      chosen = self.chosen
    except ConfigError as e:
      return errors + [e]
    if ft.rank >= 1:
      small = [p.name for p in chosen
               if ft.rank > min(_prod(p.in_shape), _prod(p.out_shape))]
      if small:
        errors.append(ConfigError('finetune.rank', f'{ft.rank} exceeds the smaller side of '
                                  f'{", ".join(small)}; lower it'))
    return errors

  def prepare(self, params, key):
    ft, chosen = self.ft, self.chosen
    init, scale = self.init_name, self.scale
    adapters: dict = {}
    base = params
    keys = jax.random.split(key, len(chosen))
    replaced = {}
    for k, p in zip(keys, chosen):
      kernel = targets.get(params, p.path)['kernel']
      adapter, new_kernel = lora.init_adapter(k, kernel, p, rank=ft.rank, init=init,
                                              scale=scale, dora=self.dora)
      _set(adapters, p.path, adapter)
      if new_kernel is not None:
        replaced[p.path + ('kernel',)] = new_kernel
    if replaced:
      flat = traverse_util.flatten_dict(base)
      flat.update(replaced)
      base = traverse_util.unflatten_dict(flat)
    return adapters, _cast(base, ft.base_dtype)

  def variables(self, trainable, frozen):
    return frozen, trainable

  def logical_axes(self, param_axes):
    adapters: dict = {}
    for p in self.chosen:
      names = tuple(targets.get(param_axes, p.path)['kernel'])
      lead = len(names) - len(p.in_shape) - len(p.out_shape)
      ins, outs = names[lead:lead + len(p.in_shape)], names[lead + len(p.in_shape):]
      spec = {'lora_a': names[:lead] + ins + (None,),
              'lora_b': names[:lead] + (None,) + outs}
      if self.dora:
        spec['magnitude'] = names[:lead] + outs
      _set(adapters, p.path, {k: jax.sharding.PartitionSpec(*v) for k, v in spec.items()})
    return adapters, param_axes

  def lr_multipliers(self, trainable):
    ratio = self.ft.lora_plus_ratio
    if not self.plus:
      return None
    # peft's groups: lora_B and every 1-D parameter (DoRA's magnitude) at lr × ratio, the rest
    # (lora_A) at lr. A scanned stack's leaves carry a layer axis: "1-D" is per layer.
    def factor(path, leaf):
      name = path[-1].key
      per_layer = leaf.ndim - (1 if self._stacked(path) else 0)
      return ratio if name in ('lora_b', 'magnitude') or per_layer == 1 else 1.0
    return jax.tree_util.tree_map_with_path(factor, trainable)

  def _stacked(self, path) -> bool:
    return self.cfg.scan_layers and getattr(path[0], 'key', '') in {
        s.name for s in layer_stacks(self.cfg)}

  def merged(self, trainable, frozen):
    return lora.merge(frozen, trainable, self.chosen, self.scale)


def _prod(shape: Sequence[int]) -> int:
  out = 1
  for d in shape:
    out *= d
  return out


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


METHODS.register('lora')(LoRA)


@METHODS.register('rslora')
class RSLoRA(LoRA):
  rslora = True


@METHODS.register('dora')
class DoRA(LoRA):
  dora = True


@METHODS.register('pissa')
class PiSSA(LoRA):
  default_init = 'pissa'


@METHODS.register('lora_plus')
class LoRAPlus(LoRA):
  plus = True

"""Which projections a fine-tuning method adapts: Hugging Face peft's `target_modules`
vocabulary mapped onto the model's own module names, and where each projection lives.

peft matches a target against the end of a module's dotted name (`q_proj` matches
`model.layers.3.self_attn.q_proj`); the same names here select our modules through the table
below, for every attention variant and the dense and shared-expert MLPs. Our own names
(`attn/q`, `mlp/down`, `lm_head`) are accepted as well.
"""

import dataclasses
import fnmatch
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientjax.errors import ConfigError
from efficientjax.model import ModelConfig, Transformer, layer_stacks
from efficientjax.nn.linear import Linear

FIELD = 'finetune.target_modules'

# peft's (Hugging Face's) module name -> (parent, name) pairs of ours that it names.
HF_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    'q_proj': (('attn', 'q'),),
    'k_proj': (('attn', 'k'),),
    'v_proj': (('attn', 'v'),),
    'o_proj': (('attn', 'o'),),
    'q_a_proj': (('attn', 'q_a'),),                # MLA (DeepSeek-V2/V3)
    'q_b_proj': (('attn', 'q_b'),),
    'kv_a_proj_with_mqa': (('attn', 'kv_a'),),
    'kv_b_proj': (('attn', 'kv_b'),),
    'gate_proj': (('mlp', 'gate'), ('shared', 'gate')),  # dense MLP, MoE shared experts
    'up_proj': (('mlp', 'up'), ('shared', 'up')),
    'down_proj': (('mlp', 'down'), ('shared', 'down')),
    'lm_head': (('', 'lm_head'),),
}
ALL_LINEAR = 'all-linear'  # peft: every linear layer except the output head


@dataclasses.dataclass(frozen=True)
class Projection:
  """One Linear layer of the model, as its params hold it."""
  path: tuple[str, ...]        # to its module in the params tree, e.g. ('blocks', 'attn', 'q')
  in_shape: tuple[int, ...]    # its kernel's input dims
  out_shape: tuple[int, ...]   # and output dims
  stacked: bool                # a scanned stack: every leaf has a leading layer axis
  layers: tuple[int, ...]      # the model's layer indices it covers (() for lm_head etc.)

  @property
  def name(self) -> str:
    return '/'.join(self.path)

  @property
  def module(self) -> tuple[str, str]:
    """(parent, name): what peft's vocabulary selects."""
    return (self.path[-2] if len(self.path) > 1 else '', self.path[-1])


def projections(cfg: ModelConfig) -> list[Projection]:
  """Every Linear of the model, found by tracing it (no weights are made)."""
  found: dict[tuple[str, ...], tuple[tuple[int, ...], tuple[int, ...]]] = {}

  def record(next_fn, args, kwargs, context):
    module = context.module
    if isinstance(module, Linear) and context.method_name == '__call__':
      x = args[0]
      in_shape = tuple(x.shape[x.ndim - module.in_dims:])
      found[tuple(module.path)] = (in_shape, tuple(module.features))
    return next_fn(*args, **kwargs)

  model = Transformer(dataclasses.replace(cfg, adapter=None))
  with nn.intercept_methods(record):
    jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 4), jnp.int32)), jax.random.key(0))
  stacks = {s.name: s for s in layer_stacks(cfg)} if cfg.scan_layers else {}
  out = []
  for path, (in_shape, out_shape) in sorted(found.items()):
    top = path[0]
    if top in stacks:
      s = stacks[top]
      layers = tuple(range(s.first_layer, s.first_layer + s.num_layers))
    elif top.startswith('block_'):
      layers = (int(top[len('block_'):]),)
    else:
      layers = ()
    out.append(Projection(path, in_shape, out_shape, top in stacks, layers))
  return out


def select(cfg: ModelConfig, target_modules: str | Sequence[str],
           field: str = FIELD) -> list[Projection]:
  """The projections `target_modules` names: 'all-linear', or a list of peft names
  (`q_proj`, ...), our own `parent/name` (`attn/q`) or glob patterns over our full paths
  (`blocks/attn/*`). Every name must select something: a typo is an error, not a no-op."""
  every = projections(cfg)
  if isinstance(target_modules, str):
    if target_modules == ALL_LINEAR:
      return [p for p in every if p.module != ('', 'lm_head')]
    target_modules = [target_modules]
  chosen: dict[tuple[str, ...], Projection] = {}
  ours = sorted({'/'.join(p.module).strip('/') for p in every})
  for name in target_modules:
    if name in HF_NAMES:
      hits = [p for p in every if p.module in HF_NAMES[name]]
    elif '/' in name and not any(c in name for c in '*?['):
      hits = [p for p in every if '/'.join(p.module) == name or p.name == name]
    else:
      hits = [p for p in every if fnmatch.fnmatchcase(p.name, name)
              or '/'.join(p.module).strip('/') == name]
    if not hits:
      present = sorted(k for k, v in HF_NAMES.items() if any(p.module in v for p in every))
      raise ConfigError(field, f'{name!r} names no projection of this model ({cfg.attention} '
                        f'attention, {cfg.ffn} FFN); peft names it has: {", ".join(present)}; '
                        f'its own: {", ".join(ours)}; or {ALL_LINEAR!r}')
    chosen.update({p.path: p for p in hits})
  return [chosen[k] for k in sorted(chosen)]


def get(tree: Any, path: Sequence[str]) -> Any:
  for key in path:
    tree = tree[key]
  return tree

"""Saving a quantised model once, so serving loads it instead of calibrating again.

One orbax checkpoint directory with two items: `params`, the arrays (each container as a dict
of its leaves: values, scales, and zeros / act_scale where present), and `meta`, JSON holding
the caller's meta, every container's static fields (`layout`, keyed by the '/'-joined path),
and every array's shape and dtype, from which `load` builds the restore target, so nothing
depends on the devices or sharding the checkpoint was saved from.
"""

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from efficientjax.quant.container import QuantizedKernel, is_quantized

_STATIC = ('kind', 'bits', 'group_size', 'shape', 'in_dims', 'dtype')
_LEAVES = ('values', 'scales', 'zeros', 'act_scale')


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save(path: str, params, meta: dict[str, Any] | None = None) -> None:
  """Writes params (containers or arrays; not boxed) and `meta` (JSON-able) to the directory
  `path`, which must not exist yet."""
  layout, arrays = {}, {}
  for keys, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
    names = tuple(k.key for k in keys)
    name = '/'.join(names)
    if is_quantized(leaf):
      layout[name] = {f: getattr(leaf, f) for f in _STATIC}
      layout[name]['shape'] = list(leaf.shape)
      for f in _LEAVES:
        if getattr(leaf, f) is not None:
          arrays[names + (f,)] = getattr(leaf, f)
    else:
      arrays[names] = leaf
  spec = {'/'.join(k): [list(np.shape(a)), jnp.dtype(a.dtype).name] for k, a in arrays.items()}
  _checkpointer().save(os.path.abspath(path), args=ocp.args.Composite(
      params=ocp.args.StandardSave(traverse_util.unflatten_dict(arrays)),
      meta=ocp.args.JsonSave({'meta': meta or {}, 'layout': layout, 'arrays': spec})))


def load(path: str, sharding: jax.sharding.Sharding | None = None) -> tuple[dict, dict[str, Any]]:
  """(params, meta) as `save` was given them, every array exactly as stored, placed with
  `sharding` (default: the first device)."""
  path = os.path.abspath(path)
  ck = _checkpointer()
  stored = ck.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = traverse_util.unflatten_dict({
      tuple(k.split('/')): jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)
      for k, (shape, dtype) in stored['arrays'].items()})
  arrays = ck.restore(path, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(target)))['params']
  flat = traverse_util.flatten_dict(arrays)
  for name, static in stored['layout'].items():
    names = tuple(name.split('/'))
    leaves = {f: flat.pop(names + (f,), None) for f in _LEAVES}
    flat[names] = QuantizedKernel(**leaves, **{**static, 'shape': tuple(static['shape'])})
  return traverse_util.unflatten_dict(flat), stored['meta']

"""A model's params at an inference precision: `quantize` once, save, serve.

What is quantised (weight-only precisions): every Linear kernel inside the layer stacks, i.e.
the attention projections and the dense or shared-expert MLPs, and the lm_head only with
quantize_lm_head=True (AWQ and GPTQ leave it). What is not, kept in bf16 and listed in the
report with the reason: embeddings and norms; biases; MoE routers and routed experts (raw
params, not Linears); NSA's branch gate and compression MLPs and Qwen2-MoE's shared-expert gate
(small: a few outputs, or l·head_dim → head_dim per head, where rounding error is not worth the
bytes). A quantised kernel becomes a `QuantizedKernel` in place of its `kernel` leaf, with the
stack's leading layer axis on every leaf of a scanned model.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from efficientjax.errors import ConfigError
from efficientjax.quant import awq as awq_lib
from efficientjax.quant import calibration as calib
from efficientjax.quant import gptq as gptq_lib
from efficientjax.quant.container import QuantizedKernel, is_quantized, storage_bytes
from efficientjax.quant.formats import container
from efficientjax.quant.precisions import PRECISIONS, Precision

GROUP_SIZES = (128, 64, 32, 16, 8, 4, 2)  # tried, largest first, for a fix that divides all


def weight_bytes(params) -> int:
  """Bytes of every array in `params`, containers' packed values, scales and zero points
  included (a.size · a.dtype.itemsize: what is stored)."""
  return storage_bytes(params)


def skip_reason(path: tuple[str, ...], quantize_lm_head: bool = False) -> str | None:
  """Why the Linear at `path` (per-layer layout) is not quantised, or None if it is."""
  name = path[-1]
  if path == ('lm_head',):
    return None if quantize_lm_head else 'lm_head (quantize_lm_head=False)'
  if not path[0].startswith('block_'):
    return 'outside the layer stacks'
  if name.endswith(('_compress_hidden', '_compress_out')):
    return "NSA's compression MLP (small)"
  if path[-2:] == ('attn', 'gate'):
    return "NSA's branch gate (three outputs per head)"
  if name == 'shared_gate':
    return "the shared experts' gate (one output)"
  return None


def _abstract_params(cfg):
  from efficientjax import model as model_lib  # pylint: disable=g-import-not-at-top (cycle)
  variables = jax.eval_shape(lambda: model_lib.Transformer(cfg).init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  return nn.unbox(variables['params'])


def _targets(sites, precision: Precision, quantize_lm_head: bool):
  if precision.kind is None:
    return []
  return [s for s in sites if skip_reason(s.path, quantize_lm_head) is None]


def _group_size_errors(targets, precision: Precision, group_size: int) -> list[ConfigError]:
  if not precision.grouped or not isinstance(group_size, int) or group_size < 2:
    return []
  bad = sorted({(s.in_features, '/'.join(s.path[1:])) for s in targets
                if s.in_features % group_size})
  if not bad:
    return []
  widths = {s.in_features for s in targets}
  fit = next((g for g in GROUP_SIZES if all(w % g == 0 for w in widths)), None)
  listed = ', '.join(f'{name} ({width})' for width, name in bad[:6])
  return [ConfigError('inference.group_size', f'{group_size} does not divide the input width of '
                      f'{listed}' + (f'; {fit} divides them all' if fit else ''),
                      {'inference.group_size': fit} if fit else None)]


def check(cfg, *, precision: str, method: str = 'rtn', group_size: int = 128,
          symmetric: bool = True, has_calibration: bool = False,
          quantize_lm_head: bool = False) -> list[ConfigError]:
  """Every reason `quantize` would refuse these settings for this model (nothing computed)."""
  try:
    entry = PRECISIONS.get(precision)
  except ConfigError as e:
    return [e]
  errors = entry.check(method=method, group_size=group_size, symmetric=symmetric,
                       has_calibration=has_calibration)
  if entry.grouped:
    sites = calib.discover(cfg, _abstract_params(cfg))
    errors += _group_size_errors(_targets(sites, entry, quantize_lm_head), entry, group_size)
  return errors


def _stack_path(cfg, path: tuple[str, ...]) -> tuple[str, ...]:
  """A per-layer path (block_i/...) in the model's own layout (the stack's name if scanned)."""
  from efficientjax import model as model_lib  # pylint: disable=g-import-not-at-top (cycle)
  if not cfg.scan_layers or not path or not path[0].startswith('block_'):
    return path
  i = int(path[0][len('block_'):])
  stack = next(s for s in model_lib.layer_stacks(cfg)
               if s.first_layer <= i < s.first_layer + s.num_layers)
  return (stack.name,) + tuple(path[1:])


def _leaf_reason(path: tuple[str, ...], kernel_reasons: dict) -> str:
  if path[:-1] in kernel_reasons and path[-1] == 'kernel':
    return kernel_reasons[path[:-1]]
  name = path[-1]
  if name == 'embedding':
    return 'embedding'
  if name == 'scale':
    return 'norm'
  if name == 'bias':
    return 'bias'
  if name == 'router':
    return 'MoE router'
  if len(path) >= 2 and path[-2] == 'mlp' and name in ('gate', 'up', 'down'):
    return 'MoE routed experts (raw params, not Linears)'
  return 'not a Linear kernel'


def quantize(cfg, params, *, precision: str, method: str = 'rtn', group_size: int = 128,
             symmetric: bool = True, calibration: Any = None, quantize_lm_head: bool = False,
             scale_dtype: str = 'bfloat16', act_order: bool = False, batch_size: int = 8,
             awq_tokens: int = 512, gptq_block_size: int = 128, damp: float = 0.01,
             stats_budget_bytes: int = 8 << 30) -> tuple[dict, dict[str, Any]]:
  """params (of `Transformer(cfg)`, full precision, scanned or not) -> (params at `precision`,
  report).

  method: rtn | awq | gptq (int8, int4); calibration: token ids [n, length] from the corpus
  (AWQ, GPTQ). group_size: int4's input features per scale; symmetric: False gives int4 zero
  points. scale_dtype: the stored scales'. act_order, gptq_block_size, damp: GPTQ's. awq_tokens:
  the token subsample of AWQ's search; batch_size: calibration rows per forward pass.
  Settings are checked (ConfigError naming the `inference.*` field) before any work. Serve the
  result with `dataclasses.replace(cfg, dtype=compute_dtype(precision))`.
  """
  entry = PRECISIONS.get(precision)
  errors = entry.check(method=method, group_size=group_size, symmetric=symmetric,
                       has_calibration=calibration is not None)
  if errors:
    raise errors[0]
  params = nn.unbox(params)
  length = 32 if calibration is None else int(jnp.shape(calibration)[1])
  sites = calib.discover(cfg, params, length)
  targets = _targets(sites, entry, quantize_lm_head)
  errors = _group_size_errors(targets, entry, group_size)
  if errors:
    raise errors[0]

  stats = {}
  if targets and method != 'rtn':
    stats = calib.collect(cfg, params, calibration, targets, hessian=method == 'gptq',
                          activations=method == 'awq', batch_size=batch_size,
                          max_tokens=awq_tokens, budget_bytes=stats_budget_bytes)

  # AWQ's scales and GPTQ's codes are searched kernel by kernel (each search compiled once per
  # shape); everything else (round-to-nearest, casts, re-stacking the layers) is one program.
  given, alphas = {}, {}
  if method != 'rtn':
    flat_u = traverse_util.flatten_dict(jax.jit(lambda p: calib.unscan(cfg, p))(params))
    for site in targets:
      w = flat_u[site.path + ('kernel',)]
      given[site.path] = _search(w, site, entry, method, stats[site.path], alphas,
                                 group_size=group_size, symmetric=symmetric,
                                 scale_dtype=scale_dtype, act_order=act_order,
                                 block_size=gptq_block_size, damp=damp)
    del flat_u

  def build(params, given):
    flat = traverse_util.flatten_dict(calib.unscan(cfg, params))
    for site in targets:
      key = site.path + ('kernel',)
      found = given.get(site.path)
      if is_quantized(found):
        flat[key] = found
      else:  # round-to-nearest, or AWQ's with its scale
        flat[key] = entry.quantize_kernel(flat[key], site.in_dims, group_size=group_size,
                                          symmetric=symmetric, scale_dtype=scale_dtype,
                                          act_scale=found)
    for key, leaf in flat.items():
      if not is_quantized(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating):
        flat[key] = leaf.astype(entry.param_dtype)
    out = traverse_util.unflatten_dict(flat)
    if cfg.scan_layers:
      from efficientjax import model as model_lib  # pylint: disable=g-import-not-at-top (cycle)
      out = model_lib.scan_params(out, cfg)
    return out

  out = jax.jit(build)(params, given)

  kernel_reasons = {}
  for site in sites:
    reason = skip_reason(site.path, quantize_lm_head) if entry.kind else 'nothing is quantised'
    if reason:
      kernel_reasons[_stack_path(cfg, site.path)] = reason
  quantized, left = [], {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(out, is_leaf=is_quantized)[0]:
    names = tuple(k.key for k in path)
    if is_quantized(leaf):
      quantized.append('/'.join(names))
    else:
      left['/'.join(names)] = f'{_leaf_reason(names, kernel_reasons)}: {leaf.dtype}'
  report = {
      'precision': precision, 'method': method, 'compute_dtype': entry.compute_dtype,
      'group_size': group_size if entry.grouped else None,
      'symmetric': symmetric if entry.kind else None,
      'scale_dtype': scale_dtype if entry.kind else None,
      'quantize_lm_head': quantize_lm_head,
      'act_order': act_order if method == 'gptq' else None,
      'calibration_tokens': None if calibration is None or method == 'rtn'
                            else int(jnp.size(calibration)),
      'quantized': sorted(set(quantized)), 'left': dict(sorted(left.items())),
      'weight_bytes_before': weight_bytes(params), 'weight_bytes_after': weight_bytes(out),
  }
  if method == 'awq':
    report['awq_alpha'] = alphas
  return out, report


def _search(kernel, site, entry: Precision, method: str, stats, alphas: dict, *,
            group_size: int, symmetric: bool, scale_dtype: str, act_order: bool,
            block_size: int, damp: float) -> QuantizedKernel | jax.Array:
  """AWQ: the kernel's act_scale s [in]; GPTQ: its container."""
  n_in = site.in_features
  group = entry.group_size(group_size, n_in)
  w = jnp.asarray(kernel, jnp.float32).reshape(n_in, -1)
  if method == 'awq':
    s, alpha, _ = awq_lib.search(w, stats.x_mean, stats.sample, kind=entry.kind, bits=entry.bits,
                                 group_size=group, symmetric=symmetric, scale_dtype=scale_dtype)
    alphas['/'.join(site.path)] = float(alpha)
    return s
  q, scales, zeros = gptq_lib.gptq(w, stats.hessian, bits=entry.bits, group_size=group,
                                   symmetric=symmetric, block_size=block_size,
                                   act_order=act_order, damp=damp, scale_dtype=scale_dtype)
  if not bool(jnp.all(jnp.isfinite(q))):
    # float32 Cholesky of a badly conditioned H gives NaN rather than failing (torch raises):
    # codes cast from NaN would be garbage, so stop here.
    raise ValueError(f"GPTQ: the Hessian of {'/'.join(site.path)} is not positive definite "
                     f'in float32 at damp={damp} (its Cholesky factor is not finite); raise the '
                     'dampening or give more calibration data')
  return container(entry.kind, q, scales, zeros, bits=entry.bits, group_size=group,
                   shape=tuple(kernel.shape), in_dims=site.in_dims, scale_dtype=scale_dtype,
                   dtype=entry.compute_dtype)


def layer_error(x: jax.Array, kernel: jax.Array, quantized: QuantizedKernel) -> jax.Array:
  """mean ‖x·W − x·dequantize(Q)‖² over tokens and outputs, x [n, in], in float32: the error
  AWQ and GPTQ minimise on the calibration set."""
  from efficientjax.quant.container import dequantize  # pylint: disable=g-import-not-at-top
  n_in = math.prod(kernel.shape[:quantized.in_dims])
  w = jnp.asarray(kernel, jnp.float32).reshape(n_in, -1)
  w_hat = dequantize(quantized, jnp.float32).reshape(n_in, -1)
  x = jnp.asarray(x, jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  return jnp.mean(jnp.square(jnp.matmul(x, w, precision=hi) - jnp.matmul(x, w_hat, precision=hi)))

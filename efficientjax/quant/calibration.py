"""Statistics of every Linear's input over a calibration set, for AWQ and GPTQ.

The full-precision model runs once over the calibration tokens, layer by layer as it always does
(not block-sequentially as AutoGPTQ does, where each block sees the outputs of the blocks before
it already quantised): every layer's statistics are those of the float model. The layers run
unscanned (`scan_layers=False` on `unscan_params`), so every Linear has its own module path, and
`nn.intercept_methods` sows what each chosen Linear sees into the `quant_stats` collection:

  xtx     Σ xᵀx [in, in] over tokens, float32, summed batch by batch (GPTQ's H = 2·XᵀX/N);
  abs_sum Σ |x| [in] (AWQ's mean |x|);
  sample  a bounded, evenly strided subsample of the tokens' inputs [≤ max_tokens, in] (AWQ's
          search).

Linears that receive the very same input tensor (q, k, v; gate and up) share one set of
statistics. What the Hessians need on the device is Σ in² · 4 bytes over the distinct inputs;
above `budget_bytes` the Linears are split over several passes of the calibration set.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

STATS = 'quant_stats'
HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Site:
  """One Linear of the model, in the per-layer (unscanned) layout."""
  path: tuple[str, ...]       # module path, e.g. ('block_0', 'attn', 'q')
  in_dims: int
  shape: tuple[int, ...]      # its kernel's
  input_of: tuple[str, ...]   # the first Linear called on the same input tensor (maybe itself)

  @property
  def in_features(self) -> int:
    return math.prod(self.shape[:self.in_dims])


@dataclasses.dataclass
class Stats:
  """What one Linear saw over the calibration set."""
  tokens: int
  hessian: jax.Array | None = None  # 2·XᵀX/N [in, in] float32
  x_mean: jax.Array | None = None   # mean |x| [in]
  sample: jax.Array | None = None   # [≤ max_tokens, in]


def _unscanned(cfg):
  return dataclasses.replace(cfg, scan_layers=False)


def unscan(cfg, params):
  """params in the per-layer layout (a no-op for an unscanned model)."""
  from efficientjax import model as model_lib  # pylint: disable=g-import-not-at-top (cycle)
  return model_lib.unscan_params(params, cfg) if cfg.scan_layers else dict(params)


def _is_linear_call(context) -> bool:
  from efficientjax.nn.linear import Linear  # pylint: disable=g-import-not-at-top (cycle)
  return context.method_name == '__call__' and isinstance(context.module, Linear)


def discover(cfg, params, length: int = 16) -> list[Site]:
  """Every Linear a forward pass calls, in call order (traced abstractly: nothing is computed)."""
  from efficientjax import model as model_lib  # pylint: disable=g-import-not-at-top (cycle)
  sites: dict[tuple[str, ...], Site] = {}
  model = model_lib.Transformer(_unscanned(cfg))

  def forward(p):
    seen = []  # (input tensor, first Linear called on it); holding x keeps its id unique

    def intercept(next_fun, args, kwargs, context):
      if _is_linear_call(context):
        mod, x = context.module, args[0]
        path = tuple(mod.path)
        first = next((p for xs, p in seen if xs is x), None)
        if first is None:
          seen.append((x, path))
        if path not in sites:
          shape = tuple(x.shape[x.ndim - mod.in_dims:]) + tuple(mod.features)
          sites[path] = Site(path, mod.in_dims, shape, first or path)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(intercept):
      return model.apply({'params': unscan(cfg, p)}, jnp.zeros((1, length), jnp.int32))

  jax.eval_shape(forward, params)
  return list(sites.values())


def _stats_step(cfg, paths: frozenset, hessian: bool, activations: bool, sample_tokens: int):
  """jit(params, tokens) -> the `quant_stats` collection of one batch (params in cfg's layout,
  unscanned inside the compiled step)."""
  from efficientjax import model as model_lib  # pylint: disable=g-import-not-at-top (cycle)
  model = model_lib.Transformer(_unscanned(cfg))

  def step(params, tokens):
    def intercept(next_fun, args, kwargs, context):
      if _is_linear_call(context) and tuple(context.module.path) in paths:
        mod, x = context.module, args[0]
        x = x.reshape(-1, math.prod(x.shape[x.ndim - mod.in_dims:])).astype(jnp.float32)
        mod.sow(STATS, 'rows', jnp.asarray(x.shape[0], jnp.float32))
        if hessian:
          mod.sow(STATS, 'xtx', jnp.matmul(x.T, x, precision=HIGHEST))
        if activations:
          mod.sow(STATS, 'abs_sum', jnp.sum(jnp.abs(x), axis=0))
          stride = max(1, x.shape[0] // sample_tokens)
          mod.sow(STATS, 'sample', x[::stride][:sample_tokens])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(intercept):
      _, state = model.apply({'params': unscan(cfg, params)}, tokens, mutable=[STATS])
    return state[STATS]

  return jax.jit(step)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def collect(cfg, params, tokens: Any, sites: list[Site], *, hessian: bool, activations: bool,
            batch_size: int = 8, max_tokens: int = 512, budget_bytes: int = 8 << 30
            ) -> dict[tuple[str, ...], Stats]:
  """Stats of each site's input over `tokens` [n, length] (int), keyed by site path; sites
  that share an input share one Stats object."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[0] == 0:
    raise ValueError(f'calibration tokens must be a non-empty [n, length] array, got shape '
                     f'{tokens.shape}')
  batches = [tokens[i:i + batch_size] for i in range(0, tokens.shape[0], batch_size)]
  per_batch = -(-max_tokens // len(batches))

  primaries = sorted({s.input_of for s in sites})
  width = {s.path: s.in_features for s in sites}
  passes, current, used = [], [], 0
  for p in primaries:
    need = width[p] ** 2 * 4 if hessian else 0
    if current and used + need > budget_bytes:
      passes.append(current)
      current, used = [], 0
    current.append(p)
    used += need
  passes.append(current)

  out: dict[tuple[str, ...], Stats] = {}
  for group in passes:
    step = {}  # one compiled step per batch shape (a shorter last batch compiles once more)
    totals: dict[tuple[str, ...], dict[str, Any]] = {p: {} for p in group}
    for batch in batches:
      key = batch.shape
      if key not in step:
        step[key] = _stats_step(cfg, frozenset(group), hessian, activations, per_batch)
      sown = step[key](params, jnp.asarray(batch))
      for p in group:
        got = _get(sown, p)
        acc = totals[p]
        for name in ('rows', 'xtx', 'abs_sum'):
          if name in got:
            value = sum(got[name])  # sow keeps a tuple: one entry per call
            acc[name] = value if name not in acc else acc[name] + value
        if 'sample' in got:
          acc.setdefault('sample', []).extend(got['sample'])
    for p in group:
      acc = totals[p]
      rows = float(acc['rows'])  # the tokens, times the calls per forward pass (one, today)
      out[p] = Stats(
          tokens=int(rows),
          hessian=2.0 * acc['xtx'] / rows if 'xtx' in acc else None,
          x_mean=acc['abs_sum'] / rows if 'abs_sum' in acc else None,
          sample=jnp.concatenate(acc['sample'])[:max_tokens] if 'sample' in acc else None)
  return {s.path: out[s.input_of] for s in sites}

"""LoRA-family adapters as data: their initialisation (kaiming/Gaussian, PiSSA's SVD, DoRA's
magnitude), their effective weight, and merging them into the base.

Layouts follow our kernels, not torch's: a projection's kernel is [in..., out...] (with a
leading layer axis in a scanned stack), its adapter `lora_a` [in..., r] and `lora_b`
[r, out...], DoRA's `magnitude` [out...]. peft's `lora_A.weight` [r, in] and `lora_B.weight`
[out, r] are these converted by each family's own tensor rules, as the kernel is
(efficientjax/peft/interchange.py).
The arithmetic is Hugging Face peft's (peft/tuners/lora/layer.py and dora.py), read and
re-derived, not copied.
"""

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from efficientjax.nn.linear import dora_weight_norm
from efficientjax.peft.targets import Projection, get


def scaling(alpha: float, rank: int, rslora: bool) -> float:
  """peft's `scaling`: alpha / r, or alpha / sqrt(r) with use_rslora (Kalajdzievski 2023)."""
  return alpha / math.sqrt(rank) if rslora else alpha / rank


def _as_matrix(kernel: jax.Array, p: Projection) -> jax.Array:
  """A (layers of) kernel as [.., in, out] matrices."""
  lead = kernel.shape[:kernel.ndim - len(p.in_shape) - len(p.out_shape)]
  return kernel.reshape(lead + (math.prod(p.in_shape), math.prod(p.out_shape)))


def init_adapter(key: jax.Array, kernel: jax.Array, p: Projection, *, rank: int, init: str,
                 scale: float, dora: bool) -> tuple[dict[str, jax.Array], jax.Array | None]:
  """(adapter variables, the new base kernel or None when the base is unchanged).

  init: 'kaiming' (peft's default `init_lora_weights=True`: A ~ kaiming_uniform(a=sqrt 5)
  over its fan-in, i.e. U(±1/sqrt(fan_in)), B = 0), 'gaussian' (A ~ N(0, 1/r), B = 0),
  'pissa' (the top-r singular triplets of the base: A, B = sqrt(S/s)·Vᵀ, U·sqrt(S/s), and the
  base keeps the residual W - s·A·B), 'pissa_niter_K' (the same from a randomised SVD with K
  subspace iterations, as peft's `pissa_niter_K`).
  """
  lead = kernel.shape[:kernel.ndim - len(p.in_shape) - len(p.out_shape)]
  fan_in = math.prod(p.in_shape)
  new_kernel = None
  if init in ('kaiming', 'gaussian'):
    shape = lead + p.in_shape + (rank,)
    if init == 'kaiming':
      bound = 1.0 / math.sqrt(fan_in)  # gain sqrt(2 / (1 + 5)) * sqrt(3 / fan_in)
      a = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    else:
      a = jax.random.normal(key, shape, jnp.float32) / rank
    b = jnp.zeros(lead + (rank,) + p.out_shape, jnp.float32)
  elif init == 'pissa' or init.startswith('pissa_niter_'):
    w = _as_matrix(kernel.astype(jnp.float32), p)
    if init == 'pissa':
      u, s, vt = jnp.linalg.svd(w, full_matrices=False)
      u, s, vt = u[..., :rank], s[..., :rank], vt[..., :rank, :]
    else:
      niter = int(init[len('pissa_niter_'):])
      keys = jax.random.split(key, math.prod(lead)).reshape(lead) if lead else key
      svd = lambda m, k: randomized_svd(m, rank, niter, k)
      for _ in lead:
        svd = jax.vmap(svd)
      u, s, vt = svd(w, keys)
    root = jnp.sqrt(s / scale)
    a = (u * root[..., None, :]).reshape(lead + p.in_shape + (rank,))
    b = (root[..., :, None] * vt).reshape(lead + (rank,) + p.out_shape)
    new_kernel = (kernel.astype(jnp.float32) - scale * _product(a, b, lead)).astype(kernel.dtype)
  else:
    raise ValueError(f'unknown LoRA initialisation {init!r}')
  adapter = {'lora_a': a, 'lora_b': b}
  if dora:
    base = kernel if new_kernel is None else new_kernel
    norm = dora_weight_norm
    for _ in lead:
      norm = jax.vmap(norm, in_axes=(0, 0, 0, None, None))
    adapter['magnitude'] = norm(base, a, b, scale, len(p.in_shape))
  return adapter, new_kernel


def _product(a: jax.Array, b: jax.Array, lead: tuple[int, ...]) -> jax.Array:
  """A·B over the rank axis, per leading (layer) index: [.., in..., out...]."""
  prod = lambda x, y: jnp.tensordot(x, y, axes=1)
  for _ in lead:
    prod = jax.vmap(prod)
  return prod(a.astype(jnp.float32), b.astype(jnp.float32))


def randomized_svd(w: jax.Array, rank: int, niter: int, key: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-`rank` SVD of w [m, n] by Halko et al.'s randomised range finder with `niter` power
  (subspace) iterations and no oversampling, as torch.svd_lowrank(q=rank) which peft calls."""
  m, n = w.shape
  y = w @ jax.random.normal(key, (n, rank), w.dtype)
  q, _ = jnp.linalg.qr(y)
  for _ in range(niter):
    z, _ = jnp.linalg.qr(w.T @ q)
    q, _ = jnp.linalg.qr(w @ z)
  u_small, s, vt = jnp.linalg.svd(q.T @ w, full_matrices=False)
  return q @ u_small, s, vt


def delta(adapter: dict[str, jax.Array], kernel: jax.Array, p: Projection,
          scale: float) -> jax.Array:
  """What merging adds to the kernel: s·A·B (LoRA), or m/‖W + s·A·B‖·(W + s·A·B) - W
  (DoRA, the norm per output feature)."""
  lead = kernel.shape[:kernel.ndim - len(p.in_shape) - len(p.out_shape)]
  lora = scale * _product(adapter['lora_a'], adapter['lora_b'], lead)
  if 'magnitude' not in adapter:
    return lora
  w = kernel.astype(jnp.float32) + lora
  axes = tuple(range(len(lead), len(lead) + len(p.in_shape)))
  norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
  mag = adapter['magnitude'].astype(jnp.float32).reshape(lead + (1,) * len(p.in_shape)
                                                         + p.out_shape)
  return mag / norm * w - kernel.astype(jnp.float32)


def merge(params: Any, adapters: Any, chosen: Sequence[Projection], scale: float) -> Any:
  """The base with every adapter folded into its kernel (a new tree; `params` untouched)."""
  return _fold(params, adapters, chosen, scale, +1)


def unmerge(merged: Any, adapters: Any, chosen: Sequence[Projection], scale: float,
            base: Any = None) -> Any:
  """The inverse of `merge` for LoRA (subtracting s·A·B). DoRA's merge is not invertible
  from the merged weight alone (its norm is of the unmerged one): pass `base` to get it."""
  if base is not None:
    return base
  if any('magnitude' in get(adapters, p.path) for p in chosen):
    raise ValueError('a merged DoRA weight cannot be unmerged without its base')
  return _fold(merged, adapters, chosen, scale, -1)


def _fold(params: Any, adapters: Any, chosen: Sequence[Projection], scale: float,
          sign: int) -> Any:
  out = jax.tree.map(lambda x: x, params)
  for p in chosen:
    module = dict(get(out, p.path))
    kernel = module['kernel']
    change = delta(get(adapters, p.path), kernel, p, scale)
    module['kernel'] = (kernel.astype(jnp.float32) + sign * change).astype(kernel.dtype)
    parent = get(out, p.path[:-1])
    parent[p.path[-1]] = module
  return out

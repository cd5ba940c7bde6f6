"""Round-to-nearest quantisation of one matrix, and containers built from codes.

Every quantiser here works on the kernel flattened to w [in, out] (float32); a group is
`group_size` consecutive input rows of one output column (group_size = in: per output channel).
A scale is rounded to its storage dtype BEFORE the codes are computed from it, so the stored
scale is the one the codes were rounded against:

  symmetric int (int8, int4):  scale = max|w| / (2^(b-1) - 1),
                               q = clip(round(w/scale), ±(2^(b-1) - 1)),  w ≈ q · scale
  asymmetric int (int4):       scale = max(max w - min w, 1e-5) / (2^b - 1),
                               zero = clip(round(-min w / scale), 0, 2^b - 1),
                               q = clip(round(w/scale) + zero, 0, 2^b - 1),  w ≈ (q - zero) · scale
  fp8 e4m3:                    scale = max|w| / 448,  v = float8_e4m3fn(clip(w/scale, ±448))

(round: to nearest, ties to even; a group of zeros gets scale 0 and codes 0.) The asymmetric
floor of 1e-5 on the range is AWQ's (`(max_val - min_val).clamp(min=1e-5)`).
"""

import functools
import math

import jax
import jax.numpy as jnp

from efficientjax.quant.container import FP8_MAX, QuantizedKernel, pack_int4

ASYMMETRIC_MIN_RANGE = 1e-5


def _safe_div(w: jax.Array, scale: jax.Array) -> jax.Array:
  ok = scale > 0
  return jnp.where(ok, w / jnp.where(ok, scale, 1.0), 0.0)


def int_params(w: jax.Array, bits: int, symmetric: bool, scale_dtype, axis: int = -2
               ) -> tuple[jax.Array, jax.Array | None]:
  """(scale, zero or None) of the values of `w` along `axis` (reduced, kept as size 1)."""
  if symmetric:
    scale = jnp.max(jnp.abs(w), axis=axis, keepdims=True) / (2 ** (bits - 1) - 1)
    return scale.astype(scale_dtype).astype(jnp.float32), None
  lo = jnp.min(w, axis=axis, keepdims=True)
  hi = jnp.max(w, axis=axis, keepdims=True)
  qmax = 2 ** bits - 1
  scale = jnp.maximum(hi - lo, ASYMMETRIC_MIN_RANGE) / qmax
  scale = scale.astype(scale_dtype).astype(jnp.float32)
  zero = jnp.clip(jnp.round(_safe_div(-lo, scale)), 0, qmax)
  return scale, zero


def int_codes(w: jax.Array, scale: jax.Array, zero: jax.Array | None, bits: int) -> jax.Array:
  """Codes (float32, integral): signed for symmetric (zero None), in [0, 2^b - 1] otherwise."""
  if zero is None:
    qmax = 2 ** (bits - 1) - 1
    return jnp.clip(jnp.round(_safe_div(w, scale)), -qmax, qmax)
  return jnp.clip(jnp.round(_safe_div(w, scale)) + zero, 0, 2 ** bits - 1)


def int_dequantize(q: jax.Array, scale: jax.Array, zero: jax.Array | None) -> jax.Array:
  return (q if zero is None else q - zero) * scale


def fp8_params(w: jax.Array, scale_dtype, axis: int = -2) -> jax.Array:
  scale = jnp.max(jnp.abs(w), axis=axis, keepdims=True) / FP8_MAX
  return scale.astype(scale_dtype).astype(jnp.float32)


def fp8_values(w: jax.Array, scale: jax.Array) -> jax.Array:
  # The clip matters: a value just above 448 (from the rounded scale) would cast to NaN, as
  # e4m3fn has no infinity.
  return jnp.clip(_safe_div(w, scale), -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)


def _grouped(w: jax.Array, group_size: int) -> jax.Array:
  n_in, n_out = w.shape
  return w.reshape(n_in // group_size, group_size, n_out)


def rtn(w: jax.Array, kind: str, *, bits: int, group_size: int, symmetric: bool, scale_dtype
        ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """w [in, out] float32 -> (codes [in, out] (float32 codes; fp8: float8 values), scales
  [in/group_size, out] float32 (already rounded to scale_dtype), zeros like scales or None)."""
  g = _grouped(w.astype(jnp.float32), group_size)
  if kind == 'fp8':
    scale = fp8_params(g, scale_dtype)
    return fp8_values(g, scale).reshape(w.shape), scale[:, 0], None
  scale, zero = int_params(g, bits, symmetric, scale_dtype)
  q = int_codes(g, scale, zero, bits).reshape(w.shape)
  return q, scale[:, 0], None if zero is None else zero[:, 0]


def fake_quantize(w: jax.Array, kind: str, *, bits: int, group_size: int, symmetric: bool,
                  scale_dtype) -> jax.Array:
  """dequantize(rtn(w)) [in, out] float32, without building a container (AWQ's search)."""
  q, scale, zero = rtn(w, kind, bits=bits, group_size=group_size, symmetric=symmetric,
                       scale_dtype=scale_dtype)
  rows = lambda a: jnp.repeat(a, group_size, axis=0)
  if kind == 'fp8':
    return q.astype(jnp.float32) * rows(scale)
  return int_dequantize(q, rows(scale), None if zero is None else rows(zero))


def container(kind: str, q: jax.Array, scales: jax.Array, zeros: jax.Array | None, *,
              bits: int, group_size: int, shape: tuple[int, ...], in_dims: int,
              scale_dtype, act_scale: jax.Array | None = None, dtype='bfloat16'
              ) -> QuantizedKernel:
  """The container holding codes `q` [in, out] (as `rtn` returns them) and their scales."""
  n_in = math.prod(shape[:in_dims])
  if q.shape != (n_in, math.prod(shape[in_dims:])):
    raise ValueError(f'codes {q.shape} do not flatten kernel {shape} with in_dims={in_dims}')
  if kind == 'int8':
    values = q.astype(jnp.int8)
  elif kind == 'fp8':
    values = q.astype(jnp.float8_e4m3fn)
  elif kind == 'int4':
    if bits > 4:
      raise ValueError(f'int4 containers hold at most 4 bits per code, got bits={bits}')
    values = pack_int4(q + 2 ** (bits - 1) if zeros is None else q)
  else:
    raise ValueError(f'unknown quantised kind {kind!r}')
  return QuantizedKernel(
      values=values, scales=scales.astype(scale_dtype),
      zeros=None if zeros is None else zeros.astype(jnp.uint8),
      act_scale=None if act_scale is None else act_scale.astype(jnp.float32),
      kind=kind, bits=bits, group_size=group_size, shape=tuple(int(d) for d in shape),
      in_dims=in_dims, dtype=jnp.dtype(dtype).name)


@functools.partial(jax.jit, static_argnames=('kind', 'in_dims', 'bits', 'group_size', 'symmetric',
                                             'scale_dtype', 'dtype'))
def quantize_kernel(kernel: jax.Array, kind: str, *, in_dims: int = 1, bits: int | None = None,
                    group_size: int | None = None, symmetric: bool = True,
                    scale_dtype='bfloat16', act_scale: jax.Array | None = None,
                    dtype='bfloat16') -> QuantizedKernel:
  """One kernel [in..., out...] quantised by round-to-nearest. group_size None: per output
  channel (int8, fp8); act_scale (AWQ's s [in]): stores Q(s·W), standing for Q(s·W)/s."""
  shape = tuple(kernel.shape)
  n_in = math.prod(shape[:in_dims])
  w = kernel.reshape(n_in, -1).astype(jnp.float32)
  if act_scale is not None:
    w = w * act_scale.astype(jnp.float32)[:, None]
  bits = bits or (4 if kind == 'int4' else 8)
  group_size = group_size or n_in
  if n_in % group_size:
    raise ValueError(f'group_size {group_size} does not divide the input width {n_in}')
  q, scales, zeros = rtn(w, kind, bits=bits, group_size=group_size, symmetric=symmetric,
                         scale_dtype=scale_dtype)
  return container(kind, q, scales, zeros, bits=bits, group_size=group_size, shape=shape,
                   in_dims=in_dims, scale_dtype=scale_dtype, act_scale=act_scale, dtype=dtype)

"""The quantised kernel: a pytree that sits in the params tree in place of a Linear's `kernel`.

Its leaves are ordinary arrays, so jit, `nn.scan` (a leading layer axis on every leaf), sharding
and orbax see nothing special; its static fields describe ONE layer's kernel, so a scanned
stack's container and the per-layer slices scan hands to `Linear` share them.

The matrix quantised is the kernel flattened to [in, out] (in = the product of its `in_dims`
leading dims, out = the product of the rest); groups of `group_size` consecutive input features
share a scale per output feature:

  int8  values int8 [in, out]; codes q in [-127, 127]; scales [1, out]; w = q · scale.
  int4  values uint8 [in/2, out], two codes per byte: input row 2i in the low nibble, row 2i+1
        in the high one; scales [in/group_size, out]. Symmetric: nibble = q + 2^(bits-1) with
        q in [-(2^(bits-1) - 1), 2^(bits-1) - 1], w = q · scale. Asymmetric: nibble = q in
        [0, 2^bits - 1], zero points uint8 [in/group_size, out] (one byte each: 1/group_size of a
        byte per weight), w = (q - zero) · scale. `bits` may be below 4 (codes still use nibbles).
  fp8   values float8_e4m3fn [in, out]; scales [1, out]; w = value · scale.

AWQ's per-input-channel scale s, when present (`act_scale` [in], float32), makes the stored
matrix Q(s·W): the kernel it stands for is Q(s·W) / s (row i divided by s_i), which is what
`dequantize` returns; x · (Q/s) = (x/s) · Q, so a kernel may apply it to x instead.

`matmul` is the one way `Linear` multiplies by a container: the implementation is looked up in
`MATMULS` per container kind ('xla': dequantise to the compute dtype, then `dot_general`, the
portable reference); a project kernel registers itself with `register_matmul`.
"""

import dataclasses
import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

KINDS = ('int8', 'int4', 'fp8')
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


@flax.struct.dataclass
class QuantizedKernel:
  """A Linear kernel stored quantised (see the module docstring for each kind's layout).

  Leaves may carry leading batch dims (a scanned stack's layer axis); the static fields never
  count them.
  """
  values: jax.Array
  scales: jax.Array
  zeros: jax.Array | None = None
  act_scale: jax.Array | None = None
  kind: str = flax.struct.field(pytree_node=False, default='int8')
  bits: int = flax.struct.field(pytree_node=False, default=8)
  group_size: int = flax.struct.field(pytree_node=False, default=0)  # input rows per scale
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())  # the kernel's
  in_dims: int = flax.struct.field(pytree_node=False, default=1)
  dtype: str = flax.struct.field(pytree_node=False, default='bfloat16')  # dequantise to
  # A MATMULS entry of this kind to use; None: the best available ('xla' today). A runtime
  # choice, not part of what is saved.
  implementation: str | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def in_features(self) -> int:
    return math.prod(self.shape[:self.in_dims])

  @property
  def out_features(self) -> int:
    return math.prod(self.shape[self.in_dims:])

  @property
  def symmetric(self) -> bool:
    return self.zeros is None

  @property
  def batch_shape(self) -> tuple[int, ...]:
    """Leading dims beyond one layer's (a scanned stack's layer axis)."""
    return self.scales.shape[:-2]


def is_quantized(x) -> bool:
  return isinstance(x, QuantizedKernel)


# ---------------------------------------------------------------------------------------------
# int4 packing.


def pack_int4(codes: jax.Array) -> jax.Array:
  """Codes in [0, 15], [..., in, out] with `in` even -> uint8 [..., in/2, out]: row 2i in the
  low nibble, row 2i+1 in the high one."""
  if codes.shape[-2] % 2:
    raise ValueError(f'int4 packing pairs input rows, so the input width must be even, got '
                     f'{codes.shape[-2]}')
  c = codes.astype(jnp.uint8)
  return c[..., 0::2, :] | (c[..., 1::2, :] << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
  """uint8 [..., in/2, out] -> codes uint8 [..., in, out] in [0, 15] (inverse of pack_int4)."""
  low, high = packed & 0xF, packed >> 4
  return jnp.stack([low, high], axis=-2).reshape(
      packed.shape[:-2] + (2 * packed.shape[-2], packed.shape[-1]))


# ---------------------------------------------------------------------------------------------
# Dequantisation and the matmul.


def codes(kernel: QuantizedKernel) -> jax.Array:
  """The stored codes as float32 [..., in, out], centred (zero points subtracted), so that the
  dequantised matrix is codes · scale (per group) / act_scale."""
  if kernel.kind == 'int8':
    return kernel.values.astype(jnp.float32)
  if kernel.kind == 'fp8':
    return kernel.values.astype(jnp.float32)
  if kernel.kind != 'int4':
    raise ValueError(f'unknown quantised kind {kernel.kind!r}; known: {", ".join(KINDS)}')
  q = unpack_int4(kernel.values).astype(jnp.float32)
  if kernel.zeros is None:
    return q - 2.0 ** (kernel.bits - 1)
  zeros = jnp.repeat(kernel.zeros.astype(jnp.float32), kernel.group_size, axis=-2)
  return q - zeros


def dequantize(x, dtype=None):
  """The kernel a container stands for, [..., *shape] in `dtype` (default its own); anything
  else (a plain array) is returned as it is."""
  if not isinstance(x, QuantizedKernel):
    return x
  c = codes(x)
  scales = jnp.repeat(x.scales.astype(jnp.float32), x.group_size, axis=-2)
  w = c * scales
  if x.act_scale is not None:
    w = w / x.act_scale.astype(jnp.float32)[..., :, None]
  w = w.reshape(x.batch_shape + tuple(x.shape))
  return w.astype(jnp.dtype(dtype or x.dtype))


@dataclasses.dataclass(frozen=True)
class MatmulImpl:
  """fn(x, kernel, in_dims, dtype) -> x · dequantize(kernel) in `dtype`, contracting x's last
  `in_dims` dims; `available()` says whether it can run here (backend, installed kernels)."""
  fn: Callable
  available: Callable[[], bool] = lambda: True


MATMULS: dict[str, dict[str, MatmulImpl]] = {kind: {} for kind in KINDS}
# What `implementation=None` tries, first available first (a registered kernel puts its name
# before 'xla' here to become the default where it runs).
PREFERRED: dict[str, list[str]] = {kind: ['xla'] for kind in KINDS}


def register_matmul(kind: str, name: str, fn: Callable, *,
                    available: Callable[[], bool] = lambda: True, preferred: bool = False) -> None:
  """Adds an implementation of x · dequantize(W) for containers of `kind`."""
  if kind not in MATMULS:
    raise ValueError(f'unknown quantised kind {kind!r}; known: {", ".join(KINDS)}')
  if name in MATMULS[kind]:
    raise ValueError(f'quantised matmul {name!r} for {kind} is registered twice')
  MATMULS[kind][name] = MatmulImpl(fn, available)
  if preferred:
    PREFERRED[kind].insert(0, name)


def _xla_matmul(x: jax.Array, kernel: QuantizedKernel, in_dims: int, dtype) -> jax.Array:
  w = dequantize(kernel, dtype)
  contract = (tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(in_dims)))
  return jax.lax.dot_general(x.astype(dtype), w, (contract, ((), ())))


for _kind in KINDS:
  register_matmul(_kind, 'xla', _xla_matmul)


def resolve_matmul(kind: str, implementation: str | None) -> MatmulImpl:
  """The implementation to run: the named one (an error if unknown or unavailable here), or
  with None the first available of PREFERRED."""
  known = MATMULS.get(kind, {})
  if implementation is None:
    for name in PREFERRED.get(kind, []):
      if name in known and known[name].available():
        return known[name]
    raise ValueError(f'no quantised matmul for {kind!r} can run here')
  if implementation not in known:
    raise ValueError(f'unknown quantised matmul {implementation!r} for {kind!r} kernels; '
                     f'registered: {", ".join(sorted(known)) or "none"}')
  if not known[implementation].available():
    raise ValueError(f'quantised matmul {implementation!r} for {kind!r} kernels cannot run on '
                     f'this backend ({jax.default_backend()}); use implementation=None or "xla"')
  return known[implementation]


def matmul(x: jax.Array, kernel: QuantizedKernel, in_dims: int, dtype,
           implementation: str | None = None) -> jax.Array:
  """x · dequantize(kernel) in `dtype`, contracting x's last `in_dims` dims with the kernel's
  leading ones. `implementation` (default the container's own, then the best available) names
  a MATMULS entry of the kernel's kind."""
  if kernel.batch_shape:
    raise ValueError(f'a quantised kernel with leading dims {kernel.batch_shape} (a stack of '
                     'layers?) cannot multiply; slice one layer first')
  if in_dims != kernel.in_dims:
    raise ValueError(f'kernel of shape {kernel.shape} was quantised with in_dims='
                     f'{kernel.in_dims}, called with in_dims={in_dims}')
  if tuple(x.shape[x.ndim - in_dims:]) != tuple(kernel.shape[:in_dims]):
    raise ValueError(f'input {x.shape} does not contract with a kernel of shape {kernel.shape}')
  impl = resolve_matmul(kernel.kind, implementation or kernel.implementation)
  return impl.fn(x, kernel, in_dims, jnp.dtype(dtype))


def with_implementation(params, implementation: str | None):
  """params with every container set to use `implementation` (checked against MATMULS)."""
  def set_impl(x):
    if not isinstance(x, QuantizedKernel):
      return x
    resolve_matmul(x.kind, implementation)
    return x.replace(implementation=implementation)
  return jax.tree.map(set_impl, params, is_leaf=is_quantized)


def storage_bytes(tree) -> int:
  """Bytes of every array stored in `tree` (containers' packed values, scales and zero points
  included): a.size · itemsize, counted from what is held, never a dtype's nominal width."""
  return int(sum(np.size(a) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))

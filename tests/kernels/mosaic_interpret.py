"""Lets jax's Mosaic GPU interpreter run a wgmma whose operand is a transposed shared-memory ref.

jax 0.10's GPU interpreter (`jax._src.pallas.mosaic_gpu.interpret`) resolves a wgmma operand
through indexing transforms only, and fails on `plgpu.transpose_ref` ("'TransposeTransform'
object has no attribute 'indices'"). The Hopper kernels need that operand form (wgmma's
transposed A for the weight gradient, transposed B for the input gradient): it is how the
hardware reads a tile in the other major order without a copy. This module swaps the
interpreter's wgmma callback for one that reads each operand through its indexers, then
applies its transposes. It also gives `plgpu.layout_cast` (a register-layout annotation, the
identity on values) the CPU lowering the interpreter asks for.

jax 0.11's interpreter does both itself (it reads every ref through an `Access`: a range
plus an axis permutation, and treats `layout_cast` as the identity), and its callbacks take
other arguments; there this module changes nothing. Private API: delete it once jax 0.10 is
no longer supported.
"""

import contextlib

import jax
import numpy as np
from jax._src.interpreters import mlir
from jax._src.pallas.mosaic.interpret import utils as interpret_utils
from jax._src.pallas.mosaic_gpu import core as mosaic_gpu_core
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax._src.state import types as state_types


def _read(shared_memory, key, transforms, thread, logging_info):
  transforms = [t for t in transforms if not isinstance(t, gpu_callbacks.NOOP_TRANSFORMS)]
  cut = next((i for i, t in enumerate(transforms)
              if isinstance(t, state_types.TransposeTransform)), len(transforms))
  indexers, transposes = transforms[:cut], transforms[cut:]
  if not all(isinstance(t, state_types.TransposeTransform) for t in transposes):
    raise NotImplementedError(f'indexing after a transpose: {transforms}')
  value, _, _ = shared_memory.get_buffer_content(
      key, interpret_utils.to_range(indexers), thread, logging_info=logging_info)
  for t in transposes:
    value = np.transpose(value, t.permutation)
  return value


def _wgmma(*, token, device_id, grid_point_coords, thread_id, acc_allocation_key_as_array,
           acc_transforms, acc_dtype, a_allocation_key_as_array, a_transforms,
           b_allocation_key_as_array, b_transforms, source_info=None):
  key = gpu_callbacks.HostAllocationKey.from_array
  shared_memory = gpu_callbacks._get_shared_memory()  # pylint: disable=protected-access
  thread = shared_memory.get_global_thread_id(int(device_id), int(thread_id))
  info = interpret_utils.GPULoggingInfo(
      device_id=int(device_id), grid_point_coords=tuple(int(x) for x in grid_point_coords),
      thread_id=int(thread_id), source_info=source_info)
  a = _read(shared_memory, key(a_allocation_key_as_array), jax.tree.map(int, a_transforms),
            thread, info)
  b = _read(shared_memory, key(b_allocation_key_as_array), jax.tree.map(int, b_transforms),
            thread, info)
  acc_key = key(acc_allocation_key_as_array)
  drop_noops = gpu_callbacks._remove_noop_transforms  # pylint: disable=protected-access
  acc_range = interpret_utils.to_range(drop_noops(jax.tree.map(int, acc_transforms)))
  acc, _, _ = shared_memory.get_buffer_content(acc_key, acc_range, thread, logging_info=info)
  shared_memory.store_buffer_content(acc_key, acc_range, acc + np.matmul(a, b, dtype=acc_dtype),
                                     thread, logging_info=info)
  return token


def _interpreter_reads_transposes():
  return hasattr(interpret_utils, 'to_access')


@contextlib.contextmanager
def interpretable():
  """Within: Mosaic GPU kernels using transposed wgmma operands and layout casts interpret.

  On the way out the interpreter's global state is reset: a kernel that failed while
  interpreted leaves it behind, and the next kernel would then fail for that reason.
  """
  original = gpu_callbacks.wgmma
  if not _interpreter_reads_transposes():
    mlir.register_lowering(mosaic_gpu_core.layout_cast_p, lambda ctx, x, *, new_layout: [x],
                           platform='cpu')
    gpu_callbacks.wgmma = _wgmma
  try:
    yield
  finally:
    gpu_callbacks.wgmma = original
    gpu_callbacks.reset_gpu_interpret_mode_state()

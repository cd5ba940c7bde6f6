"""Writing safetensors checkpoints one tensor at a time, sharded as transformers shards them.

`safetensors.numpy.save_file` takes every tensor of a file at once, so exporting a model that
way holds a converted copy of all its weights beside the params (2x the weight bytes, or more
with transposes and casts). Here the file's header is written first, from the tensors' shapes
and dtypes alone, then each tensor is made (`produce(name)`: transposed, cast, concatenated
from its params), written and dropped: the export holds at most one converted tensor at a time
beside the params.

A checkpoint larger than `max_shard_bytes` is split as `save_pretrained` splits it:
`model-0000k-of-0000n.safetensors` and `model.safetensors.index.json` ({"metadata":
{"total_size"}, "weight_map": {tensor: file}}); a smaller one is the single `model.safetensors`.
The format (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__":
{...}} padded with spaces to a multiple of 8 bytes, then the tensors' bytes back to back,
offsets relative to the end of the header.
"""

import json
import math
import os
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# transformers' save_pretrained default (max_shard_size="5GB", decimal).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

_DTYPE_NAMES = {
    np.dtype(np.float64): 'F64', np.dtype(np.float32): 'F32', np.dtype(np.float16): 'F16',
    np.dtype(ml_dtypes.bfloat16): 'BF16', np.dtype(np.int64): 'I64', np.dtype(np.int32): 'I32',
    np.dtype(np.int16): 'I16', np.dtype(np.int8): 'I8', np.dtype(np.uint8): 'U8',
    np.dtype(np.bool_): 'BOOL', np.dtype(ml_dtypes.float8_e4m3fn): 'F8_E4M3',
    np.dtype(ml_dtypes.float8_e5m2): 'F8_E5M2',
}

TensorSpec = tuple[str, tuple[int, ...], np.dtype]  # name, shape, dtype


def _nbytes(spec: TensorSpec) -> int:
  return math.prod(spec[1]) * np.dtype(spec[2]).itemsize


def shard(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
  """Tensors into files of at most `max_shard_bytes` each, in order; a tensor larger than that
  gets a file of its own (as transformers does)."""
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for spec in specs:
    n = _nbytes(spec)
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += n
  return shards


def _header(specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> bytes:
  header: dict[str, object] = {'__metadata__': dict(metadata)}
  offset = 0
  for name, shape, dtype in specs:
    n = _nbytes((name, shape, dtype))
    header[name] = {'dtype': _DTYPE_NAMES[np.dtype(dtype)], 'shape': list(shape),
                    'data_offsets': [offset, offset + n]}
    offset += n
  raw = json.dumps(header, separators=(',', ':')).encode()
  raw += b' ' * (-len(raw) % 8)  # the data starts 8-byte aligned
  return struct.pack('<Q', len(raw)) + raw


def write_file(path: Path, specs: Sequence[TensorSpec],
               produce: Callable[[str], np.ndarray], metadata: Mapping[str, str]) -> None:
  """One safetensors file at `path`, each tensor made by `produce` when its turn comes."""
  with open(path, 'wb') as f:
    f.write(_header(specs, metadata))
    for name, shape, dtype in specs:
      array = np.ascontiguousarray(produce(name))
      if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        raise ValueError(f'tensor {name!r} came out {array.dtype}{list(array.shape)}, its header '
                         f'says {np.dtype(dtype)}{list(shape)}')
      f.write(memoryview(array.reshape(-1).view(np.uint8)))  # little-endian, as x86/ARM hosts
      del array


# The weight files an export writes; other files in the directory are the user's.
_OURS = re.compile(r'model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json')


def write_checkpoint(directory: Path, specs: Sequence[TensorSpec],
                     produce: Callable[[str], np.ndarray], *,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     metadata: Mapping[str, str] | None = None) -> list[Path]:
  """The weight files of a checkpoint (single or sharded with its index); returns them.

  Every file is written under a temporary name first and renamed only once all are complete,
  so an export that fails part-way (a tensor that does not convert, a full disk) leaves an
  earlier export in `directory` as it was and no partial file. After the renames, weight files
  of an earlier export that this one does not use (a single file where shards are written now,
  or the reverse) are removed; other files are left alone.
  """
  if max_shard_bytes < 1:
    raise ValueError(f'max_shard_bytes must be positive, got {max_shard_bytes}')
  metadata = {'format': 'pt', **(metadata or {})}  # 'pt': what transformers checks before loading
  directory = Path(directory)
  shards = shard(specs, max_shard_bytes)
  n = len(shards)
  names = ([WEIGHTS_FILE] if n == 1 else
           [f'model-{i + 1:05d}-of-{n:05d}.safetensors' for i in range(n)])
  files = {directory / name: directory / (name + '.tmp') for name in names}
  if n > 1:
    files[directory / INDEX_FILE] = directory / (INDEX_FILE + '.tmp')
  try:
    for name, tensors in zip(names, shards):
      write_file(files[directory / name], tensors, produce, metadata)
    if n > 1:
      index = {'metadata': {'total_size': sum(_nbytes(s) for s in specs)},
               'weight_map': {s[0]: name for name, tensors in zip(names, shards)
                              for s in tensors}}
      with open(files[directory / INDEX_FILE], 'w') as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write('\n')
  except BaseException:
    for tmp in files.values():
      tmp.unlink(missing_ok=True)
    raise
  for final, tmp in files.items():
    os.replace(tmp, final)
  for p in directory.iterdir():
    if _OURS.fullmatch(p.name) and p not in files:
      p.unlink()
  return [directory / name for name in names]

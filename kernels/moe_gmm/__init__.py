"""Grouped matmul for MoE expert dispatch: `gmm` (tokens x their expert's weights) and `tgmm`
(the weight gradient), with a custom VJP joining them.

reference.py   the specification (plain jnp)
triton.py      Pallas-Triton kernels: the portable GPU path (the default on non-Hopper NVIDIA GPUs)
mosaic_gpu.py  Pallas Mosaic GPU kernels for Hopper: persistent, TMA + wgmma pipelines (the default there)
common.py      row/tile bookkeeping both share (tile-group pairs, banded walk order)
autotune.py    the per-shape tiling tuner, cached per device in memory and on disk
ops.py         the public functions and `implementation=` / `tiling=` (see its docstring)
"""

from kernels.moe_gmm.ops import IMPLEMENTATIONS, gmm, tgmm

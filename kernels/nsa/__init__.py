"""Native sparse attention (arXiv 2502.11089): the three branches' attention, as kernels.

reference.py  the specification (plain jnp; each branch a dense masked attention)
triton.py     Pallas-Triton kernels: compressed attention, fused block scoring + top-n, token-
              sparse attention over selected blocks and over the window; forward and backward
ops.py        `nsa_attention(..., implementation=)` with the custom VJP and the kernels' layout

Status: exact against reference.py in Pallas' interpreter (tests/kernels/test_nsa.py) and
lowered to Triton IR for CUDA at the benchmark's shapes; not yet compiled or timed on a GPU
(experiments/gpu_checks.py: nsa_kernels).
"""

from kernels.nsa.ops import DEFAULT_TILING, IMPLEMENTATIONS, nsa_attention, unsupported

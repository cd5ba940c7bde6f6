"""Grouped matmul for MoE expert dispatch: `gmm` (tokens x their expert's weights) and `tgmm`
(the weight gradient), with a custom VJP joining them."""

from kernels.moe_gmm.ops import IMPLEMENTATIONS, gmm, tgmm

"""Sparse Mixture-of-Experts: routers, load balancing, dispatch strategies (pure functions).

router.py    ROUTERS ('softmax', 'sigmoid'), `route(logits, cfg, bias) -> Routing`;
balance.py   auxiliary losses (Switch/GShard, z-loss, DeepSeek-V3 sequence-wise), expert load,
             the auxiliary-loss-free bias update;
dispatch.py  DISPATCH ('dense', 'capacity', 'dropless') and `grouped_matmul`.
expert_parallel.py  the 'dropless' dispatch with experts sharded over the mesh axis `expert`
             (all-to-all exchanges in jax.shard_map); layer.py takes it when that axis is > 1.
"""

from efficientjax.moe.balance import (expert_load, load_balancing_loss, router_z_loss,
                                      sequence_balance_loss, update_bias)
from efficientjax.moe.dispatch import DISPATCH, GROUPED_MATMULS, expert_capacity, grouped_matmul
from efficientjax.moe.router import ROUTERS, Routing, route

"""Expert statistics over a run, for the train log (per step) and the result record (per run).

The layers report per-step values in the `moe_stats` collection, stacked by scan per layer stack
(`{'blocks': {'mlp': {'load': [layers, experts], ...}}}`) or per unscanned layer
(`{'block_3': {'mlp': {...}}}`); this puts them in model-layer order.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from efficientjax.model import ModelConfig, layer_stacks

_LOSSES = ('aux_loss', 'z_loss', 'seq_aux_loss')


def by_layer(tree: Mapping[str, Any], name: str, cfg: ModelConfig) -> dict[int, np.ndarray]:
  """{model layer index: the value `name` reported by that layer's MoE block}."""
  out = {}
  starts = {s.name: s.first_layer for s in layer_stacks(cfg)}
  for key, sub in tree.items():
    value = np.asarray(sub['mlp'][name]) if name in sub.get('mlp', {}) else None
    if value is None:
      continue
    if key.startswith('block_'):
      out[int(key.removeprefix('block_'))] = value
    else:  # a scanned stack: leading axis = its layers
      for j, v in enumerate(value):
        out[starts[key] + j] = v
  return dict(sorted(out.items()))


def inactive_params(cfg: ModelConfig) -> int:
  """Parameters a token does not use: the routed experts outside its top-k, in every MoE layer
  (the record's active count is the total less this)."""
  moe = cfg.moe
  moe_layers = sum(s.num_layers for s in layer_stacks(cfg) if s.ffn == 'moe')
  return moe_layers * (moe.num_experts - moe.top_k) * 3 * cfg.embed_dim * moe.expert_dim


class ExpertStats:
  """Accumulates what the MoE layers report step by step."""

  def __init__(self, cfg: ModelConfig):
    self.cfg = cfg
    self.steps = 0
    self.load: dict[int, np.ndarray] = {}  # layer -> assignments per expert, summed over steps
    self.last_load: dict[int, np.ndarray] = {}
    self.sums = {k: 0.0 for k in (*_LOSSES, 'dropped_fraction')}

  def add(self, stats: Mapping[str, Any]) -> dict[str, float]:
    """Adds one step's stats; returns the step's summary for the train log."""
    load = by_layer(stats, 'load', self.cfg)
    self.last_load = load
    for layer, counts in load.items():
      self.load[layer] = self.load.get(layer, 0) + counts.astype(np.int64)
    step = {k: float(np.mean(list(by_layer(stats, k, self.cfg).values())))
            for k in self.sums}
    for k, v in step.items():
      self.sums[k] += v
    self.steps += 1
    step['max_over_mean_load'] = float(np.mean([_imbalance(c) for c in load.values()]))
    return step

  def summary(self, model_state: Mapping[str, Any]) -> dict[str, Any]:
    """The record's `moe` section: the run's load histograms and balance, means of the losses
    (unweighted, averaged over layers and steps) and the routing biases at the end."""
    moe = self.cfg.moe
    n = max(self.steps, 1)
    biases = by_layer(model_state.get('moe_state', {}), 'bias', self.cfg)
    return {
        'num_experts': moe.num_experts,
        'top_k': moe.top_k,
        'dispatch': moe.dispatch,
        'router': moe.router,
        'steps': self.steps,
        'layers': list(self.load),
        'load_per_layer': [self.load[i].tolist() for i in self.load],
        'last_step_load_per_layer': [self.last_load[i].tolist() for i in self.last_load],
        'max_over_mean_load_per_layer': [_imbalance(self.load[i]) for i in self.load],
        'max_over_mean_load': (float(np.mean([_imbalance(c) for c in self.load.values()]))
                               if self.load else None),
        'dropped_fraction': self.sums['dropped_fraction'] / n,
        **{k: self.sums[k] / n for k in _LOSSES},
        'routing_bias_per_layer': [biases[i].tolist() for i in biases] if biases else None,
    }


def _imbalance(counts: np.ndarray) -> float:
  """max load / mean load: 1.0 is perfectly even, num_experts is everything on one expert."""
  mean = float(np.mean(counts))
  return float(np.max(counts)) / mean if mean > 0 else 0.0

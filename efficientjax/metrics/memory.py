"""Memory before running: an analytic breakdown of a training step beside the compiler's plan.

Per device, in bytes:
- the state, from its abstract shapes and their shardings (exact): params, a fine-tuning
  method's frozen base, optimizer moments (on the host where offloaded), small state;
- gradients: the params again in their dtype, twice with gradient accumulation (the running sum
  and the micro-batch's own);
- saved activations: what autodiff keeps from the forward for the backward under the remat
  policy, read off the traced program (`jax.vjp`'s residuals on one device's micro-batch at
  abstract shapes: nothing is compiled or allocated). `remat=none` keeps every layer's
  intermediates, `full` only each layer's input, `dots_saveable` the matmul outputs;
- the backward's working set: one layer's intermediates, recomputed under `full` remat, and the
  gradients flowing through it (`WORKING_SET_LAYERS` of them), or the head's logits gradient
  where that is larger.

`compiler_bytes` reads the same step's `compiled.memory_analysis()`: arguments + outputs -
aliased (donated) + temporaries is what its buffer assignment holds at once. Where the two
disagree by more than 15% at the shapes of tests/metrics/test_memory.py, the analytic side is
wrong.

XLA:CPU computes bfloat16 arithmetic in float32 (its float-normalisation pass), so on CPU the
activations are counted at four bytes whatever `model.dtype` says.
"""

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Multiples of one layer's intermediates (under no remat) that the backward holds beside the
# saved activations: the gradients flowing back through a layer; under `full` remat also the
# layer's recomputed forward, though XLA frees the front of it while the back is still live.
# Fitted to XLA's buffer assignment on CPU for MHA, GQA, MLA, NSA and MoE layers
# (experiments/bench_memory.py): the ratio ranges over 0.6–1.0 without remat, 0.9–1.0 with
# dots_saveable, 1.05–1.4 with full. Not yet compared with a GPU's (a pending GPU check).
WORKING_SET_LAYERS = {'none': 1.0, 'dots_saveable': 1.0, 'full': 1.2}
# XLA:CPU lowers `ragged_dot` (the dropless MoE's grouped matmul) as every expert's product
# over every row, masked: its backward holds about this many [experts, rows, width] buffers.
CPU_RAGGED_DOT_BUFFERS = 4


def shard_bytes(tree: Any, shardings: Any = None) -> int:
  """Bytes one device holds of a tree of arrays (or their shapes) placed by `shardings` (a
  matching tree; None: whole on every device)."""
  leaves = jax.tree.leaves(tree)
  shards = [None] * len(leaves) if shardings is None else jax.tree.leaves(
      shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  total = 0
  for leaf, sharding in zip(leaves, shards):
    shape = tuple(leaf.shape) if sharding is None else sharding.shard_shape(tuple(leaf.shape))
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def on_host(sharding: Any) -> bool:
  return getattr(sharding, 'memory_kind', None) in ('pinned_host', 'unpinned_host')


def residuals(fn: Callable, diff_args: Any, other_args: Any = ()) -> list[tuple[Any, int | None]]:
  """What `jax.vjp(fn)` keeps for the backward pass, differentiating `diff_args` only:
  [(aval, scan length or None)] for every residual the forward computes (not the inputs
  themselves, which live anyway). A residual stacked by a `scan` (one slice per scanned layer)
  comes with the scan's length. Traced at abstract shapes: nothing runs."""
  diff_leaves, diff_tree = jax.tree.flatten(diff_args)
  other_leaves, other_tree = jax.tree.flatten(other_args)
  n_diff = len(diff_leaves)

  def vjp_of(*leaves):
    d = jax.tree.unflatten(diff_tree, leaves[:n_diff])
    o = jax.tree.unflatten(other_tree, leaves[n_diff:])
    return jax.vjp(lambda d_: fn(d_, *o), d)[1]

  closed, out_shape = jax.make_jaxpr(vjp_of, return_shape=True)(*diff_leaves, *other_leaves)
  jaxpr = closed.jaxpr
  num_res = len(jax.tree.leaves(out_shape))
  res_vars = jaxpr.outvars[len(jaxpr.outvars) - num_res:]
  inputs = set(jaxpr.invars) | set(jaxpr.constvars)
  scanned = {}
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'scan':
      for v in eqn.outvars:
        scanned[v] = eqn.params['length']
  out, seen = [], set()
  for v in res_vars:
    if hasattr(v, 'val') or v in inputs or v in seen:  # a literal, or an input kept as it is
      continue
    seen.add(v)
    out.append((v.aval, scanned.get(v)))
  return out


def _nbytes(aval: Any) -> int:
  return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize


@dataclasses.dataclass
class Estimate:
  """One device's bytes for a training step, by part (`host_` parts live in host memory)."""
  params: int
  frozen: int
  gradients: int
  optimizer: int
  optimizer_host: int
  other_state: int
  batch: int
  activations_saved: int
  activations_working: int
  layer_intermediates: int  # one layer's, under no remat (the working set's unit)

  @property
  def device_bytes(self) -> int:
    return (self.params + self.frozen + self.gradients + self.optimizer + self.other_state +
            self.batch + self.activations_saved + self.activations_working)

  @property
  def host_bytes(self) -> int:
    return self.optimizer_host

  def record(self) -> dict[str, int]:
    return {**{f'{k}_bytes': v for k, v in dataclasses.asdict(self).items()},
            'device_bytes': self.device_bytes, 'host_bytes': self.host_bytes}


def training_estimate(*, loss_for: Callable[[Any], Callable], model_cfg: Any, abstract: Any,
                      shardings: Any, micro_batch: Any, grad_accum_steps: int,
                      backend: str) -> Estimate:
  """The analytic per-device estimate of a training step.

  loss_for(model_cfg) -> loss(params, model_state, batch, frozen): the step's loss for a model
  of that config (the remat policy and compute dtype are changed to trace what each keeps).
  abstract, shardings: the train state's shapes and placement (TrainState of
  ShapeDtypeStructs / Shardings). micro_batch: one device's micro-batch (shapes).
  """
  def part(tree, sh, host=False):
    leaves = jax.tree.leaves(tree)
    shs = jax.tree.leaves(sh, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    return sum(shard_bytes(l, s) for l, s in zip(leaves, shs) if on_host(s) == host)

  params = part(abstract.params, shardings.params)
  frozen = part(abstract.frozen, shardings.frozen) if jax.tree.leaves(abstract.frozen) else 0
  other = (part(abstract.model_state, shardings.model_state) if
           jax.tree.leaves(abstract.model_state) else 0) + 12  # step (int32) and rng (2 x uint32)
  cfg = model_cfg
  if backend == 'cpu':
    cfg = dataclasses.replace(cfg, dtype=jnp.float32)  # XLA:CPU computes bf16 in f32
  args = (abstract.model_state, micro_batch, abstract.frozen)
  saved = sum(_nbytes(a) for a, _ in residuals(loss_for(cfg), abstract.params, args))
  plain = residuals(loss_for(dataclasses.replace(cfg, remat='none')), abstract.params, args)
  stacked = [(a, n) for a, n in plain if n]
  if stacked:  # scanned layers: each residual the scan stacks is one slice per layer
    layer = sum(_nbytes(a) // n for a, n in stacked)
  else:
    layer = sum(_nbytes(a) for a, _ in plain) // max(model_cfg.num_layers, 1)
  rows = int(np.prod(jax.tree.leaves(micro_batch)[0].shape[:1]))
  length = jax.tree.leaves(micro_batch)[0].shape[1] - 1
  logits = rows * length * model_cfg.vocab_size * 4  # float32 logits' gradient
  working = max(WORKING_SET_LAYERS[model_cfg.remat] * layer, logits)
  moe = model_cfg.moe
  if (backend == 'cpu' and model_cfg.ffn == 'moe' and moe.dispatch == 'dropless'
      and moe.grouped_matmul in ('auto', 'ragged_dot')):
    assignments = rows * length * moe.top_k
    working += (CPU_RAGGED_DOT_BUFFERS * moe.num_experts * assignments *
                max(moe.expert_dim, model_cfg.embed_dim) * 4)
  return Estimate(
      params=params, frozen=frozen,
      gradients=params * (2 if grad_accum_steps > 1 else 1),
      optimizer=part(abstract.opt_state, shardings.opt_state),
      optimizer_host=part(abstract.opt_state, shardings.opt_state, host=True),
      other_state=other, batch=shard_bytes(micro_batch) * grad_accum_steps,
      activations_saved=saved, activations_working=int(working), layer_intermediates=layer)


def compiler_bytes(analysis: Mapping[str, int]) -> dict[str, int] | None:
  """What the compiled step's buffer assignment holds at once on one device (arguments +
  outputs - donated + temporaries), and in host memory; None where the backend gives no
  analysis."""
  if not analysis:
    return None
  get = lambda k: int(analysis.get(k, 0))
  return {'device_bytes': (get('argument_size_in_bytes') + get('output_size_in_bytes') -
                           get('alias_size_in_bytes') + get('temp_size_in_bytes')),
          'host_bytes': (get('host_argument_size_in_bytes') + get('host_output_size_in_bytes') -
                         get('host_alias_size_in_bytes') + get('host_temp_size_in_bytes'))}


def host_memory_bytes() -> tuple[int | None, str]:
  """(bytes this process may use, where the figure comes from): the cgroup's limit where one
  is set (containers, SLURM jobs), else the machine's available memory."""
  for path in ('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes'):
    try:
      with open(path) as f:
        text = f.read().strip()
    except OSError:
      continue
    if text.isdigit() and int(text) < 1 << 60:
      return int(text), f'the cgroup limit ({path})'
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024, 'MemAvailable in /proc/meminfo'
  except OSError:
    pass
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'), 'the physical memory'
  except (ValueError, OSError):
    return None, 'no host memory figure on this system'


def device_memory_bytes(device: Any) -> tuple[int | None, str]:
  """(bytes one device can hold, where the figure comes from): the allocator's `bytes_limit`;
  on a CPU, where devices are host memory, the host's figure."""
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    pass
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit']), f'{device.device_kind} memory_stats() bytes_limit'
  if device.platform == 'cpu':
    return host_memory_bytes()
  return None, f'{device.platform} gives no memory limit'


def gib(n: int | float | None) -> str:
  """Bytes for people: GiB, or MiB below one GiB."""
  if n is None:
    return '?'
  return f'{n / 2**30:.2f} GiB' if abs(n) >= 2**30 else f'{n / 2**20:.1f} MiB'


def _vm_hwm_bytes() -> int | None:
  """This process's resident high-water mark (VmHWM), since start or the last reset."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def _reset_vm_hwm() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0: '5' to /proc/self/clear_refs)."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


class StepPeak:
  """The measured peak of one device's memory from `start()` (before the state exists) to
  `stop()` (after the first training step): what the estimate and the compiler's plan predict.

  On a device with allocator statistics, `peak_bytes_in_use` (it counts from process start,
  which before the state holds nothing larger). On a CPU, whose device memory is the process's
  own: the rise of the resident high-water mark over the window, shared by the process's
  devices; the allocator keeps some freed memory, so it is a little high.
  """

  def __init__(self, devices):
    self.devices = list(devices)
    self.baseline: int | None = None
    self.reason: str | None = None

  def start(self) -> None:
    from efficientjax.metrics.sampler import host_rss_bytes  # pylint: disable=g-import-not-at-top
    if self._allocator_peaks() is None:
      if _reset_vm_hwm():
        self.baseline = host_rss_bytes()
      else:
        self.reason = 'no allocator statistics and no resettable VmHWM (/proc/self/clear_refs)'

  def _allocator_peaks(self) -> list[int] | None:
    peaks = []
    for d in self.devices:
      try:
        stats = d.memory_stats()
      except Exception:  # pylint: disable=broad-except
        stats = None
      if not stats or 'peak_bytes_in_use' not in stats:
        return None
      peaks.append(int(stats['peak_bytes_in_use']))
    return peaks

  def stop(self) -> dict[str, Any]:
    peaks = self._allocator_peaks()
    if peaks is not None:
      return {'measured_peak_bytes': max(peaks), 'measured_peak_source':
              'peak_bytes_in_use of memory_stats(), the largest over this process\'s devices'}
    hwm = _vm_hwm_bytes()
    if self.baseline is None or hwm is None:
      return {'measured_peak_bytes': None,
              'measured_peak_source': self.reason or 'no VmHWM in /proc/self/status'}
    return {'measured_peak_bytes': (hwm - self.baseline) // max(len(self.devices), 1),
            'measured_peak_source': 'rise of the process\'s resident high-water mark (VmHWM) '
                                    'from before the state to after the first step, per device'}


def inference_estimate(*, source: Any, served: Any, baseline: Any | None, cache: Any,
                       num_slots: int, seq_len: int, prefill_chunk: int,
                       vocab_size: int) -> dict[str, int]:
  """One device's bytes for an inference run, by phase (trees of arrays or their shapes).

  source: the weights as loaded; served: at the precision; baseline: the bf16 copy the quality
  is compared with (None at bf16); cache: the engine's KV cache. The phases: quantising (the
  source, the baseline and the served weights together), the held-out evaluation (served and
  baseline weights with float32 logits and their log-softmax for num_slots x seq_len tokens),
  serving (served weights, the cache, a prefill chunk's logits). Calibration's statistics (AWQ,
  GPTQ) are not counted.
  """
  nbytes = lambda tree: 0 if tree is None else shard_bytes(tree)
  parts = {'source_weights_bytes': nbytes(source), 'served_weights_bytes': nbytes(served),
           'baseline_weights_bytes': nbytes(baseline), 'kv_cache_bytes': nbytes(cache),
           'eval_logits_bytes': 2 * num_slots * seq_len * vocab_size * 4,
           'prefill_logits_bytes': 2 * prefill_chunk * vocab_size * 4}
  phases = {
      'quantize_bytes': (parts['source_weights_bytes'] + parts['served_weights_bytes'] +
                         parts['baseline_weights_bytes']),
      'evaluate_bytes': (parts['served_weights_bytes'] + parts['baseline_weights_bytes'] +
                         parts['eval_logits_bytes']),
      'serve_bytes': (parts['served_weights_bytes'] + parts['kv_cache_bytes'] +
                      parts['prefill_logits_bytes']),
  }
  return {**parts, **phases, 'device_bytes': max(phases.values())}

"""Does a training step fit, before any array exists: the analytic estimate
(efficientjax.metrics.memory), the compiled step's own plan, the device's memory, and, when it
does not fit, the changes that would (each estimated the same way).
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from efficientjax.errors import ConfigError
from efficientjax.metrics import memory
from efficientjax.metrics.memory import gib
from efficientjax.model import Transformer


@dataclasses.dataclass
class MemoryPlan:
  estimate: memory.Estimate
  compiler: dict[str, int] | None   # memory.compiler_bytes of the compiled step
  limit_bytes: int | None           # one device's memory (CPU: the host's, shared)
  limit_source: str
  sharing: int                      # devices of this process drawing on that one limit
  backend: str
  options: list[tuple[str, dict[str, Any], int]] = dataclasses.field(default_factory=list)

  @property
  def needed_bytes(self) -> int:
    """One device's bytes: the compiler's plan where there is one (it is what will be
    allocated), else the estimate."""
    return self.compiler['device_bytes'] if self.compiler else self.estimate.device_bytes

  @property
  def fits(self) -> bool:
    if self.limit_bytes is None:
      return True  # nothing to compare with: the run finds out
    return self.needed_bytes * self.sharing <= self.limit_bytes

  def text(self) -> str:
    e = self.estimate
    where = ('per device' if self.sharing == 1 else
             f'per device, x{self.sharing} devices in this process\'s memory')
    lines = [f'memory {where} (analytic estimate; the compiler\'s plan):',
             f'  params {gib(e.params)}, gradients {gib(e.gradients)}, optimizer '
             f'{gib(e.optimizer)}' + (f' (+ {gib(e.optimizer_host)} in host memory)'
                                      if e.optimizer_host else '') +
             (f', frozen base {gib(e.frozen)}' if e.frozen else '') +
             f', activations {gib(e.activations_saved)} saved + '
             f'{gib(e.activations_working)} working, batch {gib(e.batch)}',
             f'  total {gib(e.device_bytes)} estimated; '
             + (f'{gib(self.compiler["device_bytes"])} by the compiler'
                if self.compiler else 'no compiler analysis on this backend')
             + (f'; limit {gib(self.limit_bytes)} ({self.limit_source})'
                if self.limit_bytes else f'; no limit known ({self.limit_source})')]
    return '\n'.join(lines)

  def message(self) -> str:
    """Why the run stops, and what would fit."""
    need = self.needed_bytes * self.sharing
    text = (f'the training step needs {gib(need)} '
            f'({"the compiler" if self.compiler else "estimated"}) but '
            f'{gib(self.limit_bytes)} is available ({self.limit_source}).\n{self.text()}\n')
    if self.options:
      text += 'Changes that would fit (analytic estimates, per device):\n' + '\n'.join(
          f'  {label}: {gib(b)}' + (
              f'  ({" ".join(f"--config.{k}={v}" for k, v in fix.items())})' if fix else '')
          for label, fix, b in self.options)
    else:
      text += ('No single change found fits; combine more devices (mesh), remat and smaller '
               'batches, or use a smaller preset.')
    if self.backend == 'gpu':
      text += ('\n(JAX preallocates 75% of a GPU by default; XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 '
               'raises the limit.)')
    return text

  def record(self) -> dict[str, Any]:
    return {'estimate': self.estimate.record(),
            'compiler_bytes': self.compiler['device_bytes'] if self.compiler else None,
            'compiler_host_bytes': self.compiler['host_bytes'] if self.compiler else None,
            'limit_bytes': self.limit_bytes, 'limit_source': self.limit_source,
            'devices_sharing_limit': self.sharing, 'fits': self.fits}


class DoesNotFit(ConfigError):
  """The step's memory exceeds the device's: `experiments.main` exits 2 with the plan."""

  def __init__(self, plan: MemoryPlan):
    self.plan = plan
    fix = plan.options[0][1] if plan.options else None
    super().__init__('train', plan.message(), fix)


def estimate_for(recipe: Any, model_cfg: Any, abstract_batch: Any, *,
                 grad_accum_steps: int | None = None, backend: str | None = None
                 ) -> memory.Estimate:
  """The analytic estimate of `recipe`'s step (set up on its mesh) for `model_cfg`, on
  `backend` (default: this one's)."""
  cfg_train = recipe.config['train']
  k = grad_accum_steps or cfg_train['grad_accum_steps']
  micro = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(
          ((a.sharding.shard_shape(a.shape)[0] if a.sharding else a.shape[0]) // k,)
          + a.shape[1:], a.dtype), abstract_batch)
  return memory.training_estimate(
      loss_for=lambda cfg: recipe.train_step(Transformer(cfg), recipe.tx).loss,
      model_cfg=model_cfg, abstract=recipe.abstract, shardings=recipe.shardings,
      micro_batch=micro, grad_accum_steps=k, backend=backend or jax.default_backend())


def memory_plan(recipe: Any, memory_analysis: dict[str, int], abstract_batch: Any
                ) -> MemoryPlan:
  """The plan of a recipe set up on its mesh, with its compiled step's memory analysis."""
  estimate = estimate_for(recipe, recipe.model_cfg, abstract_batch)
  local = [d for d in recipe.mesh.devices.flat if d.process_index == jax.process_index()]
  limit, source = memory.device_memory_bytes(local[0])
  backend = jax.default_backend()
  # A CPU's devices are slices of one host memory; accelerators each have their own.
  sharing = len(local) if backend == 'cpu' else 1
  plan = MemoryPlan(estimate, memory.compiler_bytes(memory_analysis), limit, source, sharing,
                    backend)
  if not plan.fits:
    plan.options = _options(recipe, plan, abstract_batch)
  return plan


def _options(recipe: Any, plan: MemoryPlan, abstract_batch: Any
             ) -> list[tuple[str, dict[str, Any], int]]:
  """(what to change, as config overrides, the estimate after it) for each change that fits on
  its own; else all the state and remat changes together, if that fits."""
  e, cfg_train, model_cfg = plan.estimate, recipe.config['train'], recipe.model_cfg
  budget = plan.limit_bytes // plan.sharing
  # Alternatives are judged on the estimate scaled by what the compiler said of this config
  # (the two differ a little, and the compiler's figure is the one that will be allocated).
  scale = plan.needed_bytes / max(e.device_bytes, 1)
  savings = {}  # change -> (label, overrides, bytes saved)
  if (cfg_train.get('opt_state_dtype') or 'float32') == 'float32':
    savings['dtype'] = ('bfloat16 optimizer moments', {'train.opt_state_dtype': 'bfloat16'},
                        e.optimizer // 2)
  if plan.backend != 'cpu' and not cfg_train['offload_optimizer']:
    # On a CPU host memory is the device's: nothing to gain.
    savings['offload'] = ('optimizer moments in host memory', {'train.offload_optimizer': True},
                          e.optimizer)
  if model_cfg.remat != 'full':
    full = estimate_for(recipe, dataclasses.replace(model_cfg, remat='full'), abstract_batch)
    savings['remat'] = ('rematerialise every layer', {'model.remat': 'full'},
                        e.device_bytes - full.device_bytes)
  candidates = [(label, fix, e.device_bytes - saved) for label, fix, saved in savings.values()]
  rows = jax.tree.leaves(abstract_batch)[0]
  rows = rows.sharding.shard_shape(rows.shape)[0] if rows.sharding else rows.shape[0]
  k = cfg_train['grad_accum_steps']
  acts = e.activations_saved + e.activations_working
  for more in (2, 4, 8, 16):  # activations shrink with the micro-batch; a gradient sum appears
    if rows % (k * more) == 0:
      after = e.device_bytes - acts + acts // more + (e.params if k == 1 else 0)
      candidates.append((f'{k * more} micro-batches a step',
                         {'train.grad_accum_steps': k * more}, after))
      if after * scale <= budget:
        break
  sharded = e.params + e.gradients + e.optimizer + e.frozen
  rest = e.device_bytes - sharded
  devices = jax.device_count()
  if rest * scale < budget:  # FSDP divides the state, not the activations
    need = math.ceil(devices * sharded / max(budget / scale - rest, 1))
    if need > devices:
      candidates.append((f'{need} devices or more (FSDP divides the state)', {},
                         rest + sharded * devices // need))
  fitting = [(label, fix, int(b * scale)) for label, fix, b in candidates if b * scale <= budget]
  if fitting:
    return fitting
  # Together: offloading makes the moments' dtype moot on the device.
  saved = savings.get('offload', savings.get('dtype', ('', {}, 0)))[2]
  saved += savings.get('remat', ('', {}, 0))[2]
  together = {k: v for label, fix, _ in savings.values() for k, v in fix.items()}
  after = int((e.device_bytes - saved) * scale)
  return [('all of these together', together, after)] if together and after <= budget else []

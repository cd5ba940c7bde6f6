"""The pretraining loop: data, model, mesh, state (fresh or resumed), steps, evals, checkpoints.

`train` is everything a `pretrain` run does except writing its record, which the experiment
runner does from the returned `TrainResult`.
"""

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from efficientjax import parallel
from efficientjax.attention.core import resolve_implementation
from efficientjax.data import Data, build_data, get_tokenizer
from efficientjax.metrics import flops as flop_counts
from efficientjax.metrics import memory
from efficientjax.metrics.architecture import attention_summary
from efficientjax.metrics.energy import make_energy_meter
from efficientjax.metrics.sampler import Sampler
from efficientjax.metrics.tensorboard import Curves, perplexity, run_dir, sampled
from efficientjax.metrics.trace import summarize_trace
from efficientjax.metrics.window import MeasurementWindow
from efficientjax.model import ModelConfig, Transformer
from efficientjax.moe.report import ExpertStats
from efficientjax.train import init_from
from efficientjax.train.checkpoint import Checkpointer, NonFiniteCheckpoint, check_finite
from efficientjax.train.execution import EagerStep, is_eager
from efficientjax.train.fit import DoesNotFit, memory_plan
from efficientjax.train.optimizer import learning_rate_schedule, make_optimizer
from efficientjax.train.progress import Progress
from efficientjax.train.state import (TrainState, init_state, on_device, state_from_variables,
                                      state_shardings)
from efficientjax.train.step import make_eval_step, make_train_step


class TrainingDiverged(RuntimeError):
  """A step's loss or gradients were not finite (train.on_nonfinite='stop', or more skipped
  steps than train.max_skipped_steps), or a state to save was not; no checkpoint holds a
  non-finite state."""


@dataclasses.dataclass
class TrainResult:
  model_config: ModelConfig
  mesh_shape: dict[str, int]
  num_params: int
  weight_bytes: int
  start_step: int                 # 0, or the step a restarted run resumed from
  final_step: int
  losses: dict[int, float]        # step -> train loss, this process's run only (applied steps)
  step_times_s: list[float]       # measured steps only (after the timing warm-up)
  tokens_per_step: int
  samples_per_step: int           # rows of the global batch
  compile_s: float
  initial_eval_loss: float | None
  eval_losses: dict[int, float]
  data_stats: dict[str, Any]
  checkpoint_dir: str | None
  attention_impl: str
  attention: dict[str, Any]       # efficientjax.metrics.architecture.attention_summary
  moe: dict[str, Any] | None      # efficientjax.moe.report.ExpertStats.summary; None if dense
  # Steps whose update was dropped as non-finite (train.on_nonfinite='skip'), over the
  # run's whole life: restarts included (kept in the checkpoints' metadata).
  skipped_steps: list[int] = dataclasses.field(default_factory=list)
  # model.init's weight source (efficientjax.train.init_from.Source.record), or None.
  init: dict[str, Any] | None = None
  # The fine-tuning method's own figures (efficientjax/train/finetune.py), or None.
  finetune: dict[str, Any] | None = None
  trainable_params: int | None = None       # what the optimizer updates (pretraining: all)
  optimizer_state_bytes: int | None = None  # the optimizer's moments and counters
  # What the metrics are made of (efficientjax.metrics.report turns them into the record).
  device_kind: str = ''
  device_count: int = 1
  analytic_flops: dict[str, float] = dataclasses.field(default_factory=dict)
  compiler_flops: float | None = None        # unrolled XLA-attention twin of the step
  compiler_flops_reason: str | None = None
  compiled_step_flops: float | None = None   # the real compiled step's own count
  memory_analysis: dict[str, int] = dataclasses.field(default_factory=dict)
  # efficientjax.train.fit.MemoryPlan.record: the estimate beside the compiler's and the limit.
  memory_plan: dict[str, Any] = dataclasses.field(default_factory=dict)
  window_s: float | None = None
  window_steps: int = 0
  # Examples in the measured steps, every process's: packed rows hold several (fine-tuning).
  window_samples: int | None = None
  paused_s: float = 0.0
  energy: dict[str, Any] = dataclasses.field(default_factory=dict)
  sampler: dict[str, Any] = dataclasses.field(default_factory=dict)
  trace: dict[str, Any] = dataclasses.field(default_factory=dict)
  execution: str = 'jit'          # how the train and eval steps ran (train/execution.py)
  curves_dir: str | None = None   # the TensorBoard event files' folder (process 0's)

  @property
  def final_eval_loss(self) -> float | None:
    return self.eval_losses[max(self.eval_losses)] if self.eval_losses else None


def _device_batch(local: Any, sharding: Any) -> Any:
  """This process's rows -> global arrays laid out over the mesh (an array, or a dict of them
  with a sharding each)."""
  return jax.tree.map(jax.make_array_from_process_local_data, sharding, local)


def evaluate(eval_fn, state: TrainState, batches, sharding) -> float:
  """The mean loss over every target the held-out batches count (eval_fn: make_eval_step's)."""
  total, count = 0.0, 0.0
  for b in batches:
    s, n = eval_fn(state, _device_batch(b, sharding))
    total += float(s)
    count += float(n)
  return total / count


class Recipe:
  """What a kind of training decides; everything else (the steps, the measurement window,
  evaluations, checkpoints, the result) is `run`'s, shared by every kind.

  This one is pretraining: the model's params train, the data is packed token windows, the
  state starts random or from `model.init`. efficientjax/train/finetune.py's recipe changes the
  state (trainable and frozen trees), the optimizer, the loss and the data, not the loop.
  """

  def __init__(self, config: Mapping[str, Any]):
    self.config = config
    self.meta: dict[str, Any] = {}  # kept with every checkpoint (init_from's source record ...)

  def model_config(self, tokenizer) -> ModelConfig:
    return ModelConfig.from_config(self.config['model'], tokenizer_vocab_size=tokenizer.vocab_size,
                                   seq_len=self.config['data']['seq_len'])

  def setup(self, model_cfg: ModelConfig, mesh) -> None:
    """Builds the model, optimizer, schedule and the state's shapes and placement."""
    cfg_train = self.config['train']
    self.model_cfg, self.mesh = model_cfg, mesh
    self.model = Transformer(model_cfg)
    self.tx = make_optimizer(cfg_train)
    self.schedule = learning_rate_schedule(cfg_train)
    self.abstract, self.shardings = state_shardings(self.model, self.tx, mesh,
                                                    self.config['data']['seq_len'],
                                                    cfg_train['offload_optimizer'])

  def opt_state_on_device(self) -> Any:
    """The optimizer state's device-memory shardings where it is offloaded, else None."""
    if not self.config['train']['offload_optimizer']:
      return None
    return on_device(self.shardings.opt_state)

  def data(self, tokenizer) -> Data:
    cfg_data, cfg_train = self.config['data'], self.config['train']
    return build_data(corpus=cfg_data['corpus'], tokenizer=tokenizer, seq_len=cfg_data['seq_len'],
                      global_batch_size=cfg_train['global_batch_size'], seed=self.config['seed'],
                      eval_fraction=cfg_data['eval_fraction'],
                      eval_batches=cfg_train['eval_batches'], process_index=jax.process_index(),
                      process_count=jax.process_count(), max_documents=cfg_data['max_documents'])

  def fresh_state(self, say) -> TrainState:
    """The state a new run starts from (random, or model.init's weights)."""
    config = self.config
    if config['model'].get('init'):
      # Trained weights (model.init), the optimizer starting afresh: no random init is built.
      t_init = time.perf_counter()
      source = init_from.source(config['model']['init'])
      state = state_from_variables(self.tx, self.mesh, config['seed'], self.shardings,
                                   self.abstract, init_from.load(source, self.model_cfg))
      # Kept with every checkpoint: a restart names the source without reading it again.
      self.meta['init'] = source.record()
      say(f'initialised from {source.spec} ({time.perf_counter() - t_init:.1f} s)')
      return state
    return init_state(self.model, self.tx, self.mesh, config['data']['seq_len'], config['seed'],
                      self.shardings)

  def restored(self, state: TrainState, meta: dict[str, Any], say) -> TrainState:
    """A restored state made whole (pretraining's checkpoints hold all of it)."""
    del meta, say
    return state

  def train_step(self, model: Transformer, tx) -> Callable:
    return make_train_step(model, tx, self.config['train']['grad_accum_steps'], self.schedule,
                           opt_state_on_device=self.opt_state_on_device())

  def eval_step(self) -> Callable:
    return make_eval_step(self.model)

  def twin(self, twin_cfg: ModelConfig) -> tuple[Callable, tuple[Any, ...]]:
    """The step and its argument shapes on the compiler-FLOP twin of the model."""
    model = Transformer(twin_cfg)
    return (make_train_step(model, self.tx, self.config['train']['grad_accum_steps']),
            (state_shardings(model, self.tx, self.mesh, self.config['data']['seq_len'])[0],
             self.abstract_batch(sharding=None)))

  def abstract_batch(self, sharding) -> Any:
    c = self.config
    return jax.ShapeDtypeStruct((c['train']['global_batch_size'], c['data']['seq_len'] + 1),
                                np.int32, sharding=sharding)

  def analytic_flops(self) -> dict[str, float]:
    c = self.config
    return flop_counts.analytic_flops_per_step(self.model_cfg, seq_len=c['data']['seq_len'],
                                               batch=c['train']['global_batch_size'])

  def finish(self, state: TrainState, workdir: str, say) -> None:
    """After the last step, with the final state: what a kind writes besides checkpoints."""
    del state, workdir, say

  def summary(self, state: TrainState) -> dict[str, Any]:
    """What TrainResult reports of the state beyond the loop's measurements."""
    params = state.params
    return dict(num_params=param_count(params), weight_bytes=tree_bytes(params),
                trainable_params=param_count(params),
                optimizer_state_bytes=tree_bytes(state.opt_state),
                attention=attention_summary(self.model_cfg, params,
                                            self.config['data']['seq_len']))


def param_count(tree: Any) -> int:
  """Elements of a tree of arrays (or their shapes)."""
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def tree_bytes(tree: Any) -> int:
  """Bytes of a tree of arrays (or their shapes), as allocated."""
  return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def compile_train_step(recipe: Recipe, batch_sh: Any) -> tuple[Any, Any]:
  """(the recipe's train step compiled from abstract shapes, the abstract batch), as a run
  compiles it: the state donated, placed by the recipe's shardings. Call under the mesh
  (`parallel.activate`) of a recipe that is set up."""
  abstract_batch = jax.tree.map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
      recipe.abstract_batch(sharding=None), batch_sh)
  step = jax.jit(recipe.train_step(recipe.model, recipe.tx),
                 in_shardings=(recipe.shardings, batch_sh), donate_argnums=0,
                 out_shardings=(recipe.shardings, parallel.replicated(recipe.mesh))
                 ).lower(recipe.abstract, abstract_batch).compile()
  return step, abstract_batch


def train(config: Mapping[str, Any], workdir: str, *, stop_after_step: int | None = None,
          devices: list[jax.Device] | None = None, progress: bool = True) -> TrainResult:
  """Runs (or resumes) the pretraining described by a validated run config.

  stop_after_step: end early after that step, as if killed (tests of resumption use it).
  devices: the devices to build the mesh on (default: all).
  """
  return run(Recipe(config), workdir, stop_after_step=stop_after_step, devices=devices,
             progress=progress)


def run(recipe: Recipe, workdir: str, *, stop_after_step: int | None = None,
        devices: list[jax.Device] | None = None, progress: bool = True) -> TrainResult:
  """Runs (or resumes) the training `recipe` describes: data, state, compiled steps, the
  measured steps with evaluations and checkpoints, and what the record needs."""
  config = recipe.config
  cfg_data, cfg_train = config['data'], config['train']
  # One display for the job: every process would print the same lines.
  bar = (Progress(cfg_train['steps'], cfg_train['log_every'])
         if progress and jax.process_index() == 0 else None)
  say = bar.message if bar else lambda text: None
  tokenizer = get_tokenizer(cfg_data['tokenizer'], eos_token=cfg_data['eos_token'])
  model_cfg = recipe.model_config(tokenizer)
  mesh = parallel.make_mesh(config['mesh'], devices)
  seq_len = cfg_data['seq_len']
  global_batch = cfg_train['global_batch_size']

  recipe.setup(model_cfg, mesh)
  model, tx, abstract, shardings = recipe.model, recipe.tx, recipe.abstract, recipe.shardings
  batch_sh = jax.tree.map(lambda a: parallel.batch_sharding(mesh, a.ndim),
                          recipe.abstract_batch(sharding=None))

  # Compiled from abstract shapes before any array exists, so that a step that cannot fit
  # stops here with the numbers, not in the allocator after minutes of loading.
  say(f'compiling the train and eval steps ({model_cfg.num_layers} layers, {global_batch} x '
      f'{seq_len} tokens a step, {mesh.devices.size} {jax.default_backend()} device(s)) ...')
  eager = is_eager(config)
  with parallel.activate(mesh):
    t0 = time.perf_counter()
    # execution=eager compiles the fused step too, for planning only. XLA cannot plan a
    # program that never exists whole, and the compiler's plan of the same step is the best
    # figure there is before anything is allocated: the state, its gradients and the optimizer
    # state are the same arrays either way (eager holds more on top: no donation, so the old
    # and the new state meet at the update, and no fusion, so intermediates are buffers; its
    # measured_peak_bytes says how much). The compile also keeps the compiler's memory and
    # FLOP figures in both modes' records, so a jit and an eager record differ only in what
    # was measured. It costs a compile the eager run does not use, small beside eager steps.
    compiled_step, abstract_batch = compile_train_step(recipe, batch_sh)
    if eager:
      # The same step functions, op by op; outputs placed as the jitted step's out_shardings.
      train_step = EagerStep(recipe.train_step(model, tx),
                             (shardings, parallel.replicated(mesh)))
      eval_step = EagerStep(recipe.eval_step())
    else:
      train_step = compiled_step
      eval_step = jax.jit(recipe.eval_step(), in_shardings=(shardings, batch_sh)
                          ).lower(abstract, abstract_batch).compile()
    compile_s = time.perf_counter() - t0
    memory_analysis = _memory_analysis(compiled_step)
    plan = memory_plan(recipe, memory_analysis, abstract_batch)
  if not plan.fits:
    raise DoesNotFit(plan)  # its message has the numbers and what would fit
  say(plan.text())

  t_data = time.perf_counter()
  data = recipe.data(tokenizer)
  eval_batches = data.eval_batches()
  counts = [f'{data.stats[f"{split}_{what}"]:,} {split} {what}' for split in ('train', 'eval')
            for what in ('documents', 'examples', 'tokens')
            if isinstance(data.stats.get(f'{split}_{what}'), int)]
  say(f'data: {cfg_data["corpus"]}{" (random tokens)" if data.synthetic else ""}: '
      f'{", ".join(counts)} ({time.perf_counter() - t_data:.1f} s)')

  analytic = recipe.analytic_flops()
  t0 = time.perf_counter()
  # Counted on an unsharded twin outside the mesh context: only the arithmetic matters here.
  compiler, compiler_reason = flop_counts.compiler_flops(model_cfg, recipe.twin)
  twin_s = time.perf_counter() - t0
  say(f'compiled in {compile_s:.1f} s (and {twin_s:.1f} s for the compiler\'s FLOP count of '
      'an unrolled twin of the step)' + ('; execution=eager: the steps run op by op, the '
                                         'compiled step only planned memory' if eager else ''))

  # From before the state exists to the end of the first step: what the plan predicts.
  step_peak = memory.StepPeak(jax.local_devices())
  step_peak.start()
  checkpointer = None
  if cfg_train['checkpoint_every'] > 0:
    checkpointer = Checkpointer(workdir, keep=cfg_train['keep_checkpoints'],
                                async_save=cfg_train['async_checkpoint'])
  meta = recipe.meta
  state, resume_step = None, None
  if checkpointer:
    # The newest checkpoint that verifies, or train.resume_step's; bad ones are set aside.
    state, restored_meta, resume_step = checkpointer.restore_latest_good(
        abstract, shardings, resume_step=cfg_train['resume_step'],
        on_bad=cfg_train['on_bad_checkpoint'])
    meta.update(restored_meta)
  if resume_step is not None:
    data.train.restore(meta['data'])
    state = recipe.restored(state, meta, say)
  else:
    state = recipe.fresh_state(say)

  log_path = os.path.join(workdir, 'train_log.jsonl')
  with parallel.activate(mesh):
    compiled_raw = flop_counts.flops_of(compiled_step)
    # Curves beside the trace: TensorBoard shows a directory's scalars and its
    # plugins/profile/ captures as one run.
    trace_dir = run_dir(workdir)
    curves = Curves(trace_dir)

    if resume_step is None:
      t_eval = time.perf_counter()
      meta['initial_eval_loss'] = evaluate(eval_step, state, eval_batches, batch_sh)
      curves.scalars({'eval/loss': meta['initial_eval_loss'],
                      'eval/perplexity': perplexity(meta['initial_eval_loss'])}, int(state.step))
      say(f'initial evaluation: loss {meta["initial_eval_loss"]:.4f}, perplexity '
          f'{math.exp(meta["initial_eval_loss"]):.2f} ({time.perf_counter() - t_eval:.1f} s)')
    else:
      say(f'resumed from the checkpoint at step {resume_step} in {checkpointer.directory}')
    start_step = int(state.step)
    measured_peak = {'measured_peak_bytes': None,
                     'measured_peak_source': 'no step ran in this process'}
    total = cfg_train['steps']
    last = total if stop_after_step is None else min(total, stop_after_step)

    tokens_per_step = global_batch * seq_len
    losses: dict[int, float] = {}
    eval_losses: dict[int, float] = {}
    step_times: list[float] = []
    window_samples = 0  # this process's examples in the measured steps
    last_good = resume_step
    skipped: list[int] = list(meta.get('skipped_steps', []))
    # Steps after `start_step`: warm-up, then the profiled ones (traced, so not timed), then
    # the measurement window up to the last step.
    warmup, profile_steps = cfg_train['timing_warmup_steps'], config['profile']['steps']
    first_profiled = start_step + warmup + 1
    first_measured = first_profiled + profile_steps
    trace = _StepTrace(trace_dir, first_profiled, profile_steps)
    meter = make_energy_meter(jax.default_backend(), jax.local_devices())
    sampler = Sampler(config['metrics']['sample_interval_s'], devices=jax.local_devices(),
                      energy_meter=meter)
    window = MeasurementWindow(meter, sampler)
    expert_stats = None  # created at the first step whose layers report expert statistics

    def stop_measuring():
      """Ends the trace, the window and pending saves on the way out of a stopped run."""
      trace.stop(state)
      if window.is_open:
        window.close()
      if checkpointer:
        checkpointer.close()
      curves.close()
    for step in range(start_step + 1, last + 1):
      trace.before(step, state)
      if step == first_measured:
        window.open(state)
      t = time.perf_counter()
      local = data.train.next()
      state, metrics = train_step(state, _device_batch(local, batch_sh))
      loss = float(metrics['loss'])  # a sync point: the step is done when its loss is on host
      dt = time.perf_counter() - t
      if step == start_step + 1:
        measured_peak = step_peak.stop()
      if window.is_open:
        step_times.append(dt)
        window.steps += 1
        window_samples += _examples(local)
      trace.after(step, state)
      line = {'step': step, 'loss': loss, 'grad_norm': float(metrics['grad_norm']),
              'learning_rate': float(metrics['learning_rate']), 'step_ms': dt * 1e3}
      if bool(metrics['finite']):
        losses[step] = loss
        # The applied steps' curve, as `losses` (a dropped step's NaN is in train_log.jsonl).
        curves.scalars({'train/loss': loss, 'train/grad_norm': line['grad_norm'],
                        'train/learning_rate': line['learning_rate'],
                        'train/step_ms': line['step_ms'],
                        'train/tokens_per_s': tokens_per_step / dt}, step)
        if window.is_open:  # the sampler runs while the window is open: its newest sample
          curves.scalars(sampled(sampler.latest()), step)
        if 'moe_stats' in metrics:
          expert_stats = expert_stats or ExpertStats(model_cfg)
          line.update(expert_stats.add(jax.device_get(metrics['moe_stats'])),
                      aux_loss=float(metrics['aux_loss']))
        _log_line(log_path, line)
      else:
        # The step kept the state it started from; its batch is consumed either way, so a
        # skip goes on with the next one (evaluations and checkpoints as scheduled).
        skipped.append(step)
        _log_line(log_path, {**line, 'nonfinite': True, 'applied': False})
        if cfg_train['on_nonfinite'] == 'stop' or len(skipped) > cfg_train['max_skipped_steps']:
          stop_measuring()
          what = (f'step {step} was not finite (loss {loss}, gradient norm '
                  f'{line["grad_norm"]}); its update was not applied'
                  if cfg_train['on_nonfinite'] == 'stop' else
                  f'{len(skipped)} steps were not finite (the last at step {step}), more than '
                  f'train.max_skipped_steps={cfg_train["max_skipped_steps"]}')
          raise TrainingDiverged(_diverged_message(cfg_train, what, last_good, checkpointer))
        say(f'step {step}: not finite (loss {loss}, gradient norm {line["grad_norm"]}); its '
            f'update was dropped and its batch skipped ({len(skipped)} of at most '
            f'{cfg_train["max_skipped_steps"]}, train.on_nonfinite=skip)')

      do_eval = (cfg_train['eval_every'] and step % cfg_train['eval_every'] == 0) or step == total
      do_save = checkpointer and (step % cfg_train['checkpoint_every'] == 0 or step == total)
      if window.is_open and step == last:
        window.close(state)
      elif window.is_open and (do_eval or do_save):
        window.pause(state)  # evaluation and saving are not training: out of the window
      if do_eval:
        eval_losses[step] = evaluate(eval_step, state, eval_batches, batch_sh)
        curves.scalars({'eval/loss': eval_losses[step],
                        'eval/perplexity': perplexity(eval_losses[step])}, step)
        curves.flush()
        if bar:
          bar.message(f'step {step}: eval loss {eval_losses[step]:.4f}, '
                      f'perplexity {math.exp(eval_losses[step]):.2f}')
      if bar:
        bar.update(step, loss, tokens_per_step / dt)
      if do_save:
        curves.flush()  # out of the window, as the evaluation's flush above
        try:
          check_finite(state)
        except NonFiniteCheckpoint as e:
          # A finite update that overflowed the state (the step checks loss and gradients):
          # never saved, and the run cannot go on from it.
          stop_measuring()
          raise TrainingDiverged(_diverged_message(
              cfg_train, f'the state after step {step} is not finite ({e}: a finite update '
              'overflowed it); it was not saved', last_good, checkpointer)) from None
        meta['data'] = data.train.state()
        meta['skipped_steps'] = skipped
        checkpointer.save(step, state, meta)
        last_good = step
      if window.is_open and (do_eval or do_save) and step != last:
        window.resume()
    trace.stop(state)  # in case the run ended inside the profiled steps
    if start_step >= total and not eval_losses:
      # Resumed at the final step (a kill between the last checkpoint and the record): the
      # record still gets the held-out loss of what was trained.
      eval_losses[start_step] = evaluate(eval_step, state, eval_batches, batch_sh)
      curves.scalars({'eval/loss': eval_losses[start_step],
                      'eval/perplexity': perplexity(eval_losses[start_step])}, start_step)
    curves.close()

  if checkpointer:
    checkpointer.close()
  recipe.finish(state, workdir, say)
  return TrainResult(
      model_config=model_cfg,
      mesh_shape=dict(mesh.shape),
      **recipe.summary(state),
      moe=(expert_stats.summary(jax.device_get(state.model_state))
           if expert_stats is not None else None),
      start_step=start_step,
      final_step=int(state.step),
      losses=losses,
      step_times_s=step_times,
      tokens_per_step=tokens_per_step,
      samples_per_step=global_batch,
      window_samples=_all_processes(window_samples),
      compile_s=compile_s,
      initial_eval_loss=meta.get('initial_eval_loss'),
      eval_losses=eval_losses,
      data_stats=data.stats,
      checkpoint_dir=checkpointer.directory if checkpointer else None,
      skipped_steps=skipped,
      init=meta.get('init'),
      attention_impl=resolve_implementation(model_cfg.attention_impl, model_cfg.dtype),
      device_kind=jax.devices()[0].device_kind,
      device_count=jax.device_count(),
      analytic_flops=analytic,
      compiler_flops=compiler,
      compiler_flops_reason=compiler_reason,
      compiled_step_flops=compiled_raw,
      memory_analysis=memory_analysis,
      memory_plan={**plan.record(), **measured_peak},
      window_s=window.seconds,
      window_steps=window.steps,
      paused_s=window.paused_s,
      energy=_job_energy(window.energy(), window.seconds),
      sampler=sampler.summary(),
      # An eager trace holds one executable per primitive, which the fused step's HLO does
      # not name: its kernels are classified by their own names.
      trace=_trace_summary(trace.logdir, profile_steps, trace.seconds,
                           None if eager else compiled_step),
      execution='eager' if eager else 'jit',
      curves_dir=trace_dir,
  )


def _examples(local: Any) -> int:
  """Examples in this process's rows: a row of token windows is one; a packed row of
  instruction examples holds as many as its highest segment id."""
  if isinstance(local, Mapping):
    return int(np.max(local['segment_ids'], axis=1).sum())
  return int(local.shape[0])


def _all_processes(count: int) -> int:
  """A per-process count summed over every process (once per run, at the end)."""
  if jax.process_count() == 1:
    return count
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.sum(multihost_utils.process_allgather(np.asarray(count, np.int64))))


def _job_energy(energy: dict[str, Any], seconds: float | None) -> dict[str, Any]:
  """This process's window energy -> the job's: every process's devices summed (each reads
  only its own), so that J/token divides the job's energy by the job's tokens. Null where any
  process has no reading. Every process must call it (a collective)."""
  if jax.process_count() == 1:
    return energy
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mine = energy.get('energy_j_per_device')
  ok = mine is not None and energy.get('energy_j') is not None
  n = jax.local_device_count()
  flat = np.asarray(mine if ok and len(mine) == n else [np.nan] * n, np.float64)
  everyone = np.asarray(multihost_utils.process_allgather(flat)).reshape(-1)
  reliable = np.asarray(multihost_utils.process_allgather(
      np.asarray(bool(energy.get('reliable')), np.bool_))).reshape(-1)
  if not np.all(np.isfinite(everyone)):
    return {**energy, 'energy_j': None, 'avg_power_w': None, 'energy_j_per_device': None,
            'reason': energy.get('reason') or 'a process of the job had no energy reading'}
  total = float(everyone.sum())
  return {**energy, 'energy_j': total, 'energy_j_per_device': everyone.tolist(),
          'avg_power_w': total / seconds if seconds else None,
          'scope': f'{energy.get("scope")}, summed over the job\'s {jax.process_count()} '
                   'processes', 'reliable': bool(reliable.all())}


def _log_line(path: str, line: dict[str, Any]) -> None:
  """One strict-JSON line: a non-finite number becomes null, and the line says so. Process 0
  writes it (the workdir is shared; every process has the same loss)."""
  if jax.process_index() != 0:
    return
  bad = [k for k, v in line.items() if isinstance(v, float) and not math.isfinite(v)]
  if bad:
    line = {**{k: (None if k in bad else v) for k, v in line.items()}, 'nonfinite': True,
            'nonfinite_fields': bad}
  with open(path, 'a') as f:
    f.write(json.dumps(line, allow_nan=False) + '\n')


def _diverged_message(cfg_train, what: str, last_good, checkpointer) -> str:
  """What went wrong, which checkpoint to go on from and how, and what to change."""
  if last_good is None:
    where = ('no checkpoint was written before it, so a rerun starts afresh (set '
             'train.checkpoint_every to a step count below this one to keep one)')
  else:
    where = (f'the newest checkpoint, step {last_good} in {checkpointer.directory}, is finite '
             '(every step\'s loss and gradients are checked before its update is applied, '
             'every state before it is saved). Rerunning with the same --workdir resumes from '
             'it; to go back further, add --config.train.resume_step=STEP with one of the '
             'steps listed there (newer ones are set aside, not deleted)')
  clip = ('' if cfg_train['grad_clip_norm'] else
          ', set train.grad_clip_norm (0 now: unclipped; 1.0 is usual)')
  return (f'{what}; {where}. Lower train.learning_rate (now {cfg_train["learning_rate"]}) or '
          f'raise train.warmup_steps (now {cfg_train["warmup_steps"]}){clip}; or let such steps '
          'be skipped with train.on_nonfinite=skip.')


class _StepTrace:
  """`jax.profiler` tracing of `count` steps from step `first`, and the wall time they took."""

  def __init__(self, logdir: str, first: int, count: int):
    self.logdir, self.first, self.count = logdir, first, count
    self.seconds: float | None = None
    self._t0: float | None = None

  def before(self, step: int, state) -> None:
    if self.count and step == self.first:
      jax.block_until_ready(state)
      jax.profiler.start_trace(self.logdir)
      self._t0 = time.perf_counter()

  def after(self, step: int, state) -> None:
    if step == self.first + self.count - 1:
      self.stop(state)

  def stop(self, state) -> None:
    """Ends the trace if one is running (also on the way out of a failed run)."""
    if self._t0 is not None:
      jax.block_until_ready(state)
      self.seconds = time.perf_counter() - self._t0
      jax.profiler.stop_trace()
      self._t0 = None


def _memory_analysis(compiled) -> dict[str, int]:
  """The compiler's own memory plan for the step (bytes), where the backend provides one."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  return {name: int(getattr(analysis, name)) for name in dir(analysis)
          if name.endswith('_in_bytes') and isinstance(getattr(analysis, name), int)}


def _trace_summary(trace_dir: str, steps: int, seconds: float | None, compiled: Any | None
                   ) -> dict[str, Any]:
  if not steps:
    return {'available': False, 'reason': 'profiling is off; set --config.profile.steps=N'}
  if seconds is None:
    return {'available': False, 'reason': 'the run ended before the profiled steps'}
  # The step's HLO lets fusions be classified by what they contain (on CPU most matmuls run
  # as fusions whose names say nothing).
  return summarize_trace(trace_dir, window_s=seconds, steps=steps,
                         hlo_text=compiled.as_text() if compiled is not None else None)

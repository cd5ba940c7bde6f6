"""Fine-tuning: the pretraining loop (efficientjax/train/loop.py) with a method's state,
optimizer, loss and data.

What a method (efficientjax/peft, `finetune.method`) changes:
- the state: `params` holds only what trains (LoRA's adapters, `freeze`'s chosen layers, all of
  it for `full`), `frozen` the rest (the base, in `finetune.base_dtype`); the optimizer sees
  only `params`, so frozen weights get no gradient and no optimizer state;
- the optimizer: LoRA+ trains B (and every 1-D parameter) at `lora_plus_ratio` × the rate;
- the loss: the mean cross-entropy of answer tokens only, packed examples kept apart by
  their segment ids (efficientjax/data/instructions.py's batches);
- the FLOPs: frozen weights need no weight gradient (`finetune_flops`).

Checkpoints hold the trainable params, the optimizer state and the data position, never the
frozen tree: a restart rebuilds it from its source (`model.init`, or the seed for a random
base) with the same method, and refuses to go on if it differs from what the run started with
(a fingerprint of it is kept in the checkpoints' metadata). So a LoRA run's checkpoints are the
size of its adapters, not of the model.
"""

import dataclasses
import os
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efficientjax import parallel
from efficientjax.data import Data
from efficientjax.data.instructions import build_instruction_data
from efficientjax.errors import ConfigError
from efficientjax.metrics import flops as flop_counts
from efficientjax.metrics.architecture import attention_summary
from efficientjax.model import ModelConfig, Transformer
from efficientjax.peft import METHODS, FinetuneConfig, targets
from efficientjax.peft.methods import LoRA, freeze_layers, layer_module_trains
from efficientjax.train import init_from
from efficientjax.train.loop import Recipe, TrainResult, param_count, run, tree_bytes
from efficientjax.train.optimizer import learning_rate_schedule, make_optimizer
from efficientjax.train.state import TrainState, optimizer_shardings, state_from_variables
from efficientjax.train.step import make_eval_step, make_train_step

# Keeps the key of a method's initialisation (LoRA's A, PiSSA's randomised SVD) apart from the
# state's and the model's.
_METHOD_KEY_TAG = zlib.crc32(b'efficientjax/finetune/method-init')
BATCH_FIELDS = ('tokens', 'segment_ids', 'positions', 'loss_mask')


class FinetuneRecipe(Recipe):
  """`kind: finetune`: the method's trainable and frozen trees around a base model."""

  def __init__(self, config: Mapping[str, Any]):
    super().__init__(config)
    self.ft = FinetuneConfig.from_config(config['finetune'])

  def model_config(self, tokenizer) -> ModelConfig:
    self.base_cfg = super().model_config(tokenizer)
    self.method = METHODS.get(self.ft.method)(self.base_cfg, self.ft)
    errors = self.method.check()
    if errors:
      raise errors[0]
    return dataclasses.replace(self.base_cfg, adapter=self.method.settings())

  def data(self, tokenizer) -> Data:
    cfg_data, cfg_train = self.config['data'], self.config['train']
    return build_instruction_data(
        corpus=cfg_data['corpus'], tokenizer=tokenizer, seq_len=cfg_data['seq_len'],
        global_batch_size=cfg_train['global_batch_size'], seed=self.config['seed'],
        eval_fraction=cfg_data['eval_fraction'], eval_batches=cfg_train['eval_batches'],
        process_index=jax.process_index(), process_count=jax.process_count(),
        max_documents=cfg_data['max_documents'])

  def setup(self, model_cfg: ModelConfig, mesh) -> None:
    self.model_cfg, self.mesh = model_cfg, mesh
    self.model = Transformer(model_cfg)
    self.schedule = learning_rate_schedule(self.config['train'])
    shapes = _state_shapes(self.model, self.method, self.config['train'], mesh,
                           self.config['data']['seq_len'])
    self.tx, self.abstract, self.shardings, self.base_params, self.param_sharding = shapes

  def _method_key(self) -> jax.Array:
    return jax.random.fold_in(jax.random.key(self.config['seed']), _METHOD_KEY_TAG)

  def _base_params(self, say) -> tuple[Any, dict[str, Any]]:
    """The base model's params on the mesh and its model state (host), from model.init or,
    without one, the seed's random initialisation."""
    spec = self.config['model'].get('init')
    if spec:
      t0 = time.perf_counter()
      source = init_from.source(spec)
      variables = init_from.load(source, self.base_cfg)
      self.meta['init'] = source.record()
      say(f'base model: {source.spec} ({time.perf_counter() - t0:.1f} s)')
      params = jax.device_put(variables.pop('params'), self.param_sharding)
      return params, variables
    say('base model: random (model.init is unset): fine-tuning measures costs, not quality')
    model, seq_len = Transformer(self.base_cfg), self.config['data']['seq_len']

    def init(key):  # init_state's key split; each leaf made where it lives on the mesh
      variables = model.init(jax.random.split(key)[0], jnp.zeros((1, seq_len), jnp.int32))
      return nn.unbox(variables['params'])
    with parallel.activate(self.mesh):
      params = jax.jit(init, out_shardings=self.param_sharding)(
          jax.random.key(self.config['seed']))
    # Model state (MoE routing biases) starts at zeros, as `init` makes it (fresh_state).
    return params, {}

  def _prepare(self, say) -> tuple[Any, Any, dict[str, Any]]:
    """(trainable, frozen, the base's model state) placed on the mesh."""
    params, model_state = self._base_params(say)
    t0 = time.perf_counter()
    sh = self.shardings
    with parallel.activate(self.mesh):
      trainable, frozen = jax.jit(self.method.prepare, out_shardings=(sh.params, sh.frozen),
                                  donate_argnums=0)(params, self._method_key())
    jax.block_until_ready((trainable, frozen))
    if self.ft.method == 'pissa':
      # PiSSA's starting adapters: what converts its trained adapter for the original base
      # (efficientjax.peft.interchange.save_adapter's `initial`). Adapter-sized, on the host.
      self.initial = _host(trainable)
    say(f'{self.ft.method}: {param_count(trainable):,} trainable parameters of the model\'s '
        f'{param_count(self.base_params):,} ({time.perf_counter() - t0:.1f} s)')
    return trainable, frozen, model_state

  def fresh_state(self, say) -> TrainState:
    trainable, frozen, model_state = self._prepare(say)
    self.meta['frozen_fingerprint'] = _fingerprint(frozen)
    # The trainable tree is the state's params: a fresh optimizer and RNG around it, as a run
    # from model.init gets them (it is already in place on the mesh).
    state = state_from_variables(self.tx, self.mesh, self.config['seed'], self.shardings,
                                 self.abstract, {'params': trainable, **model_state})
    return state.replace(frozen=frozen)

  def restored(self, state: TrainState, meta: dict[str, Any], say) -> TrainState:
    """Rebuilds the frozen tree (never checkpointed) from the run's source and checks it is
    what the run started with."""
    if not jax.tree.leaves(self.abstract.frozen):
      return state
    _, frozen, _ = self._prepare(say)
    saved = meta.get('frozen_fingerprint')
    now = _fingerprint(frozen)
    if saved is not None and not np.allclose(saved, now, rtol=1e-5, atol=1e-6):
      raise ConfigError(
          'model.init', 'the frozen base rebuilt for this restart differs from the one the run '
          f'started with (its source, {self.config["model"].get("init") or "the seed"}, has '
          'changed since); restore the source, or start a new run in a new --workdir')
    return state.replace(frozen=frozen)

  def train_step(self, model: Transformer, tx) -> Callable:
    return make_train_step(model, tx, self.config['train']['grad_accum_steps'], self.schedule,
                           variables=self.method.variables, dropout=self.ft.dropout > 0,
                           opt_state_on_device=self.opt_state_on_device())

  def eval_step(self) -> Callable:
    return make_eval_step(self.model, self.method.variables)

  def twin(self, twin_cfg: ModelConfig) -> tuple[Callable, tuple[Any, ...]]:
    method = METHODS.get(self.ft.method)(twin_cfg, self.ft)
    model = Transformer(twin_cfg)
    tx, abstract, *_ = _state_shapes(model, method, self.config['train'], self.mesh,
                                     self.config['data']['seq_len'])
    step = make_train_step(model, tx, self.config['train']['grad_accum_steps'],
                           variables=method.variables, dropout=self.ft.dropout > 0)
    return step, (abstract, self.abstract_batch(sharding=None))

  def abstract_batch(self, sharding) -> Any:
    c = self.config
    shape = (c['train']['global_batch_size'], c['data']['seq_len'] + 1)
    return {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=sharding) for k in BATCH_FIELDS}

  def analytic_flops(self) -> dict[str, float]:
    c = self.config
    return finetune_flops(self.model_cfg, self.method, seq_len=c['data']['seq_len'],
                          batch=c['train']['global_batch_size'])

  def finish(self, state: TrainState, workdir: str, say) -> None:
    """Writes what was trained as Hugging Face files (`finetune.export`): a peft adapter
    (`<workdir>/adapter`, LoRA family) or the merged model (`<workdir>/merged`)."""
    self.exported = export(self, state, workdir, say)

  def summary(self, state: TrainState) -> dict[str, Any]:
    trainable, total = param_count(state.params), param_count(self.base_params)
    frozen_bytes = tree_bytes(state.frozen)
    return dict(
        # The model's size, and the bytes of weights the run holds (frozen and trained).
        num_params=total, weight_bytes=tree_bytes(state.params) + frozen_bytes,
        trainable_params=trainable, optimizer_state_bytes=tree_bytes(state.opt_state),
        attention=attention_summary(self.model_cfg, self.base_params,
                                    self.config['data']['seq_len'], packed_rows=True),
        finetune={
            'method': self.ft.method,
            'trainable_params': trainable,
            'trainable_fraction': trainable / total,
            'trainable_bytes': tree_bytes(state.params),
            'frozen_bytes': frozen_bytes,
            'frozen_dtype': (jax.tree.leaves(state.frozen)[0].dtype.name
                             if jax.tree.leaves(state.frozen) else None),
            'optimizer_state_bytes': tree_bytes(state.opt_state),
            'adapted_projections': ([p.name for p in self.method.chosen]
                                    if isinstance(self.method, LoRA) else None),
            'scaling': (self.method.scale if isinstance(self.method, LoRA) else None),
            'export': getattr(self, 'exported', None),
        })


def _state_shapes(model: Transformer, method, cfg_train: Mapping[str, Any], mesh, seq_len: int):
  """(optimizer, abstract state, its shardings, the base params' shapes and shardings)."""
  boxed = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, seq_len), jnp.int32)),
                         jax.random.key(0))
  param_axes = nn.get_partition_spec(boxed['params'])
  abstract_params = nn.unbox(boxed['params'])
  model_state = {k: nn.unbox(v) for k, v in boxed.items() if k == 'moe_state'}
  trainable, frozen = jax.eval_shape(method.prepare, abstract_params, jax.random.key(0))
  trainable_axes, frozen_axes = method.logical_axes(param_axes)
  tx = make_optimizer(cfg_train, method.lr_multipliers(trainable))
  opt = jax.eval_shape(tx.init, trainable)
  trainable_sh = parallel.logical_to_sharding(trainable_axes, mesh)
  frozen_sh = parallel.logical_to_sharding(frozen_axes, mesh)
  rep = parallel.replicated(mesh)
  opt_sh = optimizer_shardings(tx, opt, trainable_sh, mesh, cfg_train.get('offload_optimizer', False))
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trainable,
                        opt_state=opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
                        model_state=model_state, frozen=frozen)
  shardings = TrainState(step=rep, params=trainable_sh, opt_state=opt_sh, rng=rep,
                         model_state=jax.tree.map(lambda _: rep, model_state), frozen=frozen_sh)
  return (tx, abstract, shardings, abstract_params,
          parallel.logical_to_sharding(param_axes, mesh))


def _host(tree: Any) -> Any:
  """A (possibly multi-process) tree gathered to numpy on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def export(recipe: FinetuneRecipe, state: TrainState, workdir: str, say) -> dict[str, Any]:
  """`finetune.export`: 'adapter' (LoRA family: a peft adapter directory), 'merged' (the
  trained model folded into plain weights, as a Hugging Face checkpoint), or 'none'. Returns
  the record's `finetune.export`: {'format', 'path', 'family'} or {'format', 'reason'}."""
  from efficientjax.hf import safetensors_io  # pylint: disable=g-import-not-at-top
  from efficientjax.peft import interchange  # pylint: disable=g-import-not-at-top
  ft, method, cfg = recipe.ft, recipe.method, recipe.base_cfg
  what = ft.export
  if what == 'none':
    return {'format': None, 'reason': 'finetune.export is none'}
  if what == 'adapter' and not isinstance(method, LoRA):
    return {'format': None, 'reason': f'{ft.method} has no adapter; finetune.export=merged '
            'writes the trained model'}
  init = recipe.meta.get('init') or {}
  family, base_path = None, None
  if init.get('kind') == 'hf':
    # The source checkpoint's own architecture names the modules; peft loads onto it.
    base_path = init['path']
    model_type = safetensors_io.read_hf_config(base_path).get('model_type')
    family = safetensors_io.FAMILIES.get(model_type)
  t0 = time.perf_counter()
  try:
    if what == 'adapter':
      adapters = _host(state.params)
      path = os.path.join(workdir, 'adapter')
      if jax.process_index() == 0:
        path = str(interchange.save_adapter(
            path, adapters, cfg, ft, family=family, base_model_name_or_path=base_path,
            initial=getattr(recipe, 'initial', None), overwrite=True))
    else:
      merged = _host(jax.jit(method.merged)(state.params, state.frozen))
      family = family or interchange.families_for(cfg)[0]
      path = os.path.join(workdir, 'merged')
      if jax.process_index() == 0:
        path = str(safetensors_io.save_checkpoint(path, merged, cfg, family))
  except ConfigError as e:
    say(f'finetune.export={what}: not written ({e})')
    return {'format': None, 'reason': str(e)}
  say(f'wrote the {what} to {path} ({time.perf_counter() - t0:.1f} s)')
  return {'format': 'peft' if what == 'adapter' else 'hf', 'path': os.path.abspath(path),
          'family': family.name if family else None}


def _fingerprint(tree: Any) -> list[float]:
  """Per leaf: the sum and the sum of squares (float32), enough to tell another base apart."""
  leaves = jax.tree.leaves(tree)
  stats = jax.jit(lambda xs: [jnp.stack([jnp.sum(x.astype(jnp.float32)),
                                         jnp.sum(jnp.square(x.astype(jnp.float32)))])
                              for x in xs])(leaves)
  return [float(v) for s in jax.device_get(stats) for v in s]


def finetune_flops(cfg: ModelConfig, method, *, seq_len: int, batch: int) -> dict[str, float]:
  """Analytic FLOPs of one fine-tuning step (docs/metrics.md), from the pretraining count
  (`analytic_flops_per_step`: 3 × forward, every weight's gradient included):

  - a frozen weight needs no weight gradient: its matmuls cost forward + input gradient, 2 ×
    forward, where something below it trains; 1 × where nothing does (below `freeze`'s
    lowest trained layer, whose activations need no gradient at all);
  - a trained weight costs 3 × forward, as in pretraining; attention's score and value
    products have no weights: 3 × forward where gradients flow through them, 1 × elsewhere;
  - each adapter adds 3 × its forward, 2·r·(in + out) per token; DoRA adds per step the
    product A·B and the norm of W + s·A·B per target (2·r·in·out + 3·in·out), and with
    dropout the base matmul of the dropped input (forward and input gradient).

  Keys: those of the pretraining count (matmul, attention, attention_as_executed, total),
  plus `adapters` and `pretraining_total` (the same model pretrained, for comparison).
  """
  full = flop_counts.analytic_flops_per_step(cfg, seq_len=seq_len, batch=batch)
  tokens = batch * seq_len
  matmul_fwd, attn_fwd = full['matmul'] / 3, full['attention'] / 3
  executed_fwd = full['attention_as_executed'] / 3
  head_fwd = 2.0 * cfg.embed_dim * cfg.vocab_size * tokens
  layers_fwd = matmul_fwd - head_fwd
  per_layer_fwd = layers_fwd / cfg.num_layers  # dense models: every layer the same
  adapters = 0.0
  name = method.ft.method
  if name == 'full':
    return {**full, 'adapters': 0.0, 'pretraining_total': full['total']}
  if isinstance(method, LoRA):
    chosen = method.chosen
    r = method.ft.rank
    for p in chosen:
      n_in, n_out = int(np.prod(p.in_shape)), int(np.prod(p.out_shape))
      copies = max(1, len(p.layers))
      adapters += 3 * 2.0 * r * (n_in + n_out) * tokens * copies
      if method.dora:
        adapters += (2.0 * r * n_in * n_out + 3.0 * n_in * n_out) * copies
        if method.ft.dropout > 0:
          adapters += 2 * 2.0 * n_in * n_out * tokens * copies
    # Every layer's activations need gradients (the adapters sit in every layer or could).
    lowest = min((min(p.layers) for p in chosen if p.layers), default=cfg.num_layers)
    trained_weight_fwd = 0.0
  else:  # freeze
    plan_layers = freeze_layers(cfg, method.ft)
    lowest = min(plan_layers)
    extra = {m.strip() for m in method.ft.freeze_extra.split(',') if m.strip()}
    if 'embed' in extra or 'position' in extra:
      lowest = 0
    modules = method.ft.freeze_modules.strip()
    if modules == 'all':
      trained_weight_fwd = per_layer_fwd * len(plan_layers)
    else:
      names = [m.strip() for m in modules.split(',') if m.strip()]
      selected = [p for p in targets.projections(cfg)
                  if p.layers and set(p.layers) & set(plan_layers)
                  and layer_module_trains(p.path[1:] + ('kernel',), names)]
      trained_weight_fwd = sum(2.0 * np.prod(p.in_shape) * np.prod(p.out_shape) * tokens
                               * len(set(p.layers) & set(plan_layers)) for p in selected)
    if 'lm_head' in extra or ('embed' in extra and cfg.tie_embeddings):
      trained_weight_fwd += head_fwd
  below = lowest  # layers whose activations need no gradient
  above = cfg.num_layers - below
  matmul = (matmul_fwd + per_layer_fwd * above + head_fwd + trained_weight_fwd)
  attention = attn_fwd * (1 + 2 * above / cfg.num_layers)
  executed = executed_fwd * (1 + 2 * above / cfg.num_layers)
  total = matmul + attention + adapters
  return {'matmul': float(matmul), 'attention': float(attention),
          'attention_as_executed': float(executed), 'adapters': float(adapters),
          'total': float(total), 'pretraining_total': full['total']}


def finetune(config: Mapping[str, Any], workdir: str, *, stop_after_step: int | None = None,
             devices: list[jax.Device] | None = None, progress: bool = True) -> TrainResult:
  """Runs (or resumes) the fine-tuning described by a validated run config."""
  return run(FinetuneRecipe(config), workdir, stop_after_step=stop_after_step, devices=devices,
             progress=progress)

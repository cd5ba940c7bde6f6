"""The training and evaluation steps: pure functions of (state, batch).

A batch is either an int32 array [b, seq_len + 1] of packed token windows (pretraining: every
next-token pair counts), or a dict of such arrays (`efficientjax.data.instructions`: `tokens`,
`segment_ids` and `positions` restarting per packed example, and `loss_mask`, which marks the
tokens the loss counts: answers only). A fine-tuning method (efficientjax.peft) makes the model's
variables from the trainable params and the frozen ones (`state.frozen`) through `variables`.
"""

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from efficientjax.model import auxiliary_loss
from efficientjax.nn.linear import ADAPTERS
from efficientjax.moe import balance
from efficientjax.train.optimizer import updates_applied
from efficientjax.train.state import TrainState

# What the layers report during a training step (see efficientjax.model.LAYER_COLLECTIONS).
_REPORTED = ('losses', 'moe_stats')


Variables = Callable[[Any, Any], tuple[Any, Any]]  # (trainable, frozen) -> (params, adapters)


def plain_variables(trainable: Any, frozen: Any) -> tuple[Any, Any]:
  """Pretraining's (and full fine-tuning's): the trainable params are the model's params."""
  del frozen
  return trainable, {}


def loss_weights(batch: Any) -> jax.Array | None:
  """[b, seq_len] weights of the targets (1 where the loss counts), or None: all count."""
  if isinstance(batch, Mapping):
    return batch['loss_mask'][:, 1:].astype(jnp.float32)
  return None


def forward(model: nn.Module, params: Any, model_state: Mapping[str, Any], batch: Any,
            adapters: Any = None, rngs: Mapping[str, jax.Array] | None = None
            ) -> tuple[jax.Array, dict[str, Any]]:
  """(next-token cross-entropy per position [b, seq_len], what the layers reported).
  model_state: the non-trained collections (e.g. MoE routing biases); adapters: the `adapters`
  collection (efficientjax.nn.linear); rngs: e.g. {'dropout': key} while training."""
  variables = {'params': params, **model_state}
  if adapters:
    variables[ADAPTERS] = adapters
  if isinstance(batch, Mapping):
    tokens = batch['tokens']
    logits, reported = model.apply(
        variables, tokens[:, :-1], batch['positions'][:, :-1],
        segment_ids=batch['segment_ids'][:, :-1], mutable=_REPORTED, rngs=rngs)
  else:
    tokens = batch
    logits, reported = model.apply(variables, tokens[:, :-1], mutable=_REPORTED, rngs=rngs)
  return (optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]),
          dict(reported))


def token_losses(model: nn.Module, params: Any, batch: jax.Array,
                 model_state: Mapping[str, Any] | None = None) -> jax.Array:
  """Next-token cross-entropy per position."""
  return forward(model, params, model_state or {}, batch)[0]


def update_routing_bias(model_state: Mapping[str, Any], moe_stats: Mapping[str, Any],
                        rate: float) -> dict[str, Any]:
  """DeepSeek-V3's auxiliary-loss-free balancing: each layer's routing bias moves by `rate`
  toward the experts that this step under-used (the load each layer reported)."""
  if 'moe_state' not in model_state:
    return dict(model_state)
  flat_stats = {path[:-1]: leaf for path, leaf in jax.tree_util.tree_leaves_with_path(moe_stats)
                if getattr(path[-1], 'key', None) == 'load'}

  def update(path, bias):
    return balance.update_bias(bias, flat_stats[path[:-1]], rate)
  return {**model_state, 'moe_state': jax.tree_util.tree_map_with_path(
      update, model_state['moe_state'])}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, grad_accum_steps: int,
                    schedule: optax.Schedule | None = None, *,
                    variables: Variables = plain_variables, dropout: bool = False,
                    opt_state_on_device: Any = None
                    ) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Any]]]:
  """One optimizer step over a global batch, accumulating over `grad_accum_steps` micro-batches.

  The loss optimised is the cross-entropy plus any auxiliary losses the layers report (MoE
  balancing); `metrics['loss']` is the cross-entropy alone, comparable across models. With
  loss weights (a dict batch) the cross-entropy is the mean over the counted targets of the
  whole global batch, however it is split into micro-batches. Gradients are taken with respect
  to `state.params` only: the frozen tree gets none. dropout: give the model a 'dropout' rng
  (from the state's key and step), which adapters with finetune.dropout > 0 use.
  opt_state_on_device: the optimizer state's shardings in device memory, where the state is
  kept in host memory (train.offload_optimizer): it is brought over for the update, after the
  gradients, and the jit's out_shardings send it back.

  The returned step has a `loss(params, model_state, batch, frozen)` attribute, the loss it
  differentiates (efficientjax.metrics.memory traces what its backward keeps).
  """
  def loss_fn(params, model_state, micro, frozen, total, rng):
    model_params, adapters = variables(params, frozen)
    rngs = {'dropout': rng} if dropout else None
    losses, reported = forward(model, model_params, model_state, micro, adapters, rngs)
    weights = loss_weights(micro)
    # Weighted: this micro-batch's share of the global mean, scaled by k like an unweighted
    # micro-batch mean, so that the mean over micro-batches below is the global mean.
    ce = (losses.mean() if weights is None else
          jnp.sum(losses * weights) / total * grad_accum_steps)
    aux = auxiliary_loss(reported.get('losses', {}))
    return ce + aux, (ce, aux, reported.get('moe_stats', {}))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def loss(params, model_state, batch, frozen):
    weights = loss_weights(batch)
    total = None if weights is None else jnp.maximum(jnp.sum(weights), 1.0)
    return loss_fn(params, model_state, batch, frozen, total, jax.random.key(0))[0]

  def step(state: TrainState, batch: Any):
    weights = loss_weights(batch)
    total = None if weights is None else jnp.maximum(jnp.sum(weights), 1.0)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if grad_accum_steps == 1:
      (_, (ce, aux, stats)), grads = grad_fn(state.params, state.model_state, batch, state.frozen,
                                             total, rng)
    else:
      # Micro-batch i takes rows i, i + k, i + 2k, ...: with the batch dim sharded in
      # contiguous blocks, every device keeps its own rows and nothing moves.
      micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps,
                                               -1).swapaxes(0, 1), batch)

      def accumulate(carry, xs):
        i, mb = xs
        mb = jax.tree.map(lambda x: nn.with_logical_constraint(x, ('batch', 'length')), mb)
        (_, out), grads = grad_fn(state.params, state.model_state, mb, state.frozen, total,
                                  jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (out, grads)), None

      first = jax.tree.map(lambda x: x[0], micro)
      shapes = jax.eval_shape(grad_fn, state.params, state.model_state, first, state.frozen,
                              total, rng)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][1], shapes[1]))
      ((ce, aux, stats), grads), _ = jax.lax.scan(
          accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
      # Means over micro-batches, except the expert load, which counts tokens: a sum.
      ce, aux, grads = jax.tree.map(lambda x: x / grad_accum_steps, (ce, aux, grads))
      stats = jax.tree_util.tree_map_with_path(
          lambda p, x: x if getattr(p[-1], 'key', None) == 'load' else x / grad_accum_steps, stats)
    grad_norm = optax.tree.norm(grads)
    # A step whose loss or gradients are not finite is not applied: the state stays as it was
    # (the loop then stops or skips the batch, train.on_nonfinite), so no NaN/inf reaches the
    # parameters or the optimizer moments (as optax.apply_if_finite). Known before the update,
    # the condition fuses into the optimizer's own elementwise pass; checking the new state
    # instead would cost a second pass over it every step. A finite update that overflows the
    # parameters shows at the next step's loss, and the loop checks every state it saves.
    finite = jnp.isfinite(ce) & jnp.isfinite(aux) & jnp.isfinite(grad_norm)
    old_opt_state = state.opt_state
    if opt_state_on_device is not None:
      # Offloaded moments come to the devices only now, for the update (MaxText's optimizer
      # offload); the copy back to host memory is the jit's out_shardings'.
      old_opt_state = jax.device_put(old_opt_state, opt_state_on_device)
    updates, opt_state = tx.update(grads, old_opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # What the layers keep and report decides what the step does with it: a routing bias in the
    # model state is updated from the loads, reported stats go into the metrics.
    model_state = update_routing_bias(state.model_state, stats, model.config.moe.bias_update_rate)
    params, opt_state, model_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), (params, opt_state, model_state),
        (state.params, old_opt_state, state.model_state))
    metrics = {'loss': ce, 'grad_norm': grad_norm, 'finite': finite}
    if stats:
      metrics['aux_loss'] = aux
      metrics['moe_stats'] = stats
    if schedule is not None:
      # The rate this step's update used: the schedule at the optimizer's own count, which
      # skipped (non-finite) steps do not advance.
      applied = updates_applied(state.opt_state)
      metrics['learning_rate'] = schedule(state.step if applied is None else applied)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         model_state=model_state), metrics

  step.loss = loss
  return step


def make_eval_step(model: nn.Module, variables: Variables = plain_variables
                   ) -> Callable[[TrainState, Any], tuple[jax.Array, jax.Array]]:
  """(summed cross-entropy, count of the targets it covers) over a batch, so batches combine
  exactly: every token for token windows, the answer tokens of a weighted (dict) batch."""

  def step(state: TrainState, batch: Any):
    params, adapters = variables(state.params, state.frozen)
    losses, _ = forward(model, params, state.model_state, batch, adapters)
    weights = loss_weights(batch)
    if weights is None:
      return losses.sum(), jnp.asarray(losses.size, jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(weights)

  return step

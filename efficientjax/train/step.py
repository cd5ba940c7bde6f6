"""The training and evaluation steps: pure functions of (state, batch)."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from efficientjax.train.state import TrainState


def token_losses(model: nn.Module, params: Any, batch: jax.Array) -> jax.Array:
  """Next-token cross-entropy per position. batch: [b, seq_len + 1] token windows."""
  inputs, targets = batch[:, :-1], batch[:, 1:]
  logits = model.apply({'params': params}, inputs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, grad_accum_steps: int,
                    schedule: optax.Schedule | None = None
                    ) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
  """One optimizer step over a global batch, accumulating over `grad_accum_steps` micro-batches."""

  def loss_fn(params, micro):
    return token_losses(model, params, micro).mean()

  grad_fn = jax.value_and_grad(loss_fn)

  def step(state: TrainState, batch: jax.Array):
    if grad_accum_steps == 1:
      loss, grads = grad_fn(state.params, batch)
    else:
      # Micro-batch i takes rows i, i + k, i + 2k, ...: with the batch dim sharded in
      # contiguous blocks, every device keeps its own rows and nothing moves.
      b = batch.shape[0]
      micro = batch.reshape(b // grad_accum_steps, grad_accum_steps, -1).swapaxes(0, 1)

      def accumulate(carry, mb):
        mb = nn.with_logical_constraint(mb, ('batch', 'length'))
        loss, grads = grad_fn(state.params, mb)
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
      (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro)
      loss, grads = jax.tree.map(lambda x: x / grad_accum_steps, (loss, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads)}
    if schedule is not None:
      metrics['learning_rate'] = schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def make_eval_step(model: nn.Module) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
  """(summed loss, token count) over a batch, so batches combine exactly."""

  def step(params, batch):
    losses = token_losses(model, params, batch)
    return losses.sum(), jnp.asarray(losses.size, jnp.float32)

  return step

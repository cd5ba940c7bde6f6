"""AdamW with linear warm-up and cosine decay, clipping, and decay kept off norms and biases."""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Parameters by leaf name that weight decay must not shrink: norm gains and biases.
NO_DECAY_NAMES = ('scale', 'bias')


def learning_rate_schedule(train: Mapping[str, Any]) -> optax.Schedule:
  peak = train['learning_rate']
  warmup = min(train['warmup_steps'], train['steps'] - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(train['steps'], warmup + 1), end_value=peak * train['min_lr_ratio'])


def decay_mask(params: Any) -> Any:
  """True where weight decay applies (by leaf name, so it holds for scanned stacks too)."""
  def decays(path, _):
    return getattr(path[-1], 'key', None) not in NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(decays, params)


def updates_applied(opt_state: Any) -> jax.Array | None:
  """The count the optimizer's learning-rate schedule reads: updates applied so far. Behind
  the train state's step by the steps skipped as non-finite (their optimizer state is kept, as
  optax.apply_if_finite keeps it); None for an optimizer without a schedule."""
  counts = [s.count for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
            if isinstance(s, optax.ScaleByScheduleState)]
  return counts[0] if counts else None


def stored_as(inner: optax.GradientTransformation, dtype: Any
              ) -> optax.GradientTransformation:
  """`inner` with its floating-point state kept in `dtype` (bfloat16 moments: half of AdamW's
  memory) and its arithmetic in float32: the state is widened for each update and rounded to
  `dtype` (to nearest) after it. Counters keep their integer dtype."""
  dtype = jnp.dtype(dtype)

  def cast(tree, to):
    return jax.tree.map(
        lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

  def init(params):
    return cast(inner.init(params), dtype)

  def update(updates, state, params=None):
    updates, state = inner.update(updates, cast(state, jnp.float32), params)
    return updates, cast(state, dtype)

  return optax.GradientTransformation(init, update)


def make_optimizer(train: Mapping[str, Any], lr_multipliers: Any = None
                   ) -> optax.GradientTransformation:
  """Clipping by the global norm of every gradient, then AdamW (its moments stored in
  `train.opt_state_dtype`).

  lr_multipliers: a tree of floats like the params, each leaf's learning rate as a multiple of
  the schedule's (LoRA+: B at 16×); None: one rate. AdamW's moments do not depend on the rate,
  so a leaf's update under rate lr·f is f × its update under lr, decay included (torch's AdamW
  applies a param group's lr to its decay too): the factors scale the updates, and the
  optimizer state is the same as with one rate.
  """
  parts = []
  if train['grad_clip_norm'] > 0:
    parts.append(optax.clip_by_global_norm(train['grad_clip_norm']))
  adamw = optax.adamw(learning_rate_schedule(train), b1=train['b1'], b2=train['b2'],
                      eps=train['eps'], weight_decay=train['weight_decay'], mask=decay_mask)
  state_dtype = train.get('opt_state_dtype') or 'float32'
  parts.append(adamw if state_dtype == 'float32' else stored_as(adamw, state_dtype))
  if lr_multipliers is not None and any(f != 1.0 for f in jax.tree.leaves(lr_multipliers)):
    factors = jax.tree.map(float, lr_multipliers)
    parts.append(optax.stateless(
        lambda updates, params=None: jax.tree.map(lambda u, f: u * f, updates, factors)))
  return optax.chain(*parts)

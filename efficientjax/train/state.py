"""The train state and its placement on the mesh."""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from efficientjax import parallel


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so checkpoints hold a plain array
  # Non-trained model collections that persist across steps (MoE routing biases); {} for most.
  model_state: Any = flax.struct.field(default_factory=dict)
  # What a fine-tuning method keeps fixed (efficientjax.peft): the base under adapters, the
  # layers `freeze` leaves alone; no gradient, no optimizer state, and never checkpointed (the
  # run rebuilds it from its source). {} for pretraining and full fine-tuning.
  frozen: Any = flax.struct.field(default_factory=dict)


PERSISTENT_COLLECTIONS = ('moe_state',)  # the collections of model.init kept in the train state


def _boxed_init(model: nn.Module, seq_len: int, rng: jax.Array) -> tuple[Any, dict[str, Any]]:
  """(boxed params, model state) as `model.init` makes them."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  variables = model.init(rng, tokens)
  return variables['params'], {k: v for k, v in variables.items() if k in PERSISTENT_COLLECTIONS}


HOST = 'pinned_host'  # the memory kind offloaded state lives in (DMA-able host memory)


def optimizer_shardings(tx: optax.GradientTransformation, abstract_opt: Any, param_sh: Any,
                        mesh: Mesh, offload: bool = False) -> Any:
  """The optimizer state's placement: moments mirror their params' (in host memory when
  `offload`: train.offload_optimizer); counters are replicated on the devices, where the step
  reads them for the learning rate."""
  if offload:
    param_sh = jax.tree.map(lambda s: s.with_memory_kind(HOST), param_sh)
  return optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, param_sh,
                               transform_non_params=lambda _: parallel.replicated(mesh))


def on_device(shardings: Any) -> Any:
  """The same placement in device memory (where the step computes with offloaded state)."""
  return jax.tree.map(lambda s: s.with_memory_kind('device'), shardings)


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                    seq_len: int, offload_optimizer: bool = False
                    ) -> tuple[TrainState, TrainState]:
  """(abstract state, shardings): every leaf placed by its logical axis names; the optimizer's
  moments in host memory with `offload_optimizer`."""
  boxed, abstract_model_state = jax.eval_shape(lambda k: _boxed_init(model, seq_len, k),
                                               jax.random.key(0))
  param_sh = parallel.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
  abstract_params = nn.unbox(boxed)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sh = optimizer_shardings(tx, abstract_opt, param_sh, mesh, offload_optimizer)
  rep = parallel.replicated(mesh)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
                        model_state=abstract_model_state)
  # Model state is small (a bias per expert per layer): replicated.
  shardings = TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep,
                         model_state=jax.tree.map(lambda _: rep, abstract_model_state))
  return abstract, shardings


def init_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, seq_len: int,
               seed: int, shardings: TrainState) -> TrainState:
  """Initialises directly into the sharded layout (no full copy on any one device)."""
  def init(key):
    init_key, state_key = jax.random.split(key)
    boxed, model_state = _boxed_init(model, seq_len, init_key)
    params = nn.unbox(boxed)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(state_key), model_state=nn.unbox(model_state))
  with parallel.activate(mesh):
    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def state_from_variables(tx: optax.GradientTransformation, mesh: Mesh, seed: int,
                         shardings: TrainState, abstract: TrainState,
                         variables: dict[str, Any]) -> TrainState:
  """A fresh train state (step 0, new optimizer moments) around given weights (model.init):
  `variables` holds host arrays, {'params': ..., and 'moe_state' where the source has one}.
  Each leaf goes straight to its place on the mesh, and no random init is built, so the
  params are never held twice. Model state the source lacks starts at zeros, as `init`
  starts it; the RNG is what `init_state` would give for `seed`."""
  params = jax.device_put(variables['params'], shardings.params)
  model_state = {name: (variables[name] if name in variables else
                        jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree))
                 for name, tree in abstract.model_state.items()}
  model_state = jax.device_put(model_state, shardings.model_state)

  def rest(params, key):
    _, state_key = jax.random.split(key)  # init_state's split: the state's key is the second
    return tx.init(params), jax.random.key_data(state_key)
  with parallel.activate(mesh):
    opt_state, rng = jax.jit(rest, out_shardings=(shardings.opt_state, shardings.rng))(
        params, jax.random.key(seed))
  return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
                    params=params, opt_state=opt_state, rng=rng, model_state=model_state)

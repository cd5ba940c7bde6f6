"""Orbax checkpoints of the train state plus the data position and run metadata."""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from efficientjax.train.state import TrainState


def _stored(state: TrainState) -> dict[str, Any]:
  """The state as saved: a dict, with `model_state` only when the model has one, so a dense
  model's checkpoints keep the layout they had before model state existed (and old ones load)."""
  fields = {'step': state.step, 'params': state.params, 'opt_state': state.opt_state,
            'rng': state.rng}
  if state.model_state:
    fields['model_state'] = state.model_state
  return fields


class Checkpointer:
  """Keeps the last `keep` checkpoints under `<workdir>/checkpoints/<step>`.

  Each holds `state` (params, optimizer state, step, RNG) and `meta` (JSON: the data
  iterator position and anything the run must remember across a restart).
  """

  def __init__(self, workdir: str, *, keep: int, async_save: bool):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_stored(state)),
                                                     meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, abstract: TrainState, shardings: TrainState
              ) -> tuple[TrainState, dict[str, Any]]:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_stored(target)), meta=ocp.args.JsonRestore()))
    return TrainState(**out['state']), out['meta']

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

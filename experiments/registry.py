"""Experiment kinds (`kind`): each names the runner, as 'module:function', imported on use so
that one kind's heavy imports never slow another's start-up."""

import importlib
from collections.abc import Callable

from efficientjax.registry import Registry

EXPERIMENTS: Registry[str] = Registry('kind')
EXPERIMENTS.register('pretrain')('experiments.pretrain:run')
EXPERIMENTS.register('finetune')('experiments.finetune:run')
EXPERIMENTS.register('inference')('experiments.inference:run')


def runner(kind: str) -> Callable:
  module, function = EXPERIMENTS.get(kind).split(':')
  return getattr(importlib.import_module(module), function)

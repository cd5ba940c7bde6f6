"""Small configs and models shared by the tests."""

import copy
import functools
from typing import Any

import jax
import jax.numpy as jnp

from configs import quickstart
from efficientjax.model import ModelConfig, Transformer, init_cache


def with_overrides(config: dict[str, Any], overrides: dict[str, Any], *,
                   new_keys: bool = False) -> dict[str, Any]:
  """A copy of a plain-dict config with dotted overrides ('train.steps': 4) set; a path the
  config lacks is a KeyError unless new_keys."""
  c = copy.deepcopy(config)
  for path, value in overrides.items():
    *parents, key = path.split('.')
    node = c
    for p in parents:
      node = node.setdefault(p, {}) if new_keys else node[p]
    if key not in node and not new_keys:
      raise KeyError(path)
    node[key] = value
  return c


def smoke_config(**overrides: Any) -> dict[str, Any]:
  """The quickstart's smoke preset as a plain dict, with dotted overrides ('train.steps': 4)."""
  return with_overrides(quickstart.get_config('smoke').to_dict(), overrides)


# A fresh `jax.jit(Transformer(cfg).init)` traces and compiles again on every call, even for
# the same config and shapes (a second or more each, for these tiny models); these are jitted
# once per config, so a test process compiles each (config, shape) once, whichever file asks.


@functools.cache
def jitted_init(cfg: ModelConfig):
  """`Transformer(cfg).init(key, tokens)` -> variables, jitted once per config."""
  return jax.jit(Transformer(cfg).init)


@functools.cache
def jitted_forward(cfg: ModelConfig):
  """`Transformer(cfg).apply(variables, tokens)` -> logits, jitted once per config."""
  model = Transformer(cfg)
  return jax.jit(lambda variables, tokens: model.apply(variables, tokens))


@functools.cache
def decode_step(cfg: ModelConfig):
  """`Transformer.decode_step` of `cfg`, jitted once per config."""
  model = Transformer(cfg)
  return jax.jit(lambda p, t, pos, c: model.apply({'params': p}, t, pos, c,
                                                  method=Transformer.decode_step))


def prefill_then_decode(cfg: ModelConfig, params: Any, tokens: jax.Array, prefill: int,
                        max_len: int | None = None) -> jax.Array:
  """Logits [batch, length, vocab] of one prefill of tokens[:, :prefill] into a zeroed cache of
  `max_len` slots (default: the sequence's length), then decode steps of one token each: what
  the full forward pass over `tokens` must equal."""
  batch, length = tokens.shape
  step = decode_step(cfg)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
  cache = init_cache(cfg, batch, max_len or length)
  logits, cache = step(params, tokens[:, :prefill], positions[:, :prefill], cache)
  out = [logits]
  for i in range(prefill, length):
    logits, cache = step(params, tokens[:, i:i + 1], positions[:, i:i + 1], cache)
    out.append(logits)
  return jnp.concatenate(out, axis=1)


def short_chats(path, documents: int = 24, per_document: int = 12) -> str:
  """A jsonl corpus of short chat examples (a question, a one-line answer) in
  `documents` files, for fine-tuning runs whose data is beside the point: its rows fit 64
  byte tokens, where the offline `functions` set needs 512. Returns the spec."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  for d in range(documents):
    with open(os.path.join(path, f'chats_{d:02d}.jsonl'), 'w') as f:
      for i in range(per_document):
        a, b = 3 * d + i, 7 * i + d
        f.write(json.dumps({'messages': [{'role': 'user', 'content': f'{a}+{b}?'},
                                         {'role': 'assistant', 'content': str(a + b)}]}) + '\n')
  return f'jsonl:{path}/*.jsonl'

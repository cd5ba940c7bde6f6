"""An lm-evaluation-harness model (`--model efficientjax`) backed by an efficientjax model.

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from efficientjax.infer.lm_eval_adapter import EfficientJaxLM
    lm = EfficientJaxLM(cfg, params, tokenizer)            # or EfficientJaxLM(init='run:WORKDIR')
    simple_evaluate(model=lm, tasks=['my_task'], task_manager=TaskManager(include_path=DIR))

From the shell, this module runs lm-eval's command line with the model registered:

    python -m efficientjax.infer.lm_eval_adapter --model efficientjax \
        --model_args init=run:WORKDIR --tasks my_task --include_path DIR

Requests are tokenised by lm-eval's `TemplateLM` (its `_encode_pair` and empty-context rule)
with `efficientjax.infer.loglikelihood.tok_encode`, which adds BOS where the tokenizer starts
texts with one, as a Hugging Face tokenizer's `encode` does; scores come from
`efficientjax.infer.loglikelihood.score`, so they equal `multiple_choice.evaluate`'s. Like
lm-eval's HF model, `loglikelihood_rolling` scores the text's `tok_encode` ids (BOS included
where the tokenizer adds it) after the prefix token. `generate_until` decodes with
`efficientjax.infer.engine.Engine` (greedy unless a task asks for `do_sample`; then
temperature, top_k, top_p, request i seeded with i), stops at the tokenizer's end-of-sequence
ids and cuts the text at the first `until` string.

lm_eval is an optional dependency (the `eval` extra): only this module imports it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from efficientjax.errors import ConfigError
from efficientjax.infer import loglikelihood
from efficientjax.model import ModelConfig

FIELD = 'model_args.init'


def load_model(init: str) -> tuple[ModelConfig, dict[str, Any], Any]:
  """(cfg, variables, tokenizer) of a weight source: 'run:WORKDIR[:STEP]' (a run of this
  project: its config.json, tokenizer and checkpoint) or 'hf:DIR' (a Hugging Face checkpoint
  directory with its tokenizer files)."""
  from efficientjax.data.tokenizers import get_tokenizer  # pylint: disable=g-import-not-at-top
  from efficientjax.train import init_from  # pylint: disable=g-import-not-at-top
  kind, path, _ = init_from.parse(init)
  if not os.path.isdir(path):
    raise ConfigError(FIELD, f'{init}: {path} is not a directory')
  if kind == 'hf':
    from efficientjax.hf.safetensors_io import load_checkpoint  # pylint: disable=g-import-not-at-top
    tokenizer = get_tokenizer(path)
    fields, variables = load_checkpoint(path, collections=True, host=True)
    cfg = ModelConfig.from_config(fields, tokenizer_vocab_size=tokenizer.vocab_size)
    return cfg, dict(variables), tokenizer
  config_file = os.path.join(path, 'config.json')
  try:
    with open(config_file) as f:
      config = json.load(f)
    model, data = dict(config['model']), dict(config['data'])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError(FIELD, f'{init}: {config_file} is not a config.json of a run of this '
                      f'project ({type(e).__name__}: {e}); give the --workdir of one') from None
  # The run's own model section is its schema: resolve checks the source (a whole model, the
  # step present) and pins what the run left derived, without a config file of ours.
  model, source, _ = init_from.resolve({**model, 'init': init}, data, model)
  tokenizer = get_tokenizer(data['tokenizer'], data.get('eos_token'))
  cfg = ModelConfig.from_config(model, tokenizer_vocab_size=tokenizer.vocab_size,
                                seq_len=data.get('seq_len'))
  return cfg, init_from.load(source, cfg), tokenizer


def _batch_size(value: Any, default: int) -> int:
  """lm-eval passes batch_size as given on its command line: an int, '8', 'auto' or 'auto:N'."""
  if value is None or (isinstance(value, str) and value.startswith('auto')):
    return default
  return int(value)


def cut_at(text: str, until: list[str]) -> str:
  """`text` up to the first occurrence of any stop string."""
  for stop in until:
    if stop:
      text = text.split(stop, 1)[0]
  return text


@register_model('efficientjax')
class EfficientJaxLM(TemplateLM):
  """lm-eval's `LM` over an efficientjax model: loglikelihood, loglikelihood_rolling and
  generate_until.

  Args:
    cfg, params, tokenizer: the model, its params (or variables dict) and a tokenizer of
      `efficientjax.data.tokenizers`; or none of them and `init`.
    init: 'run:WORKDIR[:STEP]' or 'hf:DIR' (see `load_model`).
    batch_size: rows per forward pass of loglikelihood requests ('auto' picks 8).
    max_length: the window contexts are cut to (default the model's max_seq_len).
    max_gen_toks: generate_until's default new-token budget (a task's gen_kwargs override it).
    num_slots, prefill_chunk: the decode engine's batch and prefill chunk.
    dtype: a compute dtype to run in ('bfloat16', ...), default the model's.
  Other keyword arguments lm-eval passes (device, max_batch_size) are accepted and unused: JAX
  places the computation.
  """

  def __init__(self, cfg: ModelConfig | None = None, params: Mapping[str, Any] | None = None,
               tokenizer: Any = None, *, init: str | None = None, batch_size: Any = 8,
               max_length: int | None = None, max_gen_toks: int = 256, num_slots: int = 8,
               prefill_chunk: int = 512, dtype: str | None = None, **unused: Any):
    super().__init__()
    del unused
    if init is not None:
      if cfg is not None or params is not None or tokenizer is not None:
        raise ValueError('give either cfg, params and tokenizer, or init, not both')
      cfg, params, tokenizer = load_model(init)
    elif cfg is None or params is None or tokenizer is None:
      raise ValueError('EfficientJaxLM needs cfg, params and tokenizer, or init=run:WORKDIR / '
                       'init=hf:DIR')
    if dtype is not None:
      cfg = dataclasses.replace(cfg, dtype=jnp.dtype(dtype))
    self.cfg = cfg
    # Host arrays (what init_from loads) would be copied to the device on every call.
    self.params = jax.device_put(params)
    self.tokenizer = tokenizer
    self.batch_size = _batch_size(batch_size, 8)
    self.max_length = int(max_length or cfg.max_seq_len)
    self.max_gen_toks = int(max_gen_toks)
    self.num_slots = int(num_slots)
    self.prefill_chunk = int(prefill_chunk)
    self._engine = None

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    return loglikelihood.prefix_token_id(self.tokenizer)

  @property
  def tokenizer_name(self) -> str:
    return str(getattr(self.tokenizer, 'name', type(self.tokenizer).__name__))

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs
                 ) -> list[int]:
    del kwargs
    return loglikelihood.tok_encode(self.tokenizer, string, add_special_tokens)

  def tok_decode(self, tokens: list[int]) -> str:
    return self.tokenizer.decode(tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                            ) -> list[tuple[float, bool]]:
    del disable_tqdm, kwargs
    pairs = [(context, continuation) for _, context, continuation in requests]
    results = loglikelihood.score(self.cfg, self.params, pairs, batch_size=self.batch_size,
                                  max_len=self.max_length)
    for (key, _, _), result in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial('loglikelihood', key, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owners = [], []
    for i, (text,) in enumerate(tqdm([r.args for r in requests], disable=disable_tqdm)):
      for pair in loglikelihood.rolling_windows(self.tok_encode(text), self.max_length,
                                                self.prefix_token_id):
        windows.append(pair)
        owners.append(i)
    scores = loglikelihood.score(self.cfg, self.params, windows, batch_size=self.batch_size,
                                 max_len=self.max_length)
    totals = [0.0] * len(requests)
    for i, (ll, _) in zip(owners, scores):
      totals[i] += ll
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', request.args, total)
    return totals

  def _generation_engine(self):
    if self._engine is None:
      from efficientjax.infer.engine import Engine  # pylint: disable=g-import-not-at-top
      self._engine = Engine(self.cfg, self.params, num_slots=self.num_slots,
                            max_len=self.max_length, prefill_chunk=self.prefill_chunk)
    return self._engine

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    from efficientjax.infer.sampling import Sampling  # pylint: disable=g-import-not-at-top
    del disable_tqdm
    prompts, lengths, settings, stops = [], [], [], []
    for i, request in enumerate(requests):
      context, gen_kwargs = request.args[0], dict(request.args[1] or {})
      until = gen_kwargs.pop('until', None) or []
      stops.append([until] if isinstance(until, str) else list(until))
      max_new = min(int(gen_kwargs.pop('max_gen_toks', self.max_gen_toks)), self.max_length - 1)
      temperature = float(gen_kwargs.pop('temperature', 0.0) or 0.0)
      if not gen_kwargs.pop('do_sample', temperature > 0.0):
        temperature = 0.0  # lm-eval's greedy: do_sample false whatever the temperature
      settings.append(Sampling(temperature=temperature,
                               top_k=int(gen_kwargs.pop('top_k', 0) or 0) if temperature else 0,
                               top_p=float(gen_kwargs.pop('top_p', 1.0) or 1.0)
                               if temperature else 1.0, seed=i))
      # Left-truncated so that prompt and output fit the engine's window.
      prompts.append(self.tok_encode(context)[-(self.max_length - max_new):])
      lengths.append(max_new)
    if not requests:
      return []
    stop_ids = tuple(getattr(self.tokenizer, 'eos_ids', (self.tokenizer.eos_id,)))
    generated = self._generation_engine().generate(prompts, max_new_tokens=lengths,
                                                   sampling=settings, stop_ids=stop_ids)
    out = []
    for request, ids, until in zip(requests, generated, stops):
      ids = list(ids)
      ends = [k for k, t in enumerate(ids) if t in stop_ids]
      text = cut_at(self.tok_decode(ids[:ends[0]] if ends else ids), until)
      out.append(text)
      self.cache_hook.add_partial('generate_until', request.args, text)
    return out


def main() -> None:
  """lm-eval's command line, with `--model efficientjax` registered."""
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
  cli_evaluate()


if __name__ == '__main__':
  main()

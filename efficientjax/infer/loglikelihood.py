"""Log-likelihood scoring of continuations, as lm-evaluation-harness's Hugging Face model does it.

`score` takes token requests (context, continuation) and returns, per request, the summed
log-probability of the continuation given the context and whether greedy decoding would have
produced it. Its conventions are lm-eval's (`lm_eval/models/huggingface.py`,
`_loglikelihood_tokens`): the model reads `(context + continuation)[-(max_len + 1):][:-1]`, so a
context too long for the window loses tokens from the left; log-softmax in float32 over the
model's whole (padded) vocabulary; greedy means every continuation token is its position's
argmax. `rolling` scores a whole text in disjoint windows (lm-eval's
`get_rolling_token_windows` + `make_disjoint_window`, context_len 1), for perplexity.

The text side is here too, shared by the multiple-choice evaluator and the lm-eval adapter:
`encode_pair` splits a (context, continuation) text pair into tokens as lm-eval's `TemplateLM`
does with a Hugging Face tokenizer (trailing spaces of the context move to the continuation;
the pair is encoded whole and the continuation is the tail; a tokenizer that starts texts with
BOS gets it at the front), and an empty context becomes the prefix token (BOS, else EOS).

Rows are right-padded to a power-of-two length (at least `MIN_BUCKET`, at most `max_len`) and
batches to a power-of-two row count (at most `batch_size`), so a run compiles a handful of
programs whatever its request lengths. Right padding cannot change a causal model's logits at
the real positions, so neither bucketing nor batch composition changes a score (a MoE layer
that drops tokens over an expert capacity is the exception: padding competes for capacity;
the default dropless dispatch has none).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficientjax.model import ModelConfig, Transformer, as_variables

# Shortest padded row: tiny requests share one program instead of one per length 1, 2, 4, 8.
MIN_BUCKET = 16

Request = tuple[Sequence[int], Sequence[int]]


@functools.lru_cache(maxsize=None)
def _token_scores(cfg: ModelConfig):
  """Jitted (variables, tokens [b, t], targets [b, t]) -> (log p(target) [b, t] float32,
  target is the argmax [b, t] bool); one per config, compiled once per padded shape."""
  model = Transformer(cfg)

  def fn(variables, tokens, targets):
    logits = model.apply(variables, tokens).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return target_logp, jnp.argmax(logits, axis=-1) == targets

  return jax.jit(fn)


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def bucket_length(length: int, max_len: int) -> int:
  """The padded row length of an input of `length` tokens."""
  return min(max(_pow2_at_least(length), MIN_BUCKET), max_len)


def score(cfg: ModelConfig, params: Mapping[str, Any], requests: Sequence[Request], *,
          batch_size: int = 8, max_len: int | None = None) -> list[tuple[float, bool]]:
  """(sum of log p(continuation | context), is greedy) for each (context, continuation) of
  token ids, in the order given.

  Args:
    cfg: the model.
    params: its params (quantised containers pass through to `Linear`), or a variables dict
      with a 'params' entry.
    requests: (context ids, continuation ids) pairs; the context must be non-empty (lm-eval
      gives an empty one the prefix token: `encode_pair`) and the continuation non-empty and at
      most `max_len` tokens.
    batch_size: most rows per forward pass.
    max_len: the model's window (default `cfg.max_seq_len`); a longer context is cut from the
      left.
  """
  max_len = cfg.max_seq_len if max_len is None else max_len
  if batch_size < 1 or max_len < 1:
    raise ValueError(f'batch_size ({batch_size}) and max_len ({max_len}) must be positive')
  rows = []
  for i, (context, continuation) in enumerate(requests):
    context, continuation = list(context), list(continuation)
    if not context or not continuation:
      raise ValueError(f'request {i}: context ({len(context)} tokens) and continuation '
                       f'({len(continuation)}) must both be non-empty; an empty context is '
                       'the prefix token (see encode_pair)')
    if len(continuation) > max_len:
      raise ValueError(f'request {i}: the continuation has {len(continuation)} tokens, more than '
                       f'the window of {max_len}')
    whole = (context + continuation)[-(max_len + 1):]
    rows.append((np.asarray(whole[:-1], np.int32), np.asarray(whole[1:], np.int32),
                 len(continuation)))

  by_bucket: dict[int, list[int]] = {}
  for i, (inputs, _, _) in enumerate(rows):
    by_bucket.setdefault(bucket_length(len(inputs), max_len), []).append(i)
  fn = _token_scores(cfg)
  variables = as_variables(params)
  results: list[tuple[float, bool] | None] = [None] * len(rows)
  for length, members in sorted(by_bucket.items()):
    for start in range(0, len(members), batch_size):
      chunk = members[start:start + batch_size]
      n = min(_pow2_at_least(len(chunk)), batch_size)
      tokens = np.zeros((n, length), np.int32)
      targets = np.zeros((n, length), np.int32)
      for r, i in enumerate(chunk):
        inputs, outputs, _ = rows[i]
        tokens[r, :len(inputs)] = inputs
        targets[r, :len(outputs)] = outputs
      logp, greedy = jax.device_get(fn(variables, tokens, targets))
      for r, i in enumerate(chunk):
        inputs, _, cont_len = rows[i]
        span = slice(len(inputs) - cont_len, len(inputs))
        # float64 on the host: the sum does not depend on XLA's reduction order.
        results[i] = (float(np.sum(logp[r, span], dtype=np.float64)), bool(np.all(greedy[r, span])))
  return results  # type: ignore[return-value]


def rolling_windows(tokens: Sequence[int], window: int, prefix_token: int
                    ) -> list[tuple[list[int], list[int]]]:
  """(context, continuation) pairs that predict every token of `tokens` exactly once, each in
  at most `window` inputs with as much context as fits: lm-eval's `get_rolling_token_windows`
  (context_len 1) followed by `make_disjoint_window`. The first token is predicted from
  `prefix_token`."""
  tokens = list(tokens)
  if window < 1:
    raise ValueError(f'window must be positive, got {window}')
  if not tokens:
    return []
  pairs = []
  first = min(window, len(tokens))
  pairs.append(([prefix_token], tokens[:first]))
  predicted = first
  while predicted < len(tokens):
    count = min(len(tokens) - predicted, window)
    end = predicted + count
    # The window's inputs are tokens[end - window - 1 : end - 1]; those before the predicted
    # span are its context.
    pairs.append((tokens[end - window - 1:end - count], tokens[end - count:end]))
    predicted = end
  return pairs


def rolling(cfg: ModelConfig, params: Mapping[str, Any], tokens: Sequence[int], window: int, *,
            prefix_token: int, batch_size: int = 8) -> float:
  """The summed log-probability of every token of `tokens` (the first given `prefix_token`),
  scored in the disjoint windows of `rolling_windows`: lm-eval's `loglikelihood_rolling`."""
  pairs = rolling_windows(tokens, window, prefix_token)
  return sum(ll for ll, _ in score(cfg, params, pairs, batch_size=batch_size, max_len=window))


# The text side: lm-eval's request tokenisation with this project's tokenizers.


def prefix_token_id(tokenizer: Any) -> int:
  """What an empty context becomes: the tokenizer's BOS where it has one, else its EOS (as
  lm-eval's HF model chooses)."""
  bos = getattr(tokenizer, 'bos_id', None)
  return tokenizer.eos_id if bos is None else bos


def tok_encode(tokenizer: Any, text: str, add_special_tokens: bool | None = None) -> list[int]:
  """Token ids of `text` as a Hugging Face tokenizer's `encode` gives them: with the BOS that
  the tokenizer starts every text with (`add_bos`), unless `add_special_tokens` is False or, by
  default, the text already starts with the BOS token's text (lm-eval's `has_bos_prefix`)."""
  ids = [int(i) for i in tokenizer.encode(text)]
  if not getattr(tokenizer, 'add_bos', False) or add_special_tokens is False:
    return ids
  bos_token = getattr(tokenizer, 'bos_token', None)
  if add_special_tokens is None and bos_token and text.startswith(bos_token):
    return ids
  return [tokenizer.bos_id] + ids


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) of a text request, as lm-eval's `TemplateLM.loglikelihood`
  and `_encode_pair` make them for a causal model."""
  if not context:
    continuation_ids = tok_encode(tokenizer, continuation, add_special_tokens=False)
    prefix = prefix_token_id(tokenizer)
    if continuation_ids and continuation_ids[0] == prefix:
      return continuation_ids[:1], continuation_ids[1:]
    return [prefix], continuation_ids
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole = tok_encode(tokenizer, context + continuation)
  context_ids = tok_encode(tokenizer, context)
  return context_ids, whole[len(context_ids):]


def score_texts(cfg: ModelConfig, params: Mapping[str, Any], tokenizer: Any,
                requests: Iterable[tuple[str, str]], *, batch_size: int = 8,
                max_len: int | None = None) -> list[tuple[float, bool]]:
  """`score` of (context, continuation) text pairs, tokenised by `encode_pair`."""
  pairs = [encode_pair(tokenizer, c, x) for c, x in requests]
  return score(cfg, params, pairs, batch_size=batch_size, max_len=max_len)

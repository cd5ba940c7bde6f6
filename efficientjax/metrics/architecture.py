"""What the attention variant costs by construction: its parameters, its KV cache per token
(analytic and measured from real cache arrays) and its FLOPs per token."""

import contextlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from efficientjax.attention import ATTENTION
from efficientjax.attention.cache import nbytes
from efficientjax.model import ModelConfig, init_cache


def _attention_params(params: Mapping[str, Any]) -> int:
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return int(sum(leaf.size for path, leaf in leaves
                 if any(getattr(k, 'key', None) == 'attn' for k in path)))


def attention_summary(cfg: ModelConfig, params: Mapping[str, Any], seq_len: int,
                      packed_rows: bool = False) -> dict[str, Any]:
  """For the record's `model.attention`. The cache is in the compute dtype (what decoding
  writes); FLOPs are forward, per token, summed over layers, averaged over a causal sequence of
  `seq_len` (x3 for a training step). packed_rows: the run's rows pack several examples
  (fine-tuning), which some implementations leave to a reference path."""
  variant = ATTENTION.get(cfg.attention)
  dtype = jnp.dtype(cfg.dtype)
  analytic = cfg.num_layers * variant.cache_values_per_token(cfg) * dtype.itemsize
  # Measured: a one-sequence cache as decoding would allocate it, on the host (it is small, and
  # the run's devices may be full).
  try:
    where = jax.default_device(jax.devices('cpu')[0])
  except RuntimeError:  # JAX_PLATFORMS without cpu
    where = contextlib.nullcontext()
  with where:
    cache = init_cache(cfg, 1, seq_len, dtype)
    measured = nbytes(cache) / seq_len
    del cache
  flops = variant.flops_per_token(cfg, seq_len)
  extra = {}
  if hasattr(variant, 'implementation_used'):  # NSA: its kernels or its dense reference
    extra['implementation'] = variant.implementation_used(cfg, packed_rows)
  return {
      **extra,
      'variant': cfg.attention,
      'params': _attention_params(params),
      'kv_cache_dtype': dtype.name,
      'kv_cache_bytes_per_token': float(analytic),
      'kv_cache_bytes_per_token_measured': float(measured),
      'kv_cache_measured_len': seq_len,
      'forward_flops_per_token': {
          'attention': float(cfg.num_layers * flops['attention']),
          'attention_as_executed': float(cfg.num_layers * flops['attention_as_executed']),
          'projections': float(cfg.num_layers * flops['projections']),
      },
  }

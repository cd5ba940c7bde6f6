"""Attention variants and their registry (`model.attention`).

A variant is a Flax module class `Variant(config, name=...)` called as
`out, cache = variant(x [batch, t, embed], positions [batch, t], cache, segment_ids=None)`, with
`cache` None for a whole sequence (training) or the layer's cache (decoding; the updated cache
comes back), `segment_ids` [batch, t] for whole sequences packing several examples (a token
attends only within its segment; tests/attention/test_segments.py), and these static methods,
which the model, validation and the metrics use:

- `init_cache(cfg, batch, max_len, dtype)`: an empty cache pytree for one layer;
- `cache_values_per_token(cfg)`: values one layer caches per token (the analytic KV-cache size;
  the measured one is read from the arrays);
- `flops_per_token(cfg, seq_len)`: forward FLOPs per token of one layer, averaged over a causal
  sequence: {'projections', 'attention', 'attention_as_executed'};
- optionally `check(model_fields, seq_len)`: a list of `ConfigError`s for shapes it cannot run.
"""

from efficientjax.attention.mha import MultiHeadAttention, kv_head_variant
from efficientjax.attention.mla import MultiHeadLatentAttention
from efficientjax.attention.nsa import NativeSparseAttention
from efficientjax.attention.positions import POSITIONS
from efficientjax.registry import Registry

ATTENTION = Registry('model.attention')
# One module for the K/V-head family; the name must match the head counts (see its `check`).
for _name in ('mha', 'gqa', 'mqa'):
  ATTENTION.register(_name)(MultiHeadAttention)
ATTENTION.register('mla')(MultiHeadLatentAttention)
ATTENTION.register('nsa')(NativeSparseAttention)

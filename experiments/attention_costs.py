"""What each attention variant of the study costs by construction, before any run: parameters
(whole model and attention), KV cache per token (analytic, and measured from real cache arrays)
and forward attention FLOPs per token at a sequence length. One markdown table.

  python -m experiments.attention_costs [--seq_len=4096] [--variants=mha,gqa,mqa,mla,nsa]
"""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from efficientjax.metrics.architecture import attention_summary
from efficientjax.model import ModelConfig, Transformer

_SEQ_LEN = flags.DEFINE_integer('seq_len', 4096, 'tokens per sequence')
_VARIANTS = flags.DEFINE_list('variants', ['mha', 'gqa', 'mqa', 'mla', 'nsa'], 'variants')
BYTE_VOCAB = 257


def costs(variant: str, seq_len: int) -> dict:
  c = importlib.import_module(f'configs.attention_{variant}').get_config().to_dict()
  cfg = ModelConfig.from_config(c['model'], tokenizer_vocab_size=BYTE_VOCAB, seq_len=seq_len)
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  params = nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)['params'])
  return {**attention_summary(cfg, params, seq_len),
          'model_params': sum(x.size for x in jax.tree.leaves(params))}


def main(argv):
  del argv
  seq = _SEQ_LEN.value
  rows = {v: costs(v, seq) for v in _VARIANTS.value}
  base = rows.get('gqa', next(iter(rows.values())))
  print(f'| variant | params | vs gqa | attention params | KV cache B/token (analytic / '
        f'measured, bf16) | attention GFLOP/token fwd at {seq} (as executed) |')
  print('|---|---|---|---|---|---|')
  for v, r in rows.items():
    f = r['forward_flops_per_token']
    print(f'| {v} | {r["model_params"] / 1e9:.3f}B | '
          f'{r["model_params"] / base["model_params"] - 1:+.1%} | {r["params"] / 1e6:.1f}M | {r["kv_cache_bytes_per_token"]:,.0f} / '
          f'{r["kv_cache_bytes_per_token_measured"]:,.0f} | {f["attention"] / 1e9:.3f} '
          f'({f["attention_as_executed"] / 1e9:.3f}) |')


if __name__ == '__main__':
  app.run(main)

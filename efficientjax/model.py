"""The decoder-only language model: embeddings, a stack of pre-norm blocks, a head.

Attention and feed-forward are looked up in their registries by config string, so a study
point changes a variant without touching this file.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientjax.attention import ATTENTION, POSITIONS
from efficientjax.nn import FFN, Embed, Linear, RMSNorm

# What a rematerialised block keeps for the backward pass; `none` keeps everything.
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
}
DTYPES = ('float32', 'bfloat16', 'float16')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's shape with every derived value resolved (no placeholders)."""
  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  attention: str = 'mha'
  attention_impl: str = 'auto'
  position: str = 'rope'
  rope_theta: float = 10000.0
  ffn: str = 'dense'
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  init_std: float = 0.02
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32
  scan_layers: bool = True
  remat: str = 'none'

  @classmethod
  def from_config(cls, model: Mapping[str, Any], *, tokenizer_vocab_size: int | None = None
                  ) -> 'ModelConfig':
    """Builds from the `model` section of a run config, deriving the placeholder fields."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in dict(model).items() if k in fields}
    if kw.get('vocab_size') is None:
      if tokenizer_vocab_size is None:
        raise ValueError('model.vocab_size is unset and no tokenizer vocabulary was given')
      # Round up so the vocab dimension tiles evenly on accelerators and shards over `tensor`.
      kw['vocab_size'] = -(-tokenizer_vocab_size // 128) * 128
    if kw.get('num_kv_heads') is None:
      kw['num_kv_heads'] = kw['num_heads']
    if kw.get('head_dim') is None:
      kw['head_dim'] = kw['embed_dim'] // kw['num_heads']
    kw['param_dtype'] = jnp.dtype(kw.get('param_dtype', 'float32'))
    kw['dtype'] = jnp.dtype(kw.get('dtype', 'float32'))
    return cls(**kw)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['param_dtype'] = jnp.dtype(self.param_dtype).name
    d['dtype'] = jnp.dtype(self.dtype).name
    return d


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(x))."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, None]:
    cfg = self.config
    norm = dict(eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    h = RMSNorm(name='attn_norm', **norm)(x)
    x = x + ATTENTION.get(cfg.attention)(cfg, name='attn')(h, positions)
    h = RMSNorm(name='mlp_norm', **norm)(x)
    x = x + FFN.get(cfg.ffn)(cfg, name='mlp')(h)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    return x, None  # (carry, output): the shape nn.scan wants


class Transformer(nn.Module):
  """tokens [batch, length] -> float32 logits [batch, length, vocab]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    embed = Embed(cfg.vocab_size, cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  init_std=cfg.init_std, name='embed')
    x = embed(tokens)
    x = POSITIONS.get(cfg.position)(theta=cfg.rope_theta).embed(x, positions)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))

    block = Block
    if cfg.remat != 'none':
      # prevent_cse is only needed outside scan, where XLA could otherwise merge the recompute
      # back into the forward pass.
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                      in_axes=(nn.broadcast,), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(cfg, name='blocks')(x, positions)
    else:
      for i in range(cfg.num_layers):
        x, _ = block(cfg, name=f'block_{i}')(x, positions)

    x = RMSNorm(eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name='final_norm')(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = Linear((cfg.vocab_size,), ('embed', 'vocab'), dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype,
                      kernel_init=nn.initializers.normal(cfg.init_std), name='lm_head')(x)
    logits = nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))
    return logits.astype(jnp.float32)


def unscan_params(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """Scanned params (`blocks` stacked on axis 0) -> the per-layer `block_i` layout."""
  params = dict(params)
  blocks = params.pop('blocks')
  for i in range(num_layers):
    params[f'block_{i}'] = jax.tree.map(lambda a, i=i: a[i], blocks)
  return params


def scan_params(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """Per-layer `block_i` params -> the scanned layout (inverse of `unscan_params`)."""
  params = dict(params)
  layers = [params.pop(f'block_{i}') for i in range(num_layers)]
  params['blocks'] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
  return params

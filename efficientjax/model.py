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
from efficientjax.attention.positions import segment_positions
from efficientjax.moe import layer as _moe_layer  # noqa: F401 (registers model.ffn 'moe')
from efficientjax.nn import FFN, Embed, Linear, RMSNorm
from efficientjax.nn.linear import ADAPTERS, AdapterSettings

# What a rematerialised block keeps for the backward pass; `none` keeps everything.
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
}
DTYPES = ('float32', 'bfloat16', 'float16')


@dataclasses.dataclass(frozen=True)
class MLAConfig:
  """Multi-head latent attention's shape (DeepSeek-V2, arXiv 2405.04434 §2.1)."""
  q_lora_rank: int = 0          # 0: queries projected directly from the input, no compression
  kv_lora_rank: int = 512       # the cached latent
  qk_nope_head_dim: int = 128   # per-head query/key features without position
  qk_rope_head_dim: int = 64    # the decoupled RoPE features; one key shared by every head
  v_head_dim: int = 128


@dataclasses.dataclass(frozen=True)
class NSAConfig:
  """Native sparse attention's branches (arXiv 2502.11089 §3); the paper's defaults."""
  block_len: int = 32           # l: tokens per compressed block
  stride: int = 16              # d: distance between compressed blocks' starts
  select_block_len: int = 64    # l': tokens per selected block
  num_selected: int = 16        # n: blocks each query (group) attends to, initial and local included
  window: int = 512             # w: the sliding-window branch
  compression: str = 'mlp'      # mlp (learned, with intra-block positions) | mean (pooling, l = d = l')
  # auto (kernels.nsa's Triton kernels on an NVIDIA GPU where they run, else the reference) |
  # reference (dense masked attention per branch) | triton | interpret (the kernels in Pallas'
  # interpreter: any machine, slow; for tests)
  implementation: str = 'auto'


@dataclasses.dataclass(frozen=True)
class YarnConfig:
  """YaRN's RoPE extension (arXiv 2309.00071), in Hugging Face's parameterisation."""
  factor: float = 1.0           # 1: plain RoPE
  original_max_len: int = 4096  # the context the model was trained at before scaling
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0           # DeepSeek's form of the attention temperature (with mscale_all_dim)
  mscale_all_dim: float = 0.0
  truncate: bool = True         # round the ramp's ends outwards to whole dims (HF's default)


@dataclasses.dataclass(frozen=True)
class Llama3RopeConfig:
  """Llama 3.1's RoPE frequency scaling (Hugging Face's `rope_type: llama3`): wavelengths
  longer than original_max_len / low_freq_factor are divided by `factor`, those shorter than
  original_max_len / high_freq_factor kept, and the band between blended smoothly."""
  factor: float = 1.0            # 1: plain RoPE
  low_freq_factor: float = 1.0   # Llama 3.1's 1
  high_freq_factor: float = 4.0  # Llama 3.1's 4; must exceed low_freq_factor
  original_max_len: int = 8192   # the context the model was trained at before scaling


@dataclasses.dataclass(frozen=True)
class RelativeConfig:
  """T5's bucketed relative-position bias (Raffel et al. 2020, §2.1)."""
  num_buckets: int = 32
  max_distance: int = 128


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """A sparse mixture of SwiGLU experts in place of the dense FFN (see configs/base.py)."""
  num_experts: int = 8
  top_k: int = 2
  expert_dim: int | None = None  # None: the dense mlp_dim
  num_shared_experts: int = 0
  # The shared experts' summed width; None: num_shared_experts × expert_dim (Qwen2-MoE's is not
  # a multiple of its experts' width).
  shared_expert_dim: int | None = None
  shared_expert_gate: bool = False  # scale the shared experts by sigmoid(x·w) (Qwen2-MoE)
  first_dense_layers: int = 0
  router: str = 'softmax'
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 1.0
  num_groups: int = 1
  topk_groups: int = 1
  aux_loss_coef: float = 0.01
  z_loss_coef: float = 0.0
  seq_aux_loss_coef: float = 0.0
  aux_free: bool = False
  bias_update_rate: float = 0.001
  dispatch: str = 'dropless'
  capacity_factor: float = 1.25
  grouped_matmul: str = 'auto'


_NESTED = {'mla': MLAConfig, 'nsa': NSAConfig, 'yarn': YarnConfig, 'relative': RelativeConfig,
           'moe': MoEConfig, 'llama3_rope': Llama3RopeConfig, 'adapter': AdapterSettings}


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
  qkv_bias: bool = False        # biases on the q, k, v projections (Qwen2)
  qk_norm: bool = False         # RMSNorm over head_dim on queries and keys, before RoPE
  sliding_window: int | None = None  # keys per query, itself included; None: the whole past
  position: str = 'rope'
  rope_theta: float = 10000.0
  max_seq_len: int = 2048       # the longest sequence learned absolute positions can embed
  yarn: YarnConfig = YarnConfig()
  llama3_rope: Llama3RopeConfig = Llama3RopeConfig()
  linear_rope_factor: float = 1.0  # position interpolation: RoPE's frequencies / this; 1: off
  relative: RelativeConfig = RelativeConfig()
  mla: MLAConfig = MLAConfig()
  nsa: NSAConfig = NSAConfig()
  ffn: str = 'dense'
  moe: MoEConfig = MoEConfig()
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  init_std: float = 0.02
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32
  scan_layers: bool = True
  remat: str = 'none'
  # Fine-tuning adapters' static settings (efficientjax.peft); None: no layer looks for them.
  adapter: AdapterSettings | None = None

  @classmethod
  def from_config(cls, model: Mapping[str, Any], *, tokenizer_vocab_size: int | None = None,
                  seq_len: int | None = None) -> 'ModelConfig':
    """Builds from the `model` section of a run config, deriving the placeholder fields
    (`seq_len`, the run's sequence length, is the default `max_seq_len`)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in dict(model).items() if k in fields}
    for name, sub in _NESTED.items():
      if name in kw and kw[name] is not None and not isinstance(kw[name], sub):
        sub_fields = {f.name for f in dataclasses.fields(sub)}
        kw[name] = sub(**{k: v for k, v in dict(kw[name]).items() if k in sub_fields})
    if kw.get('vocab_size') is None:
      if tokenizer_vocab_size is None:
        raise ValueError('model.vocab_size is unset and no tokenizer vocabulary was given')
      # Round up so the vocab dimension tiles evenly on accelerators and shards over `tensor`.
      kw['vocab_size'] = -(-tokenizer_vocab_size // 128) * 128
    if kw.get('num_kv_heads') is None:
      kw['num_kv_heads'] = 1 if kw.get('attention') == 'mqa' else kw['num_heads']
    if kw.get('head_dim') is None:
      kw['head_dim'] = kw['embed_dim'] // kw['num_heads']
    if kw.get('max_seq_len') is None:
      if seq_len is not None:
        kw['max_seq_len'] = seq_len
      else:
        kw.pop('max_seq_len', None)
    moe = kw.get('moe')
    if moe is not None and moe.expert_dim is None:
      kw['moe'] = dataclasses.replace(moe, expert_dim=kw['mlp_dim'])
    kw['param_dtype'] = jnp.dtype(kw.get('param_dtype', 'float32'))
    kw['dtype'] = jnp.dtype(kw.get('dtype', 'float32'))
    return cls(**kw)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['param_dtype'] = jnp.dtype(self.param_dtype).name
    d['dtype'] = jnp.dtype(self.dtype).name
    return d


# Per-layer variable collections besides params, scanned with the layers (see efficientjax.moe):
# `losses` (auxiliary training losses), `moe_stats` (what the record reports), `moe_state`
# (non-trained state such as the aux-loss-free routing bias).
LAYER_COLLECTIONS = ('losses', 'moe_stats', 'moe_state')


@dataclasses.dataclass(frozen=True)
class LayerStack:
  """A run of consecutive identical layers, scanned as one `nn.scan` (params under `name`)."""
  name: str
  ffn: str
  first_layer: int
  num_layers: int


def layer_stacks(cfg: ModelConfig) -> list[LayerStack]:
  """The model's layers as homogeneous stacks: DeepSeek-style MoE models keep their first
  layers dense (`model.moe.first_dense_layers`), which a single scan cannot hold."""
  dense = cfg.moe.first_dense_layers if cfg.ffn == 'moe' else 0
  stacks = [LayerStack('dense_blocks', 'dense', 0, dense)] if dense else []
  return stacks + [LayerStack('blocks', cfg.ffn, dense, cfg.num_layers - dense)]


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(x))."""
  config: ModelConfig
  ffn: str | None = None  # None: config.ffn

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, cache: Any = None,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, Any]:
    cfg = self.config
    norm = dict(eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    h = RMSNorm(name='attn_norm', **norm)(x)
    # Only packed rows pass segment ids, so a variant's call without them stays as it was.
    seg = {} if segment_ids is None else {'segment_ids': segment_ids}
    h, cache = ATTENTION.get(cfg.attention)(cfg, name='attn')(h, positions, cache, **seg)
    x = x + h
    h = RMSNorm(name='mlp_norm', **norm)(x)
    x = x + FFN.get(self.ffn or cfg.ffn)(cfg, name='mlp')(h)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    return x, cache  # (carry, per-layer output): the shape nn.scan wants


class Transformer(nn.Module):
  """tokens [batch, length] -> float32 logits [batch, length, vocab].

  `__call__` runs whole sequences (training, evaluation); `decode_step` runs new tokens against
  a KV cache from `init_cache` (prefill, then one token at a time) and returns the updated
  cache. Both are the same computation (`forward`).
  """
  config: ModelConfig

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """tokens [batch, length] -> logits. `positions` default to 0, 1, ... per row.

    `segment_ids` int [batch, length] packs several examples into a row (1, 2, ... per example,
    each a contiguous run; 0 marks padding): every token attends only to earlier tokens of its
    own segment, so each example's logits are those it gets alone in a row, given `positions`
    that restart at 0 for each example (the default with segment ids; see
    `positions.segment_positions`). None: one example per row (no mask is built).
    """
    return self.forward(tokens, positions, None, segment_ids)[0]

  def decode_step(self, tokens: jax.Array, positions: jax.Array, cache: Any
                  ) -> tuple[jax.Array, Any]:
    """tokens/positions [batch, t] (positions contiguous per row, continuing what the cache
    holds) -> (logits [batch, t, vocab], cache with the new tokens written)."""
    return self.forward(tokens, positions, cache)

  @nn.compact
  def forward(self, tokens: jax.Array, positions: jax.Array | None, cache: Any,
              segment_ids: jax.Array | None = None) -> tuple[jax.Array, Any]:
    cfg = self.config
    if segment_ids is not None and cache is not None:
      raise ValueError('segment_ids are for whole sequences; decoding with a cache takes none')
    if segment_ids is not None and jnp.shape(segment_ids) != tokens.shape:
      raise ValueError(f'segment_ids {jnp.shape(segment_ids)} must have the shape of the tokens '
                       f'{tokens.shape}: one id per token')
    if positions is None and segment_ids is not None:
      positions = segment_positions(segment_ids)
    elif positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    embed = Embed(cfg.vocab_size, cfg.embed_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  init_std=cfg.init_std, name='embed')
    x = embed(tokens)
    position_embedding = POSITIONS.get(cfg.position)(cfg).embedding
    if position_embedding is not None:
      x = x + position_embedding(cfg, name='position')(positions).astype(x.dtype)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))

    block = Block
    if cfg.remat != 'none':
      # prevent_cse is only needed outside scan, where XLA could otherwise merge the recompute
      # back into the forward pass.
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    layers = lambda c, start, n: None if c is None else jax.tree.map(lambda a: a[start:start + n], c)
    caches = []
    for s in layer_stacks(cfg):
      if cfg.scan_layers:
        # The cache (None in training) is scanned over its leading layer axis like the params.
        stack = nn.scan(block, variable_axes={'params': 0, ADAPTERS: 0,
                                              **{c: 0 for c in LAYER_COLLECTIONS}},
                        split_rngs={'params': True, 'dropout': True},
                        in_axes=(nn.broadcast, 0, nn.broadcast),
                        length=s.num_layers, metadata_params={nn.PARTITION_NAME: 'layers'})
        x, stack_cache = stack(cfg, s.ffn, name=s.name)(
            x, positions, layers(cache, s.first_layer, s.num_layers), segment_ids)
        caches.append(stack_cache)
      else:
        for i in range(s.first_layer, s.first_layer + s.num_layers):
          x, layer_cache = block(cfg, s.ffn, name=f'block_{i}')(
              x, positions, None if cache is None else jax.tree.map(lambda a, i=i: a[i], cache),
              segment_ids)
          caches.append(None if cache is None else jax.tree.map(lambda a: a[None], layer_cache))
    if cache is not None:
      cache = jax.tree.map(lambda *a: jnp.concatenate(a), *caches)

    x = RMSNorm(eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name='final_norm')(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = Linear((cfg.vocab_size,), ('embed', 'vocab'), dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, adapter=cfg.adapter,
                      kernel_init=nn.initializers.normal(cfg.init_std), name='lm_head')(x)
    logits = nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))
    return logits.astype(jnp.float32), cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> Any:
  """An empty KV cache for `Transformer.decode_step`: the attention variant's per-layer cache
  with a leading layer axis, room for `max_len` tokens, in `dtype` (default the compute dtype)."""
  variant = ATTENTION.get(cfg.attention)
  layer = jax.eval_shape(lambda: variant.init_cache(cfg, batch, max_len, jnp.dtype(dtype or cfg.dtype)))
  return jax.tree.map(lambda a: jnp.zeros((cfg.num_layers,) + a.shape, a.dtype), layer)


def as_variables(params: Mapping[str, Any]) -> Mapping[str, Any]:
  """`Transformer.apply`'s variables from a params tree, or a variables dict as it is (one with
  a 'params' entry, e.g. `init_from.load`'s, where a MoE model's routing bias rides beside the
  params in `moe_state`)."""
  return params if 'params' in params else {'params': params}


def auxiliary_loss(losses: Mapping[str, Any]) -> jax.Array:
  """The sum of every auxiliary loss the layers left in the `losses` collection (0 if none)."""
  return sum((jnp.sum(x) for x in jax.tree.leaves(losses)), jnp.zeros((), jnp.float32))


def unscan_params(params: Mapping[str, Any], cfg: ModelConfig | int) -> dict[str, Any]:
  """Scanned params (each stack's layers on axis 0) -> the per-layer `block_i` layout.
  `cfg` may be a layer count for a model of one stack."""
  stacks = (layer_stacks(cfg) if isinstance(cfg, ModelConfig)
            else [LayerStack('blocks', '', 0, cfg)])
  params = dict(params)
  for s in stacks:
    stacked = params.pop(s.name)
    for j in range(s.num_layers):
      params[f'block_{s.first_layer + j}'] = jax.tree.map(lambda a, j=j: a[j], stacked)
  return params


def scan_params(params: Mapping[str, Any], cfg: ModelConfig | int) -> dict[str, Any]:
  """Per-layer `block_i` params -> the scanned layout (inverse of `unscan_params`)."""
  stacks = (layer_stacks(cfg) if isinstance(cfg, ModelConfig)
            else [LayerStack('blocks', '', 0, cfg)])
  params = dict(params)
  for s in stacks:
    layers = [params.pop(f'block_{i}') for i in range(s.first_layer, s.first_layer + s.num_layers)]
    params[s.name] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
  return params

"""Llama interchange against transformers' own LlamaForCausalLM: logits, bits and refusals."""

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from efficientjax.attention import kv_head_variant
from efficientjax.errors import ConfigError
from efficientjax.hf import load_checkpoint, load_llama, safetensors_io, save_llama
from efficientjax.model import ModelConfig
from tests.hf.common import (assert_same_params, copy_with, hf_logits, leaves, random_tokens,
                             random_variables, read_config, save_pretrained, transformer_logits)

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB, EMBED, HEADS, MLP = 128, 64, 4, 96
# std 0.1 rather than transformers' 0.02: with tiny weights attention is near uniform and a wrong
# RoPE layout would move the logits by less than the tolerance (see test_parity_is_sensitive).
INIT_STD = 0.1

CASES = {
    'gqa_untied': dict(num_key_value_heads=2, tie_word_embeddings=False),
    'mha_tied': dict(num_key_value_heads=HEADS, tie_word_embeddings=True),
    # Newer configs carry head_dim explicitly, and it need not be hidden_size / heads.
    'gqa_head_dim24': dict(num_key_value_heads=2, tie_word_embeddings=False, head_dim=24),
}


def hf_config(**overrides) -> transformers.LlamaConfig:
  kw = dict(vocab_size=VOCAB, hidden_size=EMBED, num_hidden_layers=2, num_attention_heads=HEADS,
            intermediate_size=MLP, rope_theta=5000.0, rms_norm_eps=1e-5,
            initializer_range=INIT_STD)
  return transformers.LlamaConfig(**{**kw, **overrides})


def hf_model(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
  torch.manual_seed(seed)
  return transformers.LlamaForCausalLM(hf_config(**overrides)).eval()


def our_logits(fields: dict, params: dict, tokens: np.ndarray, scan_layers: bool = True,
               dtype=jnp.float32) -> np.ndarray:
  cfg = ModelConfig(**fields, dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
  return transformer_logits(cfg, {'params': params}, tokens)


@pytest.fixture(scope='module')
def tokens() -> np.ndarray:
  return random_tokens(VOCAB, 24)


@pytest.fixture(scope='module', params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
  """(torch model, directory written by save_pretrained) per case."""
  model = hf_model(**CASES[request.param])
  return model, save_pretrained(model, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope='module')
def gqa_checkpoint(tmp_path_factory):
  model = hf_model(**CASES['gqa_untied'])
  return model, save_pretrained(model, tmp_path_factory.mktemp('gqa'))


# ---------------------------------------------------------------------------------------------
# Import: logits parity.


@pytest.mark.parametrize('scan_layers', [True, False], ids=['scanned', 'unscanned'])
def test_load_matches_transformers_logits(checkpoint, tokens, scan_layers):
  model, path = checkpoint
  fields, params = load_llama(path, param_dtype=jnp.float32, scan_layers=scan_layers)
  hf = model.config
  assert fields == dict(
      vocab_size=VOCAB, embed_dim=EMBED, num_layers=2, num_heads=HEADS,
      num_kv_heads=hf.num_key_value_heads, head_dim=hf.head_dim, mlp_dim=MLP, rope_theta=5000.0,
      norm_eps=1e-5, tie_embeddings=hf.tie_word_embeddings,
      attention=kv_head_variant(HEADS, hf.num_key_value_heads), position='rope', ffn='dense')
  assert ('blocks' in params) == scan_layers and ('block_1' in params) != scan_layers
  assert ('lm_head' in params) != hf.tie_word_embeddings
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
  ref = hf_logits(model, tokens)
  got = our_logits(fields, params, tokens, scan_layers)
  assert np.abs(got - ref).max() < 1e-4


def test_parity_is_sensitive_to_rope_layout(gqa_checkpoint, tokens):
  """Negative control: an interleaved (GPT-J) pairing of q/k features breaks parity clearly, so
  the parity test really checks that HF Llama's half-split layout loads unpermuted."""
  model, path = gqa_checkpoint
  fields, params = load_llama(path)
  d = fields['head_dim']
  interleave = np.stack([np.arange(d // 2), np.arange(d // 2, d)], axis=1).reshape(-1)
  attn = params['blocks']['attn']
  attn['q']['kernel'] = attn['q']['kernel'][..., interleave]
  attn['k']['kernel'] = attn['k']['kernel'][..., interleave]
  assert np.abs(our_logits(fields, params, tokens) - hf_logits(model, tokens)).max() > 1e-2


def test_sharded_checkpoint(gqa_checkpoint, tmp_path, tokens):
  model, path = gqa_checkpoint
  model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size='40KB')
  assert (tmp_path / 'model.safetensors.index.json').is_file()
  assert len(list(tmp_path.glob('*.safetensors'))) > 2
  fields, params = load_llama(tmp_path)
  _, single = load_llama(path)
  assert jax.tree.all(jax.tree.map(np.array_equal, params, single))
  assert np.abs(our_logits(fields, params, tokens) - hf_logits(model, tokens)).max() < 1e-4


def test_transformers4_config_spelling(gqa_checkpoint, tmp_path):
  """transformers < 5 writes rope_theta / rope_scaling at the top level and may omit head_dim."""
  _, path = gqa_checkpoint
  copy_with(path, tmp_path, config=dict(rope_theta=5000.0, rope_scaling=None),
            drop_config=('rope_parameters', 'head_dim'))
  fields, _ = load_llama(tmp_path)
  assert fields['rope_theta'] == 5000.0 and fields['head_dim'] == EMBED // HEADS


def test_bf16_checkpoint(tmp_path, tokens):
  model = hf_model(**CASES['gqa_untied']).to(torch.bfloat16)
  save_pretrained(model, tmp_path)
  state = {k: v.float().numpy() for k, v in model.state_dict().items()}
  fields, params = load_llama(tmp_path, param_dtype=jnp.float32, scan_layers=False)
  E, H, KV, D = EMBED, HEADS, 2, fields['head_dim']
  block = params['block_1']
  layer = 'model.layers.1.'
  # Exact: a bf16 -> f32 upcast loses nothing.
  np.testing.assert_array_equal(params['embed']['embedding'], state['model.embed_tokens.weight'])
  np.testing.assert_array_equal(params['lm_head']['kernel'], state['lm_head.weight'].T)
  np.testing.assert_array_equal(params['final_norm']['scale'], state['model.norm.weight'])
  np.testing.assert_array_equal(block['attn']['q']['kernel'],
                                state[layer + 'self_attn.q_proj.weight'].T.reshape(E, H, D))
  np.testing.assert_array_equal(block['attn']['k']['kernel'],
                                state[layer + 'self_attn.k_proj.weight'].T.reshape(E, KV, D))
  np.testing.assert_array_equal(block['attn']['o']['kernel'],
                                state[layer + 'self_attn.o_proj.weight'].T.reshape(H, D, E))
  np.testing.assert_array_equal(block['mlp']['down']['kernel'],
                                state[layer + 'mlp.down_proj.weight'].T)
  np.testing.assert_array_equal(block['mlp_norm']['scale'],
                                state[layer + 'post_attention_layernorm.weight'])

  # Loaded as bf16 and saved with the params' own dtype, every tensor comes back bit for bit.
  fields, params16 = load_llama(tmp_path, param_dtype=jnp.bfloat16)
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(params16))
  out = save_llama(tmp_path / 'export', params16, fields | {'param_dtype': 'bfloat16'})
  assert read_config(out)['dtype'] == 'bfloat16'
  written = safetensors.torch.load_file(out / 'model.safetensors')
  original = model.state_dict()
  assert set(written) == set(original)
  for name, tensor in written.items():
    assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, original[name]), name

  # And the bf16 model computes what transformers' bf16 model computes, to bf16 precision.
  ref = hf_logits(model, tokens)
  got = our_logits(fields, params16, tokens, dtype=jnp.bfloat16)
  assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


# ---------------------------------------------------------------------------------------------
# Export.


@pytest.mark.parametrize('scan_layers', [True, False], ids=['scanned', 'unscanned'])
def test_export_loads_in_transformers(checkpoint, tokens, tmp_path, scan_layers):
  model, path = checkpoint
  fields, params = load_llama(path, scan_layers=scan_layers)
  cfg = ModelConfig(**fields, scan_layers=scan_layers)
  out = save_llama(tmp_path / 'export', params, cfg)
  config = read_config(out)
  assert config['architectures'] == ['LlamaForCausalLM'] and config['model_type'] == 'llama'

  exported = transformers.LlamaForCausalLM.from_pretrained(out).eval()
  got = hf_logits(exported, tokens)
  assert np.abs(got - our_logits(fields, params, tokens, scan_layers)).max() < 1e-4
  np.testing.assert_array_equal(got, hf_logits(model, tokens))

  # load -> save -> load is bit-exact, in the same layout and dtype.
  fields2, params2 = load_llama(out, scan_layers=scan_layers)
  assert fields2 == fields
  assert_same_params(params, params2)


def test_export_of_our_own_model(tmp_path, tokens):
  """A model of ours (MQA, boxed `init` variables) exports and runs in transformers."""
  cfg = ModelConfig(vocab_size=VOCAB, embed_dim=EMBED, num_layers=2, num_heads=HEADS,
                    num_kv_heads=1, head_dim=16, mlp_dim=MLP, rope_theta=123.0, norm_eps=1e-6)
  variables = random_variables(cfg, INIT_STD)
  out = save_llama(tmp_path, variables, cfg, dtype=jnp.float32)
  exported = transformers.LlamaForCausalLM.from_pretrained(out).eval()
  assert exported.config.num_key_value_heads == 1
  ref = hf_logits(exported, tokens)
  got = transformer_logits(cfg, variables, tokens)
  assert np.abs(got - ref).max() < 1e-4


def test_export_casts_to_dtype(gqa_checkpoint, tmp_path):
  _, path = gqa_checkpoint
  fields, params = load_llama(path)
  out = save_llama(tmp_path, params, fields, dtype=jnp.bfloat16)
  assert read_config(out)['dtype'] == 'bfloat16'
  _, params16 = load_llama(out, param_dtype=jnp.bfloat16)
  want = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  assert jax.tree.all(jax.tree.map(lambda a, b: a.dtype == b.dtype and np.array_equal(a, b),
                                   params16, want))


def test_export_refusals(gqa_checkpoint, tmp_path):
  _, path = gqa_checkpoint
  fields, params = load_llama(path)
  for field, value in (('attention', 'mla'), ('position', 'none'), ('ffn', 'moe')):
    with pytest.raises(ConfigError, match='no LlamaForCausalLM equivalent') as e:
      save_llama(tmp_path, params, fields | {field: value})
    assert e.value.field == f'model.{field}'
  extra = jax.tree.map(lambda a: a, params)
  extra['blocks']['attn']['q']['lora_a'] = jnp.zeros((2, EMBED, 4))
  with pytest.raises(ValueError, match=r"not part of it \['block_0/attn/q/lora_a'"):
    save_llama(tmp_path, extra, fields)
  with pytest.raises(ValueError, match='has shape'):
    save_llama(tmp_path, params, fields | {'mlp_dim': MLP * 2})
  assert not (tmp_path / 'model.safetensors').exists()


# ---------------------------------------------------------------------------------------------
# Refusals on import.


@pytest.mark.parametrize('change, phrase', [
    (dict(hidden_act='gelu'), "hidden_act='gelu' is not supported"),
    # Scaled RoPE that loads: tests/hf/test_llama3.py.
    (dict(rope_scaling={'rope_type': 'longrope', 'factor': 2.0}), "RoPE scaling 'longrope'"),
    (dict(rope_parameters={'rope_type': 'llama3', 'rope_theta': 5e5, 'factor': 8.0}),
     'llama3 RoPE scaling needs low_freq_factor and high_freq_factor'),
    (dict(rope_scaling={'type': 'dynamic', 'factor': 2.0}), "RoPE scaling 'dynamic'"),
    (dict(attention_bias=True), 'attention_bias=true is not supported'),
    (dict(mlp_bias=True), 'mlp_bias=true is not supported'),
    (dict(model_type='qwen2'), "model_type 'qwen2', not a Llama checkpoint; this loader reads "
                               "model_type 'llama'"),
    (dict(architectures=['LlamaForSequenceClassification']), 'do not include LlamaForCausalLM'),
    (dict(quantization_config={'quant_method': 'gptq'}), 'quantized checkpoints'),
    (dict(num_key_value_heads=3), 'not a multiple of num_key_value_heads=3'),
    (dict(head_dim=15), 'head_dim=15 is odd'),
    (dict(vocab_size=None), "config.json has no 'vocab_size'"),
], ids=lambda x: '-'.join(map(str, x)) if isinstance(x, dict) else None)
def test_config_refusals(gqa_checkpoint, tmp_path, change, phrase):
  path = copy_with(gqa_checkpoint[1], tmp_path, config=change, corrupt_weights=True)
  with pytest.raises(ConfigError, match=phrase.replace('[', r'\[').replace('(', r'\(')) as e:
    load_llama(path)
  assert e.value.field == 'model.hf'


def test_generic_loader_dispatches_on_model_type(gqa_checkpoint, tmp_path):
  _, path = gqa_checkpoint
  fields, params = load_checkpoint(path)
  llama_fields, llama_params = load_llama(path)
  assert fields == llama_fields and leaves(params).keys() == leaves(llama_params).keys()
  other = copy_with(path, tmp_path, config={'model_type': 'gpt2'}, corrupt_weights=True)
  with pytest.raises(ConfigError, match="unknown value 'gpt2'; valid values: .*llama") as e:
    load_checkpoint(other)
  assert e.value.field == 'model.hf'


def test_file_refusals(gqa_checkpoint, tmp_path):
  _, path = gqa_checkpoint
  with pytest.raises(ConfigError, match='is not a directory') as e:
    load_llama(tmp_path / 'nowhere')
  assert e.value.field == 'model.hf'

  no_config = copy_with(path, tmp_path / 'no_config')
  (no_config / 'config.json').unlink()
  with pytest.raises(ConfigError, match='config.json.* is missing'):
    load_llama(no_config)

  no_weights = copy_with(path, tmp_path / 'no_weights')
  (no_weights / 'model.safetensors').rename(no_weights / 'pytorch_model.bin')
  with pytest.raises(ConfigError, match=r'no \*.safetensors weights.*found only pytorch_model.bin'):
    load_llama(no_weights)

  corrupt = copy_with(path, tmp_path / 'corrupt', corrupt_weights=True)
  with pytest.raises(ConfigError, match='is not a readable safetensors file'):
    load_llama(corrupt)

  sharded = tmp_path / 'sharded'
  gqa_checkpoint[0].save_pretrained(sharded, safe_serialization=True, max_shard_size='40KB')
  next(iter(sorted(sharded.glob('*.safetensors')))).unlink()
  with pytest.raises(ConfigError, match='names shard.* that are missing'):
    load_llama(sharded)


def test_tensor_refusals(gqa_checkpoint, tmp_path):
  _, path = gqa_checkpoint
  q = 'model.layers.0.self_attn.q_proj.weight'
  cases = [
      (dict(tensors={'model.layers.0.self_attn.q_proj.bias': np.zeros(64, np.float32)}),
       'model.layers.0.self_attn.q_proj.bias have no place in the model'),
      (dict(drop_tensors=('lm_head.weight',)), "lacks tensor.* lm_head.weight"),
      (dict(tensors={q: np.zeros((EMBED, 48), np.float32)}),
       f"'{q}' has shape \\[64, 48\\], expected \\[64, 64\\]"),
      # config.json head_dim disagreeing with the weights is caught on shapes, not guessed around.
      (dict(config={'head_dim': 8}), r"q_proj.weight' has shape \[64, 64\], expected \[32, 64\]"),
      (dict(tensors={q: np.zeros((EMBED, EMBED), np.int8)}), 'stored as I8: quantised'),
  ]
  for i, (change, phrase) in enumerate(cases):
    with pytest.raises(ConfigError, match=phrase) as e:
      load_llama(copy_with(path, tmp_path / str(i), **change))
    assert e.value.field == 'model.hf'


def test_redundant_tensors(tmp_path, tokens):
  """A tied head's stored copy and old exports' rotary inv_freq load when consistent, and are
  refused when they disagree with the config (scaled RoPE, an untied head)."""
  model = hf_model(**CASES['mha_tied'])
  src = save_pretrained(model, tmp_path / 'src')
  embed = model.model.embed_tokens.weight.detach().numpy()
  d = model.config.head_dim
  inv_freq = (1.0 / 5000.0 ** (np.arange(0, d, 2) / d)).astype(np.float32)
  buffers = {f'model.layers.{i}.self_attn.rotary_emb.inv_freq': inv_freq for i in range(2)}

  fields, params = load_llama(copy_with(src, tmp_path / 'ok',
                                        tensors={'lm_head.weight': embed, **buffers}))
  assert np.abs(our_logits(fields, params, tokens) - hf_logits(model, tokens)).max() < 1e-4

  with pytest.raises(ConfigError, match="'lm_head.weight' does not match.*set "
                     'tie_word_embeddings false in config.json'):
    load_llama(copy_with(src, tmp_path / 'head', tensors={'lm_head.weight': embed + 1}))
  # A copy of another shape is refused on its header.
  narrow = np.ascontiguousarray(embed[:, :32])
  with pytest.raises(ConfigError, match=r"'lm_head.weight' has shape \[128, 32\], expected "
                     r'\[128, 64\].*set tie_word_embeddings false'):
    load_llama(copy_with(src, tmp_path / 'narrow', tensors={'lm_head.weight': narrow}))
  scaled = {k: v / 8 for k, v in buffers.items()}
  with pytest.raises(ConfigError, match="rotary_emb.inv_freq' does not match.*rope_scaling is "
                     'missing or wrong'):
    load_llama(copy_with(src, tmp_path / 'rope', tensors=scaled))


def test_redundant_refusal_comes_before_the_weights(tmp_path, monkeypatch):
  """A tied head's copy that differs from the embedding is refused having read only the two:
  every other tensor is unreadable here, so a check after the bulk read would fail on them."""
  model = hf_model(**CASES['mha_tied'])
  embed = model.model.embed_tokens.weight.detach().numpy()
  path = copy_with(save_pretrained(model, tmp_path / 'src'), tmp_path / 'head',
                   tensors={'lm_head.weight': embed + 1})
  readable, reads = {'lm_head.weight', 'model.embed_tokens.weight'}, []
  safe_open = safetensors_io.safetensors.safe_open

  class Unreadable:
    """safe_open whose tensors but `readable` fail to read (headers read as usual)."""

    def __init__(self, *args, **kwargs):
      self._file = safe_open(*args, **kwargs)

    def __enter__(self):
      self._file.__enter__()
      return self

    def __exit__(self, *exc):
      return self._file.__exit__(*exc)

    def __getattr__(self, name):
      return getattr(self._file, name)

    def get_tensor(self, name):
      reads.append(name)
      if name not in readable:
        raise OSError(f'{name} is unreadable')
      return self._file.get_tensor(name)

  monkeypatch.setattr(safetensors_io.safetensors, 'safe_open', Unreadable)
  with pytest.raises(ConfigError, match="'lm_head.weight' does not match.*set "
                     'tie_word_embeddings false in config.json'):
    load_llama(path)
  assert set(reads) == readable


def test_malformed_index_refused(gqa_checkpoint, tmp_path):
  """A damaged model.safetensors.index.json is a ConfigError naming it, not a JSON error."""
  _, path = gqa_checkpoint
  for i, (text, phrase) in enumerate([
      ('{"weight_map": {"model.embed_tokens.weight": ', 'cannot read .*index.json'),
      ('[]', 'index.json.* has no weight_map object'),
      ('{"weight_map": {"lm_head.weight": 3}}', 'index.json.* has no weight_map object')]):
    damaged = copy_with(path, tmp_path / str(i))
    (damaged / 'model.safetensors.index.json').write_text(text)
    with pytest.raises(ConfigError, match=f'{phrase}.*re-download the checkpoint') as e:
      load_llama(damaged)
    assert e.value.field == 'model.hf'


# ---------------------------------------------------------------------------------------------
# The kernels guard (DESIGN.md).


def test_transformers_does_not_pick_up_our_kernels_package():
  """Our top-level `kernels/` shares its import name with Hugging Face's kernel hub; transformers
  must not mistake it for the hub, or its models would call into our package."""
  import efficientjax  # noqa: F401
  from transformers.utils import import_utils

  if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
  spec = importlib.util.find_spec('kernels')
  if (REPO_ROOT / 'kernels' / '__init__.py').is_file():
    assert spec is not None and Path(spec.origin).parent == REPO_ROOT / 'kernels'
  import_utils.is_kernels_available.cache_clear()  # answer for this sys.path, not a cached one
  assert transformers.utils.is_kernels_available() is False

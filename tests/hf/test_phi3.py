"""Phi-3 interchange against transformers' own Phi3ForCausalLM: the fused qkv_proj / gate_up_proj
layout (unequal q/k/v parts under GQA), the sliding window, export and refusals; and the unequal
`TensorRule.part` split and concatenation on their own."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from efficientjax.errors import ConfigError
from efficientjax.hf import (TensorRule, load_checkpoint, load_phi3, safetensors_io, save_llama,
                             save_phi3)
from efficientjax.model import ModelConfig, YarnConfig
from tests.hf.common import (assert_same_params, copy_with, hf_logits, random_tokens,
                             random_variables, read_config, save_pretrained, tensor_names,
                             transformer_logits, fields_logits as our_logits)

VOCAB, EMBED, HEADS, MLP, LENGTH = 128, 64, 4, 96, 24
HEAD_DIM = EMBED // HEADS
# std 0.1 (not 0.02), as in test_llama: attention far from uniform, so layout errors show.
INIT_STD = 0.1
WINDOW = 5  # keys per query, well inside the 24-token sequence

CASES = {
    # GQA: qkv_proj's parts are 64, 32 and 32 rows. Every layer windowed.
    'gqa_window': dict(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=WINDOW),
    'mha_tied': dict(num_key_value_heads=HEADS, tie_word_embeddings=True),
}
# A LongRoPE spec as Phi-3.5-mini writes it, scaled to the tiny head (8 frequencies).
LONGROPE = dict(short_factor=[1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
                long_factor=[2.0] * 8, original_max_position_embeddings=8)


def hf_config(**overrides) -> transformers.Phi3Config:
  kw = dict(vocab_size=VOCAB, hidden_size=EMBED, num_hidden_layers=2, num_attention_heads=HEADS,
            intermediate_size=MLP, rope_parameters=dict(rope_type='default', rope_theta=5000.0),
            rms_norm_eps=1e-5, initializer_range=INIT_STD,
            # What Phi-3 configs carry and that changes nothing in eval: dropouts, a pad token
            # (the embedding's padding_idx), context lengths shorter than the test sequence.
            resid_pdrop=0.1, embd_pdrop=0.1, attention_dropout=0.1, pad_token_id=VOCAB - 1,
            bos_token_id=1, eos_token_id=2, max_position_embeddings=16,
            original_max_position_embeddings=16)
  return transformers.Phi3Config(**{**kw, **overrides})


def hf_model(seed: int = 0, **overrides) -> transformers.Phi3ForCausalLM:
  torch.manual_seed(seed)
  model = transformers.Phi3ForCausalLM(hf_config(**overrides)).eval()
  # transformers initialises norm weights to one, which would hide two norms swapped.
  with torch.no_grad():
    for name, weight in model.named_parameters():
      if 'norm' in name:
        weight.normal_(1.0, 0.3)
  return model


def read_tensors(path) -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(path / 'model.safetensors')


@pytest.fixture(scope='module')
def tokens() -> np.ndarray:
  return random_tokens(VOCAB, LENGTH)


@pytest.fixture(scope='module', params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
  """(case name, torch model, directory written by save_pretrained)."""
  model = hf_model(**CASES[request.param])
  return request.param, model, save_pretrained(model, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope='module')
def gqa_checkpoint(tmp_path_factory):
  model = hf_model(**CASES['gqa_window'])
  return model, save_pretrained(model, tmp_path_factory.mktemp('gqa'))


# ---------------------------------------------------------------------------------------------
# Import.


def test_save_pretrained_writes_fused_projections(gqa_checkpoint):
  """What transformers writes, and so what our export must write: one qkv_proj, one
  gate_up_proj per layer, no separate q/k/v/gate/up."""
  names = tensor_names(gqa_checkpoint[1])
  assert {'model.layers.1.self_attn.qkv_proj.weight', 'model.layers.1.mlp.gate_up_proj.weight'
          } <= names
  assert not any(n.endswith(('q_proj.weight', 'k_proj.weight', 'gate_proj.weight'))
                 for n in names)


def test_load_matches_transformers_logits(checkpoint, tokens):
  case, model, path = checkpoint
  fields, params = load_phi3(path)
  hf = model.config
  kv = hf.num_key_value_heads
  want = dict(
      vocab_size=VOCAB, embed_dim=EMBED, num_layers=2, num_heads=HEADS, num_kv_heads=kv,
      head_dim=HEAD_DIM, mlp_dim=MLP, rope_theta=5000.0, norm_eps=1e-5,
      tie_embeddings=hf.tie_word_embeddings, attention='gqa' if kv < HEADS else 'mha',
      position='rope', ffn='dense')
  if case == 'gqa_window':
    want['sliding_window'] = WINDOW
  assert fields == want

  # The fused rows, head by head: q's H heads, then k's KV, then v's KV, each head-major as in
  # Llama's separate projections; gate's f rows, then up's.
  layer = model.model.layers[1]
  qkv = layer.self_attn.qkv_proj.weight.detach().numpy()  # [(H + 2 KV) hd, d]
  heads = qkv.reshape(HEADS + 2 * kv, HEAD_DIM, EMBED).transpose(2, 0, 1)  # ours: [d, heads, hd]
  attn = jax.tree.map(lambda a: np.asarray(a)[1], params['blocks']['attn'])
  np.testing.assert_array_equal(attn['q']['kernel'], heads[:, :HEADS])
  np.testing.assert_array_equal(attn['k']['kernel'], heads[:, HEADS:HEADS + kv])
  np.testing.assert_array_equal(attn['v']['kernel'], heads[:, HEADS + kv:])
  gate_up = layer.mlp.gate_up_proj.weight.detach().numpy().T  # [d, 2f]
  np.testing.assert_array_equal(params['blocks']['mlp']['gate']['kernel'][1], gate_up[:, :MLP])
  np.testing.assert_array_equal(params['blocks']['mlp']['up']['kernel'][1], gate_up[:, MLP:])

  ref = hf_logits(model, tokens)
  err = np.abs(our_logits(fields, params, tokens) - ref).max()
  print(f'{case}: max |logits - transformers| = {err:.2e}')
  assert err < 1e-4


def test_parity_is_sensitive_to_the_window(gqa_checkpoint, tokens):
  """Negative control: without the window, our logits leave transformers' by far more than the
  tolerance, so the parity test checks that transformers windows every layer and we do too."""
  model, path = gqa_checkpoint
  fields, params = load_phi3(path)
  ref = hf_logits(model, tokens)
  assert np.abs(our_logits({**fields, 'sliding_window': None}, params, tokens) - ref
                ).max() > 1e-2


def test_generic_loader_dispatches_on_model_type(gqa_checkpoint):
  fields, _ = load_checkpoint(gqa_checkpoint[1])
  assert fields == load_phi3(gqa_checkpoint[1])[0]


# ---------------------------------------------------------------------------------------------
# Export.


def test_export_loads_in_transformers(checkpoint, tokens, tmp_path):
  _, model, path = checkpoint
  fields, params = load_phi3(path)
  out = save_phi3(tmp_path / 'export', params, ModelConfig.from_config(fields))
  config = read_config(out)
  assert config['architectures'] == ['Phi3ForCausalLM'] and config['model_type'] == 'phi3'
  assert config['sliding_window'] == model.config.sliding_window
  # The fused tensors are transformers' own, bit for bit (names, shapes and values).
  ours, theirs = read_tensors(out), read_tensors(path)
  assert ours.keys() == theirs.keys()
  for name in theirs:
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)

  exported = transformers.Phi3ForCausalLM.from_pretrained(out).eval()
  got = hf_logits(exported, tokens)
  np.testing.assert_array_equal(got, hf_logits(model, tokens))
  assert np.abs(got - our_logits(fields, params, tokens)).max() < 1e-4

  # load -> save -> load is bit-exact, in either layout.
  fields2, params2 = load_phi3(out)
  assert fields2 == fields
  assert_same_params(params, params2)
  _, unscanned = load_phi3(out, scan_layers=False)
  out2 = save_phi3(tmp_path / 'again', unscanned, ModelConfig.from_config(fields))
  assert_same_params(load_phi3(out2, scan_layers=False)[1], unscanned)


def test_export_of_our_own_model(tmp_path, tokens):
  """A model of ours (MQA: qkv parts of 96, 24 and 24 rows; head_dim 24, not embed/heads; a
  window; boxed `init` variables) exports and runs in transformers."""
  cfg = ModelConfig(vocab_size=VOCAB, embed_dim=EMBED, num_layers=2, num_heads=HEADS,
                    num_kv_heads=1, head_dim=24, mlp_dim=MLP, rope_theta=123.0, norm_eps=1e-6,
                    attention='mqa', sliding_window=7)
  variables = random_variables(cfg, INIT_STD)
  out = save_phi3(tmp_path, variables, cfg, dtype=jnp.float32,
                  extra_config={'eos_token_id': 2})
  assert read_tensors(out)['model.layers.0.self_attn.qkv_proj.weight'].shape == (6 * 24, EMBED)
  exported = transformers.Phi3ForCausalLM.from_pretrained(out).eval()
  assert exported.config.pad_token_id is None and exported.config.eos_token_id == 2
  assert exported.model.layers[0].self_attn.head_dim == 24
  ref = hf_logits(exported, tokens)
  assert np.abs(transformer_logits(cfg, variables, tokens) - ref).max() < 1e-4


def test_export_refusals(gqa_checkpoint, tmp_path):
  _, path = gqa_checkpoint
  fields, params = load_phi3(path)
  # Every RoPE scaling of ours too: Phi3Config takes none but LongRoPE.
  for field, value in (('attention', 'mla'), ('position', 'absolute'), ('ffn', 'moe'),
                       ('qk_norm', True), ('qkv_bias', True), ('linear_rope_factor', 2.0),
                       ('yarn', YarnConfig(factor=2.0, original_max_len=8)),
                       ('llama3_rope', dict(factor=8.0, original_max_len=8))):
    with pytest.raises(ConfigError, match='no Phi3ForCausalLM equivalent') as e:
      save_phi3(tmp_path, params, fields | {field: value})
    nested = field in ('yarn', 'llama3_rope')  # named by their factor
    assert e.value.field == f'model.{field}' + ('.factor' if nested else '')
  assert not (tmp_path / 'model.safetensors').exists()
  # A Llama export refuses the window (what this checkpoint has).
  with pytest.raises(ConfigError, match='no LlamaForCausalLM equivalent'):
    save_llama(tmp_path, params, fields)


# ---------------------------------------------------------------------------------------------
# Refusals on import.


@pytest.mark.parametrize('change, phrase', [
    (dict(rope_parameters=dict(rope_type='longrope', rope_theta=5e3, **LONGROPE)),
     "RoPE scaling 'longrope'.*Phi-3-mini-4k-instruct"),
    # transformers 4.x spellings: Phi3Config renames su and yarn to longrope.
    (dict(rope_scaling=dict(type='su', **LONGROPE)), "RoPE scaling 'su' .LongRoPE"),
    (dict(rope_scaling=dict(type='yarn', **LONGROPE)), "RoPE scaling 'yarn' .LongRoPE"),
    # Phi-4-mini's spelling (transformers 4.x): a top-level factor, no rope_parameters.
    (dict(partial_rotary_factor=0.75, rope_theta=5e3, rope_parameters=None),
     'partial_rotary_factor=0.75 .*Phi-4-mini'),
    (dict(rope_parameters=dict(rope_type='default', rope_theta=5e3, partial_rotary_factor=0.5)),
     'partial_rotary_factor=0.5'),
    # Scalings other models have and Phi3Config refuses.
    (dict(rope_parameters=dict(rope_type='linear', rope_theta=5e3, factor=2.0)),
     "RoPE scaling 'linear' is not a Phi-3 RoPE"),
    (dict(rope_scaling=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                            high_freq_factor=4.0, original_max_position_embeddings=8)),
     "RoPE scaling 'llama3' is not a Phi-3 RoPE"),
    (dict(sliding_window=0), 'sliding_window=0 in config.json is not a window'),
    (dict(sliding_window=2.5), 'sliding_window=2.5 in config.json is not a window'),
    (dict(hidden_act='gelu_new'), "hidden_act='gelu_new' is not supported"),
    (dict(attention_bias=True), 'attention_bias=true is not supported'),
    (dict(model_type='llama'), "model_type 'llama', not a Phi-3 checkpoint"),
    (dict(architectures=['Phi3ForSequenceClassification']), 'do not include Phi3ForCausalLM'),
], ids=lambda x: '-'.join(map(str, x)) if isinstance(x, dict) else None)
def test_config_refusals(gqa_checkpoint, tmp_path, change, phrase):
  path = copy_with(gqa_checkpoint[1], tmp_path, config=change, corrupt_weights=True)
  with pytest.raises(ConfigError, match=phrase) as e:
    load_phi3(path)
  assert e.value.field == 'model.hf'


def test_tensor_refusals(gqa_checkpoint, tmp_path):
  _, path = gqa_checkpoint
  qkv = 'model.layers.1.self_attn.qkv_proj.weight'
  # An MHA-sized qkv_proj under a GQA config.
  with pytest.raises(ConfigError, match=rf"'{qkv}' has shape \[192, 64\], expected \[128, 64\]"):
    load_phi3(copy_with(path, tmp_path / 'shape',
                        tensors={qkv: np.zeros((3 * EMBED, EMBED), np.float32)}))
  # Llama's separate projections are not Phi-3's.
  q = 'model.layers.1.self_attn.q_proj.weight'
  with pytest.raises(ConfigError, match=f'lacks tensor.* {qkv}'):
    load_phi3(copy_with(path, tmp_path / 'split', drop_tensors=(qkv,),
                        tensors={q: np.zeros((EMBED, EMBED), np.float32)}))


# ---------------------------------------------------------------------------------------------
# TensorRule.part: unequal slices.


def _spec(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_unequal_parts_split_and_concatenate():
  """Parts of a Linear tensor lie side by side on its output features (our output dims
  flattened), each as wide as its param: a [4, 3, 2] and a [4, 1, 2] kernel and a [4, 2] one
  make a [6 + 2 + 2, 4] tensor; parts of a tensor in our layout lie on its last axis; equal
  parts over batch dims (Mixtral's fused experts) are the special case. Import slices out
  exactly what export concatenated."""
  expected = {('a',): _spec(4, 3, 2), ('b',): _spec(4, 1, 2), ('c',): _spec(4, 2),
              ('d',): _spec(3, 2), ('e',): _spec(3, 5),
              ('g',): _spec(2, 4, 3), ('u',): _spec(2, 4, 3)}
  rules = [TensorRule('w', ('c',), linear_in_dims=1, part=(2, 3)),  # any order
           TensorRule('w', ('a',), linear_in_dims=1, part=(0, 3)),
           TensorRule('w', ('b',), linear_in_dims=1, part=(1, 3)),
           TensorRule('t', ('e',), part=(1, 2)), TensorRule('t', ('d',), part=(0, 2)),
           TensorRule('x', ('g',), linear_in_dims=1, batch_dims=1, part=(0, 2)),
           TensorRule('x', ('u',), linear_in_dims=1, batch_dims=1, part=(1, 2))]
  cfg = ModelConfig(vocab_size=8, embed_dim=4, num_layers=1, num_heads=1, num_kv_heads=1,
                    head_dim=4, mlp_dim=4)
  family = types.SimpleNamespace(name='Test')
  mapped, _ = safetensors_io._expand(rules, cfg, expected)
  safetensors_io._check_pieces(family, mapped, expected)
  rng = np.random.default_rng(0)
  flat = {p: rng.normal(size=s.shape).astype(np.float32) for p, s in expected.items()}

  want = {
      'w': np.concatenate([flat[('a',)].reshape(4, 6), flat[('b',)].reshape(4, 2),
                           flat[('c',)]], axis=-1).T,
      't': np.concatenate([flat[('d',)], flat[('e',)]], axis=-1),
      'x': np.concatenate([flat[('g',)], flat[('u',)]], axis=-1).swapaxes(-1, -2)}
  for name, tensor in want.items():
    pieces = mapped[name]
    np.testing.assert_array_equal(safetensors_io._to_hf(pieces, flat), tensor, err_msg=name)
    shape = safetensors_io._hf_shape(pieces[0].rule, pieces[0].tensor_shape(expected))
    assert shape == tensor.shape, name
    for piece in pieces:
      np.testing.assert_array_equal(safetensors_io._to_ours(tensor, piece, expected),
                                    flat[piece.param], err_msg=f'{name} {piece.param}')


@pytest.mark.parametrize('rules, phrase', [
    # Parts must tile the tensor: 0..n-1, each once.
    ([TensorRule('w', ('a',), linear_in_dims=1, part=(0, 2))], 'not its parts 0..n-1'),
    ([TensorRule('w', ('a',), linear_in_dims=1, part=(0, 2)),
      TensorRule('w', ('c',), linear_in_dims=1, part=(0, 2))], 'not its parts 0..n-1'),
    # Their input features differ (4 against 5): not slices of one matrix.
    ([TensorRule('w', ('a',), linear_in_dims=1, part=(0, 2)),
      TensorRule('w', ('c',), linear_in_dims=1, part=(1, 2))],
     'disagree on its shape outside the features'),
])
def test_parts_that_do_not_make_a_tensor_are_a_bug(rules, phrase):
  expected = {('a',): _spec(4, 3, 2), ('c',): _spec(5, 2)}
  expected = {p: expected[p] for p in {r.param for r in rules}}
  cfg = ModelConfig(vocab_size=8, embed_dim=4, num_layers=1, num_heads=1, num_kv_heads=1,
                    head_dim=4, mlp_dim=4)
  mapped, _ = safetensors_io._expand(rules, cfg, expected)
  with pytest.raises(ValueError, match=phrase):
    safetensors_io._check_pieces(types.SimpleNamespace(name='Test'), mapped, expected)

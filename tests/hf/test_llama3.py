"""Llama checkpoints with scaled RoPE (Llama 3.1-3.3's `llama3`, `linear`, YaRN) against
transformers' LlamaForCausalLM, and the llama3 frequencies against its own ROPE_INIT_FUNCTIONS."""

import dataclasses

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from efficientjax.attention.positions import llama3_frequencies, rope_frequencies
from efficientjax.errors import ConfigError
from efficientjax.hf import load_checkpoint, load_llama, save_llama
from efficientjax.model import Llama3RopeConfig, ModelConfig, YarnConfig
from tests.hf.common import (assert_same_params, copy_with, hf_logits, random_tokens, read_config,
                             save_pretrained, fields_logits as our_logits)

VOCAB, EMBED, HEADS, KV_HEADS, MLP, LENGTH = 128, 64, 4, 2, 96, 24
# std 0.1 (not 0.02), as in test_llama: attention far from uniform, so RoPE errors show.
INIT_STD = 0.1
THETA = 500.0
# head_dim 16 at theta 500 turns with wavelengths 6.3, 13.7, 29.7, ... tokens. An original
# context of 16 with low/high factors 1 and 2 keeps the first (< 16/2), smooths the second
# (between 8 and 16) and divides the rest by 8 (> 16): every branch of the rule, and the
# 24-token sequence runs past the original context.
LLAMA3 = dict(rope_type='llama3', rope_theta=THETA, factor=8.0, low_freq_factor=1.0,
              high_freq_factor=2.0, original_max_position_embeddings=16)
LINEAR = dict(rope_type='linear', rope_theta=THETA, factor=4.0)
YARN = dict(rope_type='yarn', rope_theta=THETA, factor=4.0, original_max_position_embeddings=8)

CASES = {
    'llama3': dict(rope_parameters=LLAMA3, max_position_embeddings=128),
    'linear': dict(rope_parameters=LINEAR),
    'yarn': dict(rope_parameters=YARN, max_position_embeddings=32),
}
# The fields each case loads as.
SCALING_FIELDS = {
    'llama3': {'llama3_rope': dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=2.0,
                                   original_max_len=16)},
    'linear': {'linear_rope_factor': 4.0},
    'yarn': {'yarn': dict(factor=4.0, original_max_len=8, beta_fast=32.0, beta_slow=1.0,
                          mscale=1.0, mscale_all_dim=0.0, truncate=True)},
}


def hf_config(**overrides) -> transformers.LlamaConfig:
  kw = dict(vocab_size=VOCAB, hidden_size=EMBED, num_hidden_layers=2, num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS, intermediate_size=MLP, rms_norm_eps=1e-5,
            initializer_range=INIT_STD, tie_word_embeddings=False)
  return transformers.LlamaConfig(**{**kw, **overrides})


def hf_model(**overrides) -> transformers.LlamaForCausalLM:
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf_config(**overrides)).eval()
  # transformers sets RMSNorm weights to one, which would hide a norm loaded in the wrong place.
  with torch.no_grad():
    for name, param in model.named_parameters():
      if 'norm' in name:
        param.normal_(1.0, INIT_STD)
  return model


@pytest.fixture(scope='module')
def tokens() -> np.ndarray:
  return random_tokens(VOCAB, LENGTH)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory) -> dict:
  """{case: (torch model, directory written by save_pretrained)}."""
  out = {}
  for case, overrides in CASES.items():
    model = hf_model(**overrides)
    out[case] = model, save_pretrained(model, tmp_path_factory.mktemp(case))
  return out


@pytest.fixture(params=sorted(CASES))
def checkpoint(request, checkpoints):
  """(case name, torch model, directory) per case."""
  return (request.param, *checkpoints[request.param])


# ---------------------------------------------------------------------------------------------
# The frequencies, against transformers' own.


def test_llama3_frequencies_match_transformers():
  """Llama 3.2's constants (head_dim 128, theta 500000, factor 32, original 8192, low/high 1 and
  4) against transformers' `ROPE_INIT_FUNCTIONS['llama3']`, an implementation independent of
  ours."""
  d, theta = 128, 500000.0
  params = dict(rope_type='llama3', rope_theta=theta, factor=32.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=8192)
  hf = transformers.LlamaConfig(hidden_size=2 * d, num_attention_heads=2, head_dim=d,
                                max_position_embeddings=131072, rope_parameters=params)
  want, attention_factor = ROPE_INIT_FUNCTIONS['llama3'](hf)
  want = want.numpy()
  llama3 = Llama3RopeConfig(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_len=8192)
  cfg = ModelConfig(vocab_size=8, embed_dim=2 * d, num_layers=1, num_heads=2, num_kv_heads=2,
                    head_dim=d, mlp_dim=8, rope_theta=theta, llama3_rope=llama3)
  got, factor = rope_frequencies(cfg)
  assert got.dtype == np.float32 and got.shape == (d // 2,) and factor == attention_factor == 1.0
  # numpy's float32 pow and torch's differ in the last bit of the plain frequencies ...
  np.testing.assert_array_max_ulp(got, want, maxulp=2)
  # ... and from transformers' own plain frequencies the scaling gives its bits exactly.
  plain = (1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)).numpy()
  np.testing.assert_array_equal(llama3_frequencies(plain, llama3), want)
  # Every branch is taken: kept (short wavelengths), divided by 32 (long), smoothed between.
  kept, divided = want == plain, want == plain / np.float32(32)
  assert kept.sum() >= 10 and divided.sum() >= 10 and (~kept & ~divided).sum() >= 3

  linear = dataclasses.replace(cfg, llama3_rope=Llama3RopeConfig(), linear_rope_factor=4.0)
  hf = transformers.LlamaConfig(hidden_size=2 * d, num_attention_heads=2, head_dim=d,
                                rope_parameters=dict(rope_type='linear', rope_theta=theta,
                                                     factor=4.0))
  np.testing.assert_array_max_ulp(rope_frequencies(linear)[0],
                                  ROPE_INIT_FUNCTIONS['linear'](hf)[0].numpy(), maxulp=2)


# ---------------------------------------------------------------------------------------------
# Import and export.


def test_load_matches_transformers_logits(checkpoint, tokens):
  case, model, path = checkpoint
  fields, params = load_llama(path)
  assert {k: fields[k] for k in SCALING_FIELDS[case]} == SCALING_FIELDS[case]
  assert fields['rope_theta'] == THETA
  assert np.abs(our_logits(fields, params, tokens) - hf_logits(model, tokens)).max() < 1e-4


def test_export_loads_in_transformers(checkpoint, tokens, tmp_path):
  case, model, path = checkpoint
  fields, params = load_llama(path)
  out = save_llama(tmp_path / 'export', params, fields)
  rope, given = read_config(out)['rope_parameters'], CASES[case]['rope_parameters']
  assert {k: rope[k] for k in given} == given
  exported = transformers.LlamaForCausalLM.from_pretrained(out).eval()
  got = hf_logits(exported, tokens)
  np.testing.assert_array_equal(got, hf_logits(model, tokens))
  assert np.abs(got - our_logits(fields, params, tokens)).max() < 1e-4

  # load -> save -> load is bit-exact (through the loader that picks the family itself).
  fields2, params2 = load_checkpoint(out)
  assert fields2 == fields
  assert_same_params(params, params2)


def test_transformers4_spelling(checkpoints, tmp_path):
  """Llama 3.1's config.json as published: `rope_scaling` and a top-level `rope_theta`."""
  _, path = checkpoints['llama3']
  scaling = {k: v for k, v in LLAMA3.items() if k != 'rope_theta'}
  legacy = copy_with(path, tmp_path, config=dict(rope_scaling=scaling, rope_theta=THETA),
                     drop_config=('rope_parameters',))
  assert load_llama(legacy)[0] == load_llama(path)[0]


# ---------------------------------------------------------------------------------------------
# Refusals.


@pytest.mark.parametrize('rope, phrase', [
    (dict(rope_type='dynamic', factor=2.0),
     "'dynamic' is not supported: dynamic NTK .* depends on the length of the input"),
    (dict(rope_type='longrope', short_factor=[1.0] * 8, long_factor=[2.0] * 8,
          original_max_position_embeddings=16), "'longrope' is not supported: LongRoPE"),
    (dict(rope_type='proportional'), "RoPE scaling 'proportional' is not supported"),
    ({k: v for k, v in LLAMA3.items() if k != 'high_freq_factor'},
     'llama3 RoPE scaling needs high_freq_factor'),
    ({**LLAMA3, 'high_freq_factor': 1.0}, 'need high > low > 0'),
    ({**LLAMA3, 'factor': 0.5}, 'llama3 factor=0.5 is below 1'),
    ({k: v for k, v in LINEAR.items() if k != 'factor'}, 'linear without a factor'),
], ids=lambda x: x['rope_type'] if isinstance(x, dict) else None)
def test_config_refusals(checkpoints, tmp_path, rope, phrase):
  _, path = checkpoints['llama3']
  bad = copy_with(path, tmp_path, config=dict(rope_parameters={'rope_theta': THETA, **rope}),
                  corrupt_weights=True)
  with pytest.raises(ConfigError, match=phrase) as e:
    load_llama(bad)
  assert e.value.field == 'model.hf'


def test_two_scalings_are_refused(checkpoints, tmp_path):
  _, path = checkpoints['llama3']
  fields, params = load_llama(path)
  both = {**fields, 'yarn': dataclasses.asdict(YarnConfig(factor=2.0)),
          'llama3_rope': SCALING_FIELDS['llama3']['llama3_rope'], 'linear_rope_factor': 1.0}
  with pytest.raises(ValueError, match='RoPE scalings yarn and llama3 are both on'):
    save_llama(tmp_path, params, both)
  assert not (tmp_path / 'model.safetensors').exists()

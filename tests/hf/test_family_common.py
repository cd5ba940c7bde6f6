"""What every Hugging Face family's config reading must agree on, checked on config.json dicts
alone (each family's `fields_from_hf`; no weights): transformers' defaults for the keys a config
leaves out, and what a `sliding_window` may be."""

import pytest
import transformers

from efficientjax.errors import ConfigError
from efficientjax.hf import FAMILIES

LAYERS = 2
# The keys every family requires, small.
BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
            intermediate_size=48)
# What a family requires beyond them.
EXTRA = {'deepseek_v2': dict(num_experts_per_tok=2)}
# The families that read `sliding_window` (Llama's and DeepSeek's configs have none; transformers
# ignores the key there).
WINDOWED = ('mistral', 'mixtral', 'phi3', 'qwen2', 'qwen2_moe', 'qwen3', 'qwen3_moe')
# Every layer windowed, as each family spells it (the Qwen ones need use_sliding_window; the
# others ignore both keys, or, Mistral, check layer_types against the window).
WINDOW_ON = dict(use_sliding_window=True, layer_types=['sliding_attention'] * LAYERS)


def config(model_type: str, **changes) -> dict:
  return {**BASE, 'model_type': model_type, **EXTRA.get(model_type, {}), **changes}


def hf_config_class(model_type: str) -> type:
  """transformers' config class of the family (MixtralConfig for mixtral, ...)."""
  return getattr(transformers, FAMILIES.get(model_type).architecture.replace('ForCausalLM',
                                                                             'Config'))


@pytest.mark.parametrize('model_type', sorted(FAMILIES))
def test_defaults_are_transformers(model_type):
  """A config.json without rms_norm_eps or rope_theta means the family's transformers config
  class's defaults (Mixtral and Phi-3: eps 1e-5, Mixtral: theta 1e6; the others Llama's)."""
  fields = FAMILIES.get(model_type).fields_from_hf(config(model_type))
  want = hf_config_class(model_type)()
  assert fields['norm_eps'] == want.rms_norm_eps
  assert fields['rope_theta'] == want.rope_parameters['rope_theta']


@pytest.mark.parametrize('model_type', WINDOWED)
def test_window_is_read(model_type):
  """The minimal config with a window loads (so the refusals below are the window's own)."""
  fields = FAMILIES.get(model_type).fields_from_hf(
      config(model_type, sliding_window=8, **WINDOW_ON))
  assert fields['sliding_window'] == 8


@pytest.mark.parametrize('value', [True, False, 0, -1, 2.5, '8'])
@pytest.mark.parametrize('model_type', WINDOWED)
def test_non_window_refused(model_type, value):
  """`sliding_window: true` is not a window of 1 (nor is any other bool, non-integer or value
  below 1): every family refuses it, naming the key and the fix, as transformers' configs do."""
  with pytest.raises(ConfigError, match=f'sliding_window={value!r} in config.json is not a '
                     'window: set it to the number of keys') as e:
    FAMILIES.get(model_type).fields_from_hf(config(model_type, sliding_window=value,
                                                   **WINDOW_ON))
  assert e.value.field == 'model.hf'

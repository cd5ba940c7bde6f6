"""The 7B attention points (configs/{mla,gqa,mqa,nsa}_7b.py): their size, and the memory
estimate's verdict on one 80 GB GPU for the default (no) and for `:1gpu` (yes).

The estimate is made here on a CPU for a GPU (efficientjax/train/fit.py `backend='gpu'`:
activations in the compute dtype), from abstract shapes: nothing 7B-sized is allocated.
"""

import importlib

import jax
import pytest

from efficientjax import parallel
from efficientjax.data import get_tokenizer
from efficientjax.train.fit import estimate_for
from efficientjax.train.loop import Recipe, param_count
from experiments.validate import check_run

# What JAX may use of an H100's 79.6 GiB at XLA_PYTHON_CLIENT_MEM_FRACTION=0.95, as the
# presets' docstrings say to run them.
H100_BUDGET_BYTES = int(0.95 * 79.6 * 2**30)
POINTS = ('mla_7b', 'gqa_7b', 'mqa_7b', 'nsa_7b')


def _estimate(name, preset):
  config = importlib.import_module(f'configs.{name}').get_config(preset).to_dict()
  recipe = Recipe(config)
  model_cfg = recipe.model_config(get_tokenizer(config['data']['tokenizer']))
  mesh = parallel.make_mesh(config['mesh'], jax.devices()[:1])
  recipe.setup(model_cfg, mesh)
  with parallel.activate(mesh):
    batch = recipe.abstract_batch(sharding=parallel.batch_sharding(mesh))
    return recipe, estimate_for(recipe, model_cfg, batch, backend='gpu')


@pytest.mark.parametrize('name', POINTS)
def test_7b_points_share_a_body_and_only_1gpu_fits_one_gpu(name):
  recipe, default = _estimate(name, None)
  params = param_count(recipe.abstract.params)
  assert 6.7e9 < params < 7.3e9, params
  model = recipe.model_cfg
  assert (model.embed_dim, model.num_layers, model.num_heads, model.mlp_dim,
          model.vocab_size) == (4096, 32, 32, 12288, 102400)
  assert model.attention == name.split('_')[0]
  assert default.device_bytes > 2 * H100_BUDGET_BYTES  # several GPUs, as the docstring says
  recipe, one = _estimate(name, '1gpu')
  assert recipe.config['train']['offload_optimizer']
  assert one.optimizer_host == 8 * params  # AdamW's two fp32 moments, in host memory
  assert one.device_bytes <= H100_BUDGET_BYTES, (name, one.record())


@pytest.mark.parametrize('name', POINTS)
def test_7b_points_and_their_presets_validate(name, tmp_path):
  module = importlib.import_module(f'configs.{name}')
  # The default on a GPU node (8 devices), the smoke preset on a laptop, :1gpu on one GPU.
  for preset, devices, backend in ((None, 8, 'gpu'), ('smoke', 1, 'cpu'), ('1gpu', 1, 'gpu')):
    errors = check_run(module.get_config(preset), str(tmp_path / str(preset)),
                       num_devices=devices, backend=backend)
    assert errors == [], (preset, errors)

"""One device's analytic training-step estimate for a GPU (backend='gpu'), each 7B point and preset."""
import importlib, jax
from efficientjax import parallel
from efficientjax.data import get_tokenizer
from efficientjax.train.fit import estimate_for
from efficientjax.train.loop import Recipe, param_count
for name in ('mla_7b', 'gqa_7b', 'mqa_7b', 'nsa_7b'):
  for preset in (None, '1gpu'):
    c = importlib.import_module(f'configs.{name}').get_config(preset).to_dict()
    r = Recipe(c); mc = r.model_config(get_tokenizer('byte'))
    mesh = parallel.make_mesh(c['mesh'], jax.devices()[:1]); r.setup(mc, mesh)
    with parallel.activate(mesh):
      e = estimate_for(r, mc, r.abstract_batch(sharding=parallel.batch_sharding(mesh)), backend='gpu')
    print(f'{name}:{preset or "default"} params {param_count(r.abstract.params)/1e9:.2f}B device {e.device_bytes/2**30:.1f} GiB host {e.host_bytes/2**30:.1f} GiB')

"""The fine-tuning methods (efficientjax/peft) against Hugging Face peft and hand formulas.

- lora, rslora, dora, pissa on a tiny transformers Llama (GQA), our adapters copied into
  peft's `get_peft_model(LoraConfig(...))`: the same projections adapted, the same logits
  (1e-5 abs) and the same gradient of every lora_a, lora_b and magnitude of every layer (1e-5
  of the leaf's largest), for the attention projections (scanned layers) and the MLP ones
  (per-layer params); all-linear adapts the modules peft's does. B, A and the magnitude are
  moved off their initial values so that every gradient is non-trivial. lora_plus trains
  lora's model.
- Initialisation: kaiming A is U(±1/sqrt(fan_in)) as torch's kaiming_uniform_(a=sqrt 5),
  gaussian A has std 1/r, B is 0; PiSSA's factors and residual equal peft's
  init_lora_weights='pissa' (per singular component, whose sign is free); the randomised SVD
  (pissa_niter_K) finds the top singular triplets of a decaying spectrum and its residual plus
  s·A·B is the kernel; DoRA's magnitude equals peft's lora_magnitude_vector.
- DoRA's weight norm is a constant in the backward pass (a hand formula with and without it).
- Scaling: rslora's alpha/sqrt(r) against lora's alpha/r, on the output.
- LoRA+: the learning-rate factors equal the groups of peft's create_loraplus_optimizer.
- freeze and full: what trains, and that `variables` rebuilds the params (scanned or not).
- merged ≡ unmerged, and unmerge inverts merge; at init every method is the base model;
  all-linear adapters on MLA and NSA (tests/attention/variants.py) as well.
- Adapter dropout: off without a 'dropout' rng; with one it drops the adapter's input only.
- A target_modules name that selects nothing is a ConfigError naming the field.

fp32 throughout. lora, rslora and pissa run at one scaling (rslora's alpha is chosen so that
alpha/sqrt(r) = lora's alpha/r) so that they share one compiled program per target set.
"""

import copy
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import traverse_util
from peft.optimizers import create_loraplus_optimizer
from peft.tuners.lora.layer import LoraLayer

from efficientjax.errors import ConfigError
from efficientjax.hf.safetensors_io import load_checkpoint
from efficientjax.model import ModelConfig, Transformer, unscan_params
from efficientjax.nn.linear import AdapterSettings, Linear
from efficientjax.peft import METHODS, FinetuneConfig, lora, targets
from tests.attention.variants import TINY
from tests.hf.common import jitted_apply, random_tokens, random_variables, save_pretrained

RANK = 4
# One scaling (2.0) for every method: rslora's 4/sqrt(4) = lora's 8/4. peft gets the same alpha
# and flag, so a wrong rslora formula still shows; the shared AdapterSettings let lora, rslora
# and pissa reuse one compiled program per target set.
ALPHA = {'lora': 8.0, 'rslora': 4.0, 'dora': 8.0, 'pissa': 8.0}
PEFT_FLAGS = {'lora': {}, 'rslora': {'use_rslora': True}, 'dora': {'use_dora': True},
              'pissa': {'init_lora_weights': 'pissa'}}
TARGETS = {'attn': 'q_proj,k_proj,v_proj,o_proj', 'mlp': 'gate_proj,up_proj,down_proj'}
CASES = [(m, t) for m in ('lora', 'rslora', 'dora', 'pissa') for t in ('attn', 'mlp')]
# Our (parent, name) -> the module's name inside a transformers Llama layer (written out here,
# not read from efficientjax.peft.targets, which is under test).
HF_MODULE = {('attn', 'q'): 'self_attn.q_proj', ('attn', 'k'): 'self_attn.k_proj',
             ('attn', 'v'): 'self_attn.v_proj', ('attn', 'o'): 'self_attn.o_proj',
             ('mlp', 'gate'): 'mlp.gate_proj', ('mlp', 'up'): 'mlp.up_proj',
             ('mlp', 'down'): 'mlp.down_proj'}
LOGITS_ATOL = 1e-5
GRAD_RTOL = 1e-5  # of the largest |gradient| of the leaf (one layer of one projection)


# ---------------------------------------------------------------------------------------------
# The model, both sides.

@dataclasses.dataclass
class Llama:
  hf: transformers.LlamaForCausalLM
  cfg: ModelConfig   # scanned, no adapters
  params: Any
  tokens: np.ndarray
  labels: np.ndarray
  cases: dict        # (method, target set) -> Case, filled on first use


@dataclasses.dataclass
class Case:
  method: Any        # the bound METHODS entry
  params: Any        # the base, in this case's layout
  cfg: ModelConfig   # with the method's adapter settings
  init: Any          # trainable as `prepare` made it
  trainable: Any     # moved off the init (B and the magnitude perturbed)
  frozen: Any
  init_logits: np.ndarray  # with `init`: the base model's, as every method starts from it
  logits: np.ndarray
  grads: Any
  peft_init: dict    # peft module name -> {'A', 'B', 'W', 'm'} as peft initialised them
  peft_logits: np.ndarray
  peft_grads: dict   # peft module name -> {'A', 'B', 'm'} gradients, peft's layout


@pytest.fixture(scope='module')
def llama(tmp_path_factory) -> Llama:
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=96, initializer_range=0.1)).eval()
  path = save_pretrained(hf, tmp_path_factory.mktemp('llama'))
  fields, params = load_checkpoint(path, param_dtype=jnp.float32)
  tokens = random_tokens(128, 12)
  labels = np.random.default_rng(3).integers(0, 128, tokens.shape, dtype=np.int64)
  return Llama(hf, ModelConfig.from_config(fields), params, tokens, labels, {})


def peft_name(p: targets.Projection, layer: int) -> str:
  return f'base_model.model.model.layers.{layer}.{HF_MODULE[p.path[-2:]]}'


def layer_of(tree: Any, p: targets.Projection, layer: int) -> dict[str, np.ndarray]:
  """One layer of a projection's adapter (or params) as numpy."""
  node = targets.get(tree, p.path)
  return {k: np.asarray(v[p.layers.index(layer)] if p.stacked else v) for k, v in node.items()}


def as_peft(adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our adapter layout -> peft's: A [r, in], B [out, r], m [out]."""
  out = {'A': adapter['lora_a'].reshape(-1, RANK).T, 'B': adapter['lora_b'].reshape(RANK, -1).T}
  if 'magnitude' in adapter:
    out['m'] = adapter['magnitude'].reshape(-1)
  return out


def perturb(trainable: Any, seed: int = 4) -> Any:
  """The adapters moved off their initialisation: B (zero at init) and A by noise, the
  magnitude by a few percent, so that no gradient vanishes and no ratio is 1."""
  rng = np.random.default_rng(seed)

  def move(path, x):
    noise = rng.normal(size=x.shape).astype(np.float32)
    name = path[-1].key
    if name == 'magnitude':
      return x * (1 + 0.1 * noise)
    return x + {'lora_a': 0.02, 'lora_b': 0.1}[name] * noise

  return jax.tree_util.tree_map_with_path(move, trainable)


def loss_and_grad(cfg: ModelConfig):
  """(mean cross-entropy, logits), d loss / d adapters: jitted once per config."""
  model = Transformer(cfg)

  def loss(adapters, params, tokens, labels):
    logits = model.apply({'params': params, 'adapters': adapters}, tokens)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1)), logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


_LOSS_AND_GRAD: dict = {}


def case(llama: Llama, method: str, target: str) -> Case:
  """Our side and peft's of one (method, target set), computed once. The attention targets
  run the scanned layout, the MLP ones the per-layer one (`block_i`)."""
  if (method, target) in llama.cases:
    return llama.cases[method, target]
  base_cfg = dataclasses.replace(llama.cfg, scan_layers=target != 'mlp')
  base = llama.params if base_cfg.scan_layers else unscan_params(llama.params, base_cfg)
  ft = FinetuneConfig(method=method, target_modules=TARGETS[target], rank=RANK,
                      alpha=ALPHA[method])
  m = METHODS.get(method)(base_cfg, ft)
  assert m.check() == []
  cfg = dataclasses.replace(base_cfg, adapter=m.settings())
  # Jitted: PiSSA's SVDs take twice as long eagerly.
  init, frozen = jax.jit(m.prepare)(base, jax.random.key(0))
  trainable = perturb(init)
  params, adapters = m.variables(trainable, frozen)
  assert adapters is trainable  # so d/d adapters is d/d trainable
  if cfg not in _LOSS_AND_GRAD:
    _LOSS_AND_GRAD[cfg] = loss_and_grad(cfg)
  fn = _LOSS_AND_GRAD[cfg]
  (_, logits), grads = fn(adapters, params, llama.tokens, llama.labels)
  init_logits = fn(init, frozen, llama.tokens, llama.labels)[0][1]

  torch.manual_seed(0)
  config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA[method], lora_dropout=0.0,
                           target_modules=TARGETS[target].split(','), **PEFT_FLAGS[method])
  pm = peft.get_peft_model(copy.deepcopy(llama.hf), config)
  adapted = {n for n, mod in pm.named_modules() if isinstance(mod, LoraLayer)}
  assert adapted == {peft_name(p, i) for p in m.chosen for i in p.layers}

  def tensors(mod):
    out = {'A': mod.lora_A['default'].weight, 'B': mod.lora_B['default'].weight}
    if 'default' in mod.lora_magnitude_vector:
      out['m'] = mod.lora_magnitude_vector['default'].weight
    return out

  peft_init = {}
  for p in m.chosen:
    for i in p.layers:
      mod = pm.get_submodule(peft_name(p, i))
      peft_init[peft_name(p, i)] = {k: t.detach().numpy().copy() for k, t in
                                    {**tensors(mod), 'W': mod.base_layer.weight}.items()}
      ours = as_peft(layer_of(trainable, p, i))
      mine = tensors(mod)
      if method == 'pissa':
        # Our residual too: the two SVDs agree to fp32 rounding only (~1e-5 of the weights,
        # test_pissa_init_matches_peft), which the logits would magnify past their tolerance.
        mine['W'] = mod.base_layer.weight
        ours['W'] = layer_of(frozen, p, i)['kernel'].reshape(ours['A'].shape[1], -1).T
      with torch.no_grad():
        for k, t in mine.items():
          t.copy_(torch.from_numpy(np.array(ours[k])))
  out = pm(torch.from_numpy(llama.tokens)).logits
  F.cross_entropy(out.flatten(0, 1), torch.from_numpy(llama.labels).flatten()).backward()
  peft_grads = {peft_name(p, i): {k: t.grad.numpy()
                                  for k, t in tensors(pm.get_submodule(peft_name(p, i))).items()}
                for p in m.chosen for i in p.layers}
  c = Case(m, base, cfg, init, trainable, frozen, np.asarray(init_logits), np.asarray(logits),
           grads, peft_init, out.detach().numpy(), peft_grads)
  llama.cases[method, target] = c
  return c


def base_logits(llama: Llama, params: Any) -> np.ndarray:
  """The plain model's logits (no adapters), in the layout `params` has."""
  cfg = dataclasses.replace(llama.cfg, scan_layers='blocks' in params)
  return np.asarray(jitted_apply(cfg)({'params': params}, llama.tokens))


# ---------------------------------------------------------------------------------------------
# 1. Forward and backward against peft.

@pytest.mark.parametrize('method,target', CASES)
def test_matches_peft(llama, method, target):
  c = case(llama, method, target)
  np.testing.assert_allclose(c.logits, c.peft_logits, rtol=0, atol=LOGITS_ATOL)
  assert np.abs(c.logits - c.init_logits).max() > 1e-2  # the adapters act
  for p in c.method.chosen:
    for i in p.layers:
      ours = as_peft(layer_of(c.grads, p, i))
      theirs = c.peft_grads[peft_name(p, i)]
      assert ours.keys() == theirs.keys() == ({'A', 'B', 'm'} if method == 'dora' else {'A', 'B'})
      for k in ours:
        scale = np.abs(theirs[k]).max()
        assert scale > 1e-4, (p.name, i, k)  # a gradient that is really there
        np.testing.assert_allclose(ours[k], theirs[k], rtol=0, atol=GRAD_RTOL * scale,
                                   err_msg=f'{p.name} layer {i} {k}')


def test_lora_plus_forward_is_lora(llama):
  c = case(llama, 'lora', 'attn')
  plus = METHODS.get('lora_plus')(llama.cfg, dataclasses.replace(c.method.ft, method='lora_plus'))
  assert plus.settings() == c.method.settings()
  trainable, frozen = plus.prepare(llama.params, jax.random.key(0))
  assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), trainable, c.init))
  assert frozen is llama.params
  assert c.method.lr_multipliers(trainable) is None


def test_all_linear_selects_what_peft_does(llama):
  # Every projection of the layers, not lm_head. (The numbers per projection are
  # test_matches_peft's: attention and MLP projections together are all of them here.)
  m = METHODS.get('lora')(llama.cfg, FinetuneConfig(target_modules='all-linear', rank=RANK))
  pm = peft.get_peft_model(copy.deepcopy(llama.hf),
                           peft.LoraConfig(r=RANK, target_modules='all-linear'))
  adapted = {n for n, mod in pm.named_modules() if isinstance(mod, LoraLayer)}
  assert adapted == {peft_name(p, i) for p in m.chosen for i in p.layers}
  assert len(adapted) == 14


# ---------------------------------------------------------------------------------------------
# 2. Initialisation.

def _uniform_stats_ok(x: np.ndarray, bound: float):
  n = x.size
  assert np.abs(x).max() <= bound and np.abs(x).max() > bound * (1 - 1e-3)
  sd = bound / math.sqrt(3)  # U(-b, b)
  assert abs(x.mean()) < 5 * sd / math.sqrt(n)
  assert abs(x.std() / sd - 1) < 0.01  # the sample std's own spread is ~0.1% at this n


def test_kaiming_init():
  # A multi-dim input (an o projection's heads x head_dim): the fan-in is their product.
  p = targets.Projection(('o',), (16, 64), (8,), False, ())
  r = 256
  adapter, kernel = lora.init_adapter(jax.random.key(1), jnp.zeros((16, 64, 8)), p, rank=r,
                                      init='kaiming', scale=1.0, dora=False)
  assert kernel is None and set(adapter) == {'lora_a', 'lora_b'}
  assert adapter['lora_a'].shape == (16, 64, r)
  assert adapter['lora_b'].shape == (r, 8) and not np.asarray(adapter['lora_b']).any()
  bound = 1 / math.sqrt(16 * 64)
  _uniform_stats_ok(np.asarray(adapter['lora_a']), bound)
  # torch's kaiming_uniform_(a=sqrt 5) on peft's lora_A [r, in] has the same law.
  torch.manual_seed(0)
  theirs = torch.empty(r, 16 * 64)
  torch.nn.init.kaiming_uniform_(theirs, a=math.sqrt(5))
  _uniform_stats_ok(theirs.numpy(), bound)


def test_kaiming_init_in_the_model(llama):
  m = METHODS.get('lora')(llama.cfg, FinetuneConfig(target_modules='all-linear', rank=RANK))
  init = m.prepare(llama.params, jax.random.key(0))[0]
  for p in m.chosen:
    a, b = targets.get(init, p.path)['lora_a'], targets.get(init, p.path)['lora_b']
    bound = 1 / math.sqrt(math.prod(p.in_shape))  # o: heads x head_dim; down: mlp_dim
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound, p.name
    assert not np.asarray(b).any(), p.name


def test_gaussian_init():
  p = targets.Projection(('q',), (4096,), (4, 8), False, ())
  r = 64
  adapter, kernel = lora.init_adapter(jax.random.key(2), jnp.zeros((4096, 4, 8)), p, rank=r,
                                      init='gaussian', scale=1.0, dora=False)
  assert kernel is None and not np.asarray(adapter['lora_b']).any()
  assert adapter['lora_b'].shape == (r, 4, 8)
  torch.manual_seed(0)
  theirs = torch.empty(r, 4096)
  torch.nn.init.normal_(theirs, std=1 / r)  # peft's init_lora_weights='gaussian'
  for x in (np.asarray(adapter['lora_a']), theirs.numpy()):
    assert abs(x.mean()) < 5 / r / math.sqrt(x.size)
    assert abs(x.std() * r - 1) < 0.01


@pytest.mark.parametrize('target', ['attn', 'mlp'])
def test_pissa_init_matches_peft(llama, target):
  c = case(llama, 'pissa', target)
  s = c.method.scale
  for p in c.method.chosen:
    for i in p.layers:
      theirs = c.peft_init[peft_name(p, i)]
      ours = as_peft(layer_of(c.init, p, i))
      kernel = layer_of(c.params, p, i)['kernel'].reshape(ours['A'].shape[1], -1)
      residual = layer_of(c.frozen, p, i)['kernel'].reshape(kernel.shape)
      # Each singular component's sign is free: compare the rank-1 products b_k a_k.
      for k in range(RANK):
        mine = np.outer(ours['B'][:, k], ours['A'][k])
        np.testing.assert_allclose(mine, np.outer(theirs['B'][:, k], theirs['A'][k]), rtol=0,
                                   atol=1e-5, err_msg=f'{p.name} {i} {k}')
      # The top singular values are close together (gaps ~0.01 of ~1.4), so each fp32 SVD
      # is ~3e-6 off float64's; ours and peft's are each within 5e-6 of it, 1e-5 of each other.
      u, sv, vt = np.linalg.svd(kernel.astype(np.float64), full_matrices=False)
      exact = kernel - (u[:, :RANK] * sv[:RANK]) @ vt[:RANK]
      np.testing.assert_allclose(residual, exact, rtol=0, atol=5e-6)
      np.testing.assert_allclose(residual.T, theirs['W'], rtol=0, atol=1e-5)
      # Nothing is lost: the residual plus s·A·B is the kernel.
      np.testing.assert_allclose(residual + s * (ours['B'] @ ours['A']).T, kernel, rtol=0,
                                 atol=1e-6)


def _decaying(rng, shape, decay):
  """A matrix [m, n] with singular values decay**k and random singular vectors."""
  m, n = shape
  u = np.linalg.qr(rng.normal(size=(m, m)))[0][:, :min(m, n)]
  v = np.linalg.qr(rng.normal(size=(n, n)))[0][:, :min(m, n)]
  return (u * decay ** np.arange(min(m, n))) @ v.T


def _top(w, r):
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  return (u[:, :r] * s[:r]) @ vt[:r]


def test_pissa_randomised_svd(llama):
  rng = np.random.default_rng(6)
  w = _decaying(rng, (96, 64), 0.7).astype(np.float32)
  exact = np.linalg.svd(w.astype(np.float64), compute_uv=False)[:8]
  errors = {}
  for niter in (0, 8):
    u, s, vt = (np.asarray(x) for x in lora.randomized_svd(jnp.asarray(w), 8, niter,
                                                           jax.random.key(7)))
    errors[niter] = np.linalg.norm((u * s) @ vt - _top(w, 8)) / np.linalg.norm(_top(w, 8))
    if niter == 8:
      np.testing.assert_allclose(s, exact, rtol=1e-4)
      np.testing.assert_allclose(u.T @ u, np.eye(8), atol=1e-5)
  assert errors[8] < 1e-2 and errors[0] > 10 * errors[8], errors  # the iterations matter

  # pissa_niter_8 in the model, on q kernels [layers, embed, heads, head_dim] of a decaying
  # spectrum: the residual plus s·A·B is the kernel, and s·A·B its top-r part.
  r = 8
  kernel = np.stack([_decaying(rng, (64, 64), 0.7) for _ in range(2)]).astype(np.float32)
  params = copy.copy(llama.params)
  params['blocks'] = {**params['blocks'], 'attn': {**params['blocks']['attn'], 'q': {
      'kernel': jnp.asarray(kernel.reshape(2, 64, 4, 16))}}}
  ft = FinetuneConfig(method='pissa', init='pissa_niter_8', target_modules='q_proj', rank=r)
  m = METHODS.get('pissa')(llama.cfg, ft)
  assert m.check() == []
  trainable, frozen = jax.jit(m.prepare)(params, jax.random.key(8))
  q = trainable['blocks']['attn']['q']
  for layer in range(2):
    a = np.asarray(q['lora_a'][layer])
    b = np.asarray(q['lora_b'][layer]).reshape(r, 64)
    residual = np.asarray(frozen['blocks']['attn']['q']['kernel'][layer]).reshape(64, 64)
    np.testing.assert_allclose(residual + m.scale * a @ b, kernel[layer], rtol=0, atol=1e-6)
    top = _top(kernel[layer], r)
    assert np.linalg.norm(m.scale * a @ b - top) / np.linalg.norm(top) < 1e-2
  bad = dataclasses.replace(ft, init='pissa_niter_x')
  assert [e.field for e in METHODS.get('pissa')(llama.cfg, bad).check()] == ['finetune.init']


# ---------------------------------------------------------------------------------------------
# 3. DoRA.

@pytest.mark.parametrize('target', ['attn', 'mlp'])
def test_dora_magnitude_init_matches_peft(llama, target):
  c = case(llama, 'dora', target)
  for p in c.method.chosen:
    for i in p.layers:
      theirs = c.peft_init[peft_name(p, i)]['m']
      ours = layer_of(c.init, p, i)['magnitude'].reshape(-1)
      np.testing.assert_allclose(ours, theirs, rtol=1e-6)
      # B = 0 at init: the magnitude is the norm of each output feature's weights.
      kernel = layer_of(c.params, p, i)['kernel']
      np.testing.assert_allclose(ours, np.linalg.norm(kernel.reshape(-1, theirs.size), axis=0),
                                 rtol=1e-6)


def _dora_by_hand(x, w, a, b, m, s, detach):
  v = w + s * a @ b
  norm = jnp.linalg.norm(v, axis=0)
  if detach:
    norm = jax.lax.stop_gradient(norm)
  return m / norm * (x @ w + s * x @ a @ b)


def test_dora_norm_is_detached():
  rng = np.random.default_rng(9)
  x, w = rng.normal(size=(5, 12)), rng.normal(size=(12, 10)) * 0.3
  a, b = rng.normal(size=(12, 3)) * 0.3, rng.normal(size=(3, 10)) * 0.3
  m, g = rng.uniform(0.5, 2.0, size=10), rng.normal(size=(5, 10))
  x, w, a, b, m, g = (jnp.asarray(t, jnp.float32) for t in (x, w, a, b, m, g))
  s = 2.0
  layer = Linear((10,), ('embed', 'mlp'), adapter=AdapterSettings(scaling=s))

  def ours(a, b, m):
    y = layer.apply({'params': {'kernel': w},
                     'adapters': {'lora_a': a, 'lora_b': b, 'magnitude': m}}, x)
    return jnp.sum(y * g)

  def hand(detach):
    return lambda a, b, m: jnp.sum(_dora_by_hand(x, w, a, b, m, s, detach) * g)

  grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2)))(a, b, m)  # jit: eager is slower
  grads, detached, attached = grad(ours), grad(hand(True)), grad(hand(False))
  np.testing.assert_allclose(jax.jit(ours)(a, b, m), hand(True)(a, b, m), rtol=1e-5)
  for mine, d in zip(grads, detached):
    np.testing.assert_allclose(mine, d, rtol=0, atol=1e-5 * np.abs(d).max())
  # Not a vacuous check: through the norm, d/dA and d/dB would be quite different.
  for mine, t in zip(grads[:2], attached[:2]):
    assert np.abs(mine - t).max() > 0.05 * np.abs(t).max()


# ---------------------------------------------------------------------------------------------
# 4. Scaling.

def test_rslora_scaling(llama):
  r, alpha = 16, 8.0
  ft = FinetuneConfig(target_modules='q_proj', rank=r, alpha=alpha)
  s_lora = METHODS.get('lora')(llama.cfg, ft).settings().scaling
  s_rs = METHODS.get('rslora')(llama.cfg, ft).settings().scaling
  assert s_lora == alpha / r and s_rs == alpha / math.sqrt(r)
  rng = np.random.default_rng(10)
  x, w = rng.normal(size=(3, 20)), rng.normal(size=(20, 6))
  a, b = rng.normal(size=(20, r)), rng.normal(size=(r, 6))
  x, w, a, b = (jnp.asarray(t, jnp.float32) for t in (x, w, a, b))
  v = {'params': {'kernel': w}, 'adapters': {'lora_a': a, 'lora_b': b}}
  out = {s: Linear((6,), ('embed', 'mlp'), adapter=AdapterSettings(scaling=s)).apply(v, x)
         for s in (s_lora, s_rs)}
  base = x @ w
  np.testing.assert_allclose(out[s_lora] - base, alpha / r * (x @ a @ b), rtol=1e-4, atol=1e-5)
  # The ratio of the adapters' contributions is sqrt(r) (4 here), by alpha/sqrt(r) / (alpha/r).
  np.testing.assert_allclose(out[s_rs] - base, math.sqrt(r) * (out[s_lora] - base), rtol=1e-4,
                             atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 5. LoRA+.

def _peft_leaf(name: str, scanned: bool) -> tuple[tuple[str, ...], int]:
  """A peft parameter's name -> (our leaf's path, layer)."""
  parts = name.split('.')
  layer = int(parts[parts.index('layers') + 1])
  module = '.'.join(parts[parts.index('layers') + 2:parts.index('layers') + 4])
  ours = {v: k for k, v in HF_MODULE.items()}[module]
  kind = {'lora_A': 'lora_a', 'lora_B': 'lora_b', 'lora_magnitude_vector': 'magnitude'}[
      parts[parts.index('layers') + 4]]
  top = 'blocks' if scanned else f'block_{layer}'
  return (top,) + ours + (kind,), layer


@pytest.mark.parametrize('scanned', [True, False])
def test_lora_plus_groups_match_peft(llama, scanned):
  ratio, lr = 16.0, 1e-3
  cfg = dataclasses.replace(llama.cfg, scan_layers=scanned)
  params = llama.params if scanned else unscan_params(llama.params, cfg)
  ft = FinetuneConfig(method='lora_plus', target_modules='all-linear', rank=RANK,
                      lora_plus_ratio=ratio)
  # DoRA's trainables under LoRA+'s rule, so that a 1-D parameter (the magnitude) is there.
  trainable = jax.eval_shape(METHODS.get('dora')(cfg, ft).prepare, params, jax.random.key(0))[0]
  factors = METHODS.get('lora_plus')(cfg, ft).lr_multipliers(trainable)
  ours = {}
  for path, f in traverse_util.flatten_dict(factors).items():
    layers = range(cfg.num_layers) if scanned else [int(path[0][len('block_'):])]
    ours.update({(path, i): f for i in layers})

  pm = peft.get_peft_model(copy.deepcopy(llama.hf), peft.LoraConfig(
      r=RANK, lora_alpha=8, target_modules='all-linear', use_dora=True))
  opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio)
  group_lr = {id(t): g['lr'] for g in opt.param_groups for t in g['params']}
  theirs = {_peft_leaf(n, scanned): group_lr[id(t)] / lr
            for n, t in pm.named_parameters() if t.requires_grad}
  assert ours.keys() == theirs.keys()
  wrong = {k: (ours[k], theirs[k]) for k in ours if not math.isclose(ours[k], theirs[k])}
  assert not wrong, wrong


# ---------------------------------------------------------------------------------------------
# 6, 7. freeze and full.

def _by_layer(tree: Any, scanned: bool, layers_of_stack=None) -> dict:
  """{(layer or None, path within the layer or top-level path): array}; a scanned stack's
  leaf covers `layers_of_stack` (all layers by default)."""
  out = {}
  for path, x in traverse_util.flatten_dict(tree).items():
    x = np.asarray(x)
    if scanned and path[0] == 'blocks':
      for j, layer in enumerate(layers_of_stack or range(x.shape[0])):
        out[layer, path[1:]] = x[j]
    elif not scanned and path[0].startswith('block_'):
      out[int(path[0][len('block_'):]), path[1:]] = x
    else:
      out[None, path] = x
  return out


FREEZE_CASES = [  # (finetune fields, the layers that train, which of their leaves, top-level)
    (dict(freeze_layers=1), [1], lambda inner: True, ()),
    (dict(freeze_layers=-1, freeze_extra='lm_head'), [0], lambda inner: True, ('lm_head',)),
    (dict(freeze_layers=1, freeze_modules='mlp'), [1], lambda inner: inner[0] == 'mlp', ()),
    (dict(freeze_layers=-1, freeze_modules='q_proj', freeze_extra='lm_head,final_norm'), [0],
     lambda inner: inner[:2] == ('attn', 'q'), ('lm_head', 'final_norm')),
    (dict(freeze_layers=2, freeze_modules='attn_norm,down_proj'), [0, 1],
     lambda inner: inner[0] == 'attn_norm' or inner[:2] == ('mlp', 'down'), ()),
]


@pytest.mark.parametrize('scanned', [True, False])
@pytest.mark.parametrize('changes,layers,in_layer,extra', FREEZE_CASES)
def test_freeze(llama, scanned, changes, layers, in_layer, extra):
  cfg = dataclasses.replace(llama.cfg, scan_layers=scanned)
  params = llama.params if scanned else unscan_params(llama.params, cfg)
  m = METHODS.get('freeze')(cfg, FinetuneConfig(method='freeze', **changes))
  assert m.check() == [] and m.settings() is None
  trainable, frozen = m.prepare(params, jax.random.key(0))
  everything = _by_layer(params, scanned)
  expected = {k: v for k, v in everything.items()
              if (k[0] in layers and in_layer(k[1])) or (k[0] is None and k[1][0] in extra)}
  got = _by_layer(trainable, scanned, layers)
  assert got.keys() == expected.keys()
  assert all(np.array_equal(got[k], expected[k]) for k in got)

  rebuilt, adapters = m.variables(trainable, frozen)
  assert adapters == {}
  assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), rebuilt, params))
  # Each trainable leaf moved by its own amount lands in its own layer's slice, nowhere else.
  flat = traverse_util.flatten_dict(trainable)
  moved = {path: x + (k + 1) for k, (path, x) in enumerate(flat.items())}
  shift = {}
  for k, (path, x) in enumerate(flat.items()):
    for key in _by_layer(traverse_util.unflatten_dict({path: x}), scanned, layers):
      shift[key] = k + 1
  rebuilt = _by_layer(m.variables(traverse_util.unflatten_dict(moved), frozen)[0], scanned)
  for key, x in rebuilt.items():
    np.testing.assert_array_equal(x, everything[key] + np.float32(shift.get(key, 0)),
                                  err_msg=str(key))


def test_freeze_refuses_what_selects_nothing(llama):
  bad = FinetuneConfig(method='freeze', freeze_layers=3, freeze_extra='lm_head,nope')
  assert [e.field for e in METHODS.get('freeze')(llama.cfg, bad).check()] == [
      'finetune.freeze_layers', 'finetune.freeze_extra']
  none = FinetuneConfig(method='freeze', freeze_modules='nothing_here')
  with pytest.raises(ConfigError) as e:
    METHODS.get('freeze')(llama.cfg, none).prepare(llama.params, jax.random.key(0))
  assert e.value.field == 'finetune.freeze_modules'


def test_full(llama):
  m = METHODS.get('full')(llama.cfg, FinetuneConfig(method='full'))
  trainable, frozen = m.prepare(llama.params, jax.random.key(0))
  assert trainable is llama.params and frozen == {}
  params, adapters = m.variables(trainable, frozen)
  assert params is llama.params and adapters == {}
  assert m.merged(trainable, frozen) is llama.params
  assert m.lr_multipliers(trainable) is None and m.settings() is None


# ---------------------------------------------------------------------------------------------
# 8. Merging.

@pytest.mark.parametrize('method,target', CASES)
def test_merged_equals_unmerged(llama, method, target):
  c = case(llama, method, target)
  merged = c.method.merged(c.trainable, c.frozen)
  np.testing.assert_allclose(base_logits(llama, merged), c.logits, rtol=0, atol=LOGITS_ATOL)
  # At init every method is the base model: exactly with B = 0; to rounding for DoRA
  # (m / ‖W‖ = 1) and PiSSA (residual + s·A·B = W).
  base = base_logits(llama, c.params)
  if method in ('lora', 'rslora'):
    np.testing.assert_array_equal(c.init_logits, base)
  else:
    np.testing.assert_allclose(c.init_logits, base, rtol=0, atol=LOGITS_ATOL)
  # The projections not targeted are untouched, the targeted ones changed.
  chosen = {p.path + ('kernel',) for p in c.method.chosen}
  for path, x in traverse_util.flatten_dict(merged).items():
    same = np.array_equal(x, traverse_util.flatten_dict(c.frozen)[path])
    assert same == (path not in chosen), path
  if method == 'dora':
    with pytest.raises(ValueError, match='DoRA'):
      lora.unmerge(merged, c.trainable, c.method.chosen, c.method.scale)
    assert lora.unmerge(merged, c.trainable, c.method.chosen, c.method.scale,
                        base=c.frozen) is c.frozen
  else:
    back = lora.unmerge(merged, c.trainable, c.method.chosen, c.method.scale)
    for path, x in traverse_util.flatten_dict(back).items():
      np.testing.assert_allclose(x, traverse_util.flatten_dict(c.frozen)[path], rtol=0,
                                 atol=1e-6, err_msg=str(path))


# ---------------------------------------------------------------------------------------------
# 9. Other attention variants.

@pytest.mark.parametrize('variant', ['mla', 'nsa'])  # GQA: the Llama of the tests above
def test_adapters_on_attention_variants(variant):
  cfg = TINY[variant]
  params = nn.unbox(random_variables(cfg, 0.1))['params']
  m = METHODS.get('lora')(cfg, FinetuneConfig(target_modules='all-linear', rank=RANK))
  assert m.check() == []
  adapted_cfg = dataclasses.replace(cfg, adapter=m.settings())
  # Every kernel of the layers (MLA's low-rank q/kv, NSA's three branches and gate) is adapted.
  kernels = {k for k in traverse_util.flatten_dict(params) if k[-1] == 'kernel'}
  assert {p.path + ('kernel',) for p in m.chosen} == kernels - {('lm_head', 'kernel')}
  init, frozen = jax.jit(m.prepare)(params, jax.random.key(0))
  tokens = jnp.asarray(random_tokens(cfg.vocab_size, 24))
  base = np.asarray(jitted_apply(cfg)({'params': params}, tokens))
  zero_b = np.asarray(jitted_apply(adapted_cfg)({'params': frozen, 'adapters': init}, tokens))
  np.testing.assert_array_equal(zero_b, base)
  trainable = perturb(init)
  adapted = np.asarray(jitted_apply(adapted_cfg)({'params': frozen, 'adapters': trainable},
                                                 tokens))
  merged = np.asarray(jitted_apply(cfg)({'params': m.merged(trainable, frozen)}, tokens))
  assert np.abs(adapted - base).max() > 1e-2
  np.testing.assert_allclose(merged, adapted, rtol=0, atol=LOGITS_ATOL)


# ---------------------------------------------------------------------------------------------
# 10. Dropout.

def test_dropout_is_on_the_adapter_input_only():
  n, p = 8, 0.5
  keep = 1 - p
  rng = np.random.default_rng(11)
  # |x| >= 0.5: a kept entry (x / keep) is never mistaken for a dropped one (0).
  x = jnp.asarray(rng.uniform(0.5, 1.5, (64, n)) * rng.choice([-1, 1], (64, n)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(n, n)), jnp.float32)
  eye = jnp.eye(n)
  layer = lambda dropout: Linear((n,), ('embed', 'mlp'), adapter=AdapterSettings(2.0, dropout))
  lora_vars = {'params': {'kernel': w}, 'adapters': {'lora_a': eye, 'lora_b': eye}}
  base = np.asarray(Linear((n,), ('embed', 'mlp')).apply({'params': {'kernel': w}}, x))
  no_dropout = layer(0.0).apply(lora_vars, x)
  # Without a 'dropout' rng (evaluation) the rate is ignored.
  assert np.array_equal(layer(p).apply(lora_vars, x), no_dropout)
  # With one, A = B = I shows the adapter's input: each entry dropped, or kept and scaled.
  key = {'dropout': jax.random.key(12)}
  dropped = (np.asarray(layer(p).apply(lora_vars, x, rngs=key)) - base) / 2.0
  kept = np.abs(dropped - np.asarray(x) / keep) < 1e-5
  assert (kept | (np.abs(dropped) < 1e-5)).all()
  assert 0.4 < 1 - kept.mean() < 0.6
  # B = 0: the base path is not dropped, so the output is the base exactly.
  zero_b = {'params': {'kernel': w}, 'adapters': {'lora_a': eye, 'lora_b': 0 * eye}}
  assert np.array_equal(layer(p).apply(zero_b, x, rngs=key), base)

  # DoRA with the same rng (the same mask), against peft's formula: the base path on x,
  # the magnitude's correction and the LoRA path on the dropped input.
  a = jnp.asarray(rng.normal(size=(n, 3)) * 0.3, jnp.float32)
  b = jnp.asarray(rng.normal(size=(3, n)) * 0.3, jnp.float32)
  m = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
  dora = layer(p).apply({'params': {'kernel': w}, 'adapters': {'lora_a': a, 'lora_b': b,
                                                                'magnitude': m}}, x, rngs=key)
  xd = np.where(kept, np.asarray(x) / keep, 0)
  ratio = m / np.linalg.norm(w + 2.0 * a @ b, axis=0)
  expected = base + (ratio - 1) * (xd @ w) + ratio * 2.0 * (xd @ a @ b)
  np.testing.assert_allclose(dora, expected, rtol=0, atol=1e-5)


def test_dropout_in_the_model(llama):
  c = case(llama, 'lora', 'attn')
  ft = dataclasses.replace(c.method.ft, dropout=0.5)
  cfg = dataclasses.replace(llama.cfg, adapter=METHODS.get('lora')(llama.cfg, ft).settings())
  apply = jax.jit(lambda v, t, k: Transformer(cfg).apply(v, t, rngs={'dropout': k}))
  key = jax.random.key(13)
  dropped = np.asarray(apply({'params': c.frozen, 'adapters': c.trainable}, llama.tokens, key))
  assert np.abs(dropped - c.logits).max() > 1e-2
  zero_b = np.asarray(apply({'params': c.frozen, 'adapters': c.init}, llama.tokens, key))
  np.testing.assert_array_equal(zero_b, base_logits(llama, llama.params))
  # No rng: the rate is ignored.
  no_rng = jitted_apply(cfg)({'params': c.frozen, 'adapters': c.trainable}, llama.tokens)
  np.testing.assert_array_equal(no_rng, c.logits)


# ---------------------------------------------------------------------------------------------
# 11. target_modules that select nothing.

@pytest.mark.parametrize('name', ['qproj', 'q_a_proj', 'blocks/attn/zz*', 'lm_head,nope'])
def test_target_that_selects_nothing(llama, name):
  ft = FinetuneConfig(target_modules=name)
  errors = METHODS.get('lora')(llama.cfg, ft).check()
  assert [e.field for e in errors] == ['finetune.target_modules']
  bad = name.split(',')[-1]
  assert repr(bad) in errors[0].message and 'q_proj' in errors[0].message  # what it does have
  with pytest.raises(ConfigError) as e:
    METHODS.get('lora')(llama.cfg, ft).prepare(llama.params, jax.random.key(0))
  assert e.value.field == 'finetune.target_modules'

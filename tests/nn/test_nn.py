"""The building blocks of efficientjax.nn against references that share none of their code.

- RMSNorm equals transformers' LlamaRMSNorm: fp32 forward and gradients (input and scale), bf16
  forward rounded the same way (the cast before the scale), and eps honoured where it matters.
- Linear equals an einsum written here in float64, for one and two contracted dims, vector and
  multi-dim features, with and without bias; bf16 compute casts inputs and kernel before the
  contraction; a kernel_axes of the wrong length is refused, naming the module.
- Embed's lookup is the table's rows, `attend` is x · tableᵀ, both cast to `dtype`.
- MLP (model.ffn 'dense') equals transformers' LlamaMLP holding the same weights, forward and
  backward, and its flops_per_token is twice the multiply-adds of the kernels it creates.

Weights are drawn here (numpy, fixed seeds) at O(1) activations rather than taken from the
init's std 0.02, under which a wrong formula can hide inside a tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from efficientjax.model import ModelConfig
from efficientjax.nn import FFN, MLP, Embed, Linear, RMSNorm
from tests.helpers import smoke_config

# bf16 keeps 8 significant bits: one ulp is at most 2^-7 of the value, a rounding to nearest
# (half an ulp) at most 2^-8.
BF16_ULP, BF16_ROUND = 2.0 ** -7, 2.0 ** -8


def _torch(a) -> torch.Tensor:
  return torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy, as torch wants


def _f64(a) -> np.ndarray:
  return np.asarray(jnp.asarray(a).astype(jnp.float32), dtype=np.float64)


def _bf16(a) -> np.ndarray:
  """a rounded to bf16 (nearest even, as torch and XLA both round), as float64."""
  return _f64(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16))


# ---------------------------------------------------------------------------------------------
# RMSNorm.


def _llama_norm(scale: np.ndarray, eps: float, dtype=torch.float32) -> LlamaRMSNorm:
  norm = LlamaRMSNorm(scale.shape[0], eps=eps).to(dtype)
  with torch.no_grad():
    norm.weight.copy_(_torch(scale).to(dtype))
  return norm


def _norm_inputs(seed: int, shape=(4, 8, 64), x_std=3.0):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(shape) * x_std).astype(np.float32)
  # A scale away from ones (its init), so a scale applied in the wrong place shows.
  scale = (1.0 + 0.5 * rng.standard_normal(shape[-1])).astype(np.float32)
  return x, scale


def test_rmsnorm_matches_llama_fp32():
  x, scale = _norm_inputs(0)
  got = RMSNorm(eps=1e-5).apply({'params': {'scale': jnp.asarray(scale)}}, jnp.asarray(x))
  assert got.dtype == jnp.float32
  with torch.no_grad():
    want = _llama_norm(scale, 1e-5)(_torch(x)).numpy()
  # Both compute mean(x²) and rsqrt in fp32 in their own order: a few fp32 ulps apart at most.
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('param_dtype', [jnp.bfloat16, jnp.float32])
def test_rmsnorm_rounds_like_llama_in_bf16(param_dtype):
  """bf16 input and compute against the torch module run in bf16: statistics in fp32, the
  normalised x cast to bf16, then a bf16 product with the (bf16-cast) scale. fp32 params are
  the usual mixed-precision setup; their cast to bf16 must round as torch's `.to` does."""
  x, scale = _norm_inputs(1)
  xb = jnp.asarray(x, jnp.bfloat16)
  got = RMSNorm(eps=1e-5, dtype=jnp.bfloat16, param_dtype=param_dtype).apply(
      {'params': {'scale': jnp.asarray(scale, param_dtype)}}, xb)
  assert got.dtype == jnp.bfloat16
  with torch.no_grad():
    want = _llama_norm(scale, 1e-5, torch.bfloat16)(_torch(_f64(xb)).to(torch.bfloat16))
  got, want = _f64(got), want.double().numpy()
  # Equal to the bit, but for the rare element whose fp32 value sits on a bf16 rounding boundary
  # and is tipped over by the one-fp32-ulp difference between XLA's and torch's mean/rsqrt (about
  # 1 element in 10^5 at larger shapes; none at these seeds): allow 1 in 1000 elements one bf16
  # ulp away. Scaling before the cast, by contrast, moves about a quarter of the elements.
  off = got != want
  assert off.mean() <= 1e-3, f'{off.sum()} of {off.size} elements differ from LlamaRMSNorm'
  np.testing.assert_allclose(got[off], want[off], rtol=BF16_ULP)


def test_rmsnorm_honours_eps():
  """mean(x²) of 1e-8, far below eps: the output is x / sqrt(mean(x²) + eps), ~30x smaller than
  x / rms(x), so a dropped or hard-coded eps is off by far more than the tolerance."""
  x, scale = _norm_inputs(2, x_std=1e-4)
  for eps in (1e-5, 1e-3):
    got = RMSNorm(eps=eps).apply({'params': {'scale': jnp.asarray(scale)}}, jnp.asarray(x))
    with torch.no_grad():
      want = _llama_norm(scale, eps)(_torch(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    x64 = x.astype(np.float64)
    direct = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + eps) * scale
    np.testing.assert_allclose(got, direct, rtol=1e-5)
  # An all-zero row is 0 (eps keeps the rsqrt finite), not NaN.
  zero = RMSNorm().apply({'params': {'scale': jnp.asarray(scale)}}, jnp.zeros((2, 64)))
  np.testing.assert_array_equal(zero, 0.0)


def test_rmsnorm_gradients_match_torch_autograd():
  x, scale = _norm_inputs(3)
  cot = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)

  def loss(params, x):
    return jnp.sum(RMSNorm(eps=1e-5).apply({'params': params}, x) * cot)

  g_params, g_x = jax.grad(loss, argnums=(0, 1))({'scale': jnp.asarray(scale)}, jnp.asarray(x))
  norm = _llama_norm(scale, 1e-5)
  tx = _torch(x).requires_grad_(True)
  (norm(tx) * _torch(cot)).sum().backward()
  # fp32 both sides; the scale's gradient sums 32 rows of O(1) terms.
  np.testing.assert_allclose(g_x, tx.grad.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_params['scale'], norm.weight.grad.numpy(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Linear.

LINEAR_CASES = {
    # name: (x shape, in_dims, features, kernel_axes, the einsum that is the definition)
    'in1_out1': ((2, 3, 8), 1, (6,), ('embed', 'mlp'), 'bli,io->blo'),
    'in1_out2': ((2, 3, 8), 1, (4, 5), ('embed', 'heads', 'kv'), 'bli,ihk->blhk'),
    'in2_out1': ((2, 3, 4, 5), 2, (7,), ('heads', 'kv', 'embed'), 'blhk,hko->blo'),
    'in2_out2': ((2, 3, 4, 5), 2, (3, 2), ('heads', 'kv', 'q_lora', 'mlp'), 'blhk,hkpq->blpq'),
}


def _linear_variables(x_shape, in_dims, features, use_bias, seed):
  rng = np.random.default_rng(seed)
  in_shape = x_shape[len(x_shape) - in_dims:]
  fan_in = int(np.prod(in_shape))
  kernel = rng.standard_normal(in_shape + features) / np.sqrt(fan_in)  # O(1) outputs
  params = {'kernel': kernel.astype(np.float32)}
  if use_bias:  # random, not the init's zeros, so a bias dropped or added twice shows
    params['bias'] = rng.standard_normal(features).astype(np.float32)
  x = rng.standard_normal(x_shape).astype(np.float32)
  return x, params


@pytest.mark.parametrize('use_bias', [False, True])
@pytest.mark.parametrize('case', sorted(LINEAR_CASES))
def test_linear_matches_einsum(case, use_bias):
  x_shape, in_dims, features, axes, spec = LINEAR_CASES[case]
  module = Linear(features, axes, in_dims=in_dims, use_bias=use_bias)
  # The params init creates: kernel in_shape + features, bias features, named by kernel_axes.
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(x_shape))['params']
  assert shapes['kernel'].value.shape == x_shape[len(x_shape) - in_dims:] + features
  assert shapes['kernel'].names == axes
  assert ('bias' in shapes) == use_bias
  if use_bias:
    assert shapes['bias'].value.shape == features and shapes['bias'].names == axes[in_dims:]
  x, params = _linear_variables(x_shape, in_dims, features, use_bias, seed=len(spec) + use_bias)
  got = module.apply({'params': params}, jnp.asarray(x))
  want = np.einsum(spec, x.astype(np.float64), params['kernel'].astype(np.float64))
  if use_bias:
    want = want + params['bias']
  assert got.dtype == jnp.float32 and got.shape == want.shape
  # fp32 sums of at most 20 O(1) products against a float64 reference.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('use_bias', [False, True])
@pytest.mark.parametrize('case', ['in1_out1', 'in2_out2'])
def test_linear_bf16_compute_with_fp32_params(case, use_bias):
  """dtype bf16, param_dtype fp32: params stay fp32, x and W are cast to bf16 before the
  contraction, the bias is cast and added in bf16, and the output is bf16."""
  x_shape, in_dims, features, axes, spec = LINEAR_CASES[case]
  module = Linear(features, axes, in_dims=in_dims, use_bias=use_bias, dtype=jnp.bfloat16,
                  param_dtype=jnp.float32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(x_shape))['params']
  assert all(s.value.dtype == jnp.float32 for s in shapes.values())
  x, params = _linear_variables(x_shape, in_dims, features, use_bias, seed=7 + use_bias)
  got = module.apply({'params': params}, jnp.asarray(x))
  assert got.dtype == jnp.bfloat16
  product = np.einsum(spec, _bf16(x), _bf16(params['kernel']))  # exact products of bf16 values
  want = product + (_bf16(params['bias']) if use_bias else 0.0)
  # Two bf16 roundings at most (the product, then the bias sum), each within half an ulp
  # (2^-8 relative); the fp32 accumulation of <= 20 exact bf16 products adds ~1e-6.
  bound = BF16_ROUND * (np.abs(product) + np.abs(want)) + 1e-5
  err = np.abs(_f64(got) - want)
  assert (err <= bound).all(), f'max error {err.max()} beyond the bf16 rounding bound'


def test_linear_casts_inputs_and_kernel_before_contracting():
  """Exact cases where only the cast before the dot gives the documented answer: 1 + 2^-10
  rounds to 1 in bf16, so [1 + 2^-10, -1]·[1, 1] is 0 when cast first and 2^-10 (a bf16
  number) if the contraction ran in fp32 and only the output were cast."""
  near_one = np.float32(1 + 2.0 ** -10)
  module = Linear((1,), ('embed', 'mlp'), dtype=jnp.bfloat16)
  x = jnp.asarray([[near_one, -1.0]])
  ones = jnp.ones((2, 1), jnp.float32)
  assert float(module.apply({'params': {'kernel': ones}}, x)[0, 0]) == 0.0
  kernel = jnp.asarray([[near_one], [-1.0]])
  assert float(module.apply({'params': {'kernel': kernel}}, jnp.ones((1, 2)))[0, 0]) == 0.0
  # The same in fp32 keeps the 2^-10: the cases do separate the two orders.
  assert float(Linear((1,), ('embed', 'mlp')).apply({'params': {'kernel': ones}}, x)[0, 0]) == (
      2.0 ** -10)


@pytest.mark.parametrize('axes,in_dims', [
    (('embed',), 1),                       # the output axis missing
    (('embed', 'heads', 'kv'), 1),         # one axis too many for features (6,)
    (('heads', 'mlp'), 2),                 # two contracted dims but one input axis
])
def test_linear_refuses_mismatched_kernel_axes_naming_the_module(axes, in_dims):
  module = Linear((6,), axes, in_dims=in_dims, name='wq_proj')
  with pytest.raises(ValueError, match=r'^wq_proj: kernel_axes .* do not match'):
    jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((2, 4, 8)))


# ---------------------------------------------------------------------------------------------
# Embed.

VOCAB, FEATURES = 50, 16


def _table_and_tokens():
  rng = np.random.default_rng(11)
  table = rng.standard_normal((VOCAB, FEATURES)).astype(np.float32)
  tokens = rng.integers(0, VOCAB, (3, 7)).astype(np.int32)
  tokens[0, :2] = [0, VOCAB - 1]  # both ends of the table
  x = rng.standard_normal((3, 7, FEATURES)).astype(np.float32)
  return table, tokens, x


def test_embed_init_shape_and_std():
  variables = Embed(256, 64, init_std=0.5).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  table = variables['params']['embedding']
  assert table.names == ('vocab', 'embed')
  table = np.asarray(table.value)
  assert table.shape == (256, 64) and table.dtype == np.float32
  # 16384 draws: the sample std is within ~0.6% of 0.5 (1 sigma); 5% is ~9 sigma.
  assert abs(table.std() - 0.5) < 0.025 and abs(table.mean()) < 0.025


def test_embed_lookup_is_table_rows():
  table, tokens, _ = _table_and_tokens()
  got = Embed(VOCAB, FEATURES).apply({'params': {'embedding': table}}, jnp.asarray(tokens))
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, table[tokens])  # a gather: bitwise


def test_embed_attend_is_x_times_table_transposed():
  table, _, x = _table_and_tokens()
  got = Embed(VOCAB, FEATURES).apply({'params': {'embedding': table}}, jnp.asarray(x),
                                     method=Embed.attend)
  assert got.shape == (3, 7, VOCAB) and got.dtype == jnp.float32
  want = x.astype(np.float64) @ table.astype(np.float64).T
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # fp32 sums of 16 O(1) products


def test_embed_bf16_dtype_casts_lookup_and_attend():
  table, tokens, x = _table_and_tokens()
  module = Embed(VOCAB, FEATURES, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  assert shapes['params']['embedding'].value.dtype == jnp.float32  # param_dtype stays fp32
  rows = module.apply({'params': {'embedding': table}}, jnp.asarray(tokens))
  assert rows.dtype == jnp.bfloat16
  np.testing.assert_array_equal(_f64(rows), _bf16(table[tokens]))  # a cast of a gather: bitwise
  logits = module.apply({'params': {'embedding': table}}, jnp.asarray(x), method=Embed.attend)
  assert logits.dtype == jnp.bfloat16
  want = _bf16(x) @ _bf16(table).T
  # One bf16 rounding of the output (half an ulp, 2^-8 relative) beside fp32 accumulation.
  err = np.abs(_f64(logits) - want)
  assert (err <= BF16_ROUND * np.abs(want) + 1e-5).all(), err.max()


# ---------------------------------------------------------------------------------------------
# MLP.


def _mlp_config() -> ModelConfig:
  cfg = ModelConfig.from_config(smoke_config()['model'], tokenizer_vocab_size=257)
  assert (cfg.embed_dim, cfg.mlp_dim, cfg.ffn) == (64, 128, 'dense')  # in != out: shapes show
  return cfg


def _mlp_params(cfg: ModelConfig, seed: int) -> dict:
  """Kernels on the shapes init gives, std 1/sqrt(fan_in) so every activation is O(1)."""
  x = jnp.zeros((1, 1, cfg.embed_dim))
  shapes = jax.eval_shape(MLP(cfg).init, jax.random.key(0), x)['params']
  rng = np.random.default_rng(seed)
  return {name: {'kernel': (rng.standard_normal(p['kernel'].value.shape) /
                            np.sqrt(p['kernel'].value.shape[0])).astype(np.float32)}
          for name, p in shapes.items()}


def _llama_mlp(cfg: ModelConfig, params: dict) -> LlamaMLP:
  hf = transformers.LlamaConfig(hidden_size=cfg.embed_dim, intermediate_size=cfg.mlp_dim,
                                hidden_act='silu', mlp_bias=False)
  mlp = LlamaMLP(hf)
  with torch.no_grad():
    for name in ('gate', 'up', 'down'):  # torch keeps [out, in]; our kernels are [in, out]
      getattr(mlp, f'{name}_proj').weight.copy_(_torch(params[name]['kernel'].T))
  return mlp


def test_mlp_is_registered_dense_with_three_bias_free_kernels():
  assert FFN.get('dense') is MLP
  cfg = _mlp_config()
  shapes = jax.eval_shape(MLP(cfg).init, jax.random.key(0), jnp.zeros((1, 1, cfg.embed_dim)))
  got = {name: (p['kernel'].value.shape, p['kernel'].names)
         for name, p in shapes['params'].items()}
  e, m = cfg.embed_dim, cfg.mlp_dim
  assert got == {'gate': ((e, m), ('embed', 'mlp')), 'up': ((e, m), ('embed', 'mlp')),
                 'down': ((m, e), ('mlp', 'embed'))}


def test_mlp_matches_llama_mlp_forward_and_backward():
  cfg = _mlp_config()
  params = _mlp_params(cfg, seed=21)
  rng = np.random.default_rng(22)
  x = rng.standard_normal((2, 5, cfg.embed_dim)).astype(np.float32)
  cot = rng.standard_normal(x.shape).astype(np.float32)

  def loss(params, x):
    out = MLP(cfg).apply({'params': params}, x)
    return jnp.sum(out * cot), out

  (_, out), (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      jax.tree.map(jnp.asarray, params), jnp.asarray(x))
  mlp = _llama_mlp(cfg, params)
  tx = _torch(x).requires_grad_(True)
  t_out = mlp(tx)
  (t_out * _torch(cot)).sum().backward()
  # fp32 both sides, O(1) values, sums of 64-128 terms: agreement to a few fp32 ulps of the
  # largest terms; 1e-5 leaves room for a different summation order, not for a wrong formula.
  tol = dict(rtol=1e-5, atol=1e-5)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, t_out.detach().numpy(), **tol)
  np.testing.assert_allclose(g_x, tx.grad.numpy(), **tol)
  for name in ('gate', 'up', 'down'):
    np.testing.assert_allclose(g_params[name]['kernel'],
                               getattr(mlp, f'{name}_proj').weight.grad.numpy().T, **tol,
                               err_msg=name)


def test_mlp_flops_per_token_counts_the_kernels_it_creates():
  """Each kernel [in, out] costs in·out multiply-adds per token, 2 FLOPs each: counted from the
  shapes init actually creates, not from the formula's embed_dim and mlp_dim."""
  cfg = _mlp_config()
  shapes = jax.eval_shape(MLP(cfg).init, jax.random.key(0), jnp.zeros((1, 1, cfg.embed_dim)))
  kernels = [p.value.shape for p in jax.tree.leaves(
      shapes['params'], is_leaf=lambda p: hasattr(p, 'names'))]
  assert len(kernels) == 3
  assert MLP.flops_per_token(cfg) == sum(2 * int(np.prod(s)) for s in kernels)
  assert MLP.flops_per_token(cfg) == 2 * 3 * 64 * 128  # the smoke shape, worked by hand

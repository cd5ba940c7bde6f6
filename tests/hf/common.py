"""Helpers shared by the Hugging Face parity tests: running both sides, and handling checkpoints.

Each test file keeps what is its family's own (the tiny config, the cases, how a loaded field
dict becomes a ModelConfig); what lives here is the same for every family.
"""

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import torch
import transformers

from efficientjax.model import ModelConfig, Transformer
from tests.helpers import prefill_then_decode  # noqa: F401 (re-exported for the family tests)

# ---------------------------------------------------------------------------------------------
# Both sides' logits.


def random_tokens(vocab: int, length: int, batch: int = 2) -> np.ndarray:
  """[batch, length] int64 token ids (int64: what torch embeddings take)."""
  return np.random.default_rng(1).integers(0, vocab, (batch, length), dtype=np.int64)


def hf_logits(model: transformers.PreTrainedModel, tokens: np.ndarray) -> np.ndarray:
  """transformers' logits [batch, length, vocab] as float32 numpy."""
  with torch.no_grad():
    return model(torch.from_numpy(tokens)).logits.float().numpy()


@functools.cache
def jitted_apply(cfg: ModelConfig):
  # One compile per config, shared by the tests (eager apply costs seconds on 2 CPU cores).
  return jax.jit(Transformer(cfg).apply)


def transformer_logits(cfg: ModelConfig, variables: dict, tokens: np.ndarray) -> np.ndarray:
  """Our logits [batch, length, vocab]; `variables` is {'params': ...} (boxed or not)."""
  return np.asarray(jitted_apply(cfg)(variables, jnp.asarray(tokens)))


def fields_logits(fields: dict, params: dict, tokens: np.ndarray, scan_layers: bool = True
                  ) -> np.ndarray:
  """Our logits of a model built from loaded `model` fields (a dense family's parity check)."""
  cfg = ModelConfig.from_config({**fields, 'scan_layers': scan_layers})
  return transformer_logits(cfg, {'params': params}, tokens)


def moe_model_config(fields: dict, dispatch: str = 'dropless', **changes) -> ModelConfig:
  """The ModelConfig of loaded MoE fields, with the given dispatch."""
  cfg = ModelConfig.from_config(fields)
  # ragged_dot: the grouped matmul every backend runs (the Pallas kernels are tested elsewhere).
  moe = dataclasses.replace(cfg.moe, dispatch=dispatch, grouped_matmul='ragged_dot')
  return dataclasses.replace(cfg, moe=moe, **changes)


def random_variables(cfg: ModelConfig, std: float, bias_std: float | None = None) -> dict:
  """Random float32 values on the shapes `init` gives (boxes included): norm scales N(1, std),
  biases N(0, bias_std or std), everything else N(0, std). Compiling the real random init takes
  seconds on CPU and would test nothing more in an export test."""
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(2)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    scale = bias_std if bias_std is not None and 'bias' in name else std
    return rng.normal(1.0 if 'scale' in name else 0.0, scale, s.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


# ---------------------------------------------------------------------------------------------
# Params and checkpoints.


def leaves(params: dict) -> dict[str, np.ndarray]:
  """The params' leaves by their key path ("['blocks']['attn']['q']['kernel']")."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(p): np.asarray(a) for p, a in flat}


def assert_same_params(params: dict, other: dict):
  """The same leaves, with the same dtypes and bit for bit."""
  a, b = leaves(params), leaves(other)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def save_pretrained(model: transformers.PreTrainedModel, path: Path) -> Path:
  model.save_pretrained(path, safe_serialization=True)
  return path


def read_config(path: Path) -> dict:
  return json.loads((path / 'config.json').read_text())


def tensor_names(path: Path) -> set[str]:
  """The tensor names of a single-file checkpoint."""
  with safetensors.safe_open(path / 'model.safetensors', framework='numpy') as f:
    return set(f.keys())


def copy_with(src: Path, dst: Path, config: dict | None = None, drop_config: tuple = (),
              tensors: dict | None = None, drop_tensors: tuple = (),
              corrupt_weights: bool = False) -> Path:
  """A copy of a checkpoint with config.json keys / tensors changed."""
  shutil.copytree(src, dst, dirs_exist_ok=True)
  hf = read_config(dst)
  hf.update(config or {})
  for key in drop_config:
    hf.pop(key)
  (dst / 'config.json').write_text(json.dumps(hf))
  if tensors or drop_tensors:
    state = safetensors.numpy.load_file(dst / 'model.safetensors')
    state.update(tensors or {})
    for name in drop_tensors:
      state.pop(name)
    safetensors.numpy.save_file(state, dst / 'model.safetensors', metadata={'format': 'pt'})
  if corrupt_weights:
    # Config refusals must come before any weight is read: unreadable weights prove it.
    (dst / 'model.safetensors').write_bytes(b'not a safetensors file')
  return dst

"""The streaming safetensors writer, read back by the safetensors library itself: every tensor's
bytes, dtype and shape, single files and transformers-style shards with their index."""

import json

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from efficientjax.hf import writer


def _tensors():
  rng = np.random.default_rng(0)
  return {
      'a.weight': rng.standard_normal((7, 5)).astype(np.float32),
      'b.weight': rng.standard_normal((3, 4, 2)).astype(ml_dtypes.bfloat16),
      'c.bias': rng.standard_normal(9).astype(np.float16),
      'd.empty': np.zeros((0, 3), np.float32),
      'e.ids': np.arange(6, dtype=np.int64),
  }


def _write(directory, tensors, **kwargs):
  specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
  return writer.write_checkpoint(directory, specs, lambda name: tensors[name], **kwargs)


def _read_all(directory):
  out = {}
  for path in sorted(directory.glob('*.safetensors')):
    with safetensors.safe_open(path, framework='numpy') as f:
      assert f.metadata() == {'format': 'pt'}
      for name in f.keys():
        assert name not in out
        out[name] = f.get_tensor(name)
  return out


def test_a_single_file_reads_back_bit_for_bit(tmp_path):
  tensors = _tensors()
  assert _write(tmp_path, tensors) == [tmp_path / 'model.safetensors']
  back = safetensors.numpy.load_file(tmp_path / 'model.safetensors')
  assert back.keys() == tensors.keys()
  for k, v in tensors.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape
    assert back[k].tobytes() == v.tobytes(), k


def test_shards_and_their_index_as_transformers_writes_them(tmp_path):
  tensors = _tensors()
  # 140 + 48 bytes fit one file, the rest go on: a.weight 140 B, b 48 B, c 18 B, e 48 B.
  files = _write(tmp_path, tensors, max_shard_bytes=190)
  names = [p.name for p in files]
  assert names == ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
  index = json.loads((tmp_path / 'model.safetensors.index.json').read_text())
  assert index['metadata']['total_size'] == sum(v.nbytes for v in tensors.values())
  assert index['weight_map'] == {'a.weight': names[0], 'b.weight': names[0],
                                 'c.bias': names[1], 'd.empty': names[1], 'e.ids': names[1]}
  back = _read_all(tmp_path)
  for k, v in tensors.items():
    assert back[k].tobytes() == v.tobytes() and back[k].dtype == v.dtype, k


def test_a_tensor_larger_than_a_shard_gets_a_file_of_its_own():
  specs = [('x', (10,), np.float32), ('big', (100,), np.float32), ('y', (10,), np.float32)]
  assert [[s[0] for s in f] for f in writer.shard(specs, 100)] == [['x'], ['big'], ['y']]


def test_a_new_export_replaces_the_old_layout_and_leaves_other_files(tmp_path):
  tensors = _tensors()
  mine = ['model_ema.safetensors', 'model-best.safetensors', 'tokenizer.json']
  for name in mine:
    (tmp_path / name).write_text('the user\'s')
  _write(tmp_path, tensors, max_shard_bytes=100)
  _write(tmp_path, tensors)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(['model.safetensors', *mine])
  _write(tmp_path, tensors, max_shard_bytes=100)
  assert not (tmp_path / 'model.safetensors').exists()
  assert all((tmp_path / name).read_text() == 'the user\'s' for name in mine)


def test_an_export_that_fails_part_way_leaves_the_earlier_one_whole(tmp_path):
  """A tensor that fails in the last file: no file of the new export is in place, no temporary
  is left, and the earlier sharded checkpoint still reads back bit for bit."""
  tensors = _tensors()
  _write(tmp_path, tensors, max_shard_bytes=190)  # two files and the index
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  changed = {k: v + 1 if v.dtype != np.int64 else v for k, v in tensors.items()}

  def produce(name):
    if name == 'e.ids':  # in the second file
      raise OSError('disk full')
    return changed[name]
  specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
  with pytest.raises(OSError, match='disk full'):
    writer.write_checkpoint(tmp_path, specs, produce, max_shard_bytes=190)
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_tensor_that_disagrees_with_its_header_leaves_no_file(tmp_path):
  specs = [('a', (2, 3), np.float32)]
  with pytest.raises(ValueError, match="tensor 'a' came out float32\\[3, 2\\]"):
    writer.write_checkpoint(tmp_path, specs, lambda name: np.zeros((3, 2), np.float32))
  assert list(tmp_path.iterdir()) == []


def test_a_sharded_export_loads_in_transformers_and_back(tmp_path):
  """A Llama exported in several files with their index: transformers' from_pretrained gives
  the logits of the model, and load_checkpoint reads the params back bit for bit."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from efficientjax.hf import load_llama, save_llama  # pylint: disable=g-import-not-at-top
  from efficientjax.model import ModelConfig  # pylint: disable=g-import-not-at-top
  from tests.hf.common import (assert_same_params, hf_logits, random_tokens,  # pylint: disable=g-import-not-at-top
                               random_variables, transformer_logits)
  cfg = ModelConfig(vocab_size=128, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, mlp_dim=96)
  variables = random_variables(cfg, std=0.1)
  # 40 KB files: the 32 KB embedding alone, then a few layer matrices each.
  save_llama(tmp_path, variables, cfg, max_shard_bytes=40_000)
  shards = sorted(p.name for p in tmp_path.glob('*.safetensors'))
  assert len(shards) > 3 and shards[0] == f'model-00001-of-{len(shards):05d}.safetensors'
  assert (tmp_path / 'model.safetensors.index.json').exists()
  tokens = random_tokens(128, 12)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  ours = transformer_logits(cfg, variables, tokens)
  np.testing.assert_allclose(hf_logits(torch_model.eval(), tokens), ours, atol=1e-4, rtol=0)
  _, params = load_llama(tmp_path)
  assert_same_params(params, jax_unbox(variables['params']))
  del dataclasses


def jax_unbox(tree):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return nn.unbox(tree)


def test_exporting_holds_one_tensor_beside_the_params():
  """Peak host memory of a real export (a 60M-parameter Llama, float32, one file), measured by
  the kernel's high-water mark in a fresh process: the params count 1.0 of the weight bytes,
  and the whole export stays under 1.5, which making the file's tensors first and then writing
  them (as safetensors.numpy.save_file needs) exceeds (planted once, by hand)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  with tempfile.TemporaryDirectory() as d:
    proc = subprocess.run(
        [sys.executable, '-c', 'import sys; from experiments import bench_export as b; '
         'b._child(sys.argv[1:])', '60', 'float32', str(10**10), d],
        cwd=root, capture_output=True, text=True, timeout=300,
        env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''})
  assert proc.returncode == 0, proc.stderr
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  assert row['files'] == 1
  assert row['peak_over_weight_bytes'] < 1.5, row

"""The record's own fields (README.md, "The result record"), against independent readings.

What this proves: `config_hash` is the sha256 of the config's canonical JSON, so equal configs
hash equal whatever their key order and any changed value changes it; `new_record` gives schema
version 1, a 32-hex run id and a UTC time of now; `write_record` appends one strict-JSON line
per record and refuses NaN; `git_commit` is the checkout's HEAD as git itself reports it, with
'-dirty' exactly when tracked files have local changes; and the defaults docs/metrics.md names
(the sampler's 0.1 s) are the ones configs/base.py sets.
"""

import datetime
import hashlib
import json
import math
import os
import re
import subprocess

import pytest

from configs import base
from efficientjax.metrics import record as records
from efficientjax.metrics.sampler import Sampler

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_config_hash_is_sha256_of_canonical_json():
  config = {'train': {'steps': 7, 'lr': 3e-4}, 'model': {'attention': 'gqa'}}
  reordered = {'model': {'attention': 'gqa'}, 'train': {'lr': 3e-4, 'steps': 7}}
  # Canonical: keys sorted at every level, json's default separators.
  canonical = '{"model": {"attention": "gqa"}, "train": {"lr": 0.0003, "steps": 7}}'
  want = hashlib.sha256(canonical.encode()).hexdigest()
  assert records.config_hash(config) == records.config_hash(reordered) == want
  assert records.config_hash({**config, 'train': {'steps': 8, 'lr': 3e-4}}) != want


def test_new_record_fields():
  before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
  config = {'b': 1, 'a': {'c': 2}}
  r = records.new_record('pretrain', config)
  after = datetime.datetime.now(datetime.timezone.utc)
  assert r['schema_version'] == 1 and r['kind'] == 'pretrain'
  assert re.fullmatch('[0-9a-f]{32}', r['run_id'])
  assert records.new_record('pretrain', config)['run_id'] != r['run_id']
  created = datetime.datetime.fromisoformat(r['created_at'])
  assert created.utcoffset() == datetime.timedelta(0)  # UTC, and says so
  assert before <= created <= after
  assert r['config'] == config and r['config'] is not config
  assert r['config_hash'] == records.config_hash(config)


def test_write_record_appends_strict_json_lines(tmp_path):
  path = records.write_record(str(tmp_path), {'kind': 'pretrain', 'n': 1})
  records.write_record(str(tmp_path), {'kind': 'pretrain', 'n': 2, 'x': None})
  assert path == str(tmp_path / 'results.jsonl')
  with open(path) as f:
    lines = f.read().splitlines()
  assert [json.loads(line) for line in lines] == [{'kind': 'pretrain', 'n': 1},
                                                  {'kind': 'pretrain', 'n': 2, 'x': None}]
  with pytest.raises(ValueError):  # NaN is not JSON: a non-finite metric must be null
    records.write_record(str(tmp_path), {'kind': 'pretrain', 'loss': math.nan})
  assert len(records.read_records(path)) == 2


def _git(*args):
  return subprocess.run(['git', *args], cwd=ROOT, capture_output=True, text=True,
                        check=True).stdout.strip()


def test_git_commit_is_head_and_says_dirty():
  try:
    head = _git('rev-parse', 'HEAD')
    dirty = bool(_git('status', '--porcelain', '--untracked-files=no'))
  except (OSError, subprocess.CalledProcessError):
    pytest.skip('not a git checkout')
  assert records.git_commit() == head + ('-dirty' if dirty else '')


def test_documented_defaults():
  # docs/metrics.md: metrics.sample_interval_s, default 0.1 s; no peak unless configured.
  config = base.get_config()
  assert config.metrics.sample_interval_s == 0.1
  assert config.metrics.peak_flops_per_s is None
  assert Sampler(devices=[]).interval_s == 0.1

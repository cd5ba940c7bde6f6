"""Checks that test_moe_gmm_races.py fails when a synchronisation the Mosaic kernels need is
taken out: each hazard below is seeded into a copy of the tree, whose race tests must fail.

    python -m tests.kernels.seeded_races

Not collected by pytest (each seed re-runs the race tests in a subprocess, ~10 s). On jax
0.11 every seed must be caught; jax 0.10's interpreter sees only the two that are warpgroup
loads and stores of shared memory (the rest involve asynchronous TMA stores or the proxy
fence, which it does not model). Exits 1 if a seed the installed jax should see goes unseen.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax

ROOT = pathlib.Path(__file__).resolve().parents[2]
KERNEL = 'kernels/moe_gmm/mosaic_gpu.py'

# name: (a line of mosaic_gpu.py, what replaces it, seen by jax 0.10 too)
SEEDS = {
    'gmm: staging buffer rewritten while the previous tile stores': (
        "          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores\n",
        '', False),
    'gmm: store issued without the proxy fence': (
        '          o_smem[...] = acc.astype(out_dtype)\n          plgpu.commit_smem()\n',
        '          o_smem[...] = acc.astype(out_dtype)\n', False),
    'ws gmm: staging buffer rewritten while the previous tile stores': (
        "          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # this consumer's previous "
        'stores\n', '', False),
    'ws gmm: both consumers stage in one buffer': (
        '          slot = o_smem.at[jnp.minimum(wg, 1)]\n', '          slot = o_smem.at[0]\n',
        True),
    'tgmm: staging buffer rewritten while the previous tile stores': (
        "        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store\n",
        '', False),
    'tgmm: masked rows not fenced before the wgmma': (
        '  a_smem[...] = jnp.where(keep, a_smem[...], jnp.zeros_like(a_smem[...]))\n'
        '  plgpu.commit_smem()\n',
        '  a_smem[...] = jnp.where(keep, a_smem[...], jnp.zeros_like(a_smem[...]))\n', False),
    'ws tgmm: staging buffer rewritten while the previous tile stores': (
        "            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # my previous tile's store\n",
        '', False),
    'ws tgmm: a consumer masks the whole shared block': (
        '            _zero_rows_outside(a_mine, block * block_m, start, end)\n',
        '            _zero_rows_outside(a_smem, block * block_m, start, end)\n', True),
}


def main() -> int:
  source = (ROOT / KERNEL).read_text()
  sees_async = jax.__version_info__ >= (0, 11)
  missed, as_expected = [], 0
  for name, (line, replacement, seen_by_0_10) in SEEDS.items():
    if source.count(line) != 1:
      print(f'{name}: the line to seed is not in {KERNEL} exactly once; update SEEDS')
      return 2
    with tempfile.TemporaryDirectory() as tmp:
      tree = pathlib.Path(tmp) / 'tree'
      shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
          '.git', '.venv', '.whl', '*.egg-info', '__pycache__', 'results'))
      (tree / KERNEL).write_text(source.replace(line, replacement))
      run = subprocess.run(
          [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-p', 'no:warnings',
           'tests/kernels/test_moe_gmm_races.py', '-k', 'gmm_has_no_races'],
          cwd=tree, capture_output=True, text=True,
          env=dict(os.environ, PYTHONPATH=str(tree)))  # the seeded copy, not an installed tree
    caught = run.returncode == 1 and 'RACE DETECTED' in run.stdout
    expected = sees_async or seen_by_0_10
    as_expected += caught == expected
    print(f"{'caught' if caught else 'unseen'}{'' if caught == expected else ' (!)'}: {name}")
    if expected and not caught:
      missed.append(name)
  print(f'jax {jax.__version__}: {as_expected} of {len(SEEDS)} as expected, '
        f'{len(missed)} expected and unseen')
  return 1 if missed else 0


if __name__ == '__main__':
  sys.exit(main())

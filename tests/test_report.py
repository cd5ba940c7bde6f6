"""experiments/report.py: tables, ranks, plots and the page, from committed fixture records.

What this proves, against values computed by hand from tests/data/report/ (README there):
- every results.jsonl (and *.results.jsonl) under a folder is read, records group into study
  points (a seed recorded twice keeps its latest record), blocks split by axis and environment,
  and points outside a study are labelled by what differs between their configs;
- cells hold mean ± sample std over repeats (none at n = 1) and MLPerf's olympic mean at
  n >= 5; a null shows as — with the record's reason in a footnote, never 0; memory says
  whether it is the device's peak or the host's RSS;
- EfficientLLM's within-block ranks (direction per metric, ties sharing a place) and the
  min-max scores the radar charts draw; the Pareto front;
- the portability table (one config hash on two environments) and the eager-vs-jit table
  (a record from before `execution` counts as jit), both timings and their ratio;
- every plot is a PNG with colour in it, a plot whose cost is null everywhere is not drawn and
  the page says why, the output is the same bytes twice, an empty folder is a clear error;
- the page opens in a real headless Chromium: its DOM holds the tables' text and one <img> per
  plot, and its screenshot shows every plot's coloured pixels and the tables' header cells.
"""

import csv
import glob
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from matplotlib import image as mpimg

from experiments import report, report_html

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'report')
GPU = 'NVIDIA H100 80GB HBM3 (gpu, jax 0.11.2)'
CPU = 'cpu (cpu, jax 0.10.2)'
JIT_MHA = 'execution=jit, model.attention=mha'
EAGER_MHA = 'execution=eager, model.attention=mha'
JIT_GQA = 'execution=jit, model.attention=gqa'


@pytest.fixture(scope='module')
def files():
  return report.find_record_files([DATA])


@pytest.fixture(scope='module')
def built(files):
  return report.build_report(report.load_records(files), sources=files)


@pytest.fixture(scope='module')
def out(built, tmp_path_factory):
  d = tmp_path_factory.mktemp('report')
  report.write_report(built, str(d))
  return d


def _block(built, title):
  (b,) = [b for b in built.blocks if b.block.title == title]
  return b


def _cells(table):
  """{point: {header without its footnote mark: cell}}."""
  heads = [h.split(' [')[0] for h in table.headers]
  return {row[0]: dict(zip(heads, row)) for row in table.rows}


def _footnote(table, cell):
  """The footnote texts a cell (or header) points at."""
  marks = [int(m) for m in re.findall(r'\[(\d+)\]', cell)]
  return [table.footnotes[m - 1] for m in marks]


def test_reads_every_record_file_under_the_folder(files, built):
  rel = [os.path.relpath(f, DATA) for f in files]
  assert rel == ['adhoc/results.jsonl', 'attention_small/gqa/results.jsonl',
                 'attention_small/mha/results.jsonl', 'attention_small/mqa/results.jsonl',
                 'execution_small/results.jsonl', 'h100/quickstart.results.jsonl',
                 'precision_small/_init/results.jsonl', 'precision_small/results.jsonl']
  assert built.record_count == 20 and built.setup_runs == 1


def test_points_blocks_and_labels(built):
  assert [b.block.title for b in built.blocks] == [
      'attention', 'execution', 'precision', f'pretrain · {GPU}', f'pretrain · {CPU}']
  got = {b.block.title: {p.label: p.n for p in b.block.points} for b in built.blocks}
  assert got == {
      'attention': {'gqa': 2, 'mha': 5, 'mqa': 1},
      'execution': {'mha,eager': 1, 'mha,jit': 1},
      'precision': {'bf16': 2, 'int8': 2},
      f'pretrain · {GPU}': {JIT_MHA: 1},
      f'pretrain · {CPU}': {EAGER_MHA: 1, JIT_GQA: 1, JIT_MHA: 1},
  }
  # gqa's seed 1 was recorded twice: the later record counts, the page says one was left out.
  gqa = [p for p in _block(built, 'attention').block.points if p.label == 'gqa'][0]
  assert gqa.duplicates == 1
  assert [r['config']['seed'] for r in gqa.records] == [0, 1]
  assert 'left out (latest kept): gqa: 1' in _block(built, 'attention').tables[0].note


def test_labels_outside_a_study_stay_distinct():
  """Configs that differ only by a section one of them lacks (an older record) label alike by
  their differing keys; a digest of the config tells them apart."""
  env = {'device_kind': 'cpu', 'backend': 'cpu', 'jax': '0.10.2'}
  old = {'kind': 'pretrain', 'config': {'kind': 'pretrain', 'seed': 0,
                                        'model': {'attention': 'mha'}}, 'metrics': {}, 'env': env}
  new = {**old, 'config': {**old['config'], 'finetune': {'rank': 8}}}
  gqa = {**old, 'config': {**old['config'], 'model': {'attention': 'gqa'}}}
  labels = [p.label for p in report.group_points([old, new, gqa])]
  assert labels[0] == 'model.attention=gqa'
  assert labels[1].startswith('model.attention=mha (config ')
  assert labels[2].startswith('model.attention=mha (config ') and labels[1] != labels[2]


def test_mean_spread_and_olympic_mean(built):
  mha = [p for p in _block(built, 'attention').block.points if p.label == 'mha'][0]
  s = mha.stats(report.column('pretrain', 'step_p50_ms'))
  # step p50 100, 102, 104, 110, 130 ms: squared deviations from 109.2 sum to 596.8.
  assert s.n == 5 and s.min == 100 and s.max == 130
  assert s.mean == pytest.approx(109.2)
  assert s.std == pytest.approx(math.sqrt(596.8 / 4))          # 12.2147, sample (n - 1)
  assert s.olympic == pytest.approx((102 + 104 + 110) / 3)     # 105.333: 100 and 130 dropped
  cells = _cells(_block(built, 'attention').tables[0])
  assert cells['mha']['step p50 (ms)'] == '109 ± 12 (olympic 105)'
  assert cells['mha']['eval loss'] == '2.500 ± 0.016 (olympic 2.500)'      # sqrt(0.001 / 4)
  assert cells['mha']['tokens/s'] == '37000 ± 3500 (olympic 38000)'      # sqrt(50e6 / 4)
  # gqa: two repeats (its stale duplicate, 999 ms, is not among them); mqa: one, no spread.
  assert cells['gqa']['step p50 (ms)'] == '92.0 ± 2.8'                    # sqrt(8)
  assert cells['gqa']['eval loss'] == '2.560 ± 0.014'
  assert cells['mqa']['step p50 (ms)'] == '85'
  assert cells['mqa']['n'] == '1' and cells['mha']['n'] == '5'


def test_null_is_a_dash_with_the_records_reason(built):
  table = _block(built, 'attention').tables[0]
  cells = _cells(table)
  assert cells['gqa']['J/token'].startswith('— [')
  assert _footnote(table, cells['gqa']['J/token']) == [
      'J/token: NVML energy counter not supported on this device (fixture)']
  for point in ('gqa', 'mha', 'mqa'):
    assert cells[point]['MCR'].startswith('— [')
    assert 'compresses nothing' in _footnote(table, cells[point]['MCR'])[0]
  assert all(c != '0' and not c.startswith('0 ') for row in table.rows for c in row)
  # A value the record flags (energy over too short a window) is shown, with the flag.
  assert cells['mqa']['J/token'].startswith('0.008 [')
  assert _footnote(table, cells['mqa']['J/token']) == [
      'J/token: flagged unreliable by the record: the window is under 10 counter updates '
      '(fixture)']
  # Memory says where it comes from: the device's allocator here, the host's RSS on the CPU.
  mem = [h for h in table.headers if h.startswith('peak memory (GiB)')][0]
  assert 'device allocator peak' in _footnote(table, mem)[0]
  cpu = _block(built, 'precision').tables[0]
  mem = [h for h in cpu.headers if h.startswith('peak memory (GiB)')][0]
  assert 'host resident-set peak' in _footnote(cpu, mem)[0]
  assert _cells(cpu)['int8']['peak memory (GiB)'] == '0.625 ± 0'
  assert _cells(cpu)['int8']['MBU (%)'].startswith('— [')
  # The CSV keeps the number and the reason apart.
  rows = {r['point']: r for r in csv.DictReader(table.csv().splitlines())}
  assert rows['gqa']['joules_per_token mean'] == ''
  assert rows['gqa']['joules_per_token null reason'].startswith('NVML energy counter')
  assert float(rows['mha']['step_p50_ms olympic']) == pytest.approx(316 / 3)
  assert float(rows['mha']['step_p50_ms std']) == pytest.approx(math.sqrt(149.2))


def test_within_block_ranks_and_scores(built):
  attention = _block(built, 'attention').block
  assert attention.ranks() == {
      'quality': {'gqa': 2, 'mha': 1, 'mqa': 3},        # eval loss 2.56, 2.50, 2.60
      'memory': {'gqa': 2, 'mha': 3, 'mqa': 1},         # 3, 4, 2.5 GiB
      'compute': {'gqa': 1, 'mha': 1, 'mqa': 3},        # MFU 50, 50, 25 %: a tie
      'latency': {'gqa': 2, 'mha': 3, 'mqa': 1},        # 92, 109.2, 85 ms
      'throughput': {'gqa': 2, 'mha': 3, 'mqa': 1},     # 0.044, 0.037, 0.048 tokens/param/s
      'energy': {'gqa': None, 'mha': 2, 'mqa': 1},      # null, 0.010, 0.008 J/token
      'compression': {'gqa': None, 'mha': None, 'mqa': None},
  }
  scores = attention.scores()
  want = {
      'quality': {'gqa': 0.4, 'mha': 1.0, 'mqa': 0.0},             # (2.60 - v) / 0.10
      'memory': {'gqa': 2 / 3, 'mha': 0.0, 'mqa': 1.0},            # (4 - v) / 1.5
      'compute': {'gqa': 1.0, 'mha': 1.0, 'mqa': 0.0},             # (v - 25) / 25
      'latency': {'gqa': 17.2 / 24.2, 'mha': 0.0, 'mqa': 1.0},     # (109.2 - v) / 24.2
      'throughput': {'gqa': 7 / 11, 'mha': 0.0, 'mqa': 1.0},       # (v - 0.037) / 0.011
      'energy': {'gqa': None, 'mha': 0.0, 'mqa': 1.0},
  }
  for group, per_point in want.items():
    for point, v in per_point.items():
      assert scores[group][point] == (None if v is None else pytest.approx(v)), (group, point)
  ranks = _cells(_block(built, 'attention').tables[1])
  assert ranks['gqa']['compute: MFU (%) (higher is better)'] == '1 (1.00)'
  assert ranks['gqa']['energy: J/token (lower is better)'] == '—'

  precision = _block(built, 'precision').block
  assert precision.ranks() == {
      'quality': {'bf16': 1, 'int8': 2},        # perplexity 14.79, 14.83
      'memory': {'bf16': 2, 'int8': 1},         # 0.75, 0.625 GiB
      'compute': {'bf16': None, 'int8': None},  # MBU null on a CPU
      'latency': {'bf16': 2, 'int8': 1},        # TPOT 10.2, 9.1 ms
      'throughput': {'bf16': 2, 'int8': 1},     # 740, 810 output tokens/s
      'energy': {'bf16': None, 'int8': None},
      'compression': {'bf16': 2, 'int8': 1},    # MCR 1.0, 1.81
  }


def test_statistics_rank_and_front_rules():
  # Olympic mean: five or more repeats, the single highest and lowest dropped.
  assert report.olympic_mean([1.0, 2.0, 3.0, 4.0, 100.0]) == 3.0
  assert report.olympic_mean([1.0, 2.0, 3.0, 4.0, 4.0, 100.0]) == 3.25
  assert report.olympic_mean([1.0, 2.0, 3.0, 10.0]) is None
  assert report.summarize([1.0, 2.0, 3.0, 10.0]).olympic is None
  assert report.summarize([7.0]).std is None
  values = {'a': 3.0, 'b': 1.0, 'c': 1.0, 'd': 2.0, 'e': None}
  assert report.competition_ranks(values, higher_is_better=True) == {
      'a': 1, 'b': 3, 'c': 3, 'd': 2, 'e': None}
  assert report.competition_ranks(values, higher_is_better=False) == {
      'a': 4, 'b': 1, 'c': 1, 'd': 3, 'e': None}
  # b beats c in both and d in quality at equal cost; a trades cost for quality with b.
  assert report.pareto_front({'a': (1, 3), 'b': (2, 2), 'c': (3, 3), 'd': (2, 2.5)}) == ['a', 'b']


def test_pareto_front_of_a_block(built):
  b = _block(built, f'pretrain · {CPU}').block
  lat, q = report.ranked('pretrain', 'latency'), report.ranked('pretrain', 'quality')
  pts = {p.label: (p.stats(lat).mean, p.stats(q).mean) for p in b.points}
  assert pts == {EAGER_MHA: (2000, 2.6), JIT_GQA: (450, 2.7), JIT_MHA: (500, 2.6)}
  assert report.pareto_front(pts) == [JIT_GQA, JIT_MHA]  # eager: slower, no better


def test_portability_table(built):
  (table,) = built.portability
  assert table.slug == 'portability'
  assert [r[:7] for r in table.rows] == [
      ['model.attention=mha', 'a' * 12, GPU, '1', '2.61', '30', '136533'],
      ['model.attention=mha', 'a' * 12, CPU, '1', '2.6', '500', '8192'],
  ]
  assert table.csv_rows[1][-1] == pytest.approx(500 / 30)  # CPU step time ÷ the H100's


def test_eager_vs_jit_table(built):
  (table,) = built.eager_jit
  study, loose = [dict(zip(table.headers, row)) for row in table.rows]
  # A study's grid over execution: points 'mha,jit' and 'mha,eager' pair up as 'mha'.
  assert study['point'] == 'mha'
  assert study['step p50 (ms): jit'] == '300' and study['step p50 (ms): eager'] == '900'
  assert study['step p50: eager ÷ jit'] == '3' and study['tokens/s: eager ÷ jit'] == '0.333'
  cells = loose
  assert cells['point'] == 'model.attention=mha' and cells['environment'] == CPU
  # The jit side is the record from before `execution` existed.
  assert cells['step p50 (ms): jit'] == '500' and cells['step p50 (ms): eager'] == '2000'
  assert cells['step p50: eager ÷ jit'] == '4'
  assert cells['tokens/s: jit'] == '8192' and cells['tokens/s: eager'] == '2048'
  assert cells['tokens/s: eager ÷ jit'] == '0.25'
  assert cells['eval loss: jit'] == cells['eval loss: eager'] == '2.6'


def _saturated(path):
  rgb = mpimg.imread(path)[..., :3]
  return int(((rgb.max(-1) - rgb.min(-1)) > 0.25).sum())


def test_files_and_plots_written(built, out):
  names = sorted(os.listdir(out))
  for t in built.tables:
    assert f'{t.slug}.md' in names and f'{t.slug}.csv' in names
  assert 'index.html' in names
  pngs = sorted(p.name for p in out.glob('*.png'))
  drawn = sorted(f'{p.name}.png' for p in built.plots if p.png is not None)
  assert pngs == drawn and len(pngs) == 16
  for name in pngs:
    img = mpimg.imread(out / name)
    assert img.shape[0] > 200 and img.shape[1] > 200, name
    assert _saturated(out / name) > 50, name  # points and lines in colour: not a blank axes
  # Energy is null for every point of the CPU blocks: those Pareto plots are not drawn, and
  # the page says why; a one-point block has no radar.
  skipped = {p.name: p.skipped for p in built.plots if p.png is None}
  assert set(skipped) == {'pareto_precision_energy', 'pareto_execution_energy',
                          f'pareto_{_slug(f"pretrain · {CPU}")}_energy',
                          f'radar_{_slug(f"pretrain · {GPU}")}'}
  assert 'no readable RAPL counters' in skipped['pareto_precision_energy']
  page = (out / 'index.html').read_text()
  assert 'J/output token is null for every point: no readable RAPL counters' in page
  assert 'one point: nothing to normalise against' in page
  assert "Left out: 1 set-up runs (study point &#x27;_init&#x27;" in page
  md = (out / 'attention.md').read_text()
  assert '| mha | 5 | 2.500 ± 0.016 (olympic 2.500) |' in md


def _slug(title):
  return report._slug(title)  # pylint: disable=protected-access


def test_same_records_same_bytes(built, out, tmp_path):
  again = report.build_report(report.load_records(report.find_record_files([DATA])),
                              sources=built.sources)
  report.write_report(again, str(tmp_path))
  for path in sorted(out.iterdir()):
    assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
  (tmp_path / 'empty').mkdir()
  assert report.main([str(tmp_path / 'empty'), f'--out={tmp_path / "out"}']) == 2
  err = capsys.readouterr().err
  assert f'{tmp_path / "empty"}: no results.jsonl under it' in err
  assert not (tmp_path / 'out').exists()
  assert report.main([str(tmp_path / 'missing'), f'--out={tmp_path / "out"}']) == 2
  assert 'no such directory' in capsys.readouterr().err


def test_cli_writes_the_page(tmp_path, capsys):
  assert report.main([DATA, f'--out={tmp_path}']) == 0
  assert '20 records from 8 files' in capsys.readouterr().out
  assert (tmp_path / 'index.html').stat().st_size > 50_000  # the plots are inside it


def _chromium():
  for name in ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable'):
    if shutil.which(name):
      return shutil.which(name)
  return '/usr/bin/chromium' if os.path.exists('/usr/bin/chromium') else None


def _packed(path):
  """The image's pixels as 0xRRGGBB integers."""
  rgb = (mpimg.imread(path)[..., :3] * 255).round().astype(np.int32)
  return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _tab10_pixels(packed):
  """Pixels in the plots' first five colours exactly: nothing else on the page uses them."""
  return int(np.isin(packed, [int(c[1:], 16) for c in report_html.COLORS[:5]]).sum())


def test_page_in_headless_chromium(built, out, tmp_path):
  browser = _chromium()
  if browser is None:
    pytest.skip('no Chromium binary (chromium, chromium-browser, google-chrome); .ci/run '
                'installs Debian\'s chromium where it runs as root')
  url = 'file://' + str(out / 'index.html')
  flags = [browser, '--headless', '--no-sandbox', '--disable-gpu',
           '--disable-background-networking', '--disable-component-update', '--disable-sync',
           '--no-first-run', '--hide-scrollbars', '--force-device-scale-factor=1',
           '--disable-dev-shm-usage']  # containers' /dev/shm is often 64 MB

  dom = subprocess.run(flags + [f'--user-data-dir={tmp_path / "a"}', '--dump-dom', url],
                       capture_output=True, text=True, timeout=120, check=True).stdout
  assert dom.count('<img src="data:image/png;base64,') == len(glob.glob(str(out / '*.png')))
  for text in ('attention: values', 'attention: ranks', 'Portability (pretrain)',
               'Eager vs jit (pretrain)', '109 ± 12 (olympic 105)',
               'NVML energy counter not supported on this device (fixture)'):
    assert text in dom, text
  assert dom.count('<table>') == len(built.tables)

  shot = tmp_path / 'shot.png'
  subprocess.run(flags + [f'--user-data-dir={tmp_path / "b"}', f'--screenshot={shot}',
                          '--window-size=1600,9000', url],
                 capture_output=True, text=True, timeout=120, check=True)
  screen = _packed(shot)
  rows = np.nonzero((screen != 0xffffff).any(-1))[0]
  assert rows.max() < screen.shape[0] - 50, 'the page is taller than the screenshot'
  # Every plot's coloured pixels are on the screen (drawn at their own size, 1:1) ...
  in_plots = sum(_tab10_pixels(_packed(p)) for p in sorted(out.glob('*.png')))
  assert in_plots > 2000
  assert _tab10_pixels(screen) >= 0.95 * in_plots
  # ... and so are the tables: their header cells' grey (#f0f0f0), row after row of it.
  assert int((screen == 0xf0f0f0).sum()) > 100_000


def test_cells_round_to_what_the_repeats_resolve():
  """A spread to two figures and the mean to its last digit; repeats equal but for the sum's
  rounding (a seed-independent quality) show six figures and ± 0, not 16 digits of noise."""
  cell = lambda values: report.stats_cell(report.summarize(values), len(values))
  assert cell([109.0, 121.0, 97.0]) == '109 ± 12'                       # std 12
  assert cell([14.7801770688881, 14.780177068888102, 14.7801770688881]) == '14.7802 ± 0'
  assert cell([1.00003, 1.00003]) == '1.00003 ± 0'
  assert cell([2.5]) == '2.5'                                            # n = 1: no spread

"""A study's report, built from result records alone: tables, ranks, Pareto and radar plots.

    python -m experiments.report DIR [DIR ...] --out=OUTDIR

reads every `results.jsonl` (and `*.results.jsonl`) under the DIRs, recursively, and writes
OUTDIR/index.html (one self-contained page: inline CSS, plots as base64 PNG, nothing fetched),
OUTDIR/<table>.md and .csv for every table and OUTDIR/<plot>.png for every plot. The same
steps are functions of a list of record dicts (`build_report`, `write_report`), for tests and
for other scripts.

**Study points.** A record whose `config.study.point` is set belongs to the point
(study.name, study.point, execution); any other record to the point of its config less `seed`
and `study.repeat`. Points are also split by environment (device kind, backend, jax version):
repeats on different machines are not repeats of one measurement (the portability table
compares them instead). Repeats are a point's records, one per seed (a seed recorded twice
keeps its latest record; the page says how many it left out). A point with no study name is
labelled by what differs between the configs of its axis (`model.attention=gqa`).

**Blocks.** A point is ranked within its block: `study.axis` (else the record's kind), split
further by kind and by environment where an axis spans several.

**Values.** Every cell is the mean over repeats ± the sample standard deviation (n - 1 in the
denominator; none for n = 1), and MLPerf's olympic mean where n >= 5: the single highest and
lowest repeats dropped, the rest averaged (MLPerf Training's rule for scoring a benchmark's
repeated runs). A value a record holds as null is shown as "—" with the record's reason in a
footnote, never as 0; a mean over fewer repeats than the point has says so, `(n=k)`.

What each column reads is `COLUMNS` below (docs/metrics.md defines the fields). Memory is the
device allocator's peak where the device reports one, else (a CPU: `memory_stats()` is None)
the process's resident-set peak, and a footnote says which.

**Ranks** follow EfficientLLM (arXiv 2505.13840). Its ranking table (Figure 2; the project
page https://dlyuangod.github.io/EfficientLLM, "Ranking") ranks the techniques of one
category (a block here: the attention variants, the positional encodings, the PEFT methods at
one model size, the precisions at one size) against each other, per metric, 1 = best ("lower
ranking" is better, alphaxiv's overview of Figure 2), with tied techniques sharing a rank (the
table's columns repeat ranks). We rank the same way: per block and per metric, on the means,
in the metric's direction (lower is better for memory, latency, energy and loss/perplexity;
higher for compute utilisation, throughput, MCR), ties (equal to 1e-9 relative) sharing the
best of their places (competition ranking: 1, 2, 2, 4). The metric that ranks each of the six
groups is the paper's: AMU → peak memory, PCU → MFU (training) or MBU (serving), AL → step
time (training) or time per output token (serving), TT / ST → tokens / samples per parameter
per second (pretraining / fine-tuning), IT → output tokens per second (serving), MCR → MCR.
One deviation: the paper's AEC is average power (W); we rank energy by joules per token,
because average power alone ranks a slower run of the same work as better (avg power is in the
table beside it).

**Normalisation.** The paper draws radar charts over normalised metrics (Figures 3–5) and
combines them into an "efficiency score", a weighted harmonic mean (its Appendix, Eqs. 10–12,
as summarised at github.com/bzhng-development/summary-of-some-paper-in-cuda,
docs/evaluation/EFFICIENTLLM-…ONARCH.md). The normalisation formulas themselves were not found
in any source reachable here, so this report uses min–max within the block with the direction
applied: score = (v − min) / (max − min) where higher is better, (max − v) / (max − min) where
lower is; 1 is the block's best, 0 its worst, and a metric equal across the block scores 1.
"""

import argparse
import copy
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

GIB = 2.0 ** 30
GROUPS = ('memory', 'compute', 'latency', 'throughput', 'energy', 'compression')  # the six
RECORD_FILES = re.compile(r'(^|\.)results\.jsonl$')  # results.jsonl, quickstart.results.jsonl
TIE_REL = 1e-9
# The study point of a sweep's set-up run (its `init_from`: experiments/sweep.py's INIT): the
# run the points start from, not a point; reports leave it out and say so.
SETUP_POINT = '_init'


def _dig(record: Mapping[str, Any], path: str) -> Any:
  """record['a']['b']... for path 'a.b...'; None where any step is missing or null."""
  node: Any = record
  for part in path.split('.'):
    if not isinstance(node, Mapping) or node.get(part) is None:
      return None
    node = node[part]
  return node


# ----------------------------------------------------------------------------- columns


@dataclasses.dataclass(frozen=True)
class Column:
  """One measured quantity of a record, as a table shows it."""
  name: str                     # id, used in CSV headers
  header: str                   # what the table calls it, with its unit
  group: str                    # 'quality' or one of GROUPS
  path: str                     # the record field (docs/metrics.md)
  higher_is_better: bool
  ranked: bool = False          # the group's metric that ranks and normalises (one per group)
  scale: float = 1.0            # display unit: value = field * scale

  def value(self, record: Mapping[str, Any]) -> float | None:
    v = _dig(record, self.path)
    return None if v is None else float(v) * self.scale

  def reason(self, record: Mapping[str, Any]) -> str:
    """Why the record holds null here: its metric group's own reason where it gives one."""
    if self.group != 'quality':
      reason = _dig(record, f'metrics.{self.path.split(".")[1]}.reason')
      if reason:
        return str(reason)
    return f'{self.path} is null in the record'

  def caveat(self, record: Mapping[str, Any]) -> str | None:
    """What the record says against a value it holds: energy over too short a window."""
    if (self.group == 'energy' and self.value(record) is not None
        and _dig(record, 'metrics.energy.reliable') is False):
      return ('flagged unreliable by the record: '
              f'{_dig(record, "metrics.energy.reason") or "metrics.energy.reliable is false"}')
    return None


class MemoryColumn(Column):
  """The device allocator's peak, else (no device statistics: a CPU) the host RSS peak."""

  DEVICE = 'metrics.memory.bytes_in_use_peak'
  HOST = 'metrics.memory.host_rss_bytes_peak'

  def reason(self, record):
    return str(_dig(record, 'metrics.memory.reason') or
               f'{self.DEVICE} and {self.HOST} are null in the record')

  def value(self, record):
    v = _dig(record, self.DEVICE)
    if v is None:
      v = _dig(record, self.HOST)
    return None if v is None else float(v) * self.scale

  def source(self, record: Mapping[str, Any]) -> str | None:
    """A footnote saying where the value came from (None where there is no value)."""
    if _dig(record, self.DEVICE) is not None:
      return ('device allocator peak, summed over local devices '
              f'({self.DEVICE}; a high-water mark over the process, compilation included)')
    if _dig(record, self.HOST) is not None:
      why = _dig(record, 'metrics.memory.reason') or 'the device reports no memory statistics'
      return f'host resident-set peak ({self.HOST}), not device memory: {why}'
    return None


def _memory() -> Column:
  return MemoryColumn('peak_memory_gib', 'peak memory (GiB)', 'memory', '', False, True, 1 / GIB)


_TRAINING_HEAD = (
    Column('eval_loss', 'eval loss', 'quality', 'quality.eval_loss', False, True),
    Column('eval_perplexity', 'eval perplexity', 'quality', 'quality.eval_perplexity', False),
    _memory(),
    Column('mfu_pct', 'MFU (%)', 'compute', 'metrics.compute.mfu_analytic', True, True, 100.0),
    Column('step_p50_ms', 'step p50 (ms)', 'latency', 'metrics.latency.step_ms.p50', False, True),
    Column('tokens_per_s', 'tokens/s', 'throughput', 'metrics.throughput.tokens_per_s', True),
)
_TRAINING_TAIL = (
    Column('joules_per_token', 'J/token', 'energy', 'metrics.energy.joules_per_token', False,
           True),
    Column('avg_power_w', 'avg power (W)', 'energy', 'metrics.energy.avg_power_w', False),
    Column('mcr', 'MCR', 'compression', 'metrics.compression.mcr', True, True),
)
COLUMNS: dict[str, tuple[Column, ...]] = {
    'pretrain': _TRAINING_HEAD + (
        Column('tokens_per_param_per_s', 'tokens/param/s (TT)', 'throughput',
               'metrics.throughput.tokens_per_param_per_s', True, True),
    ) + _TRAINING_TAIL,
    'finetune': _TRAINING_HEAD + (
        Column('samples_per_s', 'samples/s', 'throughput', 'metrics.throughput.samples_per_s',
               True),
        Column('samples_per_param_per_s', 'samples/param/s (ST)', 'throughput',
               'metrics.throughput.samples_per_param_per_s', True, True),
    ) + _TRAINING_TAIL,
    'inference': (
        Column('eval_perplexity', 'eval perplexity', 'quality', 'quality.eval_perplexity', False,
               True),
        Column('quality_ratio', 'quality ratio (bf16 ppl / ppl)', 'quality',
               'quality.quality_ratio', True),
        _memory(),
        Column('mbu_pct', 'MBU (%)', 'compute', 'metrics.compute.mbu', True, True, 100.0),
        Column('ttft_p50_ms', 'TTFT p50 (ms)', 'latency', 'metrics.latency.ttft_ms.p50', False),
        Column('tpot_p50_ms', 'TPOT p50 (ms)', 'latency', 'metrics.latency.tpot_ms.p50', False,
               True),
        Column('output_tokens_per_s', 'output tokens/s (IT)', 'throughput',
               'metrics.throughput.output_tokens_per_s', True, True),
        Column('joules_per_output_token', 'J/output token', 'energy',
               'metrics.energy.joules_per_output_token', False, True),
        Column('avg_power_w', 'avg power (W)', 'energy', 'metrics.energy.avg_power_w', False),
        Column('mcr', 'MCR', 'compression', 'metrics.compression.mcr', True, True),
    ),
}
# Plain throughput for the eager-vs-jit and portability tables (not per parameter: one config).
THROUGHPUT = {'pretrain': 'tokens_per_s', 'finetune': 'tokens_per_s',
              'inference': 'output_tokens_per_s'}


def columns(kind: str) -> tuple[Column, ...]:
  if kind not in COLUMNS:
    raise ValueError(f'record kind {kind!r} has no report columns; known kinds: '
                     f'{", ".join(sorted(COLUMNS))}')
  return COLUMNS[kind]


def ranked(kind: str, group: str) -> Column:
  """The column that ranks `group` ('quality' or one of GROUPS) for records of `kind`."""
  (col,) = [c for c in columns(kind) if c.group == group and c.ranked]
  return col


def column(kind: str, name: str) -> Column:
  (col,) = [c for c in columns(kind) if c.name == name]
  return col


# ----------------------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True)
class Stats:
  n: int
  mean: float
  std: float | None      # sample standard deviation (n - 1); None for n = 1
  min: float
  max: float
  olympic: float | None  # MLPerf's olympic mean; None for n < 5


def olympic_mean(values: Sequence[float]) -> float | None:
  """The mean without the single highest and lowest value (MLPerf); None below 5 values."""
  if len(values) < 5:
    return None
  kept = sorted(values)[1:-1]
  return math.fsum(kept) / len(kept)


def summarize(values: Sequence[float]) -> Stats | None:
  if not values:
    return None
  n = len(values)
  mean = math.fsum(values) / n
  std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
  return Stats(n, mean, std, min(values), max(values), olympic_mean(values))


def competition_ranks(values: Mapping[str, float | None],
                      higher_is_better: bool) -> dict[str, int | None]:
  """1 = best; ties share the best of their places (1, 2, 2, 4); None where there is no value."""
  present = [v for v in values.values() if v is not None]
  out: dict[str, int | None] = {}
  for label, v in values.items():
    if v is None:
      out[label] = None
      continue
    better = [u for u in present
              if not math.isclose(u, v, rel_tol=TIE_REL) and (u > v if higher_is_better else u < v)]
    out[label] = 1 + len(better)
  return out


def min_max_scores(values: Mapping[str, float | None],
                   higher_is_better: bool) -> dict[str, float | None]:
  """Min-max within the block with the direction applied: 1 = the best, 0 = the worst."""
  present = [v for v in values.values() if v is not None]
  if not present:
    return {k: None for k in values}
  lo, hi = min(present), max(present)
  out: dict[str, float | None] = {}
  for label, v in values.items():
    if v is None:
      out[label] = None
    elif math.isclose(lo, hi, rel_tol=TIE_REL):
      out[label] = 1.0
    else:
      out[label] = (v - lo) / (hi - lo) if higher_is_better else (hi - v) / (hi - lo)
  return out


def pareto_front(points: Mapping[str, tuple[float, float]]) -> list[str]:
  """The labels no other point dominates, both coordinates lower-is-better, by first coordinate.

  q dominates p when q is no worse in both and strictly better in one."""
  def dominated(p):
    return any(q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1])
               for q in points.values())
  front = [label for label, p in points.items() if not dominated(p)]
  return sorted(front, key=lambda label: (points[label], label))


# ----------------------------------------------------------------------------- points


def execution(record: Mapping[str, Any]) -> str:
  return record['config'].get('execution') or 'jit'  # records before the field ran jit


def environment(record: Mapping[str, Any]) -> tuple[str, str, str]:
  env = record.get('env') or {}
  return (str(env.get('device_kind')), str(env.get('backend')), str(env.get('jax')))


def env_label(env: tuple[str, str, str]) -> str:
  device, backend, jax_version = env
  return f'{device} ({backend}, jax {jax_version})'


def point_config(record: Mapping[str, Any]) -> dict[str, Any]:
  """The config that defines the point: the repeat's seed and index removed, execution filled."""
  config = copy.deepcopy(dict(record['config']))
  config.pop('seed', None)
  if isinstance(config.get('study'), dict):
    config['study'].pop('repeat', None)
    if all(v is None for v in config['study'].values()):
      del config['study']  # not a study's run: as records from before the section had it
  config['execution'] = execution(record)
  return config


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping) and v:
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _canonical(tree: Any) -> str:
  return json.dumps(tree, sort_keys=True, default=str)


@dataclasses.dataclass
class Point:
  key: tuple
  kind: str
  axis: str
  env: tuple[str, str, str]
  execution: str
  study_name: str | None
  study_point: str | None
  config: dict[str, Any]
  records: list[dict[str, Any]]  # one per seed, by seed
  duplicates: int = 0            # records left out: a seed recorded again (the latest kept)
  label: str = ''
  pair_label: str = ''           # the label without its execution (eager-vs-jit rows)

  @property
  def n(self) -> int:
    return len(self.records)

  def stats(self, col: Column) -> Stats | None:
    return column_stats(self.records, col)


def column_stats(records: Iterable[Mapping[str, Any]], col: Column) -> Stats | None:
  """The statistics of `col` over the records that hold a value for it."""
  return summarize([v for v in (col.value(r) for r in records) if v is not None])


def _check(record: Any, where: str) -> None:
  if not isinstance(record, Mapping):
    raise ValueError(f'{where}: a record is a JSON object, got {type(record).__name__}')
  for field in ('kind', 'config', 'metrics'):
    if not isinstance(record.get(field), Mapping if field != 'kind' else str):
      raise ValueError(f'{where}: record {record.get("run_id", "?")} has no {field!r}; is this '
                       'a result record (docs/metrics.md)?')
  columns(record['kind'])


def group_points(records: Iterable[Mapping[str, Any]]) -> list[Point]:
  """The records' study points, each labelled, sorted by (axis, kind, environment, label)."""
  by_key: dict[tuple, list[dict[str, Any]]] = {}
  for i, record in enumerate(records):
    _check(record, record.get('_source', f'record {i}') if isinstance(record, Mapping) else
           f'record {i}')
    study = record['config'].get('study') or {}
    env = environment(record)
    if study.get('point'):
      key = ('study', str(study.get('name')), str(study['point']), execution(record), env)
    else:
      key = ('config', _canonical(point_config(record)), env)
    by_key.setdefault(key, []).append(dict(record))

  points = []
  for key, recs in by_key.items():
    first = recs[0]
    study = first['config'].get('study') or {}
    by_seed: dict[str, dict[str, Any]] = {}
    for r in sorted(recs, key=lambda r: (str(r.get('created_at')), str(r.get('run_id')))):
      by_seed[_canonical(r['config'].get('seed'))] = r  # the latest of a seed wins
    kept = sorted(by_seed.values(), key=lambda r: _seed_order(r['config'].get('seed')))
    points.append(Point(
        key=key, kind=first['kind'], axis=str(study.get('axis') or first['kind']),
        env=environment(first), execution=execution(first),
        study_name=study.get('name') if study.get('point') else None,
        study_point=study.get('point') or None, config=point_config(first), records=kept,
        duplicates=len(recs) - len(kept)))
  _label(points)
  # Within a block, in the order the points were first run: a sweep runs every point's first
  # repeat in the study's order, so tables list the points as the study file does.
  return sorted(points, key=lambda p: (p.axis, p.kind, p.env,
                                       min(str(r.get('created_at')) for r in p.records),
                                       p.label, p.key))


def _seed_order(seed: Any) -> tuple:
  return (0, seed, '') if isinstance(seed, (int, float)) else (1, 0, _canonical(seed))


def _diff_label(point: Point, keys: Sequence[str], width: int = 72) -> str:
  """'k=v, k2=v2' over the keys the point's config holds; a long one cut, with a digest of
  the config so that labels stay distinct."""
  flat = _flatten(point.config)
  parts = [f'{k}={flat[k]}' for k in keys if k in flat]
  label = ', '.join(parts)
  if len(label) <= width:
    return label
  digest = hashlib.sha256(_canonical(point.config).encode()).hexdigest()[:8]
  kept = []
  for part in parts:
    if len(', '.join(kept + [part])) > width - 16:
      break
    kept.append(part)
  return ', '.join(kept) + f', … (config {digest})'


def _without_execution(name: str, mode: str) -> str:
  """A study point's name less its execution part: the sweep names a grid point over
  `execution` 'mha,eager' or 'attention=mha,execution=eager' (experiments/sweep.py)."""
  return ','.join(part for part in name.split(',') if part not in (mode, f'execution={mode}'))


def _label(points: list[Point]) -> None:
  """Study points by their names; the others by what differs between the configs of an axis."""
  for axis in {p.axis for p in points}:
    loose = [p for p in points if p.axis == axis and p.study_point is None]
    flats = [_flatten(p.config) for p in loose]
    keys = sorted({k for f in flats for k in f})
    # A key some configs lack (written before it existed) differs only where two that hold it
    # disagree: its absence says nothing about the value the older run used.
    differing = [k for k in keys if len({_canonical(f[k]) for f in flats if k in f}) > 1]
    for p in loose:
      digest = hashlib.sha256(_canonical(p.config).encode()).hexdigest()[:8]
      p.label = _diff_label(p, differing) or f'{p.kind} config {digest}'
      p.pair_label = (_diff_label(p, [k for k in differing if k != 'execution'])
                      or f'{p.kind} config {digest}')
    named = [p for p in points if p.axis == axis and p.study_point is not None]
    for p in named:
      p.label = str(p.study_point)
      p.pair_label = _without_execution(p.label, p.execution) or str(p.study_name)
    # Two studies (or both executions of one) naming a point alike in one block: say which.
    for p in named:
      twins = [q for q in named if q is not p and q.study_point == p.study_point
               and q.kind == p.kind and q.env == p.env]
      if any(q.study_name != p.study_name for q in twins):
        p.label = p.pair_label = f'{p.study_name}/{p.study_point}'
      if any(q.execution != p.execution for q in twins):
        p.label = f'{p.label} [{p.execution}]'
  # Configs that differ only in keys one of them lacks label alike: tell them apart (a block
  # keys its points by label).
  alike = [p for p in points if any(
      q is not p and (q.axis, q.kind, q.env, q.label) == (p.axis, p.kind, p.env, p.label)
      for q in points)]
  for p in alike:
    p.label += f' (config {hashlib.sha256(_canonical(p.config).encode()).hexdigest()[:8]})'


# ----------------------------------------------------------------------------- tables


class Footnotes:
  """Numbered, deduplicated footnotes of one table."""

  def __init__(self):
    self.texts: list[str] = []

  def mark(self, text: str) -> str:
    if text not in self.texts:
      self.texts.append(text)
    return f'[{self.texts.index(text) + 1}]'


def fmt(x: float | None, figures: int = 4) -> str:
  """`figures` significant figures (4: no exponent from 1000 up, so a table of tokens/s stays
  readable)."""
  if x is None:
    return '—'
  if abs(x) >= 10 ** (figures - 1):
    return f'{x:.0f}'
  return f'{x:.{figures}g}'


def _to_decimals(x: float, decimals: int) -> str:
  return f'{round(x, decimals):.{max(decimals, 0)}f}'


def stats_cell(s: Stats | None, point_n: int) -> str:
  """mean ± spread, the spread to two significant figures and the means to its last digit
  (what the repeats can tell apart); a single repeat keeps four figures, equal repeats six."""
  if s is None:
    return '—'
  if s.std is not None and s.std <= TIE_REL * abs(s.mean):
    # Equal repeats (a quality that does not depend on the seed; the sum's rounding aside):
    # six figures, so that points closer than four figures still differ in the table.
    cell, olympic = f'{fmt(s.mean, 6)} ± 0', fmt(s.olympic, 6)
  elif s.std is None:
    cell, olympic = fmt(s.mean), fmt(s.olympic)
  else:
    decimals = 1 - math.floor(math.log10(abs(s.std)))
    cell = f'{_to_decimals(s.mean, decimals)} ± {_to_decimals(s.std, decimals)}'
    olympic = None if s.olympic is None else _to_decimals(s.olympic, decimals)
  if s.olympic is not None:
    cell += f' (olympic {olympic})'
  if s.n != point_n:
    cell += f' (n={s.n})'
  return cell


@dataclasses.dataclass
class Table:
  slug: str                       # file name: <slug>.md, <slug>.csv
  title: str
  note: str                       # what the table shows, above it
  headers: list[str]
  rows: list[list[str]]           # as shown
  csv_headers: list[str]
  csv_rows: list[list[Any]]       # raw numbers; None -> empty
  footnotes: list[str] = dataclasses.field(default_factory=list)

  def markdown(self) -> str:
    def line(cells):
      return '| ' + ' | '.join(str(c).replace('|', '\\|') for c in cells) + ' |'
    out = [f'## {self.title}', '', self.note, '', line(self.headers),
           line(['---'] * len(self.headers))]
    out += [line(r) for r in self.rows]
    if self.footnotes:
      out.append('')
      out += [f'[{i}] {t}  ' for i, t in enumerate(self.footnotes, 1)]
    return '\n'.join(out).rstrip() + '\n'

  def csv(self) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator='\n')
    w.writerow(self.csv_headers)
    for r in self.csv_rows:
      w.writerow(['' if v is None else v for v in r])
    return buf.getvalue()


SPREAD_NOTE = ('Mean over repeats ± sample standard deviation (n − 1), the deviation to two '
               'significant figures and the mean to its last digit (CSV files: full '
               'precision); n = repeats (distinct seeds); "olympic" = MLPerf\'s olympic mean (the highest and lowest repeat '
               'dropped, the rest averaged), shown where n ≥ 5; — = null in the record (the '
               'footnote gives its reason).')


@dataclasses.dataclass
class Block:
  title: str
  slug: str
  axis: str
  kind: str
  env: tuple[str, str, str]
  points: list[Point]

  @property
  def columns(self) -> tuple[Column, ...]:
    return columns(self.kind)

  def means(self, col: Column) -> dict[str, float | None]:
    return {p.label: (s.mean if (s := p.stats(col)) else None) for p in self.points}

  def ranks(self) -> dict[str, dict[str, int | None]]:
    """{group: {point label: rank}} for quality and the six groups."""
    return {g: competition_ranks(self.means(ranked(self.kind, g)),
                                 ranked(self.kind, g).higher_is_better)
            for g in ('quality',) + GROUPS}

  def scores(self) -> dict[str, dict[str, float | None]]:
    """{group: {point label: min-max score}}: what the radar chart draws."""
    return {g: min_max_scores(self.means(ranked(self.kind, g)),
                              ranked(self.kind, g).higher_is_better)
            for g in ('quality',) + GROUPS}

  def values_table(self) -> Table:
    notes = Footnotes()
    cols = self.columns
    headers = ['point', 'n'] + [c.header for c in cols]
    # A memory column from one source throughout says so once, in its header.
    sources = {c.name: {c.source(r) for p in self.points for r in p.records} - {None}
               for c in cols if isinstance(c, MemoryColumn)}
    for i, c in enumerate(cols):
      if len(sources.get(c.name, ())) == 1:
        headers[2 + i] += ' ' + notes.mark(f'{c.header}: {next(iter(sources[c.name]))}')
    rows, csv_rows = [], []
    for p in self.points:
      row, csv_row = [p.label, str(p.n)], [p.label, p.n]
      for c in cols:
        s = p.stats(c)
        cell = stats_cell(s, p.n)
        nulls = sorted({c.reason(r) for r in p.records if c.value(r) is None})
        caveats = sorted({c.caveat(r) for r in p.records} - {None})
        marks = [notes.mark(f'{c.header}: {why}') for why in nulls + caveats]
        if len(sources.get(c.name, ())) > 1:
          marks += [notes.mark(f'{c.header}: {src}')
                    for src in sorted({c.source(r) for r in p.records} - {None})]
        row.append(' '.join([cell] + marks))
        csv_row += ([s.mean, s.std, s.min, s.max, s.olympic, s.n] if s else
                    [None] * 5 + [0]) + ['; '.join(nulls) or None]
      rows.append(row)
      csv_rows.append(csv_row)
    csv_headers = ['point', 'n'] + [f'{c.name} {stat}' for c in cols for stat in
                                    ('mean', 'std', 'min', 'max', 'olympic', 'n', 'null reason')]
    dropped = [f'{p.label}: {p.duplicates}' for p in self.points if p.duplicates]
    note = SPREAD_NOTE + (' Records of a seed already recorded, left out (latest kept): '
                          + ', '.join(dropped) + '.' if dropped else '')
    return Table(self.slug, f'{self.title}: values', note, headers, rows,
                 csv_headers, csv_rows, notes.texts)

  def ranks_table(self) -> Table:
    groups = ('quality',) + GROUPS
    ranks, scores = self.ranks(), self.scores()
    headers = ['point', 'n'] + [
        f'{g}: {ranked(self.kind, g).header} '
        f'({"higher" if ranked(self.kind, g).higher_is_better else "lower"} is better)'
        for g in groups]
    rows, csv_rows = [], []
    for p in self.points:
      row, csv_row = [p.label, str(p.n)], [p.label, p.n]
      for g in groups:
        r, s = ranks[g][p.label], scores[g][p.label]
        row.append('—' if r is None else f'{r} ({s:.2f})')
        csv_row += [r, s]
      rows.append(row)
      csv_rows.append(csv_row)
    note = ('EfficientLLM\'s within-block ranks: per metric, 1 = best, ties share the best of '
            'their places; in brackets the min–max score the radar chart draws (1 = the '
            'block\'s best, 0 its worst); — = no value (see the values table).')
    csv_headers = ['point', 'n'] + [f'{g} {x}' for g in groups for x in ('rank', 'score')]
    return Table(f'{self.slug}_ranks', f'{self.title}: ranks', note, headers, rows,
                 csv_headers, csv_rows)


def _slug(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9]+', '_', text).strip('_').lower() or 'block'


def blocks(points: Sequence[Point]) -> list[Block]:
  keys = sorted({(p.axis, p.kind, p.env) for p in points})
  out = []
  for axis, kind, env in keys:
    title = axis
    same_axis = [k for k in keys if k[0] == axis]
    if len({k[1] for k in same_axis}) > 1:
      title += f' · {kind}'
    if len({k[2] for k in same_axis}) > 1:
      title += f' · {env_label(env)}'
    out.append(Block(title, _slug(title), axis, kind, env,
                     [p for p in points if (p.axis, p.kind, p.env) == (axis, kind, env)]))
  slugs = [b.slug for b in out]
  for b in out:  # titles that slug alike (rare): keep the files apart
    if slugs.count(b.slug) > 1:
      b.slug += '_' + hashlib.sha256(b.title.encode()).hexdigest()[:6]
  return out


def _kind_tables(rows_by_kind: Mapping[str, list], slug: str) -> list[tuple[str, str, list]]:
  kinds = sorted(rows_by_kind)
  return [(kind, slug if len(kinds) == 1 else f'{slug}_{kind}', rows_by_kind[kind])
          for kind in kinds]


def portability_tables(points: Sequence[Point]) -> list[Table]:
  """Records of one config hash on different (device kind, backend, jax): side by side."""
  by_hash: dict[str, dict[tuple, list[dict]]] = {}
  label_of: dict[str, str] = {}
  for p in points:
    for r in p.records:
      h = str(r.get('config_hash'))
      by_hash.setdefault(h, {}).setdefault(p.env, []).append(r)
      label_of.setdefault(h, p.pair_label if p.execution == 'jit' else p.label)
  rows_by_kind: dict[str, list] = {}
  for h in sorted(by_hash, key=lambda h: (label_of[h], h)):
    envs = by_hash[h]
    if len(envs) < 2:
      continue
    kind = next(iter(envs.values()))[0]['kind']
    rows_by_kind.setdefault(kind, []).append((h, sorted(envs.items())))
  tables = []
  for kind, slug, entries in _kind_tables(rows_by_kind, 'portability'):
    quality, latency = ranked(kind, 'quality'), ranked(kind, 'latency')
    tput = column(kind, THROUGHPUT[kind])
    headers = ['point', 'config hash', 'environment', 'n', quality.header, latency.header,
               tput.header, f'{latency.header.split(" (")[0]} ÷ first environment\'s']
    rows, csv_rows = [], []
    for h, envs in entries:
      first = None
      for env, recs in envs:
        q, lat, t = (column_stats(recs, c) for c in (quality, latency, tput))
        ratio = (lat.mean / first.mean) if (lat and first) else None
        first = first or lat
        rows.append([label_of[h], h[:12], env_label(env), str(len(recs)), stats_cell(q, len(recs)),
                     stats_cell(lat, len(recs)), stats_cell(t, len(recs)),
                     '—' if ratio is None else f'{ratio:.3g}'])
        csv_rows.append([label_of[h], h, env_label(env), len(recs), q and q.mean,
                         lat and lat.mean, t and t.mean, ratio])
    note = ('One config (equal config_hash, so equal seed too) run in more than one environment '
            '(device kind, backend, jax version). ' + SPREAD_NOTE)
    tables.append(Table(slug, f'Portability ({kind})', note, headers, rows,
                        ['point', 'config_hash', 'environment', 'n', quality.name, latency.name,
                         tput.name, f'{latency.name} ratio to first environment'], csv_rows))
  return tables


def eager_jit_tables(points: Sequence[Point]) -> list[Table]:
  """Point pairs identical but for `execution` (and a study point's name, which may say it):
  eager's time over jit's, both shown."""
  pairs: dict[tuple, dict[str, list[Point]]] = {}
  for p in points:
    config = copy.deepcopy(p.config)
    config.pop('execution')
    if isinstance(config.get('study'), dict):
      config['study'].pop('point', None)
    pairs.setdefault((_canonical(config), p.env), {}).setdefault(p.execution, []).append(p)
  rows_by_kind: dict[str, list] = {}
  for pair in pairs.values():
    for jit in pair.get('jit', ()):
      for eager in pair.get('eager', ()):
        rows_by_kind.setdefault(jit.kind, []).append((jit, eager))
  tables = []
  for kind, slug, entries in _kind_tables(rows_by_kind, 'eager_vs_jit'):
    quality, latency = ranked(kind, 'quality'), ranked(kind, 'latency')
    tput = column(kind, THROUGHPUT[kind])
    headers = ['point', 'environment', 'n jit', 'n eager']
    for c in (quality, latency, tput):
      headers += [f'{c.header}: jit', f'{c.header}: eager']
      if c is not quality:
        headers.append(f'{c.header.split(" (")[0]}: eager ÷ jit')
    rows, csv_rows = [], []
    for jit, eager in sorted(entries, key=lambda e: (e[0].pair_label, e[0].env)):
      row = [jit.pair_label, env_label(jit.env), str(jit.n), str(eager.n)]
      csv_row: list[Any] = [jit.pair_label, env_label(jit.env), jit.n, eager.n]
      for c in (quality, latency, tput):
        sj, se = jit.stats(c), eager.stats(c)
        row += [stats_cell(sj, jit.n), stats_cell(se, eager.n)]
        csv_row += [sj and sj.mean, se and se.mean]
        if c is not quality:
          ratio = se.mean / sj.mean if (sj and se) else None
          row.append('—' if ratio is None else f'{ratio:.3g}')
          csv_row.append(ratio)
      rows.append(row)
      csv_rows.append(csv_row)
    csv_headers = ['point', 'environment', 'n_jit', 'n_eager']
    for c in (quality, latency, tput):
      csv_headers += [f'{c.name} jit', f'{c.name} eager'] + (
          [f'{c.name} eager/jit'] if c is not quality else [])
    note = ('The same point run compiled (jit: one XLA program per step, fused) and eager '
            '(jax.disable_jit: op by op, each primitive compiled by XLA on its own). '
            + SPREAD_NOTE)
    tables.append(Table(slug, f'Eager vs jit ({kind})', note, headers, rows, csv_headers,
                        csv_rows))
  return tables


# ----------------------------------------------------------------------------- the report


@dataclasses.dataclass
class Plot:
  name: str                # file name, without .png
  title: str
  png: bytes | None        # None: not drawn, see `skipped`
  skipped: str = ''        # why it was not drawn


@dataclasses.dataclass
class BlockReport:
  block: Block
  tables: list[Table]
  plots: list[Plot]


@dataclasses.dataclass
class Report:
  blocks: list[BlockReport]
  portability: list[Table]
  eager_jit: list[Table]
  sources: list[str]       # the files read (CLI) or empty (a list of records)
  record_count: int
  setup_runs: int = 0      # records of a sweep's set-up run (study point '_init'), left out

  @property
  def tables(self) -> list[Table]:
    return [t for b in self.blocks for t in b.tables] + self.portability + self.eager_jit

  @property
  def plots(self) -> list[Plot]:
    return [p for b in self.blocks for p in b.plots]


def build_report(records: Sequence[Mapping[str, Any]], sources: Sequence[str] = (),
                 plots: bool = True) -> Report:
  """Everything the page shows, from the records alone; plots=False skips drawing (fast)."""
  from experiments import report_html  # pylint: disable=g-import-not-at-top  (matplotlib)
  if not records:
    raise ValueError('no records to report on')
  measured = [r for r in records if _dig(r, 'config.study.point') != SETUP_POINT]
  if not measured:
    raise ValueError(f'only set-up runs (study point {SETUP_POINT!r}) among the records: '
                     'run the study\'s points (python -m experiments.sweep --study=...)')
  points = group_points(measured)
  block_reports = []
  for b in blocks(points):
    drawn = report_html.block_plots(b) if plots else []
    block_reports.append(BlockReport(b, [b.values_table(), b.ranks_table()], drawn))
  return Report(block_reports, portability_tables(points), eager_jit_tables(points),
                list(sources), len(records), len(records) - len(measured))


def write_report(report: Report, out_dir: str) -> list[str]:
  """Writes index.html, every table's .md and .csv and every drawn plot's .png; their paths."""
  from experiments import report_html  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  written = []

  def put(name: str, data: bytes | str) -> None:
    path = os.path.join(out_dir, name)
    with open(path, 'wb') as f:
      f.write(data.encode() if isinstance(data, str) else data)
    written.append(path)

  for t in report.tables:
    put(f'{t.slug}.md', t.markdown())
    put(f'{t.slug}.csv', t.csv())
  for p in report.plots:
    if p.png is not None:
      put(f'{p.name}.png', p.png)
  put('index.html', report_html.page(report))
  return written


def find_record_files(dirs: Sequence[str]) -> list[str]:
  """Every results.jsonl (or *.results.jsonl) under the dirs, sorted; a clear error for a dir
  that does not exist or holds none."""
  files = []
  for d in dirs:
    if os.path.isfile(d):
      files.append(d)
      continue
    if not os.path.isdir(d):
      raise FileNotFoundError(f'{d}: no such directory (pass the folder a study or run wrote, '
                              'e.g. runs/studies/<study>)')
    found = sorted(os.path.join(root, f) for root, _, names in os.walk(d) for f in names
                   if RECORD_FILES.search(f))
    if not found:
      raise FileNotFoundError(
          f'{d}: no results.jsonl under it. A run appends its record to <workdir>/results.jsonl '
          'and a study writes one per repeat (python -m experiments.sweep --study=...); pass a '
          'folder that holds them.')
    files += found
  return sorted(dict.fromkeys(files))


def load_records(files: Sequence[str]) -> list[dict[str, Any]]:
  """The records of the files, each with '_source' = 'FILE:LINE' (for messages)."""
  records = []
  for path in files:
    with open(path) as f:
      for i, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          # A run killed mid-append leaves one torn last line (efficientjax/metrics/record.py).
          print(f'{path}:{i}: skipped, not JSON ({e.msg}): a record torn by a killed run?',
                file=sys.stderr)
          continue
        if isinstance(record, dict):
          record['_source'] = f'{path}:{i}'
        records.append(record)
  if not records:
    raise ValueError(f'no records in {", ".join(files)}')
  return records


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m experiments.report',
      description='Tables, ranks, Pareto and radar plots and one HTML page from results.jsonl '
                  'files.')
  parser.add_argument('dirs', nargs='+', metavar='DIR',
                      help='folders searched recursively for results.jsonl')
  parser.add_argument('--out', required=True, metavar='OUTDIR',
                      help='where index.html, the tables and the plots go')
  args = parser.parse_args(argv)
  try:
    files = find_record_files(args.dirs)
    report = build_report(load_records(files), sources=files)
  except (FileNotFoundError, ValueError) as e:
    print(f'experiments.report: {e}', file=sys.stderr)
    return 2
  written = write_report(report, args.out)
  print(f'{report.record_count} records from {len(files)} files -> '
        f'{os.path.join(args.out, "index.html")} ({len(written)} files)')
  return 0


if __name__ == '__main__':
  # Through the package module, so report_html and this share one `experiments.report`.
  from experiments import report as _report  # pylint: disable=g-import-not-at-top
  sys.exit(_report.main())

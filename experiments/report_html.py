"""The report's pictures (matplotlib, Agg) and its one static page (experiments/report.py).

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas directly: no pyplot, so no
global state and no display backend, and PNGs saved without the matplotlib version in their
metadata, so the same records give byte-identical files.
"""

import base64
import html
import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments import report as rp

COLORS = ('#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2',
          '#7f7f7f', '#bcbd22', '#17becf')  # matplotlib's tab10
PARETO_COSTS = ('latency', 'memory', 'energy')


def _png(fig: Figure) -> bytes:
  FigureCanvasAgg(fig)
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=100, metadata={'Software': None})
  return buf.getvalue()


def _wrap(label: str, width: int = 24) -> str:
  """A long point label over several lines, broken after its commas."""
  lines, line = [], ''
  for part in label.split(', '):
    if line and len(line) + len(part) + 2 > width:
      lines.append(line + ',')
      line = part
    else:
      line = f'{line}, {part}' if line else part
  return '\n'.join(lines + [line])


def _null_reasons(block: 'rp.Block', col: 'rp.Column') -> str:
  reasons = sorted({col.reason(r) for p in block.points for r in p.records
                    if col.value(r) is None})
  return '; '.join(reasons)


def pareto_plot(block: 'rp.Block', cost_group: str) -> 'rp.Plot':
  """Quality against one cost, every point at its means (bars: the sample std), the
  non-dominated front drawn; not drawn where either is null for every point."""
  quality, cost = rp.ranked(block.kind, 'quality'), rp.ranked(block.kind, cost_group)
  name = f'pareto_{block.slug}_{cost_group}'
  title = f'{block.title}: {quality.header} against {cost.header}'
  stats = {p.label: (p.stats(cost), p.stats(quality)) for p in block.points}
  for col, i in ((cost, 0), (quality, 1)):
    if all(s[i] is None for s in stats.values()):
      return rp.Plot(name, title, None, f'{col.header} is null for every point: '
                     f'{_null_reasons(block, col)}')
  both = {k: s for k, s in stats.items() if s[0] is not None and s[1] is not None}
  if not both:
    return rp.Plot(name, title, None, f'no point has both {cost.header} and {quality.header}')
  sign = -1.0 if quality.higher_is_better else 1.0  # the front wants both lower-is-better
  front = rp.pareto_front({k: (s[0].mean, sign * s[1].mean) for k, s in both.items()})

  fig = Figure(figsize=(3.7, 3.2))
  ax = fig.add_subplot()
  labelled = []
  for i, p in enumerate(block.points):
    if p.label not in both:
      continue
    c, q = both[p.label]
    ax.errorbar(c.mean, q.mean, xerr=c.std or 0, yerr=q.std or 0, fmt='o', ms=7,
                color=COLORS[i % len(COLORS)], ecolor='#555555', elinewidth=1, capsize=2,
                zorder=3, markeredgecolor='black' if p.label in front else 'none')
    labelled.append((p.label, c.mean, q.mean))
  ax.margins(0.15)
  lo, hi = ax.get_xlim()
  for label, x, y in labelled:
    right = x > (lo + hi) / 2  # labels point inwards, so they stay inside the axes
    ann = ax.annotate(_wrap(label), (x, y), xytext=(-5 if right else 5, 4),
                      textcoords='offset points', fontsize=7, ha='right' if right else 'left')
    ann.set_in_layout(False)  # a long label must not shrink the axes
  fx = [both[k][0].mean for k in front]
  fy = [both[k][1].mean for k in front]
  ax.plot(fx, fy, '--', color='black', lw=1, drawstyle='steps-post', zorder=2,
          label='non-dominated front')
  ax.set_xlabel(f'{cost.header} (lower is better)', fontsize=8)
  ax.set_ylabel(f'{quality.header} ({"higher" if quality.higher_is_better else "lower"} '
                'is better)', fontsize=8)
  ax.set_title(block.title, fontsize=9)
  ax.tick_params(labelsize=7)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='best')
  fig.tight_layout()
  missing = [p.label for p in block.points if p.label not in both]
  skipped = f'not plotted (a value is null): {", ".join(missing)}' if missing else ''
  return rp.Plot(name, title, _png(fig), skipped)


def radar_plot(block: 'rp.Block') -> 'rp.Plot':
  """The block's points over the six metrics, min-max normalised (1 = the block's best); a
  metric null for some point is left off (the page says which)."""
  name, title = f'radar_{block.slug}', f'{block.title}: the six metrics, normalised'
  if len(block.points) < 2:
    return rp.Plot(name, title, None, 'one point: nothing to normalise against')
  scores = block.scores()
  axes = [g for g in rp.GROUPS if all(scores[g][p.label] is not None for p in block.points)]
  left_off = []
  for g in rp.GROUPS:
    if g not in axes:
      col = rp.ranked(block.kind, g)
      nulls = [p.label for p in block.points if scores[g][p.label] is None]
      which = 'every point' if len(nulls) == len(block.points) else ', '.join(nulls)
      left_off.append(f'{g} ({col.header}) is null for {which}: {_null_reasons(block, col)}')
  if len(axes) < 3:
    return rp.Plot(name, title, None, 'fewer than three of the six metrics have a value for '
                   'every point; ' + ' | '.join(left_off))
  angles = np.linspace(0, 2 * np.pi, len(axes), endpoint=False)
  # The legend goes below the chart: short labels three a row, long (wrapped) ones fewer.
  labels = [_wrap(p.label) for p in block.points]
  longest = max(len(line) for x in labels for line in x.split('\n'))
  ncols = 3 if longest <= 12 else 2 if longest <= 26 else 1
  rows = [labels[i:i + ncols] for i in range(0, len(labels), ncols)]
  legend_in = 0.1 + 0.105 * sum(max(x.count('\n') + 1 for x in row) for row in rows)
  fig = Figure(figsize=(3.7, 3.3 + legend_in))
  ax = fig.add_subplot(projection='polar')
  for i, p in enumerate(block.points):
    v = [scores[g][p.label] for g in axes]
    color = COLORS[i % len(COLORS)]
    ax.plot(np.append(angles, angles[0]), v + v[:1], color=color, lw=1.5, label=labels[i])
    ax.fill(np.append(angles, angles[0]), v + v[:1], color=color, alpha=0.12)
  ax.set_xticks(angles)
  ax.set_xticklabels([f'{g}\n{rp.ranked(block.kind, g).header}' for g in axes], fontsize=6)
  ax.tick_params(axis='x', pad=6)
  ax.set_ylim(0, 1.05)
  # 0 (the block's worst) drawn as a ring, not the centre: a point worst at everything would
  # otherwise vanish into one pixel.
  ax.set_rorigin(-0.3)
  ax.set_yticks([0.25, 0.5, 0.75, 1.0])
  ax.tick_params(axis='y', labelsize=6)
  ax.set_title(block.title, fontsize=9)
  fig.legend(fontsize=6, loc='lower center', ncols=ncols, frameon=False)
  fig.tight_layout(rect=(0, legend_in / (3.3 + legend_in), 1, 1))
  return rp.Plot(name, title, _png(fig), 'left off: ' + ' | '.join(left_off) if left_off else '')


def block_plots(block: 'rp.Block') -> list['rp.Plot']:
  return [pareto_plot(block, g) for g in PARETO_COSTS] + [radar_plot(block)]


# ----------------------------------------------------------------------------- the page

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px;
       color: #1a1a1a; max-width: 1800px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 36px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin-top: 20px; }
p, li { font-size: 13px; line-height: 1.45; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #c8c8c8; padding: 3px 6px; text-align: right; }
th { background: #f0f0f0; max-width: 130px; font-weight: 600; }
td { max-width: 150px; }
td:first-child, th:first-child { text-align: left; }
.note { color: #444; font-size: 12px; max-width: 1100px; }
.foot { color: #444; font-size: 11px; margin: 2px 0; max-width: 1400px; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; }
figcaption { font-size: 11px; color: #444; max-width: 370px; }
.skipped { color: #8a4b00; font-size: 12px; }
.scroll { overflow-x: auto; }
"""


def _e(text: object) -> str:
  return html.escape(str(text), quote=True)


def table_html(t: 'rp.Table') -> str:
  head = ''.join(f'<th>{_e(h)}</th>' for h in t.headers)
  body = ''.join('<tr>' + ''.join(f'<td>{_e(c)}</td>' for c in row) + '</tr>' for row in t.rows)
  foot = ''.join(f'<p class="foot">[{i}] {_e(text)}</p>' for i, text in enumerate(t.footnotes, 1))
  return (f'<h3 id="{_e(t.slug)}">{_e(t.title)}</h3><p class="note">{_e(t.note)}</p>'
          f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
          f'</table></div>{foot}'
          f'<p class="foot">Files: {_e(t.slug)}.md, {_e(t.slug)}.csv</p>')


def plots_html(plots: Sequence['rp.Plot']) -> str:
  figs, notes = [], []
  for p in plots:
    if p.png is None:
      notes.append(f'<p class="skipped">Not drawn: {_e(p.title)} — {_e(p.skipped)}</p>')
      continue
    data = base64.b64encode(p.png).decode()
    caption = _e(p.title) + (f' ({_e(p.skipped)})' if p.skipped else '')
    figs.append(f'<figure><img src="data:image/png;base64,{data}" alt="{_e(p.title)}">'
                f'<figcaption>{caption} · {_e(p.name)}.png</figcaption></figure>')
  return f'<div class="plots">{"".join(figs)}</div>{"".join(notes)}'


def page(report: 'rp.Report') -> str:
  parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           '<title>efficientjax study report</title>', f'<style>{CSS}</style></head><body>',
           '<h1>efficientjax study report</h1>']
  sources = (f' from {len(report.sources)} files: ' + ', '.join(report.sources)
             if report.sources else '')
  setup = (f' Left out: {report.setup_runs} set-up runs (study point {rp.SETUP_POINT!r}: the '
           'run a study\'s points start from).' if report.setup_runs else '')
  parts.append(f'<p>{report.record_count} records{_e(sources)}.{_e(setup)}</p>')
  toc = [f'<li><a href="#{_e(b.block.slug)}">{_e(b.block.title)}</a> '
         f'({len(b.block.points)} points, {_e(rp.env_label(b.block.env))})</li>'
         for b in report.blocks]
  toc.append('<li><a href="#portability">Portability</a></li>'
             '<li><a href="#eager_vs_jit">Eager vs jit</a></li>')
  parts.append(f'<ul>{"".join(toc)}</ul>')
  parts.append(
      '<p class="note"><b>How to read it.</b> ' + _e(rp.SPREAD_NOTE) + ' Ranks follow '
      'EfficientLLM (arXiv 2505.13840): within a block, per metric, 1 = best, ties sharing the '
      'best of their places; memory, latency, energy and loss/perplexity are lower-is-better, '
      'compute utilisation, throughput and MCR higher-is-better. The radar charts draw each '
      'metric min–max normalised within its block (1 = the block\'s best): the paper\'s own '
      'normalisation was not found (see experiments/report.py). Pareto plots draw each point '
      'at its means (bars: sample std) and the front of points no other point beats in both '
      'quality and cost.</p>')
  for b in report.blocks:
    parts.append(f'<h2 id="{_e(b.block.slug)}">{_e(b.block.title)}</h2>'
                 f'<p class="note">{_e(b.block.kind)} records, '
                 f'{_e(rp.env_label(b.block.env))}.</p>')
    parts += [table_html(t) for t in b.tables]
    parts.append(plots_html(b.plots))
  parts.append('<h2 id="portability">Portability</h2>')
  parts += ([table_html(t) for t in report.portability] or
            ['<p class="note">No config hash was run in more than one environment.</p>'])
  parts.append('<h2 id="eager_vs_jit">Eager vs jit</h2>')
  parts += ([table_html(t) for t in report.eager_jit] or
            ['<p class="note">No point was run both eager and jit.</p>'])
  parts.append('</body></html>\n')
  return '\n'.join(parts)

"""Device-time breakdown from a `jax.profiler.trace` capture.

A profiled run writes `<logdir>/plugins/profile/<run>/<host>.xplane.pb`; `summarize_trace`
turns it into busy / idle time and the share of busy time spent in attention, matmul, MoE
dispatch, collectives and everything else.

Busy time is the union of kernel intervals per device, not the sum of kernel durations:
kernels overlap (several streams, and concurrent nodes of one CUDA graph reported on the
same stream line), so summed durations overstate it. Overlapped time is split evenly among
the kernels covering it, so the categories add up to the busy time exactly.
"""

import collections
import glob
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax

CATEGORIES = ('attention', 'matmul', 'moe_dispatch', 'collective', 'other')

# Ordered (category, pattern, why) rows over kernel names and HLO op names; the first match
# wins, so the more specific categories come first: attention and MoE kernels contain
# GEMM-like names (wgmma, gemm) that the matmul rows would also match.
_I = re.IGNORECASE
_RULES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ('attention', re.compile(r'sdpa|fmha|flash|attention', _I),
     'cuDNN SDPA (cudnn_generated_*_sdpa_*_flash_{f,b}prop), XLA custom calls __cudnn$fmha*, '
     'Pallas/Triton flash-attention kernels'),
    ('attention', re.compile(r'(?<![a-z])(mha|nsa)(?![a-z])', _I),
     'Pallas mha kernels and native sparse attention; bounded so no longer word matches'),
    ('attention', re.compile(r'compute_dot_do_o|convert_dq_to', _I),
     'cuDNN flash-attention backward pre/post kernels: rowsum(dO*O) and the dQ accumulator '
     'cast (cudnn::fusion::*), seen next to the sdpa bprop kernel'),
    ('collective', re.compile(r'nccl|all[-_]?reduce|all[-_]?gather|reduce[-_]scatter|'
                              r'reducescatter|all[-_]?to[-_]?all|collective[-_]permute|'
                              r'sendrecv', _I),
     'NCCL kernels (ncclDevKernel_*, ncclKernel_*) and XLA collective ops (all-reduce.3, '
     'all-gather-start, ...). Before moe_dispatch: an all-to-all moving tokens is time spent '
     'communicating, which is what this category measures'),
    ('moe_dispatch', re.compile(r'ragged|megablox|grouped[-_]?(gemm|matmul|mm|dot)|'
                                r'(?<![a-z])t?gmm(?![a-z])|(?<![a-z])moe(?![a-z])', _I),
     'ragged_dot / ragged-dot, megablox gmm / tgmm, grouped GEMMs and the project\'s moe_* '
     'kernels. Sorts are left out on purpose: XLA sorts also serve top-k and sampling'),
    ('matmul', re.compile(r'nvjet|gemm|cublas|cutlass|xmma|matmul', _I),
     'cuBLAS / cuBLASLt (nvjet_sm90_*, sm90_xmma_gemm_*, cutlass::Kernel2<..gemm..>), XLA '
     'Triton GEMMs (gemm_fusion_dot_*, triton_gemm)'),
    ('matmul', re.compile(r'(?<![a-z])(dot|conv|convolution)(?![a-z])', _I),
     'XLA dot / convolution ops (dot.60, dot_general.7 on CPU); bounded so that '
     'loop_convert_fusion is not a convolution'),
)


def _category_rank() -> dict[str, int]:
  """Categories in rule order (most specific first), 'other' last."""
  order = list(dict.fromkeys(category for category, _, _ in _RULES)) + ['other']
  return {c: i for i, c in enumerate(order)}


def classify_kernel(name: str, hlo_op: str | None = None) -> str:
  """Category of one kernel from its name and, when given, its HLO op name."""
  text = name if not hlo_op or hlo_op == name else f'{name} {hlo_op}'
  for category, pattern, _ in _RULES:
    if pattern.search(text):
      return category
  return 'other'


# --- HLO text: resolving fusions whose names say nothing (CPU `ynn_fusion.1`) ---------------

_INSTR_RE = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_COMP_RE = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$')
# The opcode is the first lower-case word directly followed by '(' after '='; shapes and
# layouts ('f32[64,128]{1,0}', '(f32[], s32[])') never look like that.
_OPCODE_RE = re.compile(r'(?<![\w.\-$%])([a-z][a-z0-9\-]*)\(')
_TARGET_RE = re.compile(r'custom_call_target="([^"]*)"')
_CALLS_RE = re.compile(r'calls=%?([\w.\-]+)')


def _sanitize(name: str) -> str:
  return re.sub(r'[^A-Za-z0-9_]', '_', name)


def hlo_op_categories(hlo_texts: str | Iterable[str]) -> dict[tuple[str, str], str]:
  """`{(module, instruction): category}` for the fusions and ops of compiled HLO text.

  A fusion is classified by what it computes (the ops of its fused computation, most
  specific category first), so XLA:CPU's `ynn_fusion.1` holding a dot counts as matmul.
  Only `fusion` is looked into: `while`, `call` and command buffers contain whole programs.
  Pass `compiled.as_text()` of the traced step(s).
  """
  if isinstance(hlo_texts, str):
    hlo_texts = [hlo_texts]
  out: dict[tuple[str, str], str] = {}
  rank = _category_rank()
  for text in hlo_texts:
    module = ''
    comps: dict[str, list[tuple[str, str, str | None]]] = {}
    current: list[tuple[str, str, str | None]] | None = None
    for line in text.splitlines():
      if line.startswith('HloModule '):
        module = line.split()[1].rstrip(',')
        continue
      if current is not None and line.strip() == '}':
        current = None
        continue
      m = _INSTR_RE.match(line)
      if current is not None and m:
        name, rest = m.groups()
        op = _OPCODE_RE.search(rest)
        target = _TARGET_RE.search(rest)
        calls = _CALLS_RE.search(rest)
        desc = ' '.join(x.group(1) for x in (op, target) if x)
        current.append((name, desc, calls.group(1) if calls and op and
                        op.group(1) == 'fusion' else None))
        continue
      m = _COMP_RE.match(line)
      if m:
        current = comps.setdefault(m.group(1), [])

    memo: dict[str, str] = {}

    def comp_category(comp: str, depth: int = 0) -> str:
      if comp not in memo:
        best = 'other'
        for _, desc, called in comps.get(comp, ()):
          cat = classify_kernel(desc) if desc else 'other'
          if called and depth < 16:
            sub = comp_category(called, depth + 1)
            cat = sub if rank[sub] < rank[cat] else cat
          best = cat if rank[cat] < rank[best] else best
        memo[comp] = best
      return memo[comp]

    for instrs in comps.values():
      for name, desc, called in instrs:
        cat = comp_category(called) if called else (classify_kernel(desc) if desc else 'other')
        out[(module, name)] = cat
        # GPU kernels are named after their HLO instruction, sanitised ('fusion.229' ->
        # 'fusion_229'), so keep that spelling too.
        out.setdefault((module, _sanitize(name)), cat)
  return out


# --- Reading the trace ------------------------------------------------------------------------

_DEVICE_PLANE_RE = re.compile(r'^/device:GPU:\d+$')
# Kernel-level lines of a GPU plane are the CUDA streams: 'Stream #14(Compute)',
# 'Stream #14(Compute,Memset)', 'Stream #20(MemcpyH2D)'. Aggregate lines that tools derive
# ('XLA Modules', 'XLA Ops', 'Steps', 'Launch Stats') repeat the same time and are skipped.
_KERNEL_LINE_RE = re.compile(r'^Stream #\d+')
# XLA:CPU runs ops on these host threads; other host lines (python, runtime) are not work.
_HOST_XLA_LINE_RE = re.compile(r'^tf_XLA')
# Kernels run inside one CUDA graph report the graph's name as their hlo_op: no information.
_UNINFORMATIVE_HLO_OP_RE = re.compile(r'^command_buffer')


class Event(collections.namedtuple('Event', 'start end name category')):
  """One kernel (or host XLA op) interval in ns, already classified."""
  __slots__ = ()


def find_xplane(logdir: str) -> str:
  """Newest `*.xplane.pb` under logdir; FileNotFoundError if there is none."""
  paths = glob.glob(os.path.join(logdir, '**', '*.xplane.pb'), recursive=True)
  if not paths:
    raise FileNotFoundError(f'no *.xplane.pb under {logdir!r}: was the run profiled '
                            '(profile.steps > 0) and did jax.profiler.trace finish?')
  return max(paths, key=lambda p: (os.path.getmtime(p), p))


def _stat_dict(obj: Any) -> dict[str, Any]:
  return {k: v for k, v in obj.stats if k is not None}


def _classify(name: str, stats: Mapping[str, Any],
              hlo_cats: Mapping[tuple[str, str], str]) -> str:
  hlo_op = stats.get('hlo_op')
  if not isinstance(hlo_op, str) or _UNINFORMATIVE_HLO_OP_RE.match(hlo_op):
    hlo_op = None
  category = classify_kernel(name, hlo_op)
  if category == 'other' and hlo_cats:
    # The name said nothing; the compiled HLO may (a fusion's body holding a dot).
    module = str(stats.get('hlo_module', ''))
    for key in ((module, hlo_op or name), (module, name)):
      if key in hlo_cats:
        return hlo_cats[key]
  return category


def _device_events(planes: Sequence[Any],
                   hlo_cats: Mapping[tuple[str, str], str]) -> list[list[Event]]:
  """Per GPU plane, the events of its stream lines."""
  devices = []
  for plane in planes:
    if not _DEVICE_PLANE_RE.match(plane.name):
      continue
    events = []
    for line in plane.lines:
      if not _KERNEL_LINE_RE.match(line.name):
        continue
      for ev in line.events:
        if ev.duration_ns > 0:
          events.append(Event(ev.start_ns, ev.start_ns + ev.duration_ns, ev.name,
                               _classify(ev.name, _stat_dict(ev), hlo_cats)))
    if events:
      devices.append(events)
  return devices


def _leaves(events: list[tuple[float, float, Any]]) -> list[tuple[float, float, Any]]:
  """Drops events that enclose another event of the same thread (a while loop's body)."""
  events = sorted(events, key=lambda e: (e[0], -e[1]))
  enclosing = set()
  stack: list[int] = []
  for i, (start, end, _) in enumerate(events):
    while stack and events[stack[-1]][1] <= start:
      stack.pop()
    if stack and end <= events[stack[-1]][1]:
      enclosing.add(stack[-1])
    stack.append(i)
  return [e for i, e in enumerate(events) if i not in enclosing]


def _host_events(planes: Sequence[Any],
                 hlo_cats: Mapping[tuple[str, str], str]) -> list[Event]:
  """Leaf XLA op events of all XLA:CPU host threads, as one device."""
  events = []
  for plane in planes:
    if plane.name != '/host:CPU':
      continue
    for line in plane.lines:
      if not _HOST_XLA_LINE_RE.match(line.name):
        continue
      # XLA op events carry an hlo_op stat; 'ThunkExecutor::Execute' wrappers, 'end: op'
      # markers and thread-pool bookkeeping do not.
      ops = []
      for ev in line.events:
        stats = _stat_dict(ev)
        if 'hlo_op' in stats and ev.duration_ns > 0:
          ops.append((ev.start_ns, ev.start_ns + ev.duration_ns, (ev.name, stats)))
      for start, end, (name, stats) in _leaves(ops):
        events.append(Event(start, end, name, _classify(name, stats, hlo_cats)))
  return events


def attribute(events: Sequence[Event]) -> tuple[float, dict[str, float], dict[str, float]]:
  """Busy ns (union of intervals) and its split by category and by kernel name.

  A sweep line over the interval ends: each elementary slice covered by k events gives 1/k
  of its length to each of them, so both splits sum to the busy time.
  """
  bounds = []
  for i, ev in enumerate(events):
    bounds.append((ev.start, 1, i))
    bounds.append((ev.end, 0, i))  # ends sort before starts at equal times
  bounds.sort()
  busy = 0.0
  by_category: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
  by_name: dict[str, float] = collections.defaultdict(float)
  active: set[int] = set()
  prev = None
  for t, is_start, i in bounds:
    if active and t > prev:
      span = t - prev
      busy += span
      share = span / len(active)
      for j in active:
        by_category[events[j].category] += share
        by_name[events[j].name] += share
    prev = t
    if is_start:
      active.add(i)
    else:
      active.discard(i)
  return busy, by_category, dict(by_name)


def summarize_trace(logdir: str, *, window_s: float | None = None, steps: int | None = None,
                    hlo_text: str | Iterable[str] | None = None,
                    top_k: int = 15) -> dict[str, Any]:
  """Busy/idle time and per-category device time of the newest trace under logdir.

  On GPU the kernels of the CUDA stream lines of each `/device:GPU:N` plane are used; busy
  time is per device, averaged over devices. XLA:CPU has no device plane: there busy time is
  the time host threads spend running XLA ops (leaf op events of the `tf_XLA*` threads, all
  threads together as one device), `source` says which.

  Args:
    logdir: the directory given to `jax.profiler.trace`.
    window_s: wall-clock length of the traced window; the span of the events if None.
    steps: steps traced, for the per-step busy time.
    hlo_text: optional compiled HLO text of the traced program(s), to classify fusions whose
      names say nothing (see `hlo_op_categories`).
    top_k: how many kernels to list.

  Returns:
    A JSON-serialisable dict; `available` False with a `reason` when the trace holds no
    kernel or XLA op events.

  Raises:
    FileNotFoundError: no `*.xplane.pb` under logdir.
  """
  path = find_xplane(logdir)
  planes = list(jax.profiler.ProfileData.from_file(path).planes)
  hlo_cats = hlo_op_categories(hlo_text) if hlo_text is not None else {}
  devices = _device_events(planes, hlo_cats)
  source = 'device'
  if not devices:
    host = _host_events(planes, hlo_cats)
    devices = [host] if host else []
    source = 'host'
  if not devices:
    return {'available': False, 'trace_path': path,
            'reason': 'no GPU stream kernel events and no XLA:CPU op events in the trace '
                      f'(planes: {[p.name for p in planes]})'}

  n = len(devices)
  busy_ns = 0.0
  cat_ns = dict.fromkeys(CATEGORIES, 0.0)
  name_ns: dict[str, float] = collections.defaultdict(float)
  counts: collections.Counter[str] = collections.Counter()
  kernel_cat: dict[str, str] = {}
  for events in devices:
    busy, by_cat, by_name = attribute(events)
    busy_ns += busy
    for c, v in by_cat.items():
      cat_ns[c] += v
    for k, v in by_name.items():
      name_ns[k] += v
    for ev in events:
      counts[ev.name] += 1
      kernel_cat.setdefault(ev.name, ev.category)
  start = min(ev.start for events in devices for ev in events)
  end = max(ev.end for events in devices for ev in events)

  busy_ms = busy_ns / n / 1e6
  window_ms = window_s * 1e3 if window_s is not None else (end - start) / 1e6
  categories_ms = {c: v / n / 1e6 for c, v in cat_ns.items()}
  top = sorted(name_ns.items(), key=lambda kv: -kv[1])[:top_k]
  return {
      'available': True,
      'source': source,
      'trace_path': path,
      'devices': n,
      'events': sum(len(e) for e in devices),
      'window_ms': window_ms,
      'busy_ms': busy_ms,
      'busy_fraction': busy_ms / window_ms if window_ms > 0 else None,
      'idle_ms': window_ms - busy_ms,
      'categories_ms': categories_ms,
      'categories_share': {c: (v / busy_ms if busy_ms > 0 else 0.0)
                           for c, v in categories_ms.items()},
      # total_ms is attributed time averaged over devices, like busy_ms (overlaps split);
      # count is over all devices.
      'top_kernels': [{'name': k, 'category': kernel_cat[k], 'total_ms': v / n / 1e6,
                       'count': counts[k]} for k, v in top],
      'steps': steps,
      'busy_ms_per_step': busy_ms / steps if steps else None,
  }

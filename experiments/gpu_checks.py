"""Every GPU-only check that has no committed result yet, in priority order, within a budget.

GPU time is rare (a session that is lent one has ~15 minutes, start-up included), so the checks
that only a GPU can do live here as data, oldest unverified work first, and one command runs
as many as fit:

    python -m experiments.gpu_checks --out=$OUT --budget_s=540 [--only=NAME,...] [--all]
    python -m experiments.gpu_checks --list        # what is pending, on any machine

A check is pending until a file named `<name>.json` is committed under some
`experiments/results/<gpu>/` folder (`--all` runs done ones again). Each check runs in its own
process (a kernel that crashes or hangs cannot take the others with it, and each starts with
the GPU's memory free), writes its JSON to `--out`, and is stopped when the budget runs out:
the benchmarks write their JSON after every row, so a cut check keeps what it measured. A check
whose estimate does not fit what is left of the budget is skipped, not started. Output of every
check goes to one log (`gpu_checks.log`), and `summary.json` says what ran, how long it took and
what it found. The device tool returns at most 8 files: with more pending checks than fit one
call, split them with --only.

To add a check: append a `Check` to CHECKS (a later issue's checks go after the older ones),
with an honest estimate; commit what it returns as `experiments/results/<device>/<name>.json`
with the command that made it.
"""

import dataclasses
import glob
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from absl import app, flags

from experiments import processes

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(_ROOT, 'experiments', 'results')
CPU_FOLDERS = ('cpu',)  # results from these folders never count as a GPU check's result
LOG = 'gpu_checks.log'
SUMMARY = 'summary.json'


@dataclasses.dataclass(frozen=True)
class Check:
  """One GPU-only check: a module run as `python -m MODULE ARGS... --out=OUT/NAME.json`."""
  name: str  # also the result's file name: experiments/results/<device>/<name>.json
  why: str  # what it verifies, and for which issue
  module: str
  args: tuple[str, ...]
  estimate_s: float  # wall seconds on an H100, start-up and compiles included
  # One line from the check's JSON for the summary table (None: nothing to say).
  summarize: Callable[[dict], str] | None = None


def summarize_bench_moe_gmm(result: dict) -> str:
  """How many variants were right, wrong or failed, and the best kernel of each family."""
  right, wrong, failed, best = 0, 0, 0, {}
  for run in result.get('runs', []):
    for name, entry in run['variants'].items():
      if 'error' in entry:
        if entry['error'].startswith('wrong'):
          wrong += 1
        else:
          failed += 1
        continue
      right += 1
      family = name.rsplit('_', 1)[0] if name[-1].isdigit() else name
      key = f"{run['shape']}/{run['groups']}/{family}"
      if entry.get('fwd_tflops', 0) > best.get(key, (0,))[0]:
        best[key] = (entry['fwd_tflops'], entry['fwd_bwd_tflops'])
  tops = '; '.join(f'{k} {f:.0f}/{b:.0f}' for k, (f, b) in sorted(best.items()))
  return f'{right} right, {wrong} wrong, {failed} failed; best fwd/fwd+bwd TFLOP/s: {tops}'


def summarize_bench_nsa(result: dict) -> str:
  """Per shape, ours' forward and backward (and decode) speed-up over dense attention and how
  many of the NSA issue's goals it met; then how many rows were wrong, failed or skipped."""
  parts, wrong, failed, skipped = [], 0, 0, 0
  for run in result.get('runs', []):
    variants = run.get('variants', {})
    for entry in variants.values():
      if 'error' in entry:
        if entry['error'].startswith('wrong'):
          wrong += 1
        else:
          failed += 1
      elif 'skipped' in entry:
        skipped += 1
    ours = variants.get('ours', {})
    if 'error' in run:
      parts.append(f"{run['shape']}: {run['error'][:80]}")
      continue
    if 'fwd_speedup_vs_dense' not in ours:
      parts.append(f"{run['shape']}: ours {ours.get('error', 'not timed against dense')[:80]}")
      continue
    text = f"{run['shape']}: fwd {ours['fwd_speedup_vs_dense']:.2f}x"
    if 'bwd_speedup_vs_dense' in ours:
      text += f" bwd {ours['bwd_speedup_vs_dense']:.2f}x"
    decode = variants.get('decode_ours', {}).get('speedup_vs_dense')
    if decode is not None:
      text += f' decode {decode:.2f}x'
    goals = run.get('goals', {})
    if goals:
      met = sum(1 for g in goals.values() if g.get('met') is True)
      text += f' (goals met {met}/{len(goals)})'
    parts.append(text)
  return '; '.join(parts + [f'{wrong} wrong, {failed} failed, {skipped} skipped'])


def summarize_study_check(result: dict) -> str:
  """experiments.study_check's records and each study's exit status and seconds."""
  return f"{result.get('records')} records; " + ', '.join(
      f"{k}: exit {v['exit_code']} in {v['seconds']:.0f} s"
      for k, v in result.get('studies', {}).items())


_GMM = 'experiments.bench_moe_gmm'
def _summarize_decode(result: dict) -> str:
  """bf16 at batch 1's bandwidth utilisation, and each row's tokens/s."""
  rows = result.get('rows', [])
  mbu = {(r['precision'], r['batch']): r.get('mbu') for r in rows}
  head = (f"bf16 b1 MBU {mbu[('bf16', 1)]:.2f}; " if mbu.get(('bf16', 1)) else '')
  return head + ', '.join(f"{r['precision']} b{r['batch']} {r['output_tokens_per_s']:.0f} tok/s"
                          for r in rows)


CHECKS: tuple[Check, ...] = (
    # Issue 6: kernels/moe_gmm/mosaic_gpu.py (TMA + wgmma). Its defaults were right and
    # 1.3-1.45x Triton's forward at five of six shape/group rows on an H100
    # (results/h100/moe_gmm_mosaic_defaults.json), so implementation=None picks it on Hopper;
    # what remains: the training step with it, the tiling sweeps, the autotuner, V3 skewed.
    # Every kernel variant is checked (output and both gradients) before it is timed.
    Check('moe_gmm_mosaic_defaults',
          'Mosaic GPU gmm/tgmm at their default tiles against Triton and a dense matmul of the '
          'same FLOPs: Mixtral 8x7B, DeepSeek-V2-Lite and -V3 shapes, even and skewed groups',
          _GMM, ('--impls=dense,triton,mosaic_gpu', '--tilings=0', '--repeats=20'),
          estimate_s=600, summarize=summarize_bench_moe_gmm),
    Check('moe_dispatch_mosaic_step',
          "the DeepSeek-V2-Lite-shaped training step (configs/moe_16b.py:1gpu) with the dropless "
          "dispatch on Mosaic GPU (grouped_matmul='auto' on Hopper now) against Triton",
          'experiments.bench_moe_dispatch',
          ('--config=configs/moe_16b.py:1gpu', '--steps=12',
           '--variants=dropless:mosaic_gpu,dropless:triton'),
          estimate_s=180),
    Check('moe_gmm_mosaic_v2_lite_even',
          'every Triton and every Mosaic candidate tiling at DeepSeek-V2-Lite, even groups (the '
          'shape where both miss the issue\'s targets at their default tiles)',
          _GMM, ('--shapes=deepseek_v2_lite', '--groups=even',
                 '--impls=dense,triton,mosaic_gpu', '--repeats=20'),
          estimate_s=300, summarize=summarize_bench_moe_gmm),
    Check('moe_gmm_mosaic_v3_skewed',
          'Mosaic and Triton defaults at DeepSeek-V3 with skewed groups (the row the defaults '
          'check did not reach)',
          _GMM, ('--shapes=deepseek_v3', '--groups=skewed', '--impls=dense,triton,mosaic_gpu',
                 '--tilings=0', '--repeats=20'),
          estimate_s=300, summarize=summarize_bench_moe_gmm),
    Check('moe_gmm_mosaic_v2_lite_skewed',
          'every Mosaic tiling and the autotuner at DeepSeek-V2-Lite, Dirichlet-skewed groups',
          _GMM, ('--shapes=deepseek_v2_lite', '--groups=skewed',
                 '--impls=dense,mosaic_gpu,autotuned', '--repeats=20'),
          estimate_s=420, summarize=summarize_bench_moe_gmm),
    Check('moe_gmm_autotuned_mixtral_v3',
          "the autotuner's choice at Mixtral 8x7B and DeepSeek-V3, even and skewed groups",
          _GMM, ('--shapes=mixtral_8x7b,deepseek_v3', '--impls=dense,autotuned',
                 '--repeats=20'),
          estimate_s=480, summarize=summarize_bench_moe_gmm),
    # Issue 14: the fine-tuning methods at Llama-3.2-1B's shape (random base), each in its
    # own process: step time and peak memory, against the goals (LoRA >= 1.3x faster
    # per step than full with >= 40% less memory; DoRA <= 1.5x LoRA's step time). The segment
    # mask through cuDNN attention (packed examples) runs here for the first time on a GPU.
    Check('finetune_methods_1b',
          'step time and peak memory of full, freeze, LoRA, LoRA+, RSLoRA, DoRA and PiSSA at '
          'the 1.24B Llama-3.2 shape (8 x 1024 tokens, bf16 compute, packed examples)',
          'experiments.bench_finetune', ('--steps=12', '--batch=8', '--seq_len=1024'),
          estimate_s=420,
          summarize=lambda r: ', '.join(f'{k} {v:.2f}' for k, v in r.get('ratios', {}).items())),
    # Issue 15: decode at batch 1 and 16, every precision, random weights: tokens/s and
    # bandwidth utilisation (goal for bf16 at batch 1: >= 75% of peak bandwidth).
    Check('decode_precisions_1b',
          'decode step time, tokens/s and bandwidth utilisation of bf16, fp16, int8, int4 and '
          'fp8 weights at the 1.24B Llama-3.2 shape, batch 1 and 16, 1024-token context',
          'experiments.bench_decode', ('--shape=1b', '--batches=1,16', '--steps=64'),
          estimate_s=300, summarize=_summarize_decode),
    Check('decode_precisions_8b',
          'the same at the Llama-3.1-8B shape',
          'experiments.bench_decode', ('--shape=8b', '--batches=1,16', '--steps=64'),
          estimate_s=480, summarize=_summarize_decode),
    # Issue 16: the memory estimate's working-set factors were fitted to XLA:CPU; on a GPU
    # (bf16, cuDNN attention, the allocator's own peak) they are unverified.
    Check('memory_estimate_gpu',
          'the analytic memory estimate against the compiled step\'s plan and the allocator\'s '
          'peak on a GPU: small dense, MLA, MoE models under every remat policy',
          'experiments.bench_memory', (), estimate_s=150,
          summarize=lambda r: ', '.join(
              f"{k} {v['estimate_over_compiler'] or 0:.2f}/{v['estimate_over_measured'] or 0:.2f}"
              for k, v in r.get('rows', {}).items())),
    # Issue 16: the 7B point on one GPU, its AdamW moments in host memory (goal: MFU >= 35%).
    Check('offload_7b_1gpu',
          'configs/mla_7b.py:1gpu for 10 steps with the optimizer state in pinned host memory: '
          'step time, MFU, peak memory beside the plan; the offload\'s share of the step from '
          'an 8-layer cut with and without it',
          'experiments.bench_offload', ('--steps=10', '--layers=8'), estimate_s=480,
          summarize=lambda r: f"offload share {r.get('offload_share')}; " + ', '.join(
              f"{x['name']} p50 {x['step_ms']['p50']:.0f} ms MFU {x['mfu_analytic'] or 0:.2f}"
              for x in r.get('rows', []) if x.get('returncode') == 0)),
    # Issue 17: the small studies' first repeat on a GPU, the same configs (and config hashes)
    # as the CPU's committed ones: the report's portability table across backends, and what
    # fusion buys on a GPU (the eager-vs-jit table). Commit <name>.results.jsonl beside it.
    Check('studies_gpu',
          'attention_small and execution_small (seed 0) on the GPU: the same config hashes as '
          'the CPU studies (portability), and jit against eager per point on a GPU',
          'experiments.study_check', ('--studies=attention_small,execution_small',
                                      '--repeats=1'), estimate_s=420,
          summarize=summarize_study_check),
    # Issue 18: kernels/nsa (Pallas-Triton), never compiled on a GPU.
    Check('nsa_kernels',
          'the NSA kernels (kernels/nsa) compiled for the first time: checked against '
          'reference.nsa_attention (outputs, selection, all seven gradients), then forward, '
          'forward+backward, each kernel and decode timed against dense cuDNN attention at the '
          '1.5B shape (12/2 heads) at 16k, 8k, 32k, 64k and the NSA paper\'s (64/4 heads) at 64k',
          'experiments.bench_nsa', ('--repeats=3', '--rounds=3'), estimate_s=360,
          summarize=summarize_bench_nsa),
    Check('nsa_kernels_packed',
          'the same at the 1.5B shape (groups of 6) with tokens_per_program=pack (2 tokens a '
          '16-row program, over the union of their blocks) instead of padding each group to 16 '
          'rows: compare ours and its per-kernel rows with nsa_kernels\'',
          'experiments.bench_nsa', ('--tiling=tokens_per_program=pack',
                                    '--families=ours,branches,dense',
                                    '--shapes=1.5b_16k,1.5b_64k', '--repeats=3', '--rounds=3'),
          estimate_s=180, summarize=summarize_bench_nsa),
    # The same kernels in the model: one attention layer of the 1.5B study shape (GQA through
    # cuDNN against NSA through the kernels and its dense reference), then whole training steps
    # at 16k tokens (the "an attention_nsa step at 16k faster than attention_gqa's").
    Check('nsa_attention_layers',
          'one attention layer of configs/attention_{gqa,nsa}.py, forward and forward+backward at '
          '8k, 16k and 32k tokens: GQA on cuDNN, NSA through kernels/nsa (checked against the '
          'dense reference up to 16k) and through that reference',
          'experiments.bench_attention', ('--variants=gqa,nsa', '--seq_lens=8192,16384,32768',
                                          '--impls=cudnn', '--repeats=5'), estimate_s=240,
          summarize=lambda r: ', '.join(
              f"{x['variant']}/{x['impl']}/{x['seq_len'] // 1024}k "
              + (x['error'][:60] if 'error' in x else
                 f"{x['forward']['p50_ms']:.1f}/{x['forward_backward']['p50_ms']:.1f} ms")
              for x in r.get('rows', []))),
    Check('nsa_train_step_16k',
          'configs/studies/attention_16k.py: the 1.5B model trained 12 steps on 16k-token '
          'sequences with GQA (cuDNN) and with NSA (kernels/nsa); commit <name>.results.jsonl '
          'beside it (the records hold the step times)',
          'experiments.study_check', ('--studies=attention_16k', '--repeats=1'), estimate_s=420,
          summarize=summarize_study_check),
)


def committed_result(name: str) -> str | None:
  """The committed `<name>.json` under a GPU results folder, if any."""
  for path in sorted(glob.glob(os.path.join(RESULTS, '*', f'{name}.json'))):
    if os.path.basename(os.path.dirname(path)) not in CPU_FOLDERS:
      return path
  return None


def command(check: Check, out: str) -> list[str]:
  return [sys.executable, '-m', check.module, *check.args,
          f'--out={os.path.join(out, check.name + ".json")}']


def _run_one(check: Check, out: str, timeout_s: float, log) -> tuple[str, float, int | None]:
  """Runs one check in its own process group; (status, seconds, exit code)."""
  argv = command(check, out)
  env = dict(os.environ, PYTHONUNBUFFERED='1',
             # The autotuner's choices come back with the run, beside the results.
             EFFICIENTJAX_CACHE_DIR=os.environ.get('EFFICIENTJAX_CACHE_DIR',
                                                   os.path.join(out, 'autotune')))
  env['PYTHONPATH'] = os.pathsep.join(p for p in (_ROOT, env.get('PYTHONPATH')) if p)
  log.write(f'\n===== {check.name}: {" ".join(argv[1:])}\n')
  log.flush()
  start = time.monotonic()
  proc = processes.start_group(argv, cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  try:
    rc = proc.wait(timeout=max(timeout_s, 0.0))
    status = 'passed' if rc == 0 else 'failed'
  except subprocess.TimeoutExpired:
    processes.stop_group(proc)  # SIGTERM first: a benchmark can finish writing its JSON
    rc, status = None, 'cut'
  seconds = time.monotonic() - start
  log.write(f'===== {check.name}: {status} after {seconds:.1f} s (exit {rc})\n')
  log.flush()
  return status, seconds, rc


def run_checks(checks: Sequence[Check], out: str, budget_s: float, rerun_done: bool = False,
               clock: Callable[[], float] = time.monotonic) -> list[dict]:
  """Runs the pending checks in order while the budget lasts; one summary row per check."""
  os.makedirs(out, exist_ok=True)
  deadline = clock() + budget_s
  rows = []
  with open(os.path.join(out, LOG), 'a') as log:
    for check in checks:
      row = {'name': check.name, 'why': check.why, 'estimate_s': check.estimate_s,
             'command': ' '.join(['python -m', check.module, *check.args])}
      rows.append(row)
      done = committed_result(check.name)
      left = deadline - clock()
      if done and not rerun_done:
        row.update(status='done', result=os.path.relpath(done, _ROOT))
      elif check.estimate_s > left:
        row.update(status='skipped', reason=f'estimate {check.estimate_s:.0f} s > {left:.0f} s '
                   'of budget left')
      else:
        status, seconds, rc = _run_one(check, out, left, log)
        row.update(status=status, seconds=round(seconds, 1), exit_code=rc)
        path = os.path.join(out, check.name + '.json')
        if os.path.exists(path):
          row['output'] = path
          if check.summarize:
            try:
              with open(path) as fh:
                row['found'] = check.summarize(json.load(fh))
            except Exception as e:  # pylint: disable=broad-except
              row['found'] = f'unreadable: {type(e).__name__}: {e}'
      _write_summary(out, rows, budget_s)
  return rows


def _write_summary(out: str, rows: list[dict], budget_s: float) -> None:
  # No `import jax` here: initialising a GPU backend in this process would take the memory
  # (XLA preallocates 75%) that the checks' own processes need.
  env = {'python': sys.version.split()[0], 'budget_s': budget_s, 'gpu': _gpu_name()}
  for package in ('jax', 'jaxlib'):
    try:
      env[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      env[package] = None
  path = os.path.join(out, SUMMARY)
  with open(path + '.tmp', 'w') as fh:
    json.dump({'env': env, 'checks': rows}, fh, indent=1)
  os.replace(path + '.tmp', path)


def _gpu_name() -> str | None:
  try:
    return subprocess.run(['nvidia-smi', '--query-gpu=name', '--format=csv,noheader'],
                          capture_output=True, text=True, timeout=30, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def table(rows: Sequence[dict]) -> str:
  lines = [f'{"check":34} {"status":8} {"seconds":>8}  found / reason']
  for r in rows:
    seconds = f'{r["seconds"]:.0f}' if 'seconds' in r else '-'
    detail = r.get('found') or r.get('reason') or r.get('result') or ''
    lines.append(f'{r["name"]:34} {r["status"]:8} {seconds:>8}  {detail}')
  return '\n'.join(lines)


_OUT = flags.DEFINE_string('out', None, 'folder for the checks\' JSON, the log and summary.json')
_BUDGET = flags.DEFINE_float('budget_s', 540, 'stop starting (and cut) checks after this many '
                             'seconds; leave the device call room to return')
_ONLY = flags.DEFINE_list('only', None, 'run only these checks (by name), in CHECKS order')
_ALL = flags.DEFINE_bool('all', False, 'also run checks that already have a committed result')
_LIST = flags.DEFINE_bool('list', False, 'print the checks and whether each has a result; run '
                          'nothing')


def main(argv):
  del argv
  checks = list(CHECKS)
  if _ONLY.value:
    unknown = set(_ONLY.value) - {c.name for c in checks}
    if unknown:
      raise app.UsageError(f'unknown --only {sorted(unknown)}; valid: {[c.name for c in checks]}')
    checks = [c for c in checks if c.name in _ONLY.value]
  if _LIST.value:
    for c in checks:
      done = committed_result(c.name)
      print(f'{c.name:34} ~{c.estimate_s:4.0f} s  '
            f'{"done: " + os.path.relpath(done, _ROOT) if done else "PENDING"}\n    {c.why}')
    return
  if not _OUT.value:
    raise app.UsageError('--out is required (on the device machine: --out=$OUT)')
  rows = run_checks(checks, _OUT.value, _BUDGET.value, rerun_done=_ALL.value)
  print(table(rows))


if __name__ == '__main__':
  app.run(main)

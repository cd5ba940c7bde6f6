"""Run studies on this machine and keep their records in one place: the GPU check behind the
report's portability and eager-vs-jit tables on a GPU.

    python -m experiments.study_check --studies=attention_small,execution_small --repeats=1 \\
        --out=OUT/NAME.json

runs each `configs/studies/<name>.py` through `experiments.sweep` (repeat 0 is seed 0, the same
config as a CPU sweep's first repeat, so the same `config_hash`), into a temporary root, then
writes every record to `OUT/NAME.results.jsonl` (what `experiments.report` reads: commit it
beside the CPU study's records and report both folders) and a summary to `OUT/NAME.json`: per
study the sweep's exit status, its seconds and each run's attempt line. The records file is
rewritten after each study, so a run cut short keeps what it finished.
"""

import glob
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from efficientjax.metrics.record import read_records

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STUDIES = flags.DEFINE_list('studies', ['attention_small', 'execution_small'],
                             'configs/studies/<name>.py to run, in order')
_REPEATS = flags.DEFINE_integer('repeats', 1, 'repeats per point (the first ones of the study)')
_OUT = flags.DEFINE_string('out', None, 'the summary JSON; records go beside it as '
                           '<name>.results.jsonl')


def main(argv):
  del argv
  if not _OUT.value:
    sys.exit('--out is required')
  out = os.path.abspath(_OUT.value)
  records_path = (out[:-len('.json')] if out.endswith('.json') else out) + '.results.jsonl'
  os.makedirs(os.path.dirname(out), exist_ok=True)
  summary, lines = {'studies': {}}, []
  with tempfile.TemporaryDirectory() as root:
    for name in _STUDIES.value:
      start = time.monotonic()
      proc = subprocess.run(
          [sys.executable, '-m', 'experiments.sweep',
           f'--study={os.path.join(_ROOT, "configs", "studies", name + ".py")}',
           f'--root={root}', f'--repeats={_REPEATS.value}'], cwd=_ROOT, check=False)
      folder = os.path.join(root, name)
      for path in sorted(glob.glob(os.path.join(folder, '**', 'results.jsonl'), recursive=True)):
        lines += [json.dumps(r) + '\n' for r in read_records(path, strict=False)]
      attempts = []
      if os.path.exists(os.path.join(folder, 'sweep.jsonl')):
        with open(os.path.join(folder, 'sweep.jsonl')) as f:
          attempts = [json.loads(line) for line in f if line.strip()]
      summary['studies'][name] = {'exit_code': proc.returncode,
                                  'seconds': time.monotonic() - start, 'attempts': attempts}
      with open(records_path, 'w') as f:
        f.writelines(lines)
      with open(out, 'w') as f:
        json.dump({**summary, 'records': len(lines)}, f, indent=1)
  print(f'{len(lines)} records -> {records_path}')
  if not lines:
    sys.exit('no run left a record')  # the GPU-check runner marks the check failed


if __name__ == '__main__':
  app.run(main)

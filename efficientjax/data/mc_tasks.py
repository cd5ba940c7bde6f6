"""Offline multiple-choice tasks in lm-evaluation-harness's format, made from local sources.

`write_stdlib_next_line` builds "which line comes next?" questions from the Python standard
library files that the `stdlib` corpus holds out (`pipeline.is_held_out`, the same hash rule
and fraction as pretraining's held-out split), so a model pretrained on `stdlib` has never
trained on them: the context is a few consecutive lines of a held-out file, the choices are
the true next line and lines drawn from other held-out files, in a random order. It writes
`<dir>/<name>.jsonl` and `<dir>/<name>.yaml` (lm-eval's `multiple_choice` task over the JSONL;
the YAML names the JSONL by its absolute path), which both `efficientjax.infer.multiple_choice`
and `lm_eval` (through `efficientjax.infer.lm_eval_adapter`) run. The output is a function of
the arguments and the running Python's standard library.
"""

from __future__ import annotations

import json
import os
import random
import sys

from efficientjax.data.corpora import load_documents
from efficientjax.data.pipeline import is_held_out
from efficientjax.errors import ConfigError

FIELD = 'eval.task'


def write_stdlib_next_line(directory: str, n: int = 200, choices: int = 4, seed: int = 0, *,
                           context_lines: int = 4, eval_fraction: float = 0.02,
                           min_chars: int = 8, max_chars: int = 120,
                           name: str = 'stdlib_next_line') -> str:
  """Writes the task's JSONL and YAML into `directory`; returns the YAML's path.

  Args:
    directory: where to write (created if missing).
    n: questions.
    choices: choices per question (the true line and choices - 1 distractors).
    seed: the questions, distractors and answer positions are drawn from it.
    context_lines: lines of context before the line to choose.
    eval_fraction: the pretraining run's data.eval_fraction (which files are held out).
    min_chars: shortest line (without surrounding whitespace) that can be a choice: short lines
      (`)`, `else:`) would make several choices plausible.
    max_chars: longest line that can be a choice (a continuation longer than a model's window
      cannot be scored).
    name: the task's name and the files' stem.

  Each JSONL document is {"context": the lines joined by newlines, "choices": [...], "label":
  the true line's index, "source": "FILE:LINE" (1-based)}; the task scores each choice after
  the context and a newline (`target_delimiter: "\\n"`).
  """
  if n < 1 or choices < 2 or context_lines < 1:
    raise ConfigError(FIELD, f'need n >= 1, choices >= 2 and context_lines >= 1; got n={n}, '
                      f'choices={choices}, context_lines={context_lines}')
  held_out = [d for d in load_documents('stdlib') if is_held_out(d.name, eval_fraction)]
  files = [(d.name, [line.rstrip() for line in d.text.split('\n')]) for d in held_out]
  # Candidate choices of each file, and every (file, line) that can be a question.
  def choosable(line: str) -> bool:
    return len(line.strip()) >= min_chars and len(line) <= max_chars

  pools = [sorted({line for line in lines if choosable(line)}) for _, lines in files]
  positions = [(f, i) for f, (_, lines) in enumerate(files)
               for i in range(context_lines, len(lines))
               if choosable(lines[i]) and any(line.strip() for line in lines[i - context_lines:i])]
  if len([p for p in pools if p]) < 2 or len(positions) < n:
    raise ConfigError(FIELD, f'the held-out stdlib files at eval_fraction={eval_fraction} '
                      f'({len(files)} files) give {len(positions)} questions, fewer than n={n} '
                      '(or fewer than two files to draw choices from); lower n or min_chars')
  rng = random.Random(seed)
  docs = []
  for f, i in sorted(rng.sample(positions, n)):
    file_name, lines = files[f]
    true_line = lines[i]
    others = [g for g, pool in enumerate(pools) if g != f and pool]
    distractors: list[str] = []
    for _ in range(1000 * choices):
      if len(distractors) == choices - 1:
        break
      pool = pools[rng.choice(others)]
      line = pool[rng.randrange(len(pool))]
      if line != true_line and line not in distractors:
        distractors.append(line)
    else:
      raise ConfigError(FIELD, f'could not draw {choices - 1} distinct distractors for '
                        f'{file_name}:{i + 1}; lower choices')
    label = rng.randrange(choices)
    options = distractors[:label] + [true_line] + distractors[label:]
    docs.append({'context': '\n'.join(lines[i - context_lines:i]), 'choices': options,
                 'label': label, 'source': f'{file_name}:{i + 1}'})

  os.makedirs(directory, exist_ok=True)
  data_path = os.path.abspath(os.path.join(directory, f'{name}.jsonl'))
  with open(data_path, 'w', encoding='utf-8') as f:
    for doc in docs:
      f.write(json.dumps(doc, ensure_ascii=False) + '\n')
  task = {
      'task': name,
      'dataset_path': 'json',
      'dataset_kwargs': {'data_files': {'test': data_path}},
      'test_split': 'test',
      'output_type': 'multiple_choice',
      'doc_to_text': 'context',
      'doc_to_choice': 'choices',
      'doc_to_target': 'label',
      'target_delimiter': '\n',
      'num_fewshot': 0,
      'metadata': {'version': 1.0, 'generator': f'{__name__}.write_stdlib_next_line',
                   'n': n, 'choices': choices, 'seed': seed, 'context_lines': context_lines,
                   'eval_fraction': eval_fraction, 'min_chars': min_chars,
                   'max_chars': max_chars,
                   'python': sys.version.split()[0]},
  }
  import yaml  # pylint: disable=g-import-not-at-top  (PyYAML: a flax dependency)

  class Dumper(yaml.SafeDumper):
    pass

  # "\n" rather than YAML's block form of a string that is one newline.
  Dumper.add_representer(str, lambda d, s: d.represent_scalar(
      'tag:yaml.org,2002:str', s, style='"' if '\n' in s else None))
  yaml_path = os.path.join(directory, f'{name}.yaml')
  with open(yaml_path, 'w', encoding='utf-8') as f:
    yaml.dump(task, f, Dumper=Dumper, sort_keys=False, allow_unicode=True)
  return yaml_path


# Offline tasks by name (`inference.eval_tasks` takes these beside YAML paths): each writes its
# files into a directory, given the run's data.eval_fraction, and returns the YAML's path.
OFFLINE_TASKS = {'stdlib_next_line': write_stdlib_next_line}

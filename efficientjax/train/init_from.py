"""Starting a run from trained weights: `model.init = 'hf:DIR'` or `'run:WORKDIR[:STEP]'`.

A source fixes the model's architecture and supplies its weights; the run keeps its own choice
of how to compute with them (dtypes, remat, scanning, attention kernel, MoE dispatch) and of
how to train (the optimizer starts afresh at step 0: this is an initialisation, not a resume;
resuming is rerunning with the same --workdir).

Two steps, so that a bad source fails before anything is built:
- `resolve` reads only the source's config (`config.json` of a Hugging Face checkpoint, or the
  `config.json` a project run keeps beside its checkpoints) and returns the run's `model`
  section with the architecture fields set from it. A field given on the command line that
  contradicts the source is a `ConfigError` naming both; a value the config file set is
  replaced, and `resolve` says which.
- `load` reads the weights into the run's layout and dtype (`train.loop` calls it when the run
  starts fresh, never when it resumes).
"""

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from efficientjax.errors import ConfigError
from efficientjax.model import ModelConfig, Transformer, scan_params, unscan_params

FIELD = 'model.init'
KINDS = ('hf', 'run')

# `model` fields that say how to compute or train, not what the model is: the run's own choice
# whatever the source. Every other `model` field is architecture and comes from the source.
RUN_CHOICES = frozenset({
    'init', 'attention_impl', 'init_std', 'param_dtype', 'dtype', 'scan_layers', 'remat',
    'moe.aux_loss_coef', 'moe.z_loss_coef', 'moe.seq_aux_loss_coef', 'moe.bias_update_rate',
    'moe.dispatch', 'moe.capacity_factor', 'moe.grouped_matmul',
})


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a run's initial weights come from (what the record's `model.init` says)."""
  spec: str             # as resolved: the absolute path, and the step of a run source
  kind: str             # 'hf' | 'run'
  path: str             # absolute
  step: int | None      # run: the checkpoint step
  family: str | None    # hf: the architecture family that reads it

  def record(self) -> dict[str, Any]:
    return {'source': self.spec, 'kind': self.kind, 'path': self.path, 'step': self.step,
            'family': self.family}


def parse(spec: str) -> tuple[str, str, int | None]:
  """'hf:DIR' -> ('hf', DIR, None); 'run:WORKDIR[:STEP]' -> ('run', WORKDIR, STEP or None)."""
  kind, sep, rest = spec.partition(':')
  if not sep or kind not in KINDS or not rest:
    raise ConfigError(FIELD, f'{spec!r} is not a weight source; use hf:DIR (a Hugging Face '
                      'checkpoint directory) or run:WORKDIR[:STEP] (a run of this project), or '
                      'leave it unset for a random initialisation')
  step = None
  if kind == 'run':
    path, _, tail = rest.rpartition(':')
    if path and tail.isdigit():
      rest, step = path, int(tail)
  return kind, os.path.abspath(os.path.expanduser(rest)), step


def leaves(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(leaves(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def _architecture(model: Mapping[str, Any]) -> dict[str, Any]:
  """The architecture fields of a `model` section, flattened ('moe.top_k')."""
  return {k: v for k, v in leaves(model).items() if k not in RUN_CHOICES}


def _run_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _source_fields(kind: str, path: str, step: int | None, spec: str, data: Mapping[str, Any]
                   ) -> tuple[dict[str, Any], int | None, str | None]:
  """(architecture fields the source fixes, the checkpoint step, the HF family name)."""
  if kind == 'hf':
    from efficientjax.hf.safetensors_io import FAMILIES, read_hf_config  # pylint: disable=g-import-not-at-top
    try:
      hf = read_hf_config(path)
      family = FAMILIES.get(hf.get('model_type'))
      fields = family.fields_from_hf(hf)
    except ConfigError as e:  # the loaders name their own field (model.hf): say it is init's
      raise ConfigError(FIELD, f'{spec}: {e.message}') from None
    # A checkpoint that ships its tokenizer was trained on its ids: another tokenizer would read
    # the embedding's rows as other tokens.
    ours = os.path.abspath(os.path.expanduser(str(data.get('tokenizer'))))
    if (os.path.isfile(os.path.join(path, 'tokenizer.json')) and
        ours not in (path, os.path.join(path, 'tokenizer.json'))):
      raise ConfigError(FIELD, f'{spec}: the checkpoint has its own tokenizer, and this run '
                        f'tokenises with data.tokenizer={data.get("tokenizer")!r}; set '
                        f'--config.data.tokenizer={path}')
    # Training settings a family maps (DeepSeek's aux loss coefficient) stay the run's own.
    return _architecture(fields), None, family.name
  config_file = os.path.join(path, 'config.json')
  if not os.path.isfile(config_file):
    raise ConfigError(FIELD, f'{spec}: {config_file} is missing; give the --workdir of a run of '
                      'this project (it keeps config.json beside checkpoints/)')
  try:
    with open(config_file) as f:
      source = json.load(f)
    source_model, source_data = dict(source['model']), dict(source['data'])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError(FIELD, f'{spec}: {config_file} is not a config.json written by this '
                      f'project ({type(e).__name__}: {e}); give the --workdir of one of its '
                      'runs') from None
  method = (source.get('finetune') or {}).get('method')
  if source.get('kind') == 'finetune' and method != 'full':
    # Its checkpoints hold what it trained (adapters, chosen layers), not a model.
    raise ConfigError(FIELD, f'{spec}: that run fine-tuned with finetune.method={method!r}, and '
                      'its checkpoints hold only what it trained, not the whole model; a '
                      'fine-tuning run with finetune.export=merged writes the whole model to '
                      'WORKDIR/merged, which model.init=hf:WORKDIR/merged reads')
  steps = _run_steps(path)
  if not steps:
    raise ConfigError(FIELD, f'{spec}: {path} has no checkpoints (train.checkpoint_every was 0, '
                      'or the run stopped before its first save)')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ConfigError(FIELD, f'{spec}: no checkpoint at step {step} in {path}/checkpoints; it '
                      f'has steps {", ".join(map(str, steps))}')
  # The embedding table's rows are the source's token ids: another tokenizer would read them
  # as other tokens.
  theirs = source_data.get('tokenizer')
  if theirs != data.get('tokenizer'):
    raise ConfigError(FIELD, f'{spec}: that run tokenised with data.tokenizer={theirs!r}, this '
                      f'one with {data.get("tokenizer")!r}; set --config.data.tokenizer={theirs}')
  # A learned position table is sized by the source's sequence length where it left the field
  # to be derived: pinned here, so this run's data.seq_len cannot resize it.
  if source_model.get('max_seq_len') is None:
    source_model['max_seq_len'] = source_data.get('seq_len')
  return _architecture(source_model), step, None


def resolve(model: Mapping[str, Any], data: Mapping[str, Any], defaults: Mapping[str, Any],
            explicit: frozenset[str] | set[str] = frozenset()
            ) -> tuple[dict[str, Any], Source | None, list[str]]:
  """The run's `model` section with the architecture of `model['init']`'s source.

  Args:
    model: the run config's `model` section (plain dict).
    data: its `data` section (a run source must have used the same tokenizer).
    defaults: the schema's `model` section (configs/base.py): what an architecture field the
      source does not mention is set to (a Llama checkpoint says nothing of MLA).
    explicit: dotted `model` fields set on the command line ('num_layers'): one that
      contradicts the source is an error; other differing values are replaced.

  Returns:
    (model section, the source or None when `init` is unset, one line per replaced value).
  """
  spec = model.get('init')
  if not spec:
    return dict(model), None, []
  kind, path, step = parse(spec)
  if not os.path.isdir(path):
    raise ConfigError(FIELD, f'{spec}: {path} is not a directory')
  fields, step, family = _source_fields(kind, path, step, spec, data)
  wanted = {**_architecture(defaults), **fields}
  current = leaves(model)
  unknown = sorted(set(wanted) - set(current))
  if unknown:  # a field the source names that this version's schema lacks
    raise ConfigError(FIELD, f'{spec}: its model has field(s) {", ".join(unknown)} that this '
                      'version of the project does not know; run the version that wrote it (its '
                      "record's env.git_commit), or export it with efficientjax.hf and use hf:DIR")
  conflicts = [f'model.{k}={current[k]!r} (from the command line) but the source has {v!r}'
               for k, v in sorted(wanted.items())
               if k in explicit and not _same(current[k], v)]
  if conflicts:
    raise ConfigError(FIELD, f'{spec} fixes the architecture, and ' + '; '.join(conflicts) +
                      '. Drop those overrides, or use another source')
  replaced = [f'model.{k}: {current[k]!r} -> {v!r}' for k, v in sorted(wanted.items())
              if not _same(current[k], v)]
  # The spec as resolved (absolute path, the step chosen): the load and any restart read the
  # same checkpoint even if the source run saves newer ones meanwhile.
  canonical = f'{kind}:{path}' + (f':{step}' if step is not None else '')
  out = leaves_to_tree({**current, **wanted, 'init': canonical})
  return out, Source(canonical, kind, path, step, family), replaced


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
    return float(a) == float(b)
  return a == b


def leaves_to_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Dotted leaves ('moe.top_k': 2) -> nested plain dicts; the inverse of `leaves`."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, key = path.split('.')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[key] = value
  return tree


def source(spec: str) -> Source:
  """The `Source` of a `model.init` value that `resolve` accepted: for 'run:' without a step,
  the run's newest checkpoint."""
  kind, path, step = parse(spec)
  family = None
  if kind == 'hf':
    from efficientjax.hf.safetensors_io import FAMILIES, read_hf_config  # pylint: disable=g-import-not-at-top
    family = FAMILIES.get(read_hf_config(path).get('model_type')).name
  elif step is None:
    step = _run_steps(path)[-1]
  return Source(spec, kind, path, step, family)


def load(source: Source, cfg: ModelConfig) -> dict[str, Any]:
  """The source's weights as host (numpy) arrays in `cfg`'s layout (scanned or not) and
  param_dtype: {'params': ..., and any non-trained collection the source carries}."""
  if source.kind == 'hf':
    from efficientjax.hf.safetensors_io import load_checkpoint  # pylint: disable=g-import-not-at-top
    # The variables: params, and the routing bias where the checkpoint has one (DeepSeek-V3).
    _, variables = load_checkpoint(source.path, param_dtype=cfg.param_dtype,
                                   scan_layers=cfg.scan_layers, collections=True, host=True)
    return dict(variables)
  return _load_run_params(source, cfg)


def _load_run_params(source: Source, cfg: ModelConfig) -> dict[str, Any]:
  """The params (and MoE routing biases) of a project run's checkpoint, verified against its
  integrity manifest and finite, restored without the optimizer state."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top

  from efficientjax.train.checkpoint import CheckpointError, verify_manifest  # pylint: disable=g-import-not-at-top
  with open(os.path.join(source.path, 'config.json')) as f:
    theirs = json.load(f)['model']
  # The source's own layout (scanned or not); the architecture is the same as ours.
  source_cfg = dataclasses.replace(cfg, scan_layers=bool(theirs.get('scan_layers', True)))
  directory = Path(source.path) / 'checkpoints' / str(source.step)
  steps = ', '.join(map(str, _run_steps(source.path)))
  try:
    verify_manifest(str(directory))  # raises CorruptCheckpoint naming the file that differs
  except CheckpointError as e:
    raise ConfigError(FIELD, f'{source.spec}: checkpoint {directory} is damaged ({e}); choose '
                      f'another step, run:{source.path}:STEP with STEP one of {steps}') from None
  abstract = jax.eval_shape(
      lambda: Transformer(source_cfg).init(jax.random.key(0), np.zeros((1, 1), np.int32)))
  # As efficientjax.train.checkpoint stores the state: params, and model_state when there is one.
  target = {'params': nn.unbox(abstract['params'])}
  if 'moe_state' in abstract:
    target['model_state'] = {'moe_state': nn.unbox(abstract['moe_state'])}
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=cpu, global_shape=a.shape, dtype=a.dtype), target)
  item = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), target)
  try:
    out = ocp.PyTreeCheckpointer().restore(
        str(directory / 'state'),
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
  except (ValueError, KeyError) as e:  # shapes or names that do not fit the resolved model
    raise ConfigError(FIELD, f'{source.spec}: step {source.step} does not restore into the '
                      f'model its config.json describes ({str(e).splitlines()[0][:300]})') from None
  # Restored in the source's dtype; cast (no copy where it already is the run's).
  params = jax.tree.map(lambda a: np.asarray(a).astype(cfg.param_dtype, copy=False),
                        out['params'])
  bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(params)
         if not np.isfinite(x).all()]
  if bad:
    raise ConfigError(FIELD, f'{source.spec}: step {source.step} holds non-finite values in '
                      f'{", ".join(bad[:3])}; choose an earlier step (run:WORKDIR:STEP)')
  variables = {'params': params}
  if 'model_state' in out:
    variables.update(jax.tree.map(np.asarray, out['model_state']))
  if source_cfg.scan_layers != cfg.scan_layers:
    # Per-layer trees, the routing biases as much as the params, change layout together.
    convert = scan_params if cfg.scan_layers else unscan_params
    variables = {name: convert(tree, cfg) for name, tree in variables.items()}
  return variables

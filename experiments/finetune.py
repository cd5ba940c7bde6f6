"""`kind = 'finetune'`: adapt a model (usually `model.init`'s) with a method of
efficientjax/peft and record quality (held-out answer loss) and cost, as pretraining does, plus
what the method trains (the record's `finetune` section)."""

from ml_collections import ConfigDict

from efficientjax.train.finetune import finetune
from experiments.pretrain import run_training


def run(config: ConfigDict, workdir: str) -> str:
  # A resume under another method or its settings would mix two runs' adapters.
  return run_training(config, workdir, finetune, sections=('finetune',))

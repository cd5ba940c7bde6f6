"""Fine-tuning methods on one pretrained model, small: the paper's Table 7 at CPU scale.

The quick start's run (configs/quickstart.py, 130 steps) is pretrained once (`init_from`);
each method then fine-tunes it on the offline instruction set (complete Python functions from
their signature and docstring, loss on answer tokens) for 30 steps of 8 × 512 tokens, two
seeds: full, freeze (the last 2 layers), LoRA, LoRA+, RSLoRA, DoRA (r 16, alpha 32) and PiSSA.
Full and freeze train at 2e-4, the adapters at 2e-3. About 17 minutes on a 2-core CPU.
"""

_TRAIN = {'train.steps': 30, 'train.warmup_steps': 3, 'train.eval_every': 0,
          'train.eval_batches': 4, 'train.checkpoint_every': 0, 'train.timing_warmup_steps': 3,
          'finetune.export': 'none'}


def get_study():
  return dict(
      name='finetune_small',
      axis='finetune',
      base='configs/finetune_quickstart.py',
      init_from={'base': 'configs/quickstart.py', 'overrides': {'train.checkpoint_every': 130}},
      overrides=_TRAIN,
      points={
          'full': {'finetune.method': 'full', 'train.learning_rate': 2e-4},
          'freeze': {'finetune.method': 'freeze', 'train.learning_rate': 2e-4},
          'lora': {'finetune.method': 'lora'},
          'lora_plus': {'finetune.method': 'lora_plus'},
          'rslora': {'finetune.method': 'rslora'},
          'dora': {'finetune.method': 'dora'},
          'pissa': {'finetune.method': 'pissa'},
      },
      repeats=2,
  )

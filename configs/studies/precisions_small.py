"""Inference precisions on one pretrained model, small: the paper's Table 9 at CPU scale.

The quick start's run is pretrained once (`init_from`) and served at bf16, fp16, int8 (RTN),
int4 (AWQ, groups of 128 with zero points) and fp8 weights through the continuous-batching
engine (configs/infer_*.py's `:quickstart` workload), three seeds of the request stream.
About 9 minutes on a 2-core CPU.
"""


def get_study():
  return dict(
      name='precisions_small',
      axis='precision',
      base='configs/infer_bf16.py:quickstart',
      init_from={'base': 'configs/quickstart.py', 'overrides': {'train.checkpoint_every': 130}},
      points={
          'bf16': {'inference.precision': 'bf16'},
          'fp16': {'inference.precision': 'fp16'},
          'int8': {'inference.precision': 'int8', 'inference.quant_method': 'rtn'},
          'int4': {'inference.precision': 'int4', 'inference.quant_method': 'awq',
                   'inference.symmetric': False},
          'fp8': {'inference.precision': 'fp8'},
      },
      repeats=3,
  )

"""The inference precisions (`inference.precision`) and the checks on their settings.

  bf16, fp16   every float param cast; compute in that dtype; nothing quantised.
  int8         weight-only, symmetric, one scale per output channel; compute bf16.
  int4         weight-only, groups of `group_size` input features (32/64/128 as in AWQ and
               GPTQ), symmetric or with zero points, packed two codes per byte; compute bf16.
  fp8          weight-only float8_e4m3fn, one scale per output channel (round-to-nearest only);
               compute bf16.

Weight-only precisions keep every param they do not quantise in bf16. `method` (rtn | awq |
gptq) picks how int8/int4 codes are chosen; fp8 and the float precisions take only rtn.
"""

import dataclasses
import math

import jax

from efficientjax.errors import ConfigError
from efficientjax.quant.container import QuantizedKernel
from efficientjax.quant.formats import quantize_kernel
from efficientjax.registry import Registry

METHODS = ('rtn', 'awq', 'gptq')

PRECISIONS: Registry['Precision'] = Registry('inference.precision')


@dataclasses.dataclass(frozen=True)
class Precision:
  name: str
  compute_dtype: str         # the model's `dtype` when serving at this precision
  param_dtype: str           # of every float param not quantised
  kind: str | None = None    # the container kind of quantised kernels; None: cast only
  bits: int | None = None
  grouped: bool = False      # int4: group_size applies (else one scale per output channel)
  asymmetric: bool = False   # symmetric=False (zero points) is supported
  methods: tuple[str, ...] = ('rtn',)

  def group_size(self, requested: int, n_in: int) -> int:
    """The input rows per scale for a kernel of `n_in` inputs."""
    return requested if self.grouped else n_in

  def quantize_kernel(self, kernel: jax.Array, in_dims: int, *, group_size: int, symmetric: bool,
                      scale_dtype, act_scale: jax.Array | None = None) -> QuantizedKernel:
    """One kernel [in..., out...] by round-to-nearest (AWQ passes its act_scale)."""
    n_in = math.prod(kernel.shape[:in_dims])
    return quantize_kernel(kernel, self.kind, in_dims=in_dims, bits=self.bits,
                           group_size=self.group_size(group_size, n_in), symmetric=symmetric,
                           scale_dtype=scale_dtype, act_scale=act_scale, dtype=self.compute_dtype)

  def check(self, *, method: str, group_size: int, symmetric: bool,
            has_calibration: bool) -> list[ConfigError]:
    """Settings this precision cannot honour, each naming its field (input widths are checked
    against group_size later, once the kernels are known)."""
    errors = []
    if method not in METHODS:
      errors.append(ConfigError('inference.quant_method', f'unknown value {method!r}; valid '
                                f'values: {", ".join(METHODS)}'))
    elif method not in self.methods:
      errors.append(ConfigError(
          'inference.quant_method', f'{method} is not available for precision {self.name} '
          f'({"round-to-nearest only" if self.kind else "nothing is quantised"}); use '
          f'{" or ".join(self.methods)}', {'inference.quant_method': 'rtn'}))
    elif method != 'rtn' and not has_calibration:
      errors.append(ConfigError('inference.quant_method', f'{method} needs a calibration set '
                                '(token ids [n, length] drawn from the corpus); none was given'))
    if self.grouped and (not isinstance(group_size, int) or group_size < 2 or group_size % 2):
      errors.append(ConfigError('inference.group_size', f'must be a positive even number of '
                                f'input features (32, 64 or 128 as usual), got {group_size!r}',
                                {'inference.group_size': 128}))
    if self.kind and not symmetric and not self.asymmetric:
      errors.append(ConfigError('inference.symmetric', f'precision {self.name} is symmetric '
                                'only (no zero points); set inference.symmetric=True',
                                {'inference.symmetric': True}))
    return errors


for _p in (
    Precision('bf16', 'bfloat16', 'bfloat16'),
    Precision('fp16', 'float16', 'float16'),
    Precision('int8', 'bfloat16', 'bfloat16', 'int8', 8, methods=METHODS),
    Precision('int4', 'bfloat16', 'bfloat16', 'int4', 4, grouped=True, asymmetric=True,
              methods=METHODS),
    Precision('fp8', 'bfloat16', 'bfloat16', 'fp8', 8),
):
  PRECISIONS.register(_p.name)(_p)


def compute_dtype(precision: str) -> str:
  """The model's compute dtype (`ModelConfig.dtype`) to serve at `precision`."""
  return PRECISIONS.get(precision).compute_dtype

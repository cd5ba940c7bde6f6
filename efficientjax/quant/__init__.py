"""Weight-only quantisation for inference (`inference.precision`): bf16, fp16, int8, int4, fp8.

container.py   QuantizedKernel (the pytree in place of a Linear's kernel), int4 packing,
               dequantize, and `matmul` with its per-kind implementations (MATMULS)
formats.py     round-to-nearest codes and scales (the closed forms), containers from codes
awq.py, gptq.py  the two calibrated methods, for one matrix
calibration.py   what every Linear sees over a calibration set (one pass of the float model)
precisions.py  the PRECISIONS registry and the checks on its settings
convert.py     quantize(cfg, params, ...) -> (params, report); weight_bytes
io.py          save / load with orbax
"""

from efficientjax.quant.container import (MATMULS, QuantizedKernel, dequantize, is_quantized,
                                          matmul, pack_int4, register_matmul, unpack_int4,
                                          with_implementation)
from efficientjax.quant.convert import check, layer_error, quantize, skip_reason, weight_bytes
from efficientjax.quant.formats import quantize_kernel
from efficientjax.quant.io import load, save
from efficientjax.quant.precisions import METHODS, PRECISIONS, Precision, compute_dtype

__all__ = ['MATMULS', 'METHODS', 'PRECISIONS', 'Precision', 'QuantizedKernel', 'check',
           'compute_dtype', 'dequantize', 'is_quantized', 'layer_error', 'load', 'matmul',
           'pack_int4', 'quantize', 'quantize_kernel', 'register_matmul', 'save', 'skip_reason',
           'unpack_int4', 'weight_bytes', 'with_implementation']

"""Hugging Face checkpoint interchange: safetensors in and out, one file per model family."""

from efficientjax.hf.deepseek_v2 import DEEPSEEK_V2, load_deepseek_v2, save_deepseek_v2
from efficientjax.hf.llama import LLAMA, load_llama, save_llama
from efficientjax.hf.mixtral import MIXTRAL, load_mixtral, save_mixtral
from efficientjax.hf.qwen2 import QWEN2, load_qwen2, save_qwen2
from efficientjax.hf.safetensors_io import (FAMILIES, Family, OneOf, Redundant, TensorRule,
                                            load_checkpoint, save_checkpoint)

__all__ = [
    'DEEPSEEK_V2', 'FAMILIES', 'Family', 'LLAMA', 'MIXTRAL', 'OneOf', 'QWEN2', 'Redundant',
    'TensorRule', 'load_checkpoint', 'load_deepseek_v2', 'load_llama', 'load_mixtral',
    'load_qwen2', 'save_checkpoint', 'save_deepseek_v2', 'save_llama', 'save_mixtral',
    'save_qwen2',
]

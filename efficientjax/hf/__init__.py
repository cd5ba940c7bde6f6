"""Hugging Face checkpoint interchange: safetensors in and out, one file per model family."""

from efficientjax.hf.llama import LLAMA, load_llama, save_llama
from efficientjax.hf.safetensors_io import (FAMILIES, Family, Redundant, TensorRule,
                                            load_checkpoint, save_checkpoint)

__all__ = [
    'FAMILIES', 'Family', 'LLAMA', 'Redundant', 'TensorRule', 'load_checkpoint', 'load_llama',
    'save_checkpoint', 'save_llama',
]

"""Hugging Face checkpoint interchange: safetensors in and out, one file per model family."""

from efficientjax.hf.deepseek_v2 import DEEPSEEK_V2, load_deepseek_v2, save_deepseek_v2
from efficientjax.hf.deepseek_v3 import DEEPSEEK_V3, load_deepseek_v3, save_deepseek_v3
from efficientjax.hf.llama import LLAMA, load_llama, save_llama
from efficientjax.hf.mistral import MISTRAL, load_mistral, save_mistral
from efficientjax.hf.mixtral import MIXTRAL, load_mixtral, save_mixtral
from efficientjax.hf.phi3 import PHI3, load_phi3, save_phi3
from efficientjax.hf.qwen2 import QWEN2, load_qwen2, save_qwen2
from efficientjax.hf.qwen3 import QWEN3, load_qwen3, save_qwen3
from efficientjax.hf.qwen_moe import (QWEN2_MOE, QWEN3_MOE, load_qwen2_moe, load_qwen3_moe,
                                      save_qwen2_moe, save_qwen3_moe)
from efficientjax.hf.safetensors_io import (FAMILIES, Family, OneOf, Redundant, TensorRule,
                                            load_checkpoint, save_checkpoint)

__all__ = [
    'DEEPSEEK_V2', 'FAMILIES', 'Family', 'LLAMA', 'MIXTRAL', 'OneOf', 'QWEN2', 'Redundant',
    'TensorRule', 'load_checkpoint', 'load_deepseek_v2', 'load_llama', 'load_mixtral',
    'load_qwen2', 'save_checkpoint', 'save_deepseek_v2', 'save_llama', 'save_mixtral',
    'save_qwen2',
    'PHI3', 'load_phi3', 'save_phi3',
    'MISTRAL', 'load_mistral', 'save_mistral',
    'QWEN3', 'load_qwen3', 'save_qwen3', 'QWEN3_MOE', 'load_qwen3_moe', 'save_qwen3_moe',
    'QWEN2_MOE', 'load_qwen2_moe', 'save_qwen2_moe',
    'DEEPSEEK_V3', 'load_deepseek_v3', 'save_deepseek_v3',
]

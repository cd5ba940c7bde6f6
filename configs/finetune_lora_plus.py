"""Fine-tuning study point: LoRA+ (Hayou et al. 2024): LoRA with B trained at 16x A's learning
rate.

Everything else is configs/finetune_lora.py's (Llama-3.2-1B's shape, the offline instruction
set). Presets: `:smoke` (CPU, seconds).
"""

from configs import finetune_lora

PRESETS = ('smoke',)  # --help lists them; no preset is the full size


def get_config(preset=None):
  return finetune_lora.study_point('lora_plus', preset)

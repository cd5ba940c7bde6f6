"""Fine-tuning study point: full fine-tuning: every weight trains (the comparison point of the
axis).

Everything else is configs/finetune_lora.py's (Llama-3.2-1B's shape, the offline instruction
set). Presets: `:smoke` (CPU, seconds).
"""

from configs import finetune_lora

PRESETS = ('smoke',)  # --help lists them; no preset is the full size


def get_config(preset=None):
  return finetune_lora.study_point('full', preset)

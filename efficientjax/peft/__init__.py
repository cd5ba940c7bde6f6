"""Parameter-efficient fine-tuning: methods as data beside a frozen base (methods.py), the
projections they adapt (targets.py), LoRA-family arithmetic (lora.py) and peft's file format
(interchange.py: save_adapter, load_adapter; imported on use, it reads the HF families)."""

from efficientjax.peft.methods import METHODS, FinetuneConfig, Method
from efficientjax.peft.targets import ALL_LINEAR, Projection, projections, select

__all__ = ['METHODS', 'FinetuneConfig', 'Method', 'ALL_LINEAR', 'Projection', 'projections',
           'select']

"""Parameter-efficient fine-tuning: methods as data beside a frozen base (see methods.py)."""

from efficientjax.peft.methods import METHODS, FinetuneConfig, Method
from efficientjax.peft.targets import ALL_LINEAR, Projection, projections, select

__all__ = ['METHODS', 'FinetuneConfig', 'Method', 'ALL_LINEAR', 'Projection', 'projections',
           'select']

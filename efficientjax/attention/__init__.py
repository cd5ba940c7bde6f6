"""Attention variants and their registry (`model.attention`)."""

from efficientjax.attention.mha import MultiHeadAttention
from efficientjax.attention.positions import POSITIONS
from efficientjax.registry import Registry

ATTENTION = Registry('model.attention')
ATTENTION.register('mha')(MultiHeadAttention)

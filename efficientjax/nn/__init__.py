"""Building blocks shared by every model variant."""

from efficientjax.nn.embed import Embed
from efficientjax.nn.linear import Linear
from efficientjax.nn.mlp import FFN, MLP
from efficientjax.nn.norms import RMSNorm

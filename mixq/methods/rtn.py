"""Round to nearest, on parameters chosen by the format's importance-weighted search.

The importance of input column j is H_jj, so the search minimises the layer's output error with H
reduced to its diagonal (llama.cpp's imatrix weighting); each format family owns its search (`fit`).
"""

from __future__ import annotations

import torch

from mixq.formats import Format, QTensor
from mixq.methods import MethodSettings, importance, register_method


@register_method("rtn")
def quantize_rtn(W: torch.Tensor, H: torch.Tensor, fmt: Format, settings: MethodSettings) -> QTensor:
    return fmt.fit(W.float(), importance(H), *settings.clip())

"""Round to nearest, with a per-group clipping search.

The search tries shrinking each group's range by factors from 1.0 down to `clip_min` and keeps,
per (row, group), the one with the least error sum_j H_jj (w_j - w_hat_j)^2: the layer's output
error with H reduced to its diagonal, which separates over groups (llama.cpp's imatrix weighting).
"""

from __future__ import annotations

import torch

from mixq.formats import QTensor
from mixq.formats.integer import IntFormat
from mixq.methods import MethodSettings, register_method


def search_qparams(
    fmt: IntFormat, W: torch.Tensor, importance: torch.Tensor, settings: MethodSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros (rows, n_groups) minimising the importance-weighted squared error."""
    if not settings.clip_search:
        return fmt.qparams(W)
    G = fmt.grouped(W)  # (rows, n_groups, group_len)
    imp = fmt.grouped(importance.unsqueeze(0))  # (1, n_groups, group_len), zero on padding
    lo, hi = fmt.group_range(G)
    best_err = best_scale = best_zero = None
    for clip in torch.linspace(1.0, settings.clip_min, settings.clip_grid).tolist():
        scale, zero = fmt.qparams_from_range(lo, hi, clip)
        s, z = scale.unsqueeze(2), zero.unsqueeze(2)
        # squared error of every weight, in place: (scale * (code - zero) - w)^2 * importance
        e = torch.div(G, s).round_().add_(z).clamp_(0, fmt.qmax).sub_(z).mul_(s).sub_(G)
        err = e.square_().mul_(imp).sum(dim=2)  # (rows, n_groups)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


@register_method("rtn")
def quantize_rtn(W: torch.Tensor, H: torch.Tensor, fmt: IntFormat, settings: MethodSettings) -> QTensor:
    W = W.float()
    importance = torch.diag(H).float().clamp(min=0)  # (cols,)
    if importance.sum() == 0:
        importance = torch.ones_like(importance)
    scale, zero = search_qparams(fmt, W, importance, settings)
    return fmt.quantize(W, scale, zero)

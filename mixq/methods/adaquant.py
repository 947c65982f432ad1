"""AdaQuant (Hubara et al., 2021) per layer: learned rounding and scales that minimise the layer's
own output error on the calibration inputs, ||W_q X - W X||^2 = tr(dW H dW^T).

With H = X^T X captured, the objective is exact over every calibration token and costs one
(rows, cols) x (cols, cols) product per step, whatever the number of tokens. The start is
`settings.init` (GPTQ by default); the result is kept only if it beats the start.

`block` is registered here too: per layer it is its start; `quantize.py` then trains the rounding
of every `block` tensor of a transformer block jointly on the block's output (reconstruct.py).
"""

from __future__ import annotations

import torch

from mixq.formats import Format, QTensor
from mixq.methods import MethodSettings, output_error, register_method, starting_point
from mixq.methods.rounding import LearnedRounding, sign_descent


@register_method("adaquant")
def quantize_adaquant(W: torch.Tensor, H: torch.Tensor, fmt: Format, settings: MethodSettings) -> QTensor:
    W = W.float()
    q0 = starting_point(W, H, fmt, settings)
    if settings.steps == 0:
        return q0
    Hn = (H / max(float(torch.diag(H).mean()), 1e-30)).float()  # scale-free: the sign step ignores it anyway
    rounding = LearnedRounding(W, q0, settings.learn_scale)

    def loss(_step: int) -> torch.Tensor:
        dW = rounding() - W
        return ((dW @ Hn) * dW).sum()

    sign_descent([(list(rounding.parameters()), settings.step_size(settings.steps))], loss, settings.steps, rounding.clamp_, keep_best=True)
    q = rounding.to_qtensor()
    return q if output_error(W, q.dequantize(), H) < output_error(W, q0.dequantize(), H) else q0


@register_method("block")
def quantize_block_start(W: torch.Tensor, H: torch.Tensor, fmt: Format, settings: MethodSettings) -> QTensor:
    return starting_point(W, H, fmt, settings)

"""Greedy coordinate descent on the layer's exact output error, from another method's result
(GPTQ by default), as in CDQuant (Nair and Suggala, 2024).

The objective is tr(dW H dW^T), one independent quadratic per row. Moving one code by +-1 changes
its weight by +-s (s: that weight's group scale), and the objective by exactly

    delta = +-2 s g_j + s^2 H_jj,   g = dW H (row-wise),

so each column in turn takes, in every row at once, the move that lowers the error most, if any.
GPTQ chooses each code once, with only the columns after it left to compensate; revisiting every
code with all the others fixed finds the changes it could not. Grid parameters (scales, zero
points) stay as the start chose them, so the result has the start's format and bytes.

Columns are visited in blocks: g for a block's columns is one (rows, cols) x (cols, block) product
from the current dW, and moves inside the block update it through H's diagonal block only, so a
pass costs about one GPTQ's arithmetic. The result is kept only if it lowers the error.
"""

from __future__ import annotations

import torch

from mixq.formats import Format, QTensor
from mixq.methods import MethodSettings, output_error, register_method, starting_point

BLOCK = 128  # columns whose gradient is made by one product and updated in place


@register_method("cd")
def quantize_coordinate_descent(W: torch.Tensor, H: torch.Tensor, fmt: Format, settings: MethodSettings) -> QTensor:
    W = W.float()
    start = starting_point(W, H, fmt, settings)
    q = descend(W, H.float(), start, settings.cd_passes)
    return q if output_error(W, q.dequantize(), H) < output_error(W, start.dequantize(), H) else start


@torch.no_grad()
def descend(W: torch.Tensor, H: torch.Tensor, start: QTensor, passes: int) -> QTensor:
    cols = W.shape[1]
    glen = start.format.group_len(cols)
    step = start.scale.float().repeat_interleave(glen, dim=1)[:, :cols]
    qmax = start.format.qmax
    codes = start.codes.to(torch.int16)
    dW = start.dequantize().float() - W
    for _ in range(passes):
        moved = 0
        for b0 in range(0, cols, BLOCK):
            b1 = min(b0 + BLOCK, cols)
            g = dW @ H[:, b0:b1]  # (rows, block)
            H_block = H[b0:b1, b0:b1]
            for j in range(b1 - b0):
                c = b0 + j
                s, h = step[:, c], H_block[j, j]
                up = 2 * s * g[:, j] + s * s * h
                down = -2 * s * g[:, j] + s * s * h
                up = torch.where(codes[:, c] < qmax, up, torch.inf)
                down = torch.where(codes[:, c] > 0, down, torch.inf)
                move = torch.where(torch.minimum(up, down) < 0, torch.where(up <= down, 1, -1), 0)
                if not move.any():
                    continue
                moved += int(move.count_nonzero())
                delta = move * s
                codes[:, c] += move.to(codes.dtype)
                dW[:, c] += delta
                g += delta[:, None] * H_block[j][None, :]
        if moved == 0:
            break
    return QTensor(start.format, codes.to(torch.uint8), start.scale, start.zero, start.offset, start.super_scale)

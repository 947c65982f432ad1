"""Greedy coordinate descent on the layer's exact output error, from another method's result
(GPTQ by default), as in CDQuant (Nair and Suggala, 2024).

The objective is tr(dW H dW^T), one independent quadratic per row. Moving one code to a neighbour
changes its weight by some e (the group scale, or a codebook's level spacing times it), and the
objective by exactly

    delta = 2 e g_j + e^2 H_jj,   g = dW H (row-wise),

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
from mixq.formats.integer import decode
from mixq.methods import MethodSettings, check_supported, output_error, register_method, starting_point

BLOCK = 128  # columns whose gradient is made by one product and updated in place


@register_method("cd")
def quantize_coordinate_descent(W: torch.Tensor, H: torch.Tensor, fmt: Format, settings: MethodSettings) -> QTensor:
    check_supported("cd", fmt)
    W = W.float()
    start = starting_point(W, H, fmt, settings)
    q = descend(W, H.float(), start, settings.cd_passes)
    return q if output_error(W, q.dequantize(), H) < output_error(W, start.dequantize(), H) else start


@torch.no_grad()
def descend(W: torch.Tensor, H: torch.Tensor, start: QTensor, passes: int) -> QTensor:
    cols = W.shape[1]
    fmt = start.format
    qmax = fmt.qmax
    codes = start.codes.to(torch.int16)
    W_hat = start.dequantize().float()
    dW = W_hat - W

    def moved(c: int, code: torch.Tensor) -> torch.Tensor:
        """Column c's weights with the codes `code` (clamped into range: the move is then masked)."""
        return column(start, c, code.clamp(0, qmax))
    for _ in range(passes):
        n_moved = 0
        for b0 in range(0, cols, BLOCK):
            b1 = min(b0 + BLOCK, cols)
            g = dW @ H[:, b0:b1]  # (rows, block)
            H_block = H[b0:b1, b0:b1]
            for j in range(b1 - b0):
                c = b0 + j
                h, now = H_block[j, j], W_hat[:, c]
                w_up, w_down = moved(c, codes[:, c] + 1), moved(c, codes[:, c] - 1)
                e_up, e_down = w_up - now, w_down - now
                up = torch.where(codes[:, c] < qmax, 2 * e_up * g[:, j] + e_up * e_up * h, torch.inf)
                down = torch.where(codes[:, c] > 0, 2 * e_down * g[:, j] + e_down * e_down * h, torch.inf)
                move = torch.where(torch.minimum(up, down) < 0, torch.where(up <= down, 1, -1), 0)
                if not move.any():
                    continue
                n_moved += int(move.count_nonzero())
                new = torch.where(move > 0, w_up, torch.where(move < 0, w_down, now))
                g += (new - now)[:, None] * H_block[j][None, :]
                codes[:, c] += move.to(codes.dtype)
                W_hat[:, c] = new
                dW[:, c] = new - W[:, c]
        if n_moved == 0:
            break
    return QTensor(start.format, codes.to(torch.uint8), start.scale, start.zero, start.offset, start.super_scale)


def column(q: QTensor, c: int, codes: torch.Tensor) -> torch.Tensor:
    """Column c of q's weights were its codes `codes`: the format's own decoding of one column."""
    g = c // q.format.group_len(q.shape[1])
    offset = None if q.offset is None else q.offset[:, g]
    return decode(codes.float(), q.scale[:, g].float(), q.zero[:, g].float(), offset, q.format.levels)

"""GPTQ (Frantar et al., 2022): quantize columns in turn, pushing each column's rounding error onto
the columns not yet quantized through the inverse Hessian of the layer's inputs.

Notation follows the paper: W (rows, cols), H = sum x^T x (cols, cols), Hinv the upper Cholesky
factor of H^-1, Err1 the scaled errors of one block of columns i1:i2 (the lazy batch update).

Group parameters are chosen when the first column of a group comes up, from the group's current
(already error-compensated) weights, with the same clipping search as RTN. With `act_order` the
columns are visited by decreasing diag(H), but codes, scales and zeros are stored in the original
column order, so the storage layout never depends on the method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from mixq.formats import QTensor
from mixq.formats.integer import IntFormat, decode, encode
from mixq.methods import MethodSettings, register_batched, register_method
from mixq.methods.rtn import search_qparams

GPTQ_PRECISION = torch.float32  # the column loop; the Cholesky factorisations run in float64


@register_method("gptq")
def quantize_gptq(W: torch.Tensor, H: torch.Tensor, fmt: IntFormat, settings: MethodSettings) -> QTensor:
    return quantize_gptq_many(W, H, [fmt], settings)[0]


@register_batched("gptq")
def quantize_gptq_many(
    W: torch.Tensor, H: torch.Tensor, fmts: Sequence[IntFormat], settings: MethodSettings
) -> list[QTensor]:
    """GPTQ of W onto several grids that share a group size, in one pass.

    The k copies of W are stacked as rows: rows never interact in GPTQ, so they share H's
    factorisation and the column loop, which costs little more for k copies than for one.
    """
    assert len({f.group_size for f in fmts}) == 1, "stacked grids must share the group size"
    fmt = fmts[0]
    rows, cols = W.shape
    k = len(fmts)
    W = W.to(GPTQ_PRECISION).repeat(k, 1)  # (k*rows, cols)
    copies = [slice(j * rows, (j + 1) * rows) for j in range(k)]
    qmax = torch.tensor([f.qmax for f in fmts], dtype=GPTQ_PRECISION).repeat_interleave(rows)  # (k*rows,)
    H = H.to(torch.float64).clone()

    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0

    perm = torch.argsort(torch.diag(H), descending=True) if settings.act_order else torch.arange(cols)
    inv_perm = torch.argsort(perm)
    W, H = W[:, perm], H[perm][:, perm]
    importance = torch.diag(H).to(GPTQ_PRECISION)

    H += settings.damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Hinv = Hinv.to(GPTQ_PRECISION)

    glen, n_groups = fmt.group_len(cols), fmt.n_groups(cols)
    group_of = perm // glen  # (cols,) group of each visited position
    scale = torch.zeros(k * rows, n_groups)
    zero = torch.zeros(k * rows, n_groups)
    ready = torch.zeros(n_groups, dtype=torch.bool)
    Q = torch.zeros(k * rows, cols)

    B = settings.block_size
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        W1 = W[:, i1:i2].clone()  # (k*rows, i2-i1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = int(group_of[i1 + i])
            if not ready[g]:
                W[:, i1:i2] = W1  # let the group see its compensated weights
                pos = inv_perm[g * glen : min((g + 1) * glen, cols)]  # (glen,) positions of the group
                for f, rows_j in zip(fmts, copies):
                    one_group = dataclasses.replace(f, group_size=0)
                    s, z = search_qparams(one_group, W[rows_j][:, pos], importance[pos], settings)
                    scale[rows_j, g], zero[rows_j, g] = s[:, 0], z[:, 0]
                ready[g] = True
            w = W1[:, i]  # (k*rows,)
            q = encode(w, scale[:, g], zero[:, g], qmax)
            Q[:, i1 + i] = q
            err = (w - decode(q, scale[:, g], zero[:, g])) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    Q = Q[:, inv_perm].to(torch.uint8)
    return [QTensor(f, Q[rows_j], scale[rows_j], zero[rows_j]) for f, rows_j in zip(fmts, copies)]

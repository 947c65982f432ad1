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

import torch

from mixq.formats import QTensor
from mixq.formats.integer import IntFormat
from mixq.methods import MethodSettings, register_method
from mixq.methods.rtn import search_qparams

GPTQ_PRECISION = torch.float32  # the column loop; the Cholesky factorisations run in float64


@register_method("gptq")
def quantize_gptq(W: torch.Tensor, H: torch.Tensor, fmt: IntFormat, settings: MethodSettings) -> QTensor:
    W = W.to(GPTQ_PRECISION).clone()
    rows, cols = W.shape
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
    one_group = dataclasses.replace(fmt, group_size=0)  # qparams of a single group
    scale = torch.zeros(rows, n_groups)
    zero = torch.zeros(rows, n_groups)
    ready = torch.zeros(n_groups, dtype=torch.bool)
    Q = torch.zeros(rows, cols)

    B = settings.block_size
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        W1 = W[:, i1:i2].clone()  # (rows, i2-i1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = int(group_of[i1 + i])
            if not ready[g]:
                W[:, i1:i2] = W1  # let the group see its compensated weights
                pos = inv_perm[g * glen : min((g + 1) * glen, cols)]  # (glen,) positions of the group
                s, z = search_qparams(one_group, W[:, pos], importance[pos], settings)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
                ready[g] = True
            w = W1[:, i]  # (rows,)
            q = fmt.encode(w, scale[:, g], zero[:, g])
            Q[:, i1 + i] = q
            err = (w - fmt.decode(q, scale[:, g], zero[:, g])) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    return QTensor(fmt, Q[:, inv_perm].to(torch.uint8), scale, zero)

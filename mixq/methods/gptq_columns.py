"""GPTQ's column loop, compiled with numba and parallel over rows.

Rows never interact in GPTQ, so each thread takes whole rows; a row's block of columns stays in the
core's cache while each column's scaled rounding error is pushed onto the block's later columns.
In Python this loop cost ten torch calls per column, most of GPTQ's time on small layers. The
arithmetic is that of `formats.integer.encode`/`decode` and the paper's update, element by element
in float32 without contraction to fused multiply-adds, so results equal the torch loop's to the
bit (tests/test_methods.py). Compiled on first use, cached on disk where the package allows.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, cache=True)
def quantize_columns(Hinv1, scale, zero, offset, qmax, levels, codebook, group_of, W, Q, Err, start, stop, i1, i2):
    """Quantize visiting positions start..stop-1 of the block i1..i2 of W (rows, cols), in place.

    Hinv1 is the block's part of the inverse-Hessian factor; scale, zero, offset (rows, n_groups)
    are the grids' parameters, qmax (rows,) the largest code, levels a codebook used when
    `codebook`, group_of the group of each visiting position. Codes go to Q, each column's scaled
    error to Err (column i - i1), and W's later columns in the block take the compensation."""
    mids = (levels[1:] + levels[:-1]) / np.float32(2)
    for r in numba.prange(W.shape[0]):
        for i in range(start, stop):
            g = group_of[i]
            s, z, o, w = scale[r, g], zero[r, g], offset[r, g], W[r, i]
            x = (w + o) / s if s != 0 else np.float32(0)
            if codebook:
                q = np.float32(np.searchsorted(mids, x))  # the count of midpoints below x, as torch.bucketize
                w_hat = s * levels[np.int64(q)] - o
            else:
                q = min(max(np.float32(np.rint(x)) + z, np.float32(0)), qmax[r])
                w_hat = s * (q - z) - o
            err = (w - w_hat) / Hinv1[i - i1, i - i1]
            Q[r, i] = q
            Err[r, i - i1] = err
            later, h = W[r, i:i2], Hinv1[i - i1, i - i1 :]
            for j in range(later.shape[0]):  # over views from 0: numba then vectorises the loop
                later[j] -= err * h[j]

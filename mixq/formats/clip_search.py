"""The integer grids' per-group search for a range shrink, compiled with numba.

For every group it makes each candidate's (scale, zero) from the group's range shrunk by a factor,
sums importance * (w_hat - w)^2 over the group's weights, and keeps the first candidate with the
least error. As torch passes over a (factors, rows, groups, group_len) tensor this was most of the
profile's time; fused into one loop per group it runs over ten times faster and makes no
temporaries. The parameters are made as `IntFormat.qparams_from_range` makes them (float32, the
scale rounded up to the next fp16 value) and each weight's error as `IntFormat` rounds and decodes
it (no fused multiply-adds); only the order of the sum over a group is free (`reassoc`), so a choice
can differ from a float32 torch sum only between candidates whose errors tie to rounding.
Compiled on first use, cached on disk where the package allows.
"""

from __future__ import annotations

import numba
import numpy as np

FP16_MAX = 65504.0
FP16_SUBNORMAL = 2.0**-14  # below it fp16 values are multiples of 2^-24


@numba.njit(cache=True)
def _fp16_ceil(x, word):
    """The least fp16 value >= x, for 0 < x <= FP16_MAX, as float32. fp16 keeps 10 of float32's 23
    mantissa bits, so above its subnormals that is x with the 13 low bits cleared, plus one unit of
    the kept bits if any was set (`word`: a float32 array of one element and its uint32 view)."""
    if x < FP16_SUBNORMAL:  # fp16's subnormals are multiples of 2^-24
        return np.float32(np.ceil(x * np.float32(2.0**24)) * np.float32(2.0**-24))
    value, bits = word
    value[0] = x
    low = bits[0] & np.uint32(0x1FFF)
    bits[0] = (bits[0] - low + np.uint32(0x2000)) if low else bits[0]
    return value[0]


@numba.njit(cache=True)
def _exact_scale(lo, hi, clip, qmax, symmetric):
    """The scale of one group's range (lo, hi) shrunk by `clip` (qmax: float32), before it is made storable."""
    if symmetric:
        return hi * clip / ((qmax + np.float32(1)) / np.float32(2) - np.float32(0.5))
    return (hi - lo) * clip / qmax


@numba.njit(cache=True)
def _candidate(lo, hi, clip, qmax, symmetric, word):
    """(scale, zero) of one group's range (lo, hi) shrunk by `clip`, as IntFormat.qparams_from_range."""
    scale = _fp16_ceil(max(_exact_scale(lo, hi, clip, qmax, symmetric), np.float32(2.0**-24)), word)
    if symmetric:
        return scale, (qmax + np.float32(1)) / np.float32(2)
    return scale, min(max(np.float32(np.rint(-lo * clip / scale)), np.float32(0)), qmax)


@numba.njit(parallel=True, cache=True, fastmath={"reassoc", "nsz"})
def fit_groups(G, importance, clips, qmax, symmetric):
    """Per group of G (rows, n_groups, group_len): the (scale, zero) of the first of the range
    shrinks `clips` with the least error sum importance * (w_hat - w)^2 (`importance`: n_groups x
    group_len), each row on its own grid (`qmax`, `symmetric`: per row, so that the grids of a
    GPTQ stack fit in one call). Also whether every scale was storable (finite, below fp16's largest)."""
    rows, n_groups, _ = G.shape
    scale_out = np.empty((rows, n_groups), np.float32)
    zero_out = np.empty((rows, n_groups), np.float32)
    storable = np.ones(rows, np.bool_)
    for r in numba.prange(rows):
        value = np.empty(1, np.float32)
        word = (value, value.view(np.uint32))
        top, sym = qmax[r], symmetric[r]
        for g in range(n_groups):
            w, imp = G[r, g], importance[g]
            lo, hi = np.float32(0), np.float32(0)  # the range includes 0 (and so any padding)
            finite = True
            for j in range(w.shape[0]):
                finite &= np.isfinite(w[j])
                if sym:
                    hi = max(hi, abs(w[j]))
                else:
                    lo, hi = min(lo, w[j]), max(hi, w[j])
            if sym:
                lo = -hi
            if not (finite and _exact_scale(lo, hi, clips.max(), top, sym) < FP16_MAX):
                storable[r] = False
                scale_out[r, g], zero_out[r, g] = np.float32(1), np.float32(0)
                continue
            least = np.inf
            for f in range(clips.shape[0]):
                s, z = _candidate(lo, hi, clips[f], top, sym, word)
                err = np.float32(0)
                for j in range(w.shape[0]):
                    e = (min(max(np.float32(np.rint(w[j] / s)) + z, np.float32(0)), top) - z) * s - w[j]
                    err += e * e * imp[j]
                if err < least:  # the first of equal errors: the widest range wins ties
                    least = err
                    scale_out[r, g], zero_out[r, g] = s, z
    return scale_out, zero_out, storable.all()

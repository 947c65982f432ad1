"""The lattice types' codes for given scales, compiled with numba.

Each group of weights (four for IQ3, eight for IQ2), in units of its sub-block's scale, rounds to a
cell of levels; of that cell's k nearest grid points (a table made once per type), the first of
least importance-weighted error sum w * (|x| - point)^2 is kept. Types that store 7 signs of each 8
then flip, in an 8-weight chunk with an odd count of minus signs, the sign that costs least
(importance * |x| * magnitude). As torch ops over a (rows, groups, k, width) gather of the
candidates this was most of a lattice fit's time; fused into one loop per sub-block it makes no
temporaries. Each term is computed in the order the torch version used; only the order of the sum
over a group's few weights is free, so a choice can differ from torch's only between candidates
whose errors tie to rounding. Compiled on first use, cached on disk where the package allows.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, cache=True)
def lattice_codes(G, scale, importance, magnitudes, key_bits, neighbours, coordinates, point_levels, sign_parity):
    """Codes (rows, sub-blocks, sub) as float32: 0..half-1 the negative levels from the largest,
    half.. the positive ones, where half = len(magnitudes).

    G: (rows, sub-blocks, sub) weights; scale: (rows, sub-blocks), a sub-block's weights count as 0
    where it is 0; importance: (sub-blocks, sub); magnitudes: the type's positive levels, ascending;
    key_bits: bits of one level in a cell's key; neighbours: (keys, k) grid point indices, nearest
    first; coordinates: (keys, k, width) their magnitudes; point_levels: (points, width) each grid
    point's level indices; sign_parity: the 8th sign of each 8 makes the count of minus signs even.
    """
    rows, n_sub, sub = G.shape
    k, width = coordinates.shape[1], coordinates.shape[2]
    half = magnitudes.shape[0]
    boundaries = (magnitudes[1:] + magnitudes[:-1]) / np.float32(2)  # a level: the count of these below |x|
    codes = np.empty((rows, n_sub, sub), np.float32)
    for r in numba.prange(rows):
        x = np.empty(sub, np.float32)
        level = np.empty(sub, np.int64)
        for s in range(n_sub):
            imp = importance[s]
            for j in range(sub):
                x[j] = G[r, s, j] / scale[r, s] if scale[r, s] != 0 else np.float32(0)
            for g in range(0, sub, width):
                cell = 0
                for d in range(width):
                    level_d = 0
                    while level_d < boundaries.shape[0] and boundaries[level_d] < abs(x[g + d]):
                        level_d += 1
                    cell |= level_d << (key_bits * d)
                best, least = 0, np.inf
                for j in range(k):
                    err = np.float32(0)
                    for d in range(width):
                        e = abs(x[g + d]) - coordinates[cell, j, d]
                        err += imp[g + d] * (e * e)
                    if err < least:  # the first of equal errors, as torch's argmin
                        least, best = err, j
                for d in range(width):
                    level[g + d] = point_levels[neighbours[cell, best], d]
            for c in range(0, sub, 8 if sign_parity else sub):
                flip = -1
                if sign_parity:
                    odd, cheapest = False, np.inf
                    for j in range(c, c + 8):
                        odd ^= x[j] < 0
                        cost = imp[j] * abs(x[j]) * magnitudes[level[j]]
                        if cost < cheapest:
                            cheapest, flip = cost, j
                    flip = flip if odd else -1
                for j in range(c, c + (8 if sign_parity else sub)):
                    negative = (x[j] < 0) ^ (j == flip)
                    codes[r, s, j] = half - 1 - level[j] if negative else half + level[j]
    return codes

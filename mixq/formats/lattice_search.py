"""The lattice types' per-group search for a grid point, compiled with numba.

Each group of weights (four for IQ3, eight for IQ2), in units of its sub-block's scale, rounds to a
cell of levels; of that cell's k nearest grid points (a table made once per type), the search keeps
the first of least importance-weighted error sum w * (|x| - point)^2. As torch ops over a (rows,
groups, k, width) gather of the candidates this was most of a lattice fit's time; fused into one
loop per group it makes no temporaries. Each term is computed as the torch version did (the
square, then the weight); only the order of the sum over a group's few weights is free, so a
choice can differ from torch's only between candidates whose errors tie to rounding.
Compiled on first use, cached on disk where the package allows.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, cache=True)
def nearest_points(magnitudes, importance, boundaries, key_bits, neighbours, coordinates):
    """Per group: the grid point of least weighted error among its cell's neighbours.

    magnitudes: (rows, groups, width) |x| in units of the scale; importance: (groups, width);
    boundaries: the midpoints between the type's levels (a weight's level is the count of them below
    it, as torch.bucketize); key_bits: bits of one level in a cell's key; neighbours: (keys, k) grid
    point indices, nearest first; coordinates: (keys, k, width) their magnitudes. Returns (rows,
    groups) grid point indices.
    """
    rows, groups, width = magnitudes.shape
    k = neighbours.shape[1]
    points = np.empty((rows, groups), np.int64)
    for r in numba.prange(rows):
        for g in range(groups):
            cell = 0
            for d in range(width):
                level = 0
                while level < boundaries.shape[0] and boundaries[level] < magnitudes[r, g, d]:
                    level += 1
                cell |= level << (key_bits * d)
            best, least = 0, np.inf
            for j in range(k):
                err = np.float32(0)
                for d in range(width):
                    e = magnitudes[r, g, d] - coordinates[cell, j, d]
                    err += importance[g, d] * (e * e)
                if err < least:  # the first of equal errors, as torch's argmin
                    least, best = err, j
            points[r, g] = neighbours[cell, best]
    return points

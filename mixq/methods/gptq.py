"""GPTQ (Frantar et al., 2022): quantize columns in turn, pushing each column's rounding error onto
the columns not yet quantized through the inverse Hessian of the layer's inputs.

Notation follows the paper: W (rows, cols), H = sum x^T x (cols, cols), Hinv the upper Cholesky
factor of H^-1, Err1 the scaled errors of one block of columns i1:i2 (the lazy batch update).

Where a format's groups are independent (the int family, ggml's 32-wide types), a group's
parameters are chosen when its first column comes up, from the group's current (already
error-compensated) weights, with the format's own importance-weighted search. The k-quants tie
groups together through their super-block scales, so their grid is chosen once, from W, before the
column loop, which then rounds onto it with compensation. The column loop runs compiled
(gptq_columns.py), stopping where a group's parameters are to be chosen. With `act_order` the
columns are visited by decreasing diag(H), but codes and parameters are stored in the original
column order, so the storage layout never depends on the method. The lattice types choose codes a
few columns at a time (`quantize_gptq_lattice`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch

from mixq.errors import MixqError
from mixq.formats import Format, QTensor
from mixq.formats.ggml import LatticeFormat, positive_importance
from mixq.formats.integer import IntFormat, fit_stacked
from mixq.memory import release_tail
from mixq.methods import MethodSettings, check_supported, register_batched, register_method

GPTQ_PRECISION = torch.float32  # the column loop; the Cholesky factorisations run in float64


@register_method("gptq")
def quantize_gptq(W: torch.Tensor, H: torch.Tensor, fmt: Format, settings: MethodSettings) -> QTensor:
    return quantize_gptq_many(W, H, [fmt], settings)[0]


def permuted_float64(H: torch.Tensor, perm: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """H[perm][:, perm] as a new float64 matrix, made a slice of rows at a time (no temporary of
    H's full size: for an 8960-wide down_proj each is 320-640 MB)."""
    out = torch.empty(H.shape, dtype=torch.float64)
    for start in range(0, len(perm), rows):
        out[start : start + rows] = H.index_select(0, perm[start : start + rows]).index_select(1, perm)
    return out


def inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of H^-1 (float32) from a float64 H that it overwrites: LAPACK's
    factorisations run in place and the float32 result is written over the first half of H's own
    memory (the second half given back to the system), so a 8960-wide H costs one float64 copy at
    the factorisation and one float32 matrix after."""
    from scipy.linalg import lapack

    a = H.numpy().T  # H is symmetric: its transpose is the same matrix in LAPACK's column order
    for step, (routine, kwargs) in enumerate(((lapack.dpotrf, {"overwrite_a": 1, "clean": 0}),
                                              (lapack.dpotri, {"overwrite_c": 1}),
                                              (lapack.dpotrf, {"overwrite_a": 1, "clean": 1}))):
        a, info = routine(a, lower=0, **kwargs)
        if info != 0:
            raise MixqError(f"GPTQ: the damped H is not positive definite (LAPACK step {step}, info {info}); "
                            "raise the damping")
    assert np.shares_memory(a, H.numpy()), "LAPACK did not factorise in place"
    return _narrowed_in_place(H).T  # H's rows now hold the factor's columns (U^T, lower, clean)


def _narrowed_in_place(M: torch.Tensor) -> torch.Tensor:
    """M (float64, n x n, contiguous) as float32 in the first half of its own memory. Rows are
    converted in runs [s, 2s): a run's float32 bytes end where its float64 rows begin, so nothing is
    overwritten before it is read. The pages of the second half are returned to the system."""
    n = M.shape[0]
    out = M.view(-1).view(torch.float32)[: n * n].view(n, n)
    out[0].copy_(M[0].clone())  # row 0 overlaps itself
    start = 1
    while start < n:
        stop = min(n, 2 * start)
        out[start:stop].copy_(M[start:stop])
        start = stop
    release_tail(M, n * n * 4)
    return out


class _LastFactor:
    """The last H's visiting order and factor, kept inside `one_factorisation_per_h` only. Keyed by
    the H tensor itself (a weak reference: a new tensor is a new H, whatever its address) and its
    version counter (an in-place change is a new H), with the settings that shape the factor."""

    enabled = False
    entry: tuple | None = None

    @classmethod
    def get(cls, H: torch.Tensor, key: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        if cls.entry is not None and cls.entry[0]() is H and cls.entry[1] == (H._version, *key):
            return cls.entry[2]
        cls.entry = None  # dropped before the next factorisation, whose float64 copy is GPTQ's peak
        return None

    @classmethod
    def put(cls, H: torch.Tensor, key: tuple, value: tuple[torch.Tensor, torch.Tensor]) -> None:
        if cls.enabled:
            cls.entry = (weakref.ref(H), (H._version, *key), value)


@contextmanager
def one_factorisation_per_h() -> Iterator[None]:
    """Within the block, GPTQ factorises each H once however many quantizations use it: the
    matrices of one stage (q/k/v, gate/up) share one input and so one H, and the profile quantizes
    each matrix at several group lengths. On leaving, the last factor (as large as H) is dropped."""
    _LastFactor.enabled = True
    try:
        yield
    finally:
        _LastFactor.enabled, _LastFactor.entry = False, None


def visiting_order_and_factor(H: torch.Tensor, diag: torch.Tensor,
                              settings: MethodSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The order GPTQ visits the columns in (by decreasing diag(H) with act_order) and the upper
    Cholesky factor of the damped, permuted H^-1; `diag` is H's diagonal with dead inputs set to 1."""
    key = (settings.act_order, settings.damp)
    found = _LastFactor.get(H, key)
    if found is not None:
        return found
    perm = torch.argsort(diag, descending=True) if settings.act_order else torch.arange(len(diag))
    damped = permuted_float64(H, perm)  # factorised in place: this one copy is GPTQ's peak
    damped.diagonal().copy_(diag[perm] + settings.damp * diag.mean())
    found = perm, inverse_cholesky(damped)  # a view over the copy's memory
    _LastFactor.put(H, key, found)
    return found


def working_copy(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W as the column loop's copy, diag(H) in float64, the importance the fits weigh by). Inputs that
    were always zero are dead: their weights do not matter and are zeroed, their diagonal set to 1."""
    W = W.to(GPTQ_PRECISION, copy=True)
    diag = torch.diag(H).double()
    dead = diag == 0
    diag[dead] = 1
    W[:, dead] = 0
    return W, diag, diag.to(GPTQ_PRECISION)


def chooses_grid_first(fmt: Format) -> bool:
    return getattr(fmt, "two_level", False)


@register_batched("gptq")
def quantize_gptq_many(
    W: torch.Tensor, H: torch.Tensor, fmts: Sequence[Format], settings: MethodSettings
) -> list[QTensor]:
    """GPTQ of W onto several grids that share a group length, in one pass.

    The k copies of W are stacked as rows: rows never interact in GPTQ, so they share H's
    factorisation and the column loop, which costs little more for k copies than for one.
    """
    for f in fmts:
        check_supported("gptq", f)
    if any(f.joint_codes for f in fmts):
        return [quantize_gptq_lattice(W, H, f, settings) for f in fmts]
    rows, cols = W.shape
    glen = fmts[0].group_len(cols)
    assert all(f.group_len(cols) == glen for f in fmts), "stacked grids must share the group length"
    assert len({f.levels is None or tuple(f.levels.tolist()) for f in fmts}) == 1, "stacked grids must share their levels"
    levels = fmts[0].levels
    n_groups, k = fmts[0].n_groups(cols), len(fmts)
    copies = [slice(j * rows, (j + 1) * rows) for j in range(k)]
    qmax = torch.tensor([f.qmax for f in fmts], dtype=GPTQ_PRECISION).repeat_interleave(rows)  # (k*rows,)
    W, diag, importance = working_copy(W, H)

    scale, zero, offset = (torch.zeros(k * rows, n_groups) for _ in range(3))
    ready = torch.zeros(k, n_groups, dtype=torch.bool)
    grids: list[QTensor | None] = []
    for j, f in enumerate(fmts):
        grid = f.fit(W, importance, *settings.clip()) if chooses_grid_first(f) else None
        if grid is not None:
            scale[copies[j]], zero[copies[j]] = grid.scale, grid.zero
            if grid.offset is not None:
                offset[copies[j]] = grid.offset
            ready[j] = True
        grids.append(grid)

    perm, Hinv = visiting_order_and_factor(H, diag, settings)
    inv_perm = torch.argsort(perm)
    W = W.repeat(k, 1)[:, perm]  # (k*rows, cols), columns in visiting order

    group_of = (perm // glen).tolist()  # group of each visited position
    integer = all(isinstance(f, IntFormat) for f in fmts)
    fitted = {g for g in range(n_groups) if ready[:, g].all()}
    Q = torch.zeros(k * rows, cols)
    Err1 = torch.empty(k * rows, settings.block_size)
    from mixq.methods.gptq_columns import quantize_columns  # compiles on first use

    grid_arrays = (scale.numpy(), zero.numpy(), offset.numpy(), qmax.numpy(),
                   (torch.zeros(1) if levels is None else levels.float()).numpy(), levels is not None,
                   np.asarray(group_of, dtype=np.int64))
    B = settings.block_size
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        Hinv1 = Hinv[i1:i2, i1:i2].contiguous()
        i = i1
        while i < i2:  # the kernel runs up to the next column whose group has no parameters yet
            stop = next((c for c in range(i, i2) if group_of[c] not in fitted), i2)
            quantize_columns(Hinv1.numpy(), *grid_arrays, W.numpy(), Q.numpy(), Err1.numpy(), i, stop, i1, i2)
            if stop < i2:
                g = group_of[stop]
                group_cols = slice(g * glen, min((g + 1) * glen, cols))
                pos = inv_perm[group_cols]  # where the group's columns sit in the visiting order
                if integer:  # every grid of the stack in one search
                    s, z = fit_stacked(fmts, W[:, pos], importance[group_cols], *settings.clip())
                    scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
                for j in [] if integer else torch.nonzero(~ready[:, g]).flatten().tolist():
                    one = fmts[j].fit(W[copies[j]][:, pos], importance[group_cols], *settings.clip())
                    scale[copies[j], g], zero[copies[j], g] = one.scale[:, 0], one.zero[:, 0]
                    if one.offset is not None:
                        offset[copies[j], g] = one.offset[:, 0]
                ready[:, g] = True
                fitted.add(g)
            i = stop
        W[:, i2:] -= Err1[:, : i2 - i1] @ Hinv[i1:i2, i2:]

    Q = Q[:, inv_perm].to(torch.uint8)
    out = []
    for f, rows_j, grid in zip(fmts, copies, grids):
        has_offset = getattr(f, "has_min", False)
        out.append(QTensor(
            f, Q[rows_j], scale[rows_j], zero[rows_j], offset[rows_j] if has_offset else None,
            grid.super_scale if grid is not None else None,
        ))
    return out


def quantize_gptq_lattice(W: torch.Tensor, H: torch.Tensor, fmt: LatticeFormat, settings: MethodSettings) -> QTensor:
    """GPTQ onto a lattice type (IQ3_S, IQ3_XXS, the IQ2 types), whose codes are chosen a chunk of
    columns at a time (the weights of one grid point, or the 8 sharing a sign parity).

    The scales are chosen first, from W, by the format's own fit (as for the k-quants). Columns are
    then visited in storage order (act_order would split the chunks): each chunk's codes come from
    its current, error-compensated weights by the same neighbour search rtn's fit uses, and then
    each of its columns in turn pushes its rounding error onto the columns after it, those of the
    chunk included (their codes are fixed, their error grows or shrinks), as GPTQ does for one
    column. With a diagonal H nothing is pushed and the result is rtn's.
    """
    rows, cols = W.shape
    W, diag, importance = working_copy(W, H)
    grid = fmt.fit(W, importance, *settings.clip())
    _, Hinv = visiting_order_and_factor(H, diag, replace(settings, act_order=False))
    imp = positive_importance(importance)
    scale, levels, chunk = fmt.expand(grid.scale), fmt.levels, fmt.chunk
    B = settings.block_size - settings.block_size % chunk
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        block = W[:, i1:i2].T.contiguous()  # the block's columns as rows: each update below is contiguous
        Err1 = torch.empty_like(block)
        U = Hinv[i1:i2, i1:i2]
        for c0 in range(0, i2 - i1, chunk):
            c1 = c0 + chunk
            found = fmt.chunk_codes(block[c0:c1].T, imp[i1 + c0 : i1 + c1], scale[:, i1 + c0])
            codes[:, i1 + c0 : i1 + c1] = found
            Q = scale[:, i1 + c0 : i1 + c1].T * levels[found.T.long()]
            for j in range(c0, c1):
                Err1[j] = (block[j] - Q[j - c0]) / U[j, j]
                block[j + 1 :] -= U[j, j + 1 :, None] * Err1[j]
        W[:, i2:] -= Err1.T @ Hinv[i1:i2, i2:]
    return fmt.with_codes(grid, codes)

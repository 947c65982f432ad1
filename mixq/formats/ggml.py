"""llama.cpp's block formats (ggml types): Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the k-quants Q2_K..Q6_K, the
4-bit codebook types IQ4_NL and IQ4_XS, and the lattice types IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS and IQ2_XXS.

A row is cut into blocks of 32 or 256 weights, stored byte for byte as ggml lays them out, so a
GGUF writer copies `pack`'s bytes verbatim. Within a block, sub-blocks of 16 or 32 weights share one
scale. The 32-wide types store an fp16 scale (and min) per block; the k-quants store each sub-block's
scale (and min) as a small integer times an fp16 super-block scale `d` (and `dmin`).

In mixq's terms, per sub-block, a weight is  scale * (code - zero) - offset  with codes in [0, 2**bits):
- symmetric types (Q8_0, Q4_0, Q5_0, Q3_K, Q6_K): zero = 2**(bits-1), no offset; scales may be negative;
- types with a min (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K): zero = 0 and offset = -min.
For the k-quants scale = d * sc and offset = dmin * m with integer sc, m; computed this way the floats
are exactly those of ggml's own dequantization (tests check this against the `gguf` package).
IQ4_NL (Q4_0's layout) and IQ4_XS (Q4_K's super-blocks, signed 6-bit sub-block scales, no mins) put
16 non-uniform levels on the same scales: a weight is scale * levels[code] (`codebook`).
IQ3_S and IQ3_XXS (`LatticeFormat`) are codebooks of 16 levels (+-8 magnitudes) whose magnitudes,
four weights at a time, must be one of the type's grid points; the IQ2 types likewise with 6 levels
(+-3 magnitudes), eight weights at a time. Their sub-block scales are odd multiples of d.

Choosing the parameters (`fit`) is a search weighted by input importance (diag of H, the idea behind
llama.cpp's imatrix): per sub-block, a grid of range shrinks and of small moves of the range's top
(its bottom held, as llama.cpp's own searches do), each followed by a weighted least-squares refit;
then, for the k-quants, the integer sub-block scales around the rounded ones are searched again
against the same weighted error.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants
from gguf.quants import IQ4_NL

from mixq.errors import MixqError
from mixq.formats import QTensor, register_family
from mixq.formats.integer import IntFormat, decode, encode
from mixq.formats.lattice_search import lattice_codes


FIT_CHUNK_ELEMENTS = 1 << 21  # weights fitted at once: the search's temporaries stay cache-sized
TOP_MOVE = 0.1  # the search moves the range's top by up to this share of the range, either way


def positive_importance(importance: torch.Tensor) -> torch.Tensor:
    """Per-column importance as the fits weigh errors: float32, with no weight exactly zero (a
    sub-block of dead inputs still gets a scale)."""
    imp = importance.float().clamp(min=0)
    return imp + 1e-9 * imp.mean().clamp(min=1e-30)


@dataclass(frozen=True)
class GGMLFormat:
    name: str  # llama.cpp's type name, lower case: "q4_k"
    bits: int
    block: int  # weights per block (the unit of storage)
    sub: int  # weights per sub-block (one scale, and one min, each)
    has_min: bool
    sub_scale_range: tuple[int, int] = (0, 0)  # k-quants: integer range of sub-block scales (and mins)
    sub_scale_step: int = 1  # those integers are lo, lo + step, ..., hi (IQ3_S: the odd 1..31)
    codebook: tuple[float, ...] | None = None  # IQ types: the level of each code, ascending
    moves_top = True  # whether the search also moves the range's top (a class constant, not a field)

    @property
    def levels(self) -> torch.Tensor | None:
        return None if self.codebook is None else torch.tensor(self.codebook, dtype=torch.float32)

    @property
    def joint_codes(self) -> bool:
        """Whether codes are chosen a group of weights at a time (a lattice), not each on its own."""
        return False

    @property
    def ggml_type(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.name.upper()]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][1]

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def zero(self) -> float:
        return 0.0 if self.has_min or self.codebook else float(2 ** (self.bits - 1))

    @property
    def fallback(self) -> str | None:
        """The type llama.cpp uses instead on rows this one does not fit."""
        return _FALLBACK.get(self.name)

    @property
    def two_level(self) -> bool:
        return self.sub_scale_range != (0, 0)

    def fits(self, shape: tuple[int, int]) -> bool:
        return shape[1] % self.block == 0

    def group_len(self, cols: int) -> int:
        return self.sub

    def n_groups(self, cols: int) -> int:
        return cols // self.sub

    def nbytes(self, shape: tuple[int, int]) -> int:
        self._check(shape)
        return shape[0] * shape[1] // self.block * self.type_size

    def _check(self, shape: tuple[int, int]) -> None:
        if not self.fits(shape):
            raise MixqError(f"{self.name} needs rows whose length is a multiple of {self.block}, got {shape[1]}")

    # -- parameters -------------------------------------------------------------------------
    def fit(self, W: torch.Tensor, importance: torch.Tensor, clip_grid: int = 21, clip_min: float = 0.5) -> QTensor:
        """Round-to-nearest codes on parameters chosen to minimise sum importance * (w - w_hat)^2.

        Rows are independent: they are fitted in chunks, so memory stays bounded on large matrices.
        """
        self._check(tuple(W.shape))
        imp = positive_importance(importance).view(1, -1, self.sub)
        chunk = max(1, FIT_CHUNK_ELEMENTS // W.shape[1])
        parts = [self._fit_rows(W[r : r + chunk].float(), imp, clip_grid, clip_min) for r in range(0, W.shape[0], chunk)]
        if len(parts) == 1:
            return parts[0]

        def cat(field: str) -> torch.Tensor | None:
            values = [getattr(p, field) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return QTensor(self, cat("codes"), cat("scale"), cat("zero"), cat("offset"), cat("super_scale"))

    def _fit_rows(self, W: torch.Tensor, imp: torch.Tensor, clip_grid: int, clip_min: float) -> QTensor:
        G = W.view(W.shape[0], -1, self.sub)  # (rows, n_sub, sub)
        scale, offset = self._fit_sub_blocks(G, imp, clip_grid, clip_min)
        if self.two_level:
            scale, offset, super_scale = self._quantize_sub_params(G, imp, scale, offset)
        else:
            scale, offset, super_scale = _fp16(scale), _fp16(offset), None
        codes = self._codes(G, imp, scale, offset).reshape(W.shape)
        offset = offset if self.has_min else None
        return QTensor(self, codes.to(torch.uint8), scale, torch.full_like(scale, self.zero), offset, super_scale)

    def _fit_sub_blocks(
        self, G: torch.Tensor, imp: torch.Tensor, clip_grid: int, clip_min: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuous (scale, offset) per sub-block: the best of a range-shrink grid and its refits."""
        if self.has_min:
            lo, hi = G.amin(dim=2), G.amax(dim=2)
            if self.two_level:  # k-quant mins are stored as non-negative multiples of dmin
                lo = lo.clamp(max=0)
            base_scale, base_offset = (hi - lo) / self.qmax, -lo
        else:
            # The largest-magnitude weight lands on the lowest level, which has no mirror.
            at = G.abs().argmax(dim=2, keepdim=True)
            lowest = self.codebook[0] if self.codebook else -self.zero
            base_scale, base_offset = G.gather(2, at).squeeze(2) / lowest, torch.zeros_like(G[..., 0])
        # (factor, whether the range's bottom is held): shrinks of the whole range toward zero and, for
        # half of the candidates, llama.cpp's moves of the range's top a little either way with its
        # bottom held; after the refit those often fit better than any shrink. Half as many shrinks
        # lose little (the types' errors within 2% of all of them with the moves; 3-18% lower errors
        # than all shrinks without), at the search's former cost.
        moves = clip_grid // 2 if self.moves_top else 0
        candidates = [(c, False) for c in torch.linspace(1.0, clip_min, max(clip_grid - moves, 1)).tolist()]
        candidates += [(c, True) for c in torch.linspace(1 + TOP_MOVE, 1 - TOP_MOVE, moves).tolist()]
        best = None
        for clip, bottom_held in candidates:
            s, o = base_scale * clip, base_offset if bottom_held else base_offset * clip
            for candidate in ((s, o), self._refit(G, imp, s, o)):
                err = self._error(G, imp, *candidate)
                if best is None:
                    best = (err, *candidate)
                else:
                    better = err < best[0]
                    best = tuple(torch.where(better, new, old) for new, old in zip((err, *candidate), best))
        return best[1], best[2]

    def _codes(self, G: torch.Tensor, imp: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Each weight's nearest code (`imp` matters only to formats that choose codes jointly)."""
        return encode(G, scale.unsqueeze(2), self.zero, self.qmax, offset.unsqueeze(2), self.levels)

    def _values(self, codes: torch.Tensor) -> torch.Tensor:
        """What each code multiplies its scale by: code - zero, or its level."""
        return codes - self.zero if self.codebook is None else self.levels[codes.long()]

    def _error(self, G: torch.Tensor, imp: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        w_hat = scale.unsqueeze(2) * self._values(self._codes(G, imp, scale, offset)) - offset.unsqueeze(2)
        return ((w_hat - G).square() * imp).sum(dim=2)

    def _refit(
        self, G: torch.Tensor, imp: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted least squares for (scale, offset) with the codes of (scale, offset) held fixed."""
        c = self._values(self._codes(G, imp, scale, offset))
        sw, swc, swx = imp.sum(2), (imp * c).sum(2), (imp * G).sum(2)
        swcc, swcx = (imp * c * c).sum(2), (imp * c * G).sum(2)
        if not self.has_min:
            return torch.where(swcc > 0, swcx / swcc, scale), offset
        det = sw * swcc - swc * swc
        ok = det > 1e-12 * sw * swcc
        new_scale = torch.where(ok, (sw * swcx - swc * swx) / det, scale)
        new_offset = torch.where(ok, -(swx - new_scale * swc) / sw, offset)
        if self.two_level:
            new_offset = new_offset.clamp(min=0)
        return new_scale.clamp(min=0), new_offset

    def _quantize_sub_params(
        self, G: torch.Tensor, imp: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k-quants: sub-block scales (and mins) as integers times fp16 super-block scales.

        d is chosen so the largest sub-block scale is representable; each integer is then the best of
        the nearest integer and its two neighbours under the weighted error of the sub-block.
        """
        rows, n_sub = scale.shape
        per_block = self.block // self.sub
        lo, hi = self.sub_scale_range
        step = self.sub_scale_step
        d = self._super(scale.view(rows, -1, per_block), lo, hi)  # (rows, n_blocks)
        d_sub = d.repeat_interleave(per_block, dim=1)
        sc = (((_div(scale, d_sub) - lo) / step).round() * step + lo).clamp(lo, hi)
        if self.has_min:
            dmin = self._super(offset.view(rows, -1, per_block), lo, hi)
            dmin_sub = dmin.repeat_interleave(per_block, dim=1)
            mn = _div(offset, dmin_sub).round().clamp(lo, hi)
        else:
            dmin_sub, mn = torch.zeros_like(d_sub), torch.zeros_like(sc)
        best = None
        for dsc in (0, -step, step):
            for dmn in (0, -1, 1) if self.has_min else (0,):
                s = d_sub * (sc + dsc).clamp(lo, hi)
                o = dmin_sub * (mn + dmn).clamp(lo, hi)
                err = self._error(G, imp, s, o)
                if best is None:
                    best = (err, s, o)
                else:
                    better = err < best[0]
                    best = tuple(torch.where(better, new, old) for new, old in zip((err, s, o), best))
        super_scale = torch.stack([d, dmin_sub[:, ::per_block]], dim=2)  # (rows, n_blocks, 2)
        return best[1], best[2], super_scale

    @staticmethod
    def _super(values: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """fp16 super-block scale mapping the largest-magnitude value of each block onto the integer range."""
        if lo < 0:  # signed sub-block scales: the largest one lands on `lo`, which has no mirror
            at = values.abs().argmax(dim=2, keepdim=True)
            return _fp16(values.gather(2, at).squeeze(2) / lo)
        return _fp16(values.amax(dim=2) / hi)

    # -- codes ------------------------------------------------------------------------------
    def expand(self, per_group: torch.Tensor | None) -> torch.Tensor | None:
        return None if per_group is None else per_group.repeat_interleave(self.sub, dim=1)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        return decode(q.codes.float(), self.expand(q.scale), self.expand(q.zero), self.expand(q.offset), self.levels)

    def with_codes(self, q: QTensor, codes: torch.Tensor) -> QTensor:
        return QTensor(self, codes, q.scale, q.zero, q.offset, q.super_scale)

    # -- storage ----------------------------------------------------------------------------
    def pack(self, q: QTensor) -> dict[str, torch.Tensor]:
        """{"blocks": (rows, cols // block * type_size) uint8}: ggml's bytes for this tensor."""
        rows, cols = q.shape
        n = rows * cols // self.block
        codes = q.codes.numpy().reshape(n, self.block).astype(np.uint8)
        params = _BlockParams.from_qtensor(self, q, n)
        data = _LAYOUTS[self.name][0](self, codes, params)
        assert data.shape == (n, self.type_size)
        return {"blocks": torch.from_numpy(np.ascontiguousarray(data).reshape(rows, -1))}

    def unpack(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], rows: slice | None = None) -> QTensor:
        self._check(shape)
        blocks = tensors["blocks"].reshape(shape[0], -1)
        if rows is not None:
            blocks = blocks[rows]
        rows, cols = blocks.shape[0], shape[1]
        n = rows * cols // self.block
        data = blocks.numpy().reshape(n, self.type_size)
        codes, params = _LAYOUTS[self.name][1](self, data)
        return params.to_qtensor(self, torch.from_numpy(codes.reshape(rows, cols).astype(np.uint8)), rows)


LATTICE_NEIGHBOURS = 64  # grid points searched per group of weights for the final codes,
SEARCH_NEIGHBOURS = 8  # and while the scales are searched (within about 1% of the error, 8x faster)
# Range shrinks tried for a lattice type's scales: each costs a neighbour search, and on a SmolLM2
# down_proj 6 instead of 21 moved IQ2_S's and IQ3_XXS's error by under 0.03%, 2.8x faster.
LATTICE_CLIP_GRID = 6


@dataclass(frozen=True)
class LatticeFormat(GGMLFormat):
    """IQ3_S and IQ3_XXS: codes over 8 magnitudes and a sign whose magnitudes, four weights at a time,
    form one point of the type's grid (`gguf.quants`' 512 and 256 points); IQ2_S, IQ2_XS and IQ2_XXS:
    3 magnitudes, eight weights at a time, grids of 1024, 512 and 256 points. IQ3_S and IQ2_S store
    every sign; the others store 7 of each 8 and the 8th makes their count of minus signs even
    (`sign_parity`).

    Rounding is therefore per group: of the `LATTICE_NEIGHBOURS` grid points nearest to the
    cell of levels the group's magnitudes round to (all of them when that cell is a grid point), the
    one of least importance-weighted error (llama.cpp's quantizer searches such neighbour lists too);
    with `sign_parity`, an 8-weight chunk with an odd count of minus signs then flips the sign that
    costs least. rtn fits whole sub-blocks this way and GPTQ one `chunk` of columns at a time
    (`chunk_codes`); learned rounding's per-weight steps would leave the grid.
    """

    grid_type: str = "IQ3_S"  # the `gguf.quants` class whose grid this is
    sign_parity: bool = False
    moves_top = False  # each candidate costs a search of the lattice: only its few shrinks are tried

    @property
    def joint_codes(self) -> bool:
        return True

    @property
    def magnitudes(self) -> tuple[float, ...]:
        """The positive levels, ascending: the grid's values in units of the sub-block scale."""
        return self.codebook[len(self.codebook) // 2 :]

    def _fit_sub_blocks(
        self, G: torch.Tensor, imp: torch.Tensor, clip_grid: int, clip_min: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scale, offset = super()._fit_sub_blocks(G, imp, clip_grid, clip_min)
        return scale.abs(), offset  # signs are stored per weight: the scale is a magnitude

    def _fit_rows(self, W: torch.Tensor, imp: torch.Tensor, clip_grid: int, clip_min: float) -> QTensor:
        q = super()._fit_rows(W, imp, min(clip_grid, LATTICE_CLIP_GRID), clip_min)  # with SEARCH_NEIGHBOURS
        G = W.view(W.shape[0], -1, self.sub)
        codes = self._codes(G, imp, q.scale, None, LATTICE_NEIGHBOURS)
        return self.with_codes(q, codes.reshape(W.shape).to(torch.uint8))

    @property
    def chunk(self) -> int:
        """Columns whose codes are chosen together: the weights of one grid point, or the 8 whose
        signs share a parity."""
        return 8 if self.sign_parity else _grid_levels(self.grid_type).shape[1]

    def chunk_codes(self, X: torch.Tensor, importance: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Codes (rows, chunk) of the columns X (rows, chunk), which lie within one sub-block whose
        scales are `scale` (rows,), chosen as `fit` chooses its final codes (`importance`: the
        chunk's `positive_importance`)."""
        rows = X.shape[0]
        codes = self._codes(X.reshape(rows, 1, self.chunk), importance, scale.reshape(rows, 1), None,
                            LATTICE_NEIGHBOURS)
        return codes.reshape(rows, self.chunk).to(torch.uint8)

    def _codes(self, G: torch.Tensor, imp: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
               k: int = SEARCH_NEIGHBOURS) -> torch.Tensor:
        neighbours, coordinates = _neighbours(self.grid_type, self.magnitudes, k)
        codes = lattice_codes(G.contiguous().numpy(), scale.contiguous().numpy(), imp.reshape(G.shape[1:]).numpy(),
                              np.array(self.magnitudes, np.float32), _level_bits(self.grid_type), neighbours.numpy(),
                              coordinates.numpy(), _grid_levels(self.grid_type), self.sign_parity)
        return torch.from_numpy(codes)


@functools.cache
def _grid_levels(grid_type: str) -> np.ndarray:
    """A lattice type's grid as gguf-py decodes it (llama.cpp's tables), each value as the index of its
    level: (points, width) integers in [0, levels)."""
    cls = getattr(gguf_quants, grid_type)
    cls.init_grid()
    return np.searchsorted(np.array(cls.grid_map), cls.grid.reshape(cls.grid_shape)).astype(np.int64)


def _level_bits(grid_type: str) -> int:
    """Bits per coordinate in a key of level indices (3 for IQ3's 8 levels, 2 for IQ2's 3)."""
    return (len(getattr(gguf_quants, grid_type).grid_map) - 1).bit_length()


@functools.cache
def _neighbours(grid_type: str, magnitudes: tuple[float, ...], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each cell of levels (keyed as in `_grid_index`), the k grid points nearest to its centre,
    nearest first: (keys, k) indices and (keys, k, width) magnitudes (zeros at keys no cell has)."""
    values = np.array(magnitudes, np.float32)
    grid = values[_grid_levels(grid_type)]
    width, key_bits = grid.shape[1], _level_bits(grid_type)
    cells = np.stack(np.meshgrid(*[np.arange(len(values))] * width, indexing="ij"), axis=-1).reshape(-1, width)
    centres = values[cells]
    # |c - g|^2 as one product: IQ2_S has 3^8 cells by 1024 points
    distance = (centres**2).sum(axis=1, keepdims=True) - 2 * centres @ grid.T + (grid**2).sum(axis=1)
    nearest = np.zeros((1 << (key_bits * width), k), np.int64)
    nearest[(cells << (key_bits * np.arange(width))).sum(axis=1)] = np.argsort(distance, axis=1, kind="stable")[:, :k]
    return torch.from_numpy(nearest), torch.from_numpy(grid[nearest])


@functools.cache
def _grid_index(grid_type: str) -> np.ndarray:
    """Grid point of each tuple of level indices, keyed by them (`_level_bits` each); -1 off the grid."""
    grid, key_bits = _grid_levels(grid_type), _level_bits(grid_type)
    keys = (grid << (key_bits * np.arange(grid.shape[1]))).sum(axis=1)
    index = np.full(1 << (key_bits * grid.shape[1]), -1, np.int64)
    index[keys] = np.arange(len(grid))
    return index


def _lattice_points(fmt: LatticeFormat, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(grid point of each group of weights, each weight's minus sign) of a lattice type's codes."""
    n, half = codes.shape[0], len(fmt.magnitudes)
    negative = codes < half
    level = np.where(negative, half - 1 - codes.astype(np.int64), codes.astype(np.int64) - half)
    width, key_bits = _grid_levels(fmt.grid_type).shape[1], _level_bits(fmt.grid_type)
    point = _grid_index(fmt.grid_type)[(level.reshape(n, -1, width) << (key_bits * np.arange(width))).sum(axis=2)]
    if (point < 0).any():
        raise MixqError(f"{fmt.name}: codes off its grid (a method that rounds each weight on its own made them)")
    return point, negative


def _lattice_codes(fmt: LatticeFormat, point: np.ndarray, negative: np.ndarray) -> np.ndarray:
    half = len(fmt.magnitudes)
    level = _grid_levels(fmt.grid_type)[point].reshape(negative.shape)
    return np.where(negative, half - 1 - level, half + level).astype(np.uint8)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(x).all() or x.abs().max() >= torch.finfo(torch.float16).max:
        raise MixqError("weights are not finite or too large for fp16 scales (NaN/inf in the model?)")
    return x.half().float()


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b != 0, a / torch.where(b != 0, b, 1), 0)


@dataclass
class _BlockParams:
    """A tensor's parameters per block, as ggml stores them."""

    d: np.ndarray  # (n,) float16: the block's (super-)scale
    m: np.ndarray  # (n,) float16: 32-wide types' min, k-quants' dmin; zeros when unused
    sc: np.ndarray  # (n, per_block) int: k-quants' sub-block scales
    mn: np.ndarray  # (n, per_block) int: k-quants' sub-block mins

    @classmethod
    def from_qtensor(cls, fmt: GGMLFormat, q: QTensor, n: int) -> _BlockParams:
        per_block = fmt.block // fmt.sub
        scale = q.scale.reshape(n, per_block)
        offset = q.offset.reshape(n, per_block) if q.offset is not None else torch.zeros_like(scale)
        if not fmt.two_level:
            zeros = np.zeros((n, 1), np.int64)
            return cls(scale[:, 0].half().numpy(), (-offset[:, 0]).half().numpy(), zeros, zeros)
        d, dmin = q.super_scale.reshape(n, 2).unbind(1)
        sc = _div(scale, d.unsqueeze(1)).round().long().numpy()
        mn = _div(offset, dmin.unsqueeze(1)).round().long().numpy()
        return cls(d.half().numpy(), dmin.half().numpy(), sc, mn)

    def to_qtensor(self, fmt: GGMLFormat, codes: torch.Tensor, rows: int) -> QTensor:
        d = torch.from_numpy(self.d.astype(np.float32)).unsqueeze(1)
        m = torch.from_numpy(self.m.astype(np.float32)).unsqueeze(1)
        if fmt.two_level:
            scale = d * torch.from_numpy(self.sc).float()
            offset = m * torch.from_numpy(self.mn).float()
            super_scale = torch.stack([d[:, 0], m[:, 0]], dim=1).reshape(rows, -1, 2)
        else:
            scale, offset, super_scale = d, -m, None
        scale = scale.reshape(rows, -1)
        return QTensor(
            fmt, codes, scale, torch.full_like(scale, fmt.zero),
            offset.reshape(rows, -1) if fmt.has_min else None, super_scale,
        )


# -- ggml's byte layouts ------------------------------------------------------------------------
# Codes are laid out in "planes": within each chunk of (8 // bits) * width codes, code s * width + l
# sits in byte l of the chunk at bit s * bits.


def _planes(codes: np.ndarray, bits: int, width: int) -> np.ndarray:
    n = codes.shape[0]
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).reshape(1, 1, per, 1)
    parts = (codes.reshape(n, -1, per, width) & np.uint8(2**bits - 1)) << shifts
    return np.bitwise_or.reduce(parts, axis=2).reshape(n, -1)


def _unplanes(data: np.ndarray, bits: int, width: int) -> np.ndarray:
    n = data.shape[0]
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).reshape(1, 1, per, 1)
    return ((data.reshape(n, -1, 1, width) >> shifts) & np.uint8(2**bits - 1)).reshape(n, -1)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _f16(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(data).view(np.float16).reshape(-1)


def _split(data: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(data, np.cumsum(sizes)[:-1], axis=1)


def _none(n: int, per_block: int = 1) -> np.ndarray:
    return np.zeros((n, per_block), np.int64)


def _pack_32(fmt: GGMLFormat, codes: np.ndarray, p: _BlockParams) -> np.ndarray:
    head = [_f16_bytes(p.d)] + ([_f16_bytes(p.m)] if fmt.has_min else [])
    if fmt.bits == 8:
        return np.concatenate(head + [(codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)], axis=1)
    if fmt.bits == 5:
        head.append(np.packbits((codes >> 4) & 1, axis=1, bitorder="little"))
    return np.concatenate(head + [_planes(codes, 4, 16)], axis=1)


def _unpack_32(fmt: GGMLFormat, data: np.ndarray) -> tuple[np.ndarray, _BlockParams]:
    n = data.shape[0]
    sizes = [2] + ([2] if fmt.has_min else []) + ([4] if fmt.bits == 5 else [])
    parts = _split(data, sizes + [data.shape[1] - sum(sizes)])
    d = _f16(parts[0])
    m = _f16(parts[1]) if fmt.has_min else np.zeros(n, np.float16)
    if fmt.bits == 8:
        codes = (parts[-1].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    else:
        codes = _unplanes(parts[-1], 4, 16)
        if fmt.bits == 5:
            codes = codes | (np.unpackbits(parts[-2], axis=1, bitorder="little") << 4)
    return codes, _BlockParams(d, m, _none(n), _none(n))


def _pack_k4_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins in 12 bytes."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    return np.concatenate([
        sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
        mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4),
    ], axis=1)


def _unpack_k4_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    low_sc, low_mn, rest = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = np.concatenate([low_sc & 63, (rest & 15) | ((low_sc >> 6) << 4)], axis=1)
    mn = np.concatenate([low_mn & 63, (rest >> 4) | ((low_mn >> 6) << 4)], axis=1)
    return sc.astype(np.int64), mn.astype(np.int64)


def _pack_q2_k(fmt: GGMLFormat, codes: np.ndarray, p: _BlockParams) -> np.ndarray:
    scales = (p.sc | (p.mn << 4)).astype(np.uint8)
    return np.concatenate([scales, _planes(codes, 2, 32), _f16_bytes(p.d), _f16_bytes(p.m)], axis=1)


def _unpack_q2_k(fmt: GGMLFormat, data: np.ndarray) -> tuple[np.ndarray, _BlockParams]:
    scales, qs, d, dmin = _split(data, [16, 64, 2, 2])
    sc, mn = (scales & 15).astype(np.int64), (scales >> 4).astype(np.int64)
    return _unplanes(qs, 2, 32), _BlockParams(_f16(d), _f16(dmin), sc, mn)


def _pack_q3_k(fmt: GGMLFormat, codes: np.ndarray, p: _BlockParams) -> np.ndarray:
    v = (p.sc + 32).astype(np.uint8)  # 6-bit, biased by 32
    low = (v[:, :8] & 15) | ((v[:, 8:] & 15) << 4)
    high = np.bitwise_or.reduce(((v.reshape(-1, 4, 4) >> 4) & 3) << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1), axis=1)
    return np.concatenate([_planes(codes >> 2, 1, 32), _planes(codes, 2, 32), low, high, _f16_bytes(p.d)], axis=1)


def _unpack_q3_k(fmt: GGMLFormat, data: np.ndarray) -> tuple[np.ndarray, _BlockParams]:
    n = data.shape[0]
    hmask, qs, low, high, d = _split(data, [32, 64, 8, 4, 2])
    low16 = np.concatenate([low & 15, low >> 4], axis=1)
    high16 = ((high.reshape(n, 1, 4) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)) & 3).reshape(n, 16)
    sc = (low16 | (high16 << 4)).astype(np.int64) - 32
    codes = _unplanes(qs, 2, 32) | (_unplanes(hmask, 1, 32) << 2)
    return codes, _BlockParams(_f16(d), np.zeros(n, np.float16), sc, _none(n, 16))


def _pack_q45_k(fmt: GGMLFormat, codes: np.ndarray, p: _BlockParams) -> np.ndarray:
    high = [_planes(codes >> 4, 1, 32)] if fmt.bits == 5 else []
    return np.concatenate(
        [_f16_bytes(p.d), _f16_bytes(p.m), _pack_k4_scales(p.sc, p.mn), *high, _planes(codes, 4, 32)], axis=1
    )


def _unpack_q45_k(fmt: GGMLFormat, data: np.ndarray) -> tuple[np.ndarray, _BlockParams]:
    sizes = [2, 2, 12] + ([32] if fmt.bits == 5 else [])
    parts = _split(data, sizes + [128])
    codes = _unplanes(parts[-1], 4, 32)
    if fmt.bits == 5:
        codes = codes | (_unplanes(parts[3], 1, 32) << 4)
    sc, mn = _unpack_k4_scales(parts[2])
    return codes, _BlockParams(_f16(parts[0]), _f16(parts[1]), sc, mn)


def _pack_q6_k(fmt: GGMLFormat, codes: np.ndarray, p: _BlockParams) -> np.ndarray:
    scales = p.sc.astype(np.int8).view(np.uint8)
    return np.concatenate([_planes(codes, 4, 64), _planes(codes >> 4, 2, 32), scales, _f16_bytes(p.d)], axis=1)


def _unpack_q6_k(fmt: GGMLFormat, data: np.ndarray) -> tuple[np.ndarray, _BlockParams]:
    n = data.shape[0]
    ql, qh, scales, d = _split(data, [128, 64, 16, 2])
    codes = _unplanes(ql, 4, 64) | (_unplanes(qh, 2, 32) << 4)
    sc = np.ascontiguousarray(scales).view(np.int8).astype(np.int64)
    return codes, _BlockParams(_f16(d), np.zeros(n, np.float16), sc, _none(n, 16))


def _pack_iq4_xs(fmt: GGMLFormat, codes: np.ndarray, p: _BlockParams) -> np.ndarray:
    """IQ4_XS: d, the high 2 bits of the eight 6-bit scales (biased by 32) in one uint16, their low
    4 bits in 4 bytes, then each 32-weight sub-block's codes as in Q4_0."""
    v = (p.sc + 32).astype(np.uint16)
    high = np.bitwise_or.reduce((v >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=1).astype(np.uint16)
    low = (v[:, 0::2] & 15) | ((v[:, 1::2] & 15) << 4)
    qs = _planes(codes, 4, 16)
    return np.concatenate([_f16_bytes(p.d), high.reshape(-1, 1).view(np.uint8), low.astype(np.uint8), qs], axis=1)


def _unpack_iq4_xs(fmt: GGMLFormat, data: np.ndarray) -> tuple[np.ndarray, _BlockParams]:
    n = data.shape[0]
    d, high, low, qs = _split(data, [2, 2, 4, 128])
    high = np.ascontiguousarray(high).view(np.uint16).reshape(n, 1)
    low8 = np.stack([low & 15, low >> 4], axis=2).reshape(n, 8)
    sc = (low8 | (((high >> (2 * np.arange(8, dtype=np.uint16))) & 3) << 4)).astype(np.int64) - 32
    return _unplanes(qs, 4, 16), _BlockParams(_f16(d), np.zeros(n, np.float16), sc, _none(n, 8))


def _odd_scale_nibbles(sc: np.ndarray) -> np.ndarray:
    """Sub-block scales 2 s + 1 as 4-bit s, two to a byte (the first in the low half)."""
    s = ((sc - 1) // 2).astype(np.uint8)
    return s[:, 0::2] | (s[:, 1::2] << 4)


def _odd_scales(nibbles: np.ndarray) -> np.ndarray:
    n = nibbles.shape[0]
    return 2 * np.stack([nibbles & 15, nibbles >> 4], axis=2).reshape(n, -1).astype(np.int64) + 1


def _sign_fields(fmt: LatticeFormat, negative: np.ndarray) -> np.ndarray:
    """The first 7 signs of each 8 weights as a 7-bit field, (n, weights // 8): the 8th sign is their
    parity (llama.cpp's ksigns table), so a count of minus signs must be even."""
    chunks = negative.reshape(negative.shape[0], -1, 8)
    if (chunks.sum(axis=2) % 2).any():
        raise MixqError(f"{fmt.name}: an odd number of minus signs in 8 weights, which it cannot store")
    return (chunks[..., :7].astype(np.uint32) << np.arange(7, dtype=np.uint32)).sum(axis=2)


def _signs_of_fields(fields: np.ndarray) -> np.ndarray:
    """Each weight's minus sign from 7-bit sign fields (n, chunks of 8)."""
    first = (fields[..., None] >> np.arange(7, dtype=np.uint32)) & 1
    return np.concatenate([first, first.sum(axis=-1, keepdims=True) % 2], axis=-1).reshape(fields.shape[0], -1) == 1


def _pack_iq3_s(fmt: LatticeFormat, codes: np.ndarray, p: _BlockParams) -> np.ndarray:
    """IQ3_S: d, each group of four's grid point (low 8 bits in qs, the 9th in qh), each weight's sign
    bit, and the eight sub-block scales 2 s + 1 as 4-bit s."""
    point, negative = _lattice_points(fmt, codes)
    signs = np.packbits(negative, axis=1, bitorder="little")
    qh = np.packbits((point >> 8).astype(np.uint8), axis=1, bitorder="little")
    return np.concatenate([_f16_bytes(p.d), (point & 255).astype(np.uint8), qh, signs, _odd_scale_nibbles(p.sc)], axis=1)


def _unpack_iq3_s(fmt: LatticeFormat, data: np.ndarray) -> tuple[np.ndarray, _BlockParams]:
    n = data.shape[0]
    d, qs, qh, signs, scales = _split(data, [2, 64, 8, 32, 4])
    point = qs.astype(np.int64) | (np.unpackbits(qh, axis=1, bitorder="little").astype(np.int64) << 8)
    codes = _lattice_codes(fmt, point, np.unpackbits(signs, axis=1, bitorder="little") == 1)
    return codes, _BlockParams(_f16(d), np.zeros(n, np.float16), _odd_scales(scales), _none(n, 8))


_SIGN_FIELDS = 7 * np.arange(4, dtype=np.uint32)  # IQ3_XXS, IQ2_XXS: a sub-block's four 7-bit sign fields


def _sub_block_words(fmt: LatticeFormat, negative: np.ndarray, p: _BlockParams) -> np.ndarray:
    """IQ3_XXS and IQ2_XXS: per 32-weight sub-block one uint32, its four sign fields in 7 bits each
    and the scale's s in the top 4: (n, 8)."""
    fields = _sign_fields(fmt, negative).reshape(negative.shape[0], 8, 4)
    return (fields << _SIGN_FIELDS).sum(axis=2) | ((p.sc.astype(np.uint32) - 1) // 2 << 28)


def _words_signs_scales(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each weight's minus sign, and the sub-block scales, from `_sub_block_words`' words."""
    words = np.ascontiguousarray(words).view("<u4").astype(np.uint32)  # (n, 8)
    fields = ((words[..., None] >> _SIGN_FIELDS) & 127).reshape(words.shape[0], -1)
    return _signs_of_fields(fields), 2 * (words >> 28).astype(np.int64) + 1


def _pack_iq3_xxs(fmt: LatticeFormat, codes: np.ndarray, p: _BlockParams) -> np.ndarray:
    """IQ3_XXS: d, each group of four's 8-bit grid point, then the sub-blocks' words."""
    point, negative = _lattice_points(fmt, codes)
    words = _sub_block_words(fmt, negative, p)
    return np.concatenate([_f16_bytes(p.d), point.astype(np.uint8), words.astype("<u4").view(np.uint8)], axis=1)


def _unpack_iq3_xxs(fmt: LatticeFormat, data: np.ndarray) -> tuple[np.ndarray, _BlockParams]:
    n = data.shape[0]
    d, qs, words = _split(data, [2, 64, 32])
    negative, sc = _words_signs_scales(words)
    return _lattice_codes(fmt, qs.astype(np.int64), negative), _BlockParams(_f16(d), np.zeros(n, np.float16), sc, _none(n, 8))


def _pack_iq2_xxs(fmt: LatticeFormat, codes: np.ndarray, p: _BlockParams) -> np.ndarray:
    """IQ2_XXS: d, then per 32-weight sub-block its four groups' 8-bit grid points and its word."""
    n = codes.shape[0]
    point, negative = _lattice_points(fmt, codes)
    words = _sub_block_words(fmt, negative, p).astype("<u4").view(np.uint8).reshape(n, 8, 4)
    return np.concatenate([_f16_bytes(p.d), np.concatenate([point.reshape(n, 8, 4).astype(np.uint8), words], axis=2)
                           .reshape(n, 64)], axis=1)


def _unpack_iq2_xxs(fmt: LatticeFormat, data: np.ndarray) -> tuple[np.ndarray, _BlockParams]:
    n = data.shape[0]
    d, qs = _split(data, [2, 64])
    pairs = qs.reshape(n, 8, 2, 4)
    negative, sc = _words_signs_scales(np.ascontiguousarray(pairs[:, :, 1]).reshape(n, 32))
    codes = _lattice_codes(fmt, pairs[:, :, 0].reshape(n, 32).astype(np.int64), negative)
    return codes, _BlockParams(_f16(d), np.zeros(n, np.float16), sc, _none(n, 8))


def _pack_iq2_xs(fmt: LatticeFormat, codes: np.ndarray, p: _BlockParams) -> np.ndarray:
    """IQ2_XS: d, per group of eight one uint16 (9-bit grid point, its 7-bit sign field above), then
    the sixteen 16-weight sub-block scales 2 s + 1 as 4-bit s."""
    point, negative = _lattice_points(fmt, codes)
    qs = (point.astype(np.uint16) | (_sign_fields(fmt, negative).astype(np.uint16) << 9)).astype("<u2")
    return np.concatenate([_f16_bytes(p.d), qs.view(np.uint8), _odd_scale_nibbles(p.sc)], axis=1)


def _unpack_iq2_xs(fmt: LatticeFormat, data: np.ndarray) -> tuple[np.ndarray, _BlockParams]:
    n = data.shape[0]
    d, qs, scales = _split(data, [2, 64, 8])
    qs = np.ascontiguousarray(qs).view("<u2").astype(np.int64)  # (n, 32)
    codes = _lattice_codes(fmt, qs & 511, _signs_of_fields((qs >> 9).astype(np.uint32)))
    return codes, _BlockParams(_f16(d), np.zeros(n, np.float16), _odd_scales(scales), _none(n, 16))


def _pack_iq2_s(fmt: LatticeFormat, codes: np.ndarray, p: _BlockParams) -> np.ndarray:
    """IQ2_S: d, each group of eight's grid point (low 8 bits in qs, the high 2 in qh, four to a
    byte), each weight's sign bit, then the sub-block scales as IQ2_XS stores them."""
    n = codes.shape[0]
    point, negative = _lattice_points(fmt, codes)
    qh = np.bitwise_or.reduce(((point >> 8).reshape(n, 8, 4) << (2 * np.arange(4))).astype(np.uint8), axis=2)
    signs = np.packbits(negative, axis=1, bitorder="little")
    return np.concatenate([_f16_bytes(p.d), (point & 255).astype(np.uint8), signs, qh, _odd_scale_nibbles(p.sc)], axis=1)


def _unpack_iq2_s(fmt: LatticeFormat, data: np.ndarray) -> tuple[np.ndarray, _BlockParams]:
    n = data.shape[0]
    d, qs, signs, qh, scales = _split(data, [2, 32, 32, 8, 8])
    high = (qh.reshape(n, 8, 1).astype(np.int64) >> (2 * np.arange(4))) & 3
    codes = _lattice_codes(fmt, qs.astype(np.int64) | (high.reshape(n, 32) << 8),
                           np.unpackbits(signs, axis=1, bitorder="little") == 1)
    return codes, _BlockParams(_f16(d), np.zeros(n, np.float16), _odd_scales(scales), _none(n, 16))


_LAYOUTS = {
    **dict.fromkeys(("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"), (_pack_32, _unpack_32)),
    "q2_k": (_pack_q2_k, _unpack_q2_k),
    "q3_k": (_pack_q3_k, _unpack_q3_k),
    "q4_k": (_pack_q45_k, _unpack_q45_k),
    "q5_k": (_pack_q45_k, _unpack_q45_k),
    "q6_k": (_pack_q6_k, _unpack_q6_k),
    "iq4_xs": (_pack_iq4_xs, _unpack_iq4_xs),
    "iq3_s": (_pack_iq3_s, _unpack_iq3_s),
    "iq3_xxs": (_pack_iq3_xxs, _unpack_iq3_xxs),
    "iq2_s": (_pack_iq2_s, _unpack_iq2_s),
    "iq2_xs": (_pack_iq2_xs, _unpack_iq2_xs),
    "iq2_xxs": (_pack_iq2_xxs, _unpack_iq2_xxs),
}

# The IQ2 grids' values 8, 25 and 43 with sub-block scales d (s + 1/2) / 4: as odd multiples of d
# they are levels of 1, 3.125 and 5.375 (exact in binary, so the products equal gguf-py's).
IQ2_LEVELS = (-5.375, -3.125, -1.0, 1.0, 3.125, 5.375)  # 6 levels: codes of 3 bits

GGML_FORMATS = {
    f.name: f
    for f in (
        GGMLFormat("q8_0", 8, 32, 32, has_min=False),
        GGMLFormat("q5_1", 5, 32, 32, has_min=True),
        GGMLFormat("q5_0", 5, 32, 32, has_min=False),
        GGMLFormat("q4_1", 4, 32, 32, has_min=True),
        GGMLFormat("q4_0", 4, 32, 32, has_min=False),
        GGMLFormat("q6_k", 6, 256, 16, has_min=False, sub_scale_range=(-128, 127)),
        GGMLFormat("q5_k", 5, 256, 32, has_min=True, sub_scale_range=(0, 63)),
        GGMLFormat("q4_k", 4, 256, 32, has_min=True, sub_scale_range=(0, 63)),
        GGMLFormat("q3_k", 3, 256, 16, has_min=False, sub_scale_range=(-32, 31)),
        GGMLFormat("q2_k", 2, 256, 16, has_min=True, sub_scale_range=(0, 15)),
        GGMLFormat("iq4_nl", 4, 32, 32, has_min=False, codebook=IQ4_NL.kvalues),
        GGMLFormat("iq4_xs", 4, 256, 32, has_min=False, sub_scale_range=(-32, 31), codebook=IQ4_NL.kvalues),
        LatticeFormat("iq3_s", 4, 256, 32, has_min=False, sub_scale_range=(1, 31), sub_scale_step=2,
                      codebook=tuple(range(-15, 16, 2))),
        # IQ3_XXS's sub-block scale is d (s + 1/2) / 2 and its grid values 4, 12, ..., 52, 62: as odd
        # multiples of d they are levels of 1, 3, ..., 13, 15.5.
        LatticeFormat("iq3_xxs", 4, 256, 32, has_min=False, sub_scale_range=(1, 31), sub_scale_step=2,
                      codebook=(-15.5, *range(-13, 0, 2), *range(1, 14, 2), 15.5), grid_type="IQ3_XXS",
                      sign_parity=True),
        LatticeFormat("iq2_s", 3, 256, 16, has_min=False, sub_scale_range=(1, 31), sub_scale_step=2,
                      codebook=IQ2_LEVELS, grid_type="IQ2_S"),
        LatticeFormat("iq2_xs", 3, 256, 16, has_min=False, sub_scale_range=(1, 31), sub_scale_step=2,
                      codebook=IQ2_LEVELS, grid_type="IQ2_XS", sign_parity=True),
        LatticeFormat("iq2_xxs", 3, 256, 32, has_min=False, sub_scale_range=(1, 31), sub_scale_step=2,
                      codebook=IQ2_LEVELS, grid_type="IQ2_XXS", sign_parity=True),
    )
}

# llama.cpp's choices (llama-quant.cpp) for rows that are not whole blocks.
_FALLBACK = {**dict.fromkeys(("iq4_xs", "iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs"), "iq4_nl"), "q2_k": "q4_0", "q3_k": "q4_0",
             "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}

_NAME = re.compile(r"^(?:q\d_(?:0|1|k)|iq4_(?:nl|xs)|iq[23]_(?:s|xs|xxs))$")


def parse(name: str) -> GGMLFormat | None:
    return GGML_FORMATS.get(name) if _NAME.match(name) else None


register_family("q", parse)
register_family("iq", parse)


def rounded_inputs(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (..., cols) as llama.cpp's CPU kernels multiply it with a matrix of `block`-wide blocks:
    every `block` consecutive inputs as 8-bit integers times one scale, their largest magnitude / 127
    (Q8_0 and Q8_1 for the 32-wide types, with the scale stored in fp16; Q8_K for the 256-wide
    ones, in float32). The products themselves are exact integer sums, so this rounding is all the
    error the engine adds to the inputs. `cols` must be a multiple of `block`."""
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / 127
    codes = torch.round(blocks / torch.where(scale > 0, scale, 1.0)).clamp(-127, 127)
    if block == 32:
        scale = scale.half().float()
    return (codes * scale).reshape(x.shape)


def input_rounding_error(x: torch.Tensor, block: int) -> torch.Tensor:
    """(cols,) float64: the sum over the rows of x (tokens, cols) of each input's squared error under
    `rounded_inputs`. The errors of different inputs are independent roundings with mean zero, so
    a matrix W's output error from them is sum_j error_j * ||W[:, j]||^2."""
    return (rounded_inputs(x, block) - x.float()).square().sum(dim=0, dtype=torch.float64)


def equivalent_of(fmt: IntFormat) -> GGMLFormat | None:
    """The 32-wide ggml type that stores an integer grid as it is, or None: groups of 32 at 4, 5 or 8
    bits. The symmetric grids are Q4_0, Q5_0 and Q8_0 bit for bit (same codes, fp16 scale, zero at
    2**(bits-1)); grids with zero points are Q4_1 and Q5_1 up to their min, scale * zero, which ggml
    stores in fp16 (see `from_int`)."""
    if fmt.group_size != 32 or fmt.bits not in (4, 5, 8) or (fmt.bits == 8 and not fmt.symmetric):
        return None
    return GGML_FORMATS[f"q{fmt.bits}_{0 if fmt.symmetric else 1}"]


def from_int(q: QTensor) -> QTensor:
    """An integer-grid tensor as its equivalent ggml type (`equivalent_of`): the same codes and
    scales; for grids with zero points, the min scale * zero rounded to fp16, which moves each weight
    of a group by the same amount, at most half an fp16 ulp of that min."""
    fmt = equivalent_of(q.format)
    if fmt is None or not fmt.fits(q.shape):
        raise MixqError(f"{q.format.name} on {q.shape[1]} columns is no ggml type")
    offset = _fp16(q.scale * q.zero) if fmt.has_min else None
    return QTensor(fmt, q.codes, q.scale, torch.full_like(q.scale, fmt.zero), offset)

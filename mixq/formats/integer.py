"""Uniform integer grids: 2-8 bits, per output channel or per group of input weights.

Convention (the only one in mixq): w ~ scale * (q - zero), with codes q in [0, 2**bits - 1] and an
integer zero point. Scales are stored as fp16; zero points as `bits`-bit integers.

- asymmetric: scale = (max - min) / (2**bits - 1) over the group's range widened to include 0,
  zero = round(-min / scale); one zero per group is stored.
- symmetric: zero = 2**(bits-1) for every group (not stored), so the levels are
  -2**(bits-1) .. 2**(bits-1) - 1 around 0, and scale = absmax / (2**(bits-1) - 0.5): both ends of
  the range land half a step inside the outermost levels, so all 2**bits levels are used.

Groups run along the input dimension (columns). A row whose length is not a multiple of the
group size ends with one shorter group: 576 columns at group 128 are 4 groups of 128 and one of 64.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from mixq.errors import MixqError
from mixq.formats import QTensor, register_family
from mixq.formats.bitpack import pack_bits, packed_nbytes, unpack_bits

MIN_BITS, MAX_BITS = 2, 8
GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)  # 0 means one group per output channel
FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal); scales never round to 0
NOT_STORABLE = "weights are not finite or too large for fp16 scales (NaN/inf in the model?)"


def encode(
    W: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | float,
    qmax: int | torch.Tensor,
    offset: torch.Tensor | None = None,
    levels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Codes round((W + offset) / scale) + zero, clamped to [0, qmax] (qmax may differ per row); with
    `levels` (a codebook, ascending), the index of the level nearest to (W + offset) / scale.

    A zero scale (an all-zero group) gives the code of 0.
    """
    x = W if offset is None else W + offset
    x = torch.where(scale != 0, x / scale, 0)
    if levels is not None:
        return torch.bucketize(x, (levels[1:] + levels[:-1]) / 2).float()
    q = (x.round() + zero).clamp(min=0)
    return torch.minimum(q, qmax) if isinstance(qmax, torch.Tensor) else q.clamp(max=qmax)


def decode(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float, offset: torch.Tensor | None = None,
    levels: torch.Tensor | None = None,
) -> torch.Tensor:
    """scale * (codes - zero) - offset: the one convention of every format (see formats/__init__);
    a codebook format's weight is scale * levels[code] - offset."""
    w = scale * (codes - zero if levels is None else levels[codes.long()])
    return w if offset is None else w - offset


@dataclass(frozen=True)
class IntFormat:
    bits: int
    group_size: int  # 0: per output channel
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise MixqError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {self.bits}")
        if self.group_size != 0 and self.group_size not in GROUP_SIZES:
            raise MixqError(
                f"group size must be one of {', '.join(map(str, GROUP_SIZES))} "
                f"or 'channel', got {self.group_size}"
            )

    @property
    def name(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "ch"
        return f"int{self.bits}-{group}" + ("-sym" if self.symmetric else "")

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def fits(self, shape: tuple[int, int]) -> bool:
        return True

    def group_len(self, cols: int) -> int:
        return self.group_size or cols

    def n_groups(self, cols: int) -> int:
        return math.ceil(cols / self.group_len(cols))

    def nbytes(self, shape: tuple[int, int]) -> int:
        rows, cols = shape
        n_params = rows * self.n_groups(cols)
        zeros = 0 if self.symmetric else packed_nbytes(n_params, self.bits)
        return packed_nbytes(rows * cols, self.bits) + 2 * n_params + zeros

    # -- parameters -------------------------------------------------------------------------
    def qparams(self, W: torch.Tensor, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales and zeros (rows, n_groups) for W (rows, cols), the range shrunk by `clip`."""
        return self.qparams_from_range(*self.group_range(self.grouped(W)), clip)

    def group_range(self, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) per group of G (rows, n_groups, group_len): symmetric, or widened to include 0.

        Padding zeros are harmless: the range includes 0 anyway.
        """
        if self.symmetric:
            absmax = G.abs().amax(dim=2)
            return -absmax, absmax
        return G.amin(dim=2).clamp(max=0), G.amax(dim=2).clamp(min=0)

    def qparams_from_range(
        self, lo: torch.Tensor, hi: torch.Tensor, clip: torch.Tensor | float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.symmetric:
            scale = self.storable_scale(hi * clip / (2 ** (self.bits - 1) - 0.5))
            return scale, torch.full_like(scale, 2.0 ** (self.bits - 1))
        scale = self.storable_scale((hi - lo) * clip / self.qmax)
        return scale, torch.clamp(torch.round(-lo * clip / scale), 0, self.qmax)

    @staticmethod
    def storable_scale(scale: torch.Tensor) -> torch.Tensor:
        """Scales as stored: rounded up to fp16, so the grid still spans the range and no weight is off by more than half a step."""
        if not torch.isfinite(scale).all() or scale.max() >= torch.finfo(torch.float16).max:
            raise MixqError(NOT_STORABLE)
        s16 = scale.clamp(min=FP16_TINY).half()
        s16 = torch.where(s16.float() < scale, torch.nextafter(s16, torch.full_like(s16, torch.inf)), s16)
        return s16.float()

    def fit(self, W: torch.Tensor, importance: torch.Tensor, clip_grid: int = 21, clip_min: float = 0.5) -> QTensor:
        """Round-to-nearest codes on the per-group range shrink (of `clip_grid` factors from 1.0 down to
        `clip_min`) with the least error sum_j importance_j (w_j - w_hat_j)^2: the layer's output error
        with H reduced to its diagonal, which separates over groups (llama.cpp's imatrix weighting)."""
        return self.quantize(W, *fit_stacked([self], W, importance, clip_grid, clip_min))

    # -- codes ------------------------------------------------------------------------------
    levels = None  # evenly spaced: no codebook
    joint_codes = False  # each weight rounded on its own

    def encode(self, W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Codes for W given per-column (broadcastable) scale and zero."""
        return encode(W, scale, zero, self.qmax)

    @staticmethod
    def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return decode(codes, scale, zero)

    def grouped(self, W: torch.Tensor) -> torch.Tensor:
        """(rows, cols) -> (rows, n_groups, group_len), zero-padded at the end of each row."""
        rows, cols = W.shape
        g = self.group_len(cols)
        pad = self.n_groups(cols) * g - cols
        return torch.nn.functional.pad(W, (0, pad)).view(rows, -1, g)

    def expand(self, per_group: torch.Tensor, cols: int) -> torch.Tensor:
        """(rows, n_groups) -> (rows, cols): each group's value repeated over its columns."""
        return per_group.repeat_interleave(self.group_len(cols), dim=1)[:, :cols]

    def quantize(self, W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> QTensor:
        cols = W.shape[1]
        codes = self.encode(W, self.expand(scale, cols), self.expand(zero, cols))
        return QTensor(self, codes.to(torch.uint8), scale, zero)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        cols = q.shape[1]
        return self.decode(q.codes.float(), self.expand(q.scale, cols), self.expand(q.zero, cols))

    # -- storage ----------------------------------------------------------------------------
    def pack(self, q: QTensor) -> dict[str, torch.Tensor]:
        out = {"qweight": pack_bits(q.codes, self.bits), "scales": q.scale.half()}
        if not self.symmetric:
            out["qzeros"] = pack_bits(q.zero, self.bits)
        return out

    def unpack(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], rows: slice | None = None) -> QTensor:
        n_rows, cols = shape
        rows = slice(*rows.indices(n_rows)) if rows is not None else slice(0, n_rows)
        taken = rows.stop - rows.start
        codes = unpack_bits(tensors["qweight"], self.bits, taken * cols, rows.start * cols).view(taken, cols)
        scale = tensors["scales"][rows].float()
        if self.symmetric:
            zero = torch.full_like(scale, 2.0 ** (self.bits - 1))
        else:
            n_groups = scale.shape[1]
            zero = unpack_bits(tensors["qzeros"], self.bits, scale.numel(), rows.start * n_groups).view_as(scale).float()
        return QTensor(self, codes, scale, zero)


_NAME = re.compile(r"^int(\d+)-(?:g(\d+)|(ch))(-sym)?$")


def fit_stacked(fmts: list[IntFormat], W: torch.Tensor, importance: torch.Tensor, clip_grid: int = 21,
                clip_min: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """`IntFormat.fit`'s scales and zeros (rows, n_groups) for W whose rows are len(fmts) equal
    blocks, the j-th on fmts[j]'s grid (formats of one group length): GPTQ's stacked grids in one call."""
    from mixq.formats.clip_search import fit_groups  # compiled on first use

    per = W.shape[0] // len(fmts)
    assert per * len(fmts) == W.shape[0] and len({f.group_len(W.shape[1]) for f in fmts}) == 1
    G = fmts[0].grouped(W.float()).contiguous()  # (rows, n_groups, group_len)
    imp = fmts[0].grouped(importance.float().unsqueeze(0))[0].contiguous()  # zero on padding
    qmax = torch.tensor([float(f.qmax) for f in fmts]).repeat_interleave(per)
    symmetric = torch.tensor([f.symmetric for f in fmts]).repeat_interleave(per)
    clips = torch.linspace(1.0, clip_min, max(clip_grid, 1))
    scale, zero, storable = fit_groups(G.numpy(), imp.numpy(), clips.numpy(), qmax.numpy(), symmetric.numpy())
    if not storable:
        raise MixqError(NOT_STORABLE)
    return torch.from_numpy(scale), torch.from_numpy(zero)


def parse(name: str) -> IntFormat | None:
    m = _NAME.match(name)
    if m is None:
        return None
    return IntFormat(int(m[1]), int(m[2]) if m[2] else 0, symmetric=bool(m[4]))


register_family("int", parse)

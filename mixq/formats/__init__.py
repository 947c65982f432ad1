"""Number formats: how one weight matrix is stored.

A format is a frozen dataclass with a `name`, exact storage (`nbytes`, `fits`), and pure functions:
`fit` (parameters chosen by an importance-weighted search, codes rounded to nearest), `dequantize`,
`pack`/`unpack` (the tensors written to disk). Each family lives in its own module and registers
a name parser here, so `parse_format("int3-g128")` and the exporters agree on one table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from mixq.errors import MixqError


class Format(Protocol):
    @property
    def name(self) -> str: ...

    def fits(self, shape: tuple[int, int]) -> bool: ...

    def nbytes(self, shape: tuple[int, int]) -> int: ...

    def group_len(self, cols: int) -> int: ...

    def n_groups(self, cols: int) -> int: ...

    @property
    def levels(self) -> torch.Tensor | None:
        """A codebook format's level per code (w = scale * levels[code] - offset); None: evenly spaced."""

    @property
    def joint_codes(self) -> bool:
        """Whether codes are chosen a group of weights at a time (a lattice): rtn's fit and GPTQ make them."""

    def fit(self, W: torch.Tensor, importance: torch.Tensor, clip_grid: int = 21, clip_min: float = 0.5) -> QTensor: ...

    def dequantize(self, q: QTensor) -> torch.Tensor: ...

    def pack(self, q: QTensor) -> dict[str, torch.Tensor]: ...

    def unpack(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], rows: slice | None = None) -> QTensor:
        """The QTensor of stored `tensors` of a (rows, cols) matrix; with `rows` (a slice, step 1), only
        those rows, read from the stored tensors without unpacking the rest."""
        ...


@dataclass
class QTensor:
    """One quantized matrix: w = scale * (code - zero) - offset, per group of input weights.

    codes are (rows, cols) integers in [0, 2**bits); scale, zero and offset are (rows, n_groups).
    offset is None for formats without a stored min. super_scale (rows, n_blocks, 2) holds the fp16
    (d, dmin) of formats that store group scales as integers times a per-block scale (ggml's k-quants).
    """

    format: Format
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    offset: torch.Tensor | None = None
    super_scale: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.codes.shape[1])

    def dequantize(self) -> torch.Tensor:
        return self.format.dequantize(self)

    def nbytes(self) -> int:
        return self.format.nbytes(self.shape)

    def to(self, device: torch.device | str) -> QTensor:
        """This matrix with its codes and parameters on `device`."""
        moved = {f: getattr(self, f).to(device) for f in ("codes", "scale", "zero", "offset", "super_scale")
                 if getattr(self, f) is not None}
        return replace(self, **moved)


_PARSERS: dict[str, Callable[[str], Format | None]] = {}


def register_family(prefix: str, parser: Callable[[str], Format | None]) -> None:
    _PARSERS[prefix] = parser


def parse_format(name: str) -> Format:
    """The format with this name, for example `int4-g128`, `int3-g64-sym`, `int8-ch`, `q4_k`."""
    for prefix, parser in _PARSERS.items():
        if name.startswith(prefix):
            fmt = parser(name)
            if fmt is not None:
                return fmt
    raise MixqError(f"unknown format {name!r} (known families: {', '.join(sorted(_PARSERS))})")


from mixq.formats import ggml, integer  # noqa: E402,F401  (register the families)

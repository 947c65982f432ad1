"""Pack b-bit unsigned codes into a dense little-endian bit stream, and back.

Code k occupies bits [k*b, (k+1)*b) of the stream; bit 0 of the stream is the least significant
bit of byte 0. A tensor of n codes takes exactly ceil(n*b/8) bytes.
"""

from __future__ import annotations

import numpy as np
import torch


def packed_nbytes(n_codes: int, bits: int) -> int:
    return (n_codes * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten `codes` (any shape, values in [0, 2**bits)) into a uint8 tensor of packed bits."""
    c = codes.reshape(-1).to(torch.uint8).numpy()
    if bits == 8:
        return torch.from_numpy(c.copy())
    planes = (c[:, None] >> np.arange(bits, dtype=np.uint8)) & 1  # (n, bits), LSB first
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, n_codes: int, first: int = 0) -> torch.Tensor:
    """Inverse of `pack_bits`: codes `first` .. `first + n_codes` as a flat uint8 tensor (only their
    bytes are unpacked, so a slice of rows costs its own size)."""
    p = packed.reshape(-1).numpy()
    if bits == 8:
        return torch.from_numpy(p[first : first + n_codes].copy())
    start, lead = divmod(first * bits, 8)
    n_bits = lead + n_codes * bits
    stream = np.unpackbits(p[start : start + (n_bits + 7) // 8], bitorder="little", count=n_bits)[lead:]
    planes = stream.reshape(n_codes, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint8)
    return torch.from_numpy((planes * weights).sum(axis=1, dtype=np.uint8))

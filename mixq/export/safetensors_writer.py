"""Write a safetensors file one tensor at a time.

safetensors' own `save_file` takes every tensor at once and builds the file's bytes in memory
first, twice the size of a model that is already large. Here the header is made from the names,
dtypes and shapes alone, and each tensor is asked for, written and dropped in turn. The layout is
the one `save_file` makes: tensors ordered by dtype (never increasing in size), then by name, so
every tensor sits at an offset aligned to its dtype after the 8-byte-padded header.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from mixq.errors import MixqError

# In the order safetensors writes them (its dtype enumeration, reversed): sizes never increase.
DTYPE_NAMES = {
    torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32", torch.bfloat16: "BF16",
    torch.float16: "F16", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
WRITE_RANK = {dtype: rank for rank, dtype in enumerate(DTYPE_NAMES)}


def write_safetensors(path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                      pieces_of: Callable[[str], Iterable[torch.Tensor]], metadata: dict[str, str]) -> None:
    """Write `path` holding a tensor per name of `specs` (dtype, shape), each made by `pieces_of(name)`
    when its turn comes: the tensor whole, or in consecutive slices along its first dimension (so
    that not even one tensor need be held whole)."""
    order = sorted(specs, key=lambda n: (WRITE_RANK[specs[n][0]], n))
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        dtype, shape = specs[name]
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            dtype, shape = specs[name][0], tuple(specs[name][1])
            rows = 0
            for t in pieces_of(name):
                whole = t.dim() == len(shape) == 0
                if t.dtype != dtype or (not whole and tuple(t.shape[1:]) != shape[1:]):
                    raise MixqError(f"internal error: {name} is {t.dtype} {tuple(t.shape)}, announced as {specs[name]}")
                rows += 1 if whole else t.shape[0]
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())
            if rows != (shape[0] if shape else 1):
                raise MixqError(f"internal error: {name} came in {rows} rows, announced as {specs[name]}")

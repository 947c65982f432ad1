"""Options: the ways one weight matrix can be stored, and the space a plan chooses from.

An option is a number format plus the method that rounds onto it (`int3-g64-gptq`), or `f16`:
keep the tensor at 16 bits. An option space is the set of options a profile measures, restricted
by CLI flags or a JSON config file, e.g. {"bits": [2, 3, 4], "group_sizes": [64, 128],
"methods": ["gptq"], "symmetric": false, "keep_16bit": true}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from mixq.errors import MixqError
from mixq.formats import parse_format
from mixq.formats.integer import IntFormat
from mixq.methods import get_method

KEEP = "f16"


@dataclass(frozen=True)
class Option:
    """One way to store one weight matrix: a number format and the method that rounds onto it."""

    format: str  # a registered format name, e.g. "int4-g128", or "f16" to keep the tensor
    method: str  # a registered method name, e.g. "gptq"; "keep" for f16

    @property
    def name(self) -> str:
        return KEEP if self.is_keep else f"{self.format}-{self.method}"

    @property
    def is_keep(self) -> bool:
        return self.format == KEEP

    @classmethod
    def parse(cls, name: str) -> Option:
        if name == KEEP:
            return cls(KEEP, "keep")
        fmt, _, method = name.rpartition("-")
        if not fmt:
            raise MixqError(f"option {name!r}: expected FORMAT-METHOD, e.g. int4-g128-gptq, or {KEEP}")
        parse_format(fmt)
        get_method(method)
        return cls(fmt, method)

    def nbytes(self, shape: tuple[int, int]) -> int:
        if self.is_keep:
            return 2 * shape[0] * shape[1]
        return parse_format(self.format).nbytes(shape)


KEEP_OPTION = Option(KEEP, "keep")


@dataclass(frozen=True)
class OptionSpace:
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    group_sizes: tuple[int, ...] = (32, 64, 128)
    methods: tuple[str, ...] = ("rtn", "gptq")
    symmetric: bool = False
    keep_16bit: bool = True

    def options(self) -> list[Option]:
        for m in self.methods:
            get_method(m)
        out = [
            Option(IntFormat(b, g, self.symmetric).name, m)
            for m in self.methods
            for g in self.group_sizes
            for b in self.bits
        ]
        return out + ([KEEP_OPTION] if self.keep_16bit else [])

    @classmethod
    def from_file(cls, path: Path) -> OptionSpace:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MixqError(f"cannot read option space {path}: {e}") from None
        known = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) - known:
            raise MixqError(f"option space {path}: expected an object with keys among {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})

"""Options: the ways one weight matrix can be stored, and the space a plan chooses from.

An option is a number format plus the method that rounds onto it (`int3-g64-gptq`, `q4_k-gptq`), or
`f16`: keep the tensor at 16 bits. An option space is the set of options a profile measures,
restricted by CLI flags or a JSON config file, e.g. {"formats": ["int"], "bits": [2, 3, 4],
"group_sizes": [64, 128], "methods": ["gptq"], "symmetric": false, "keep_16bit": true}.

`formats` names families or formats: "int" is mixq's integer grids (bits x group sizes), "gguf" is
every ggml type mixq writes (Q2_K..Q6_K, Q4_0..Q5_1, Q8_0, IQ4_NL/XS, IQ3_S/XXS, IQ2_S/XS/XXS); any
other entry is one format name.
A tensor only gets the formats its shape fits (k-quants need rows that are a multiple of 256).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from mixq.errors import MixqError
from mixq.formats import parse_format
from mixq.formats.ggml import GGML_FORMATS
from mixq.formats.integer import IntFormat
from mixq.methods import get_method, supports

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

    def fits(self, shape: tuple[int, int]) -> bool:
        return self.is_keep or parse_format(self.format).fits(shape)

    def nbytes(self, shape: tuple[int, int]) -> int:
        if self.is_keep:
            return 2 * shape[0] * shape[1]
        return parse_format(self.format).nbytes(shape)


KEEP_OPTION = Option(KEEP, "keep")


FAMILIES = ("int", "gguf")


@dataclass(frozen=True)
class OptionSpace:
    formats: tuple[str, ...] = ("int",)
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    group_sizes: tuple[int, ...] = (32, 64, 128)
    methods: tuple[str, ...] = ("rtn", "gptq")
    symmetric: bool = False
    keep_16bit: bool = True

    def options(self) -> list[Option]:
        for m in self.methods:
            get_method(m)
        return [Option(f, m) for m in self.methods for f in self.format_names() if supports(m, parse_format(f))] + (
            [KEEP_OPTION] if self.keep_16bit else []
        )

    def format_names(self) -> list[str]:
        names: list[str] = []
        for entry in self.formats:
            if entry == "int":
                names += [IntFormat(b, g, self.symmetric).name for g in self.group_sizes for b in self.bits]
            elif entry == "gguf":
                names += list(GGML_FORMATS)
            else:
                names.append(parse_format(entry).name)
        if not names:
            raise MixqError(f"the option space has no formats (families: {', '.join(FAMILIES)}, or format names)")
        return list(dict.fromkeys(names))

    @property
    def ggml_only(self) -> bool:
        """Every format is a ggml type: the plan can be exported to GGUF."""
        return all(n in GGML_FORMATS for n in self.format_names())

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

"""A plan as a recipe for llama.cpp's own quantizer: `llama-quantize --tensor-type-file FILE`.

One `PATTERN=type` per line, a pattern per tensor anchored on its whole GGUF name
(`^blk\\.3\\.attn_q\\.weight$`: llama-quantize matches them as regular expressions, and `blk.1.` alone
would also name other blocks), the type llama.cpp's name of the ggml type, f16 for kept matrices. A
user applies mixq's allocation with llama.cpp's quantizer and its own importance matrix:

    llama-quantize --tensor-type-file FILE [--imatrix imatrix.gguf] MODEL-F16.gguf OUT.gguf Q8_0

(Q8_0 only names the base type of tensors the file leaves out, none here; a source GGUF that is
already quantized needs --allow-requantize). The rounding is then llama.cpp's, not mixq's: the
recipe carries the allocation, not the weights.
"""

from __future__ import annotations

import re
from pathlib import Path

from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

from mixq.atomic import atomic_write_text, check_output_dir
from mixq.errors import MixqError
from mixq.export import Target, gguf, native, register, stored_formats
from mixq.models import LoadedModel


def recipe_lines(loaded: LoadedModel, formats: dict[str, str]) -> list[str]:
    """`PATTERN=type` for every parameter matrix of `loaded`: its format in `formats` (tensor -> ggml
    type name) or f16."""
    arch = gguf.gguf_arch(loaded)
    names = get_tensor_name_map(next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch), loaded.n_blocks)
    lines = []
    for param, shape in loaded.stored_tensors().items():
        if len(shape) < 2:
            continue  # vectors stay F32 in llama.cpp whatever the recipe says
        gguf_name = names.get_name(param, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise MixqError(f"no GGUF tensor name for parameter {param} of architecture {arch}")
        lines.append(f"^{re.escape(gguf_name)}$={formats.get(param.removesuffix('.weight'), 'f16')}")
    return lines


def export_recipe(model_dir: Path, out: Path, overwrite: bool = False) -> str:
    from mixq.models import load_model

    check_output_dir(Path(out), overwrite)
    info = native.read_info(model_dir)
    loaded = load_model(info["model"])
    formats = stored_formats(model_dir)
    TARGET.check(loaded, formats)
    types = {n: gguf.ggml_format(f).name for n, (f, _) in formats.items()}
    lines = recipe_lines(loaded, types)
    atomic_write_text(Path(out), "\n".join(lines) + "\n")
    needs = sorted(set(types.values()) & NEEDS_IMATRIX)
    imatrix = "--imatrix IMATRIX.gguf" if needs else "[--imatrix IMATRIX.gguf]"
    return (f"{len(lines)} tensor types; apply with: llama-quantize --tensor-type-file {out} "
            f"{imatrix} MODEL-F16.gguf OUT.gguf Q8_0"
            + (f" (llama-quantize makes {', '.join(needs)} only with an imatrix)" if needs else ""))


# Types llama-quantize refuses to make without an importance matrix (its tensor_requires_imatrix)
NEEDS_IMATRIX = frozenset({"iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s"})


TARGET = register(Target(
    name="llama-quantize-recipe",
    summary="the plan as llama-quantize's --tensor-type-file (ggml types; llama.cpp rounds)",
    refusal=gguf.refusal,
    export=export_recipe,
    model_refusal=gguf.model_refusal,
    formats=("gguf",),
))

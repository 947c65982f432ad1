"""Export a mixq model directory to a GGUF file that llama.cpp runs.

Each planned tensor keeps the ggml type its plan gave it: the bytes mixq packed are ggml's block
layout already (formats/ggml.py), so they are copied, not re-quantized. Kept matrices are written as
F16, norms and biases as F32. All metadata and tokenizer data come from the source GGUF, in order;
tensors the Hugging Face model has no parameter for (e.g. rope frequency tables) are copied as they
are. general.file_type is set to "guessed", as llama.cpp does for mixes.

llama.cpp's converter reorders the rows of q_proj/k_proj of llama-family models for its rotary
embedding (transformers undoes it on load); the same reordering is applied here, to whole rows,
which every ggml type stores independently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import (
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    get_tensor_name_map,
)

from mixq.atomic import check_output_dir
from mixq.errors import MixqError
from mixq.export import Target, native, register, stored_formats
from mixq.formats import parse_format
from mixq.formats.ggml import GGMLFormat
from mixq.models import source_gguf
from mixq.models.architectures import family

SKIPPED_FIELDS = ("GGUF.", "general.architecture", "general.file_type")
ALIGNMENT_SLACK = 31  # bytes of padding a tensor's data may need to start on a 32-byte boundary


def read_source(source: Path) -> GGUFReader:
    try:
        return GGUFReader(source)
    except Exception as e:  # the gguf package raises many kinds on corrupt input
        raise MixqError(f"cannot read GGUF file {source}: {e}") from None


def name_map_of(reader: GGUFReader):
    arch_name = str(reader.fields["general.architecture"].contents())
    n_blocks = int(reader.fields[f"{arch_name}.block_count"].contents())
    return get_tensor_name_map(next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch_name), n_blocks)


def overhead_bound(source: Path, params: list[str]) -> int:
    """Bytes of an exported GGUF beyond the model parameters' data: metadata, tokenizer, tensor infos,
    tensors that are not parameters, and alignment padding (bounded). Only the types of the
    parameters change in an export, and type codes have a fixed size, so the header is the source's."""
    reader = read_source(source)
    name_map = name_map_of(reader)
    ours = {name_map.get_name(p, try_suffixes=(".weight", ".bias")) for p in params}
    data = sum(int(t.n_bytes) for t in reader.tensors)
    others = sum(int(t.n_bytes) for t in reader.tensors if t.name not in ours)
    return Path(source).stat().st_size - data + others + ALIGNMENT_SLACK * len(reader.tensors)


def export_gguf(model_dir: Path, out: Path, overwrite: bool = False) -> dict[str, int]:
    """Write OUT.gguf from a mixq model directory; returns the count of tensors by ggml type."""
    out = Path(out)
    check_output_dir(out, overwrite)
    from mixq.models import load_model

    info = native.read_info(model_dir)
    loaded = load_model(info["model"])
    stored = native.StoredModel(model_dir)
    entries = stored.entries
    TARGET.check(loaded, stored_formats(model_dir))
    reader = read_source(source_gguf(info["model"]))
    arch_name = str(reader.fields["general.architecture"].contents())
    arch = family(arch_name)
    name_map = name_map_of(reader)
    heads = int(reader.fields[f"{arch_name}.attention.head_count"].contents())
    kv_field = reader.fields.get(f"{arch_name}.attention.head_count_kv")
    kv_heads = int(kv_field.contents()) if kv_field is not None else heads

    ours: dict[str, str] = {}  # GGUF tensor name -> parameter name
    for name in entries:
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise MixqError(f"no GGUF tensor name for parameter {name} of architecture {arch_name}")
        ours[gguf_name] = name

    tmp = out.with_name(f".{out.name}.partial")
    writer = GGUFWriter(tmp, arch_name)
    try:
        for key, field in reader.fields.items():
            if not key.startswith(SKIPPED_FIELDS):
                _copy_field(writer, key, field)
        writer.add_file_type(LlamaFileType.GUESSED)
        counts: dict[str, int] = {}
        for t in reader.tensors:
            if t.name in ours:
                name = ours.pop(t.name)
                data, dtype = _tensor_data(name, entries[name], stored)
                if arch.gguf_permutes_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
                    data = permute_rows(data, heads if "q_proj" in name else kv_heads)
                writer.add_tensor(t.name, data, raw_dtype=dtype)
                counts[dtype.name] = counts.get(dtype.name, 0) + 1
            else:  # not a model parameter (rope tables and the like): as the source has it
                writer.add_tensor(t.name, t.data, raw_shape=list(reversed(t.shape.tolist())), raw_dtype=t.tensor_type)
        if ours:
            raise MixqError(f"the source GGUF has no tensor for {sorted(ours.values())[:3]}")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return counts


def _copy_field(writer: GGUFWriter, key: str, field) -> None:
    vtype = field.types[0]
    sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
    writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def _tensor_data(name: str, entry: dict, stored: native.StoredModel):
    fmt_name, shape = entry["format"], tuple(entry["shape"])
    if fmt_name in native.KEPT_FORMATS:
        dtype = GGMLQuantizationType.F16 if fmt_name == "f16" else GGMLQuantizationType.F32
        return stored.tensor(name).numpy(), dtype
    blocks = stored.parts(name)["blocks"].numpy()
    return blocks.reshape(shape[0], -1), parse_format(fmt_name).ggml_type


def refusal(fmt_name: str, shape: tuple[int, int]) -> str | None:
    """Why llama.cpp cannot store a (rows, cols) matrix in `fmt_name`, or None if it can."""
    fmt = parse_format(fmt_name)
    if not isinstance(fmt, GGMLFormat):
        return "llama.cpp reads ggml types only (--formats gguf)"
    return None if fmt.fits(shape) else f"{fmt_name} does not fit its {shape[1]} columns"


def model_refusal(loaded) -> str | None:
    if source_gguf(loaded.spec) is None:
        return (f"export to GGUF needs a GGUF source model; {loaded.spec!r} is not one (convert it with llama.cpp's "
                "convert_hf_to_gguf.py, then quantize that file with mixq)")
    if any(t.expert is not None for t in loaded.quantizable().values()):
        return ("exporting a mixture of experts is not implemented: llama.cpp stores each layer's experts as one "
                "tensor of one type, mixq each expert in its own format")
    return None


def _export(model_dir: Path, out: Path, overwrite: bool) -> str:
    counts = export_gguf(model_dir, out, overwrite)
    types = ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{Path(out).stat().st_size:,} bytes; tensors by type: {types}"


def permute_rows(data: np.ndarray, n_head: int, inverse: bool = False) -> np.ndarray:
    """Hugging Face's q/k row order -> llama.cpp's (within each head, halves interleaved), or back."""
    rows = data.shape[0]
    order = np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)
    return np.ascontiguousarray(data[np.argsort(order) if inverse else order])


TARGET = register(Target(
    name="gguf",
    summary="one GGUF file llama.cpp runs (ggml types; needs a GGUF source model)",
    refusal=refusal,
    export=_export,
    model_refusal=model_refusal,
    formats=("gguf",),
))

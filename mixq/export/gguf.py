"""Export a mixq model directory to a GGUF file that llama.cpp runs.

Each planned tensor keeps the ggml type its plan gave it: the bytes mixq packed are ggml's block
layout already (formats/ggml.py), so they are copied, not re-quantized. Kept matrices are written as
F16, vectors as F32. general.file_type is set to "guessed", as llama.cpp does for mixes.

Everything else comes from a skeleton GGUF, which also says where each parameter goes:
- a GGUF source is its own skeleton: metadata and tokenizer are copied in order, tensors that are no
  model parameter (rope frequency tables) as they are; llama.cpp's converter reorders the rows of
  q_proj/k_proj of llama-family models for its rotary embedding (transformers undoes it on load),
  and the same reordering is applied here to whole rows, which every ggml type stores independently;
  a layer's expert stacks, which transformers' reader merged (gate and up), are placed back in the
  tensors they came from by handing the reader numbered rows (GGUFSource.row_origins);
- a Hugging Face source is converted by llama.cpp's own converter (pinned source) with each matrix
  replaced by a column of row numbers: the converter writes the metadata, tokenizer, vectors (after
  whatever it does to them) and extra tensors, and its output shows each matrix's GGUF name and row
  order, for any architecture it knows, without mixq restating its rules. Expert stacks are given to
  it as the checkpoint lists them (one linear per expert); it writes each layer's experts as one
  tensor (blk.N.ffn_gate_exps), so all of them must share one type (`--target gguf` ties them).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import (
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    get_tensor_name_map,
    size_label,
)
from safetensors.torch import save_file

from mixq.atomic import check_output_dir
from mixq.errors import MixqError
from mixq.export import Target, native, register, stored_formats
from mixq.export.llama_cpp import convert_hf_to_gguf, decode_seconds, engine_build, file_matmuls, time_matmuls
from mixq.formats import parse_format
from mixq.formats.ggml import GGMLFormat, equivalent_of, from_int
from mixq.formats.integer import IntFormat
from mixq.latency import Kernels
from mixq.models import LoadedModel, source_gguf
from mixq.models.gguf_file import read_gguf
from mixq.models.source import GGUFSource
from mixq.models.architectures import family

SKIPPED_FIELDS = ("GGUF.", "general.architecture", "general.file_type", "general.size_label")
ALIGNMENT_SLACK = 31  # bytes of padding a tensor's data may need to start on a 32-byte boundary
# model types whose GGUF architecture has another name (llama.cpp's converter writes Mistral as llama)
GGUF_ARCH = {"mistral": "llama", "mixtral": "llama", "gemma3_text": "gemma3", "qwen2_moe": "qwen2moe",
             "qwen3_moe": "qwen3moe"}
# what llama.cpp's converter reads from a Hugging Face directory besides the weights
CONVERTER_INPUTS = (".json", ".txt", ".model", ".jinja", ".md", ".tiktoken")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
EXACT_ROW_NUMBERS = 1 << 24  # float32 holds every integer below this


def gguf_arch(loaded: LoadedModel) -> str | None:
    """llama.cpp's architecture name of `loaded`, or None if it has none."""
    if isinstance(loaded.source, GGUFSource):
        return loaded.source.arch
    name = GGUF_ARCH.get(loaded.config.model_type, loaded.config.model_type)
    return name if name in MODEL_ARCH_NAMES.values() else None


def name_map_of(reader: GGUFReader):
    arch_name = str(reader.fields["general.architecture"].contents())
    n_blocks = int(reader.fields[f"{arch_name}.block_count"].contents())
    return get_tensor_name_map(next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch_name), n_blocks)


Pieces = list[tuple[str, np.ndarray | None]]  # a GGUF tensor's rows: (parameter, its rows in order or None: all)


@dataclass
class Skeleton:
    """What an export copies (metadata, tokenizer, tensors no plan decides on), how each GGUF tensor
    that holds parameters is made of their rows (GGUF name -> pieces, concatenated; one piece for a
    plain matrix, one per expert for a layer's expert tensor) and the bytes an exported file holds
    beyond the parameters' data (a bound)."""

    reader: GGUFReader
    layout: dict[str, Pieces]
    overhead: int


def skeleton(loaded: LoadedModel, shapes: dict[str, tuple[int, ...]], value: Callable[[str], torch.Tensor],
             work: Path) -> Skeleton:
    """The skeleton of `loaded` whose stored tensors have `shapes` (vectors' values from `value`), made
    in the directory `work`, which it needs for as long as it is read."""
    path = source_gguf(loaded.spec)
    if path is not None:
        return source_skeleton(loaded, path, shapes)
    return converted_skeleton(Path(loaded.spec), shapes, value, checkpoint_keys(loaded), work)


def checkpoint_keys(loaded: LoadedModel) -> dict[str, list[str]]:
    """Stored expert matrices (STACK.E.weight) -> the keys the checkpoint lists the expert's rows under."""
    out = {}
    for ref in loaded.quantizable().values():
        if ref.expert is not None:
            experts = loaded.source.expert_keys(ref.param)
            if experts is None or ref.transposed:
                raise MixqError(f"exporting the experts of {ref.param} to GGUF is not implemented (the checkpoint "
                                "does not list them as one linear each)")
            out[f"{ref.name}.weight"] = experts[ref.expert]
    return out


def source_skeleton(loaded: LoadedModel, path: Path, shapes: dict[str, tuple[int, ...]]) -> Skeleton:
    reader = read_gguf(path)
    arch_name = str(reader.fields["general.architecture"].contents())
    name_map = name_map_of(reader)
    heads = int(reader.fields[f"{arch_name}.attention.head_count"].contents())
    kv_field = reader.fields.get(f"{arch_name}.attention.head_count_kv")
    kv_heads = int(kv_field.contents()) if kv_field is not None else heads
    experts: dict[str, dict[int, str]] = {}  # expert stack -> expert -> its stored matrix
    for ref in loaded.quantizable().values():
        if ref.expert is not None and f"{ref.name}.weight" in shapes:
            experts.setdefault(ref.param, {})[ref.expert] = f"{ref.name}.weight"
    layout = {}
    for param, stored in experts.items():
        layout.update(expert_layout(loaded, param, stored))
    in_stacks = {name for stored in experts.values() for name in stored.values()}
    for name, shape in shapes.items():
        if name in in_stacks:
            continue
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise MixqError(f"no GGUF tensor name for parameter {name} of architecture {arch_name}")
        order = None
        if family(arch_name).gguf_permutes_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            order = qk_row_order(shape[0], heads if "q_proj" in name else kv_heads)
        layout[gguf_name] = [(name, order)]
    params_data = sum(int(t.n_bytes) for t in reader.tensors if t.name in layout)
    return Skeleton(reader, layout, file_overhead(path, reader, params_data))


def expert_layout(loaded: LoadedModel, param: str, stored: dict[int, str]) -> dict[str, Pieces]:
    """The GGUF tensors an expert stack of a GGUF source came from, each as pieces of the stored
    experts' rows (`stored`: expert -> stored matrix), as transformers' processor mapped them on load."""
    parts, origins = loaded.source.row_origins(param)  # origins: (experts, rows) -> row number
    n_experts, n_rows = origins.shape
    where = np.full(sum(int(np.prod(shape)) for _, shape in parts), -1, dtype=np.int64)
    where[origins.reshape(-1).numpy()] = np.arange(origins.numel())
    if (where < 0).any() or len(stored) != n_experts:
        raise MixqError(f"transformers' reading of {param} from its GGUF tensors is not a reordering of their rows; "
                        "mixq cannot place its quantized rows")
    layout, start = {}, 0
    for gguf_name, shape in parts:
        position = where[start : start + int(np.prod(shape))]
        start += len(position)
        expert, rows = position // n_rows, position % n_rows
        layout[gguf_name] = [(stored[int(expert[run[0]])], rows[run])
                             for run in np.split(np.arange(len(position)), np.flatnonzero(np.diff(expert)) + 1)]
    return layout


def converted_skeleton(source: Path, shapes: dict[str, tuple[int, ...]], value: Callable[[str], torch.Tensor],
                       keys: dict[str, list[str]], work: Path) -> Skeleton:
    """llama.cpp's converter run on the source's config and tokenizer, with mixq's vectors and each
    stored matrix replaced by a column of numbers, distinct across matrices (under the checkpoint's
    `keys` where it lists a matrix's rows under others, each an equal share: an expert's gate and up):
    each column that comes out names its matrix's GGUF tensor and shows how the converter orders its
    rows. Vectors come out as F32 after whatever the converter does to them, and are copied as they are."""
    hf = work / source.name
    hf.mkdir()
    for f in source.iterdir():
        if f.is_file() and f.name.endswith(CONVERTER_INPUTS) and f.name not in WEIGHT_INDEXES:
            shutil.copyfile(f, hf / f.name)
    tensors, starts, matrices, n_rows, vector_bytes = {}, [], [], 0, 0
    for name, shape in shapes.items():
        if len(shape) == 2:
            starts.append(n_rows)
            matrices.append(name)
            numbers = torch.arange(n_rows, n_rows + shape[0], dtype=torch.float32)[:, None]
            listed = keys.get(name, [name])
            tensors.update(zip(listed, numbers.chunk(len(listed))))
            n_rows += shape[0]
        else:
            tensors[name] = value(name).float()
            vector_bytes += tensors[name].numel() * 4
    if n_rows > EXACT_ROW_NUMBERS:
        raise MixqError("exporting a model with over 16.7M matrix rows to GGUF from a Hugging Face source "
                        "is not implemented")
    save_file(tensors, hf / "model.safetensors")
    path = work / "skeleton.gguf"
    convert_hf_to_gguf(hf, path)
    reader = read_gguf(path)
    layout, placed = {}, {name: [] for name in matrices}
    for t in reader.tensors:
        if len(t.shape) < 2 or int(t.shape[0]) != 1:
            continue  # a vector or extra tensor the converter wrote: copied as it is
        numbers = np.asarray(t.data, dtype=np.int64).reshape(-1)
        owner = np.searchsorted(starts, numbers, side="right") - 1
        layout[t.name] = []
        for run in np.split(np.arange(len(numbers)), np.flatnonzero(np.diff(owner)) + 1):
            name = matrices[owner[run[0]]]
            rows = numbers[run] - starts[owner[run[0]]]
            placed[name].append(rows)
            whole = np.array_equal(rows, np.arange(shapes[name][0]))
            layout[t.name].append((name, None if whole else rows))
    for name, rows in placed.items():
        if not rows:
            raise MixqError(f"llama.cpp's converter writes no tensor for {name}")
        if not np.array_equal(np.sort(np.concatenate(rows)), np.arange(shapes[name][0])):
            raise MixqError(f"llama.cpp's converter changes {name} beyond reordering its rows; "
                            "mixq cannot place its quantized rows")
    return Skeleton(reader, layout, file_overhead(path, reader, 4 * n_rows + vector_bytes))


def file_overhead(path: Path, reader: GGUFReader, params_data: int) -> int:
    """Bytes of a file exported from this skeleton beyond its parameters' data (a bound): the
    skeleton's bytes less its parameters' data and its own alignment padding, plus the most padding
    the exported file's tensors may need."""
    spans = sorted((int(t.data_offset), int(t.n_bytes)) for t in reader.tensors)
    ends = [start for start, _ in spans[1:]] + [path.stat().st_size]
    padding = sum(end - start - n for (start, n), end in zip(spans, ends))
    return path.stat().st_size - params_data - padding + ALIGNMENT_SLACK * len(reader.tensors)


_OVERHEADS: dict[str, int] = {}  # by model spec: a Hugging Face source's conversion runs once per process


def overhead_bound(loaded: LoadedModel) -> int:
    """Bytes of a GGUF exported from `loaded` beyond the parameters' data, for any plan: metadata,
    tokenizer, tensor infos, tensors that are no parameter, and alignment padding (bounded). Only the
    parameters' types change between plans, and type codes have a fixed size."""
    if loaded.spec not in _OVERHEADS:
        with tempfile.TemporaryDirectory(prefix="mixq-gguf-") as work:
            _OVERHEADS[loaded.spec] = skeleton(loaded, loaded.stored_tensors(), loaded.read, Path(work)).overhead
    return _OVERHEADS[loaded.spec]


def export_gguf(model_dir: Path, out: Path, overwrite: bool = False) -> tuple[dict[str, int], dict[str, float]]:
    """Write OUT.gguf from a mixq model directory; returns the count of tensors by ggml type, and for
    each integer grid with zero points written as Q4_1/Q5_1, how far its weights moved (in steps)."""
    out = Path(out)
    check_output_dir(out, overwrite)
    from mixq.models import load_model

    info = native.read_info(model_dir)
    loaded = load_model(info["model"])
    stored = native.StoredModel(model_dir)
    entries = stored.entries
    TARGET.check(loaded, stored_formats(model_dir))
    tmp = out.with_name(f".{out.name}.partial")
    with tempfile.TemporaryDirectory(prefix=".mixq-gguf-", dir=out.parent) as work:
        shapes = {name: tuple(entry["shape"]) for name, entry in entries.items()}
        made = skeleton(loaded, shapes, stored.tensor, Path(work))
        reader = made.reader
        layout = dict(made.layout)
        writer = GGUFWriter(tmp, str(reader.fields["general.architecture"].contents()))
        try:
            for key, field in reader.fields.items():
                if not key.startswith(SKIPPED_FIELDS):
                    copy_field(writer, key, field)
            writer.add_size_label(model_size_label(loaded))
            writer.add_file_type(LlamaFileType.GUESSED)
            counts: dict[str, int] = {}
            moved: dict[str, float] = {}  # integer grid -> most a weight moved on conversion, in steps
            digests = {}
            for t in reader.tensors:
                if t.name in layout:
                    data, dtype = _gathered(t, layout.pop(t.name), entries, stored, moved)
                    writer.add_tensor(t.name, data, raw_dtype=dtype)
                    digests[t.name] = (dtype, _digest(data))
                    counts[dtype.name] = counts.get(dtype.name, 0) + 1
                else:  # no parameter of the model, or a vector as the converter wrote it: as it is
                    writer.add_tensor(t.name, t.data, raw_shape=list(reversed(t.shape.tolist())), raw_dtype=t.tensor_type)
            if layout:
                raise MixqError(f"the GGUF skeleton has no tensor for {sorted(layout.values())[0][0][0]}")
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            _verify(tmp, digests)
            tmp.replace(out)
        finally:
            writer.close()
            tmp.unlink(missing_ok=True)
    return counts, moved


def model_size_label(loaded: LoadedModel) -> str:
    """general.size_label as llama.cpp's converter writes it: "1.5B", or "8x7B" for 8 experts (the
    parameters outside the experts and one expert's)."""
    refs = [ref for ref in loaded.quantizable().values() if ref.expert is not None]
    n_params = sum(int(np.prod(shape)) for shape in loaded.stored_tensors().values())
    expert_params = sum(int(np.prod(ref.shape)) for ref in refs)
    n_experts = max((ref.expert for ref in refs), default=-1) + 1
    return size_label(n_params, n_params - expert_params, expert_params // max(n_experts, 1), n_experts)


def _gathered(t, pieces: Pieces, entries: dict, stored: native.StoredModel,
              moved: dict[str, float]) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The bytes and type of GGUF tensor `t`, gathered from its pieces' rows (every ggml type stores
    rows independently); records in `moved` how far integer grids moved on conversion."""
    datas, types = [], {}
    for name, rows in pieces:
        data, dtype, step_moved = _tensor_data(name, entries[name], stored)
        fmt = entries[name]["format"]
        if step_moved:
            moved[fmt] = max(moved.get(fmt, 0.0), step_moved)
        datas.append(data if rows is None else data[rows])
        types.setdefault(dtype, fmt)
    if len(types) > 1:
        raise MixqError(f"llama.cpp stores {t.name} as one tensor of one type, but the plan gives its parts "
                        f"{' and '.join(sorted(types.values()))}: quantize with --target gguf, which ties them")
    data = np.ascontiguousarray(np.concatenate(datas) if len(datas) > 1 else datas[0])
    if len(t.shape) == 3:  # a layer's experts: (experts, rows, row bytes)
        data = data.reshape(int(t.shape[2]), int(t.shape[1]), -1)
    return data, next(iter(types))


def _digest(data: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(data).view(np.uint8).data, digest_size=16).hexdigest()


def _verify(path: Path, digests: dict[str, tuple[GGMLQuantizationType, str]]) -> None:
    """Reread the written file: every parameter has the type and the bytes that were meant for it."""
    written = {t.name: t for t in read_gguf(path).tensors}
    for gguf_name, (dtype, digest) in digests.items():
        t = written.get(gguf_name)
        if t is None or t.tensor_type != dtype or _digest(t.data) != digest:
            raise MixqError(f"the written GGUF does not hold {gguf_name} as meant (type or bytes differ)")


def copy_field(writer: GGUFWriter, key: str, field) -> None:
    vtype = field.types[0]
    sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
    writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def _tensor_data(name: str, entry: dict, stored: native.StoredModel) -> tuple[np.ndarray, GGMLQuantizationType, float]:
    """A parameter's GGUF bytes and type, and how far an integer grid's conversion moved its weights,
    in steps of their group (0 where the bytes are mixq's own)."""
    fmt_name, shape = entry["format"], tuple(entry["shape"])
    if fmt_name in native.KEPT_FORMATS:
        dtype = GGMLQuantizationType.F16 if fmt_name == "f16" else GGMLQuantizationType.F32
        return stored.tensor(name).numpy(), dtype, 0.0
    fmt, parts = parse_format(fmt_name), stored.parts(name)
    moved = 0.0
    if isinstance(fmt, IntFormat):
        q = fmt.unpack(parts, shape)
        converted = from_int(q)
        if converted.offset is not None:
            moved = float(((converted.offset - q.scale * q.zero).abs() / q.scale).max())
        fmt, parts = converted.format, converted.format.pack(converted)
    return parts["blocks"].numpy().reshape(shape[0], -1), fmt.ggml_type, moved


def ggml_format(fmt_name: str) -> GGMLFormat | None:
    """The ggml type a matrix stored in `fmt_name` is written as: the format itself, an integer grid's
    equivalent type (`formats.ggml.equivalent_of`), or None."""
    fmt = parse_format(fmt_name)
    return fmt if isinstance(fmt, GGMLFormat) else equivalent_of(fmt) if isinstance(fmt, IntFormat) else None


def kernel_type(fmt_name: str) -> str:
    """The ggml type whose kernel multiplies a matrix stored in `fmt_name` (kept: f16)."""
    if fmt_name in native.KEPT_FORMATS:
        return fmt_name
    written = ggml_format(fmt_name)
    if written is None:
        raise MixqError(f"{fmt_name} is no ggml type, so llama.cpp has no kernel for it: profile with --target gguf")
    return written.name


def input_block(fmt_name: str) -> int | None:
    """The width of the 8-bit blocks llama.cpp's CPU kernels round a matrix's inputs to before
    multiplying them with `fmt_name`'s blocks (ggml's vec_dot types): the weights' own block width,
    Q8_0 or Q8_1 for the 32-wide types and Q8_K for the 256-wide ones. F16 matrices take fp16 inputs
    (their rounding changed SmolLM2's KL by under 1e-5) and F32 ones take them as they are: None."""
    written = None if fmt_name in native.KEPT_FORMATS else ggml_format(fmt_name)
    return None if written is None else written.block


def refusal(fmt_name: str, shape: tuple[int, int]) -> str | None:
    """Why llama.cpp cannot store a (rows, cols) matrix in `fmt_name`, or None if it can."""
    written = ggml_format(fmt_name)
    if written is None:
        fmt = parse_format(fmt_name)
        nearest = nearest_ggml_type(fmt) if isinstance(fmt, IntFormat) else "q8_0"
        return f"llama.cpp reads ggml types only; the nearest to {fmt_name} is {nearest} (--formats gguf)"
    as_type = "" if written.name == fmt_name else f" as {written.name}"
    return None if written.fits(shape) else f"{fmt_name}{as_type} does not fit its {shape[1]} columns"


def nearest_ggml_type(fmt: IntFormat) -> str:
    """The ggml type closest to an integer grid: same bits (7 -> 8), with a min where it has zeros."""
    if fmt.bits in (4, 5):
        return f"q{fmt.bits}_{0 if fmt.symmetric else 1}"
    return {2: "q2_k", 3: "q3_k", 6: "q6_k"}.get(fmt.bits, "q8_0")


def model_refusal(loaded: LoadedModel) -> str | None:
    if gguf_arch(loaded) is None:
        return f"llama.cpp has no architecture for model type {loaded.config.model_type!r}"
    return None


def _export(model_dir: Path, out: Path, overwrite: bool) -> str:
    counts, moved = export_gguf(model_dir, out, overwrite)
    types = ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    notes = "".join(f"; {fmt} written as {ggml_format(fmt).name}, its mins rounded to fp16 (weights moved "
                    f"by at most {step:.2g} of a step)" for fmt, step in sorted(moved.items()))
    return f"{Path(out).stat().st_size:,} bytes; tensors by type: {types}{notes}"


def qk_row_order(rows: int, n_head: int) -> np.ndarray:
    """llama.cpp's q/k rows as indices into Hugging Face's (within each head, halves interleaved)."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)


TARGET = register(Target(
    name="gguf",
    summary="one GGUF file llama.cpp runs (ggml types)",
    refusal=refusal,
    export=_export,
    model_refusal=model_refusal,
    tie="experts",  # a layer's experts are one GGUF tensor of one type
    formats=("gguf",),
    nbytes=lambda fmt, shape: ggml_format(fmt).nbytes(shape),
    overhead=lambda loaded, planned: overhead_bound(loaded),
    kernels=Kernels(engine_build, kernel_of=kernel_type, time=time_matmuls, file_cases=file_matmuls,
                    decode_seconds=decode_seconds),
    input_block=input_block,
))

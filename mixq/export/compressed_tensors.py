"""Export a mixq model directory to compressed-tensors' `pack-quantized` layout: a directory that
transformers (`AutoModelForCausalLM.from_pretrained`) and vLLM load.

    DIR/config.json         the model's config, dtype float16, with a `quantization_config` written by
                            compressed-tensors' own ModelCompressor: one config group per distinct
                            integer scheme (bits, group size or channel, symmetric or not) naming its
                            linears, and every 16-bit linear in `ignore`
    DIR/model.safetensors   per quantized linear NAME (rows, cols), `bits` b:
                              NAME.weight_packed      int32  codes - 2^(b-1), packed by the package's
                                                             pack_to_int32 along each row
                              NAME.weight_scale       fp16   (rows, n_groups): mixq's scales as stored
                              NAME.weight_zero_point  int32  zeros - 2^(b-1), packed along the rows
                                                             (asymmetric formats only)
                              NAME.weight_shape       int64  (rows, cols)
                            every other parameter as mixq stored it (16-bit matrices, fp32 vectors)
    DIR/tokenizer files, generation_config.json (copied when the source directory has one)

A mixture of experts' experts are written as the linears their checkpoint lists (NAME = ...experts.E.
gate_proj, up_proj, down_proj; gate and up share the rows of mixq's fused matrix), under one config
group whose target is EXPERTS_TARGET: transformers decompresses every expert with that one scheme
(and without zero points) while it loads them into its fused stacks.

mixq's integer convention w = scale * (code - zero), codes in [0, 2^b), is compressed-tensors' signed one
w = scale * (q - zp) with q = code - 2^(b-1) and zp = zero - 2^(b-1); a symmetric mixq format has
zero = 2^(b-1), hence zp = 0, which compressed-tensors' symmetric schemes leave out. So every value
is carried over exactly: loaded in float32, transformers' weights equal mixq's bit for bit; in float16
(the config's dtype) each weight is rounded to fp16 (relative error at most 2^-11).

Packed with compressed-tensors 0.17, the version vLLM's CPU build pins. Later versions pack 2, 4 and
8 bits identically and 3, 5, 6 and 7 bits densely across int32 words (0.17: 32 // bits codes per word);
and from 0.19 on, transformers fails to load asymmetric pack-quantized files with them (it expects
unpacked int8 zero points, then cannot decompress them), so mixq requires 0.17.x.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mixq.atomic import atomic_dir
from mixq.errors import MixqError
from mixq.export import Target, native, register, stored_formats
from mixq.export.safetensors_writer import write_safetensors
from mixq.formats import QTensor, parse_format
from mixq.formats.integer import IntFormat
from mixq.models import LoadedModel

DTYPE = torch.float16  # the scales' dtype: the model's, so that every engine reads them unrounded
COPIED_FILES = ("generation_config.json",)


def refusal(fmt_name: str, shape: tuple[int, int]) -> str | None:
    """Why compressed-tensors cannot store a (rows, cols) matrix in `fmt_name`, or None if it can."""
    fmt = parse_format(fmt_name)
    if not isinstance(fmt, IntFormat):
        return "compressed-tensors stores integer grids (int2..int8, by group or channel), not ggml types"
    if fmt.group_size and shape[1] % fmt.group_size:
        return (f"its {shape[1]} columns are not a whole number of groups of {fmt.group_size} "
                "(compressed-tensors has no shorter last group)")
    return None


# transformers takes the scheme of every expert from the one config group whose "re:" target names experts
EXPERTS_TARGET = r"re:.*\.experts\.\d+\.[^.]+$"


def model_refusal(loaded: LoadedModel) -> str | None:
    for ref in loaded.quantizable().values():
        if ref.expert is not None and (ref.transposed or loaded.source.expert_keys(ref.param) is None):
            return (f"exporting the experts of {ref.param} is not implemented: its checkpoint does not list them "
                    "as one linear each")
    return None


def expert_format(fmt_name: str) -> tuple[str, str | None]:
    """Experts take the symmetric twin of an integer grid: transformers decompresses them without
    zero points."""
    fmt = parse_format(fmt_name)
    if isinstance(fmt, IntFormat) and not fmt.symmetric:
        return (IntFormat(fmt.bits, fmt.group_size, symmetric=True).name,
                "transformers decompresses experts without zero points (symmetric grids only)")
    return fmt_name, None


def scheme_args(fmt: IntFormat) -> dict:
    """compressed-tensors' QuantizationArgs of a mixq integer format."""
    return dict(num_bits=fmt.bits, type="int", symmetric=fmt.symmetric,
                strategy="group" if fmt.group_size else "channel", group_size=fmt.group_size or None)


def packed(q: QTensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """A QTensor of an IntFormat as compressed-tensors' tensors (suffixes of NAME.weight_...)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    fmt: IntFormat = q.format
    half = 1 << (fmt.bits - 1)
    out = {
        "packed": pack_to_int32((q.codes.to(torch.int32) - half).to(torch.int8), fmt.bits),
        "scale": scales.to(DTYPE),
        "shape": torch.tensor(q.shape, dtype=torch.int64),
    }
    if not fmt.symmetric:
        out["zero_point"] = pack_to_int32((q.zero.to(torch.int32) - half).to(torch.int8), fmt.bits, packed_dim=0)
    return out


def dequantized_by_the_package(tensors: dict[str, torch.Tensor], fmt: IntFormat) -> torch.Tensor:
    """The float32 weight that compressed-tensors' own decompression makes of `packed`'s tensors."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**scheme_args(fmt)))
    state = {f"weight_{k}": v.float() if k == "scale" else v for k, v in tensors.items()}
    return PackedQuantizationCompressor.decompress(state, scheme)["weight"]


def export_compressed_tensors(model_dir: Path, out: Path, overwrite: bool = False, target: Target | None = None) -> str:
    """Write the directory OUT from a mixq model directory, checked against `target`'s rules (default:
    compressed-tensors'; vLLM's are stricter); returns what it wrote, in a line."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    from mixq.models import load_model

    target = target or TARGET
    info = native.read_info(model_dir)
    stored = native.StoredModel(model_dir)
    entries = stored.entries
    loaded = load_model(info["model"])
    target.check(loaded, stored_formats(model_dir))
    quantized = {n: e for n, e in entries.items() if e["format"] not in native.KEPT_FORMATS}
    written = {name: written_as(loaded, name, entry) for name, entry in entries.items()}

    experts = {e["format"] for e in entries.values() if "stack" in e}
    if len(experts) > 1:
        raise MixqError(f"transformers reads every expert of a model in one scheme, but the plan gives them "
                        f"{' and '.join(sorted(experts))}: quantize with --target {target.name}, which ties them")
    groups: dict[str, list[str]] = {}
    for name, entry in quantized.items():
        if "stack" not in entry:
            groups.setdefault(entry["format"], []).append(written[name][0][0])
    linears = {n for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear)}
    config_groups = {
        f"group_{i}": QuantizationScheme(targets=sorted(members), format="pack-quantized",
                                         weights=QuantizationArgs(**scheme_args(parse_format(fmt))))
        for i, (fmt, members) in enumerate(sorted(groups.items()))
    }
    if experts - set(native.KEPT_FORMATS):
        config_groups["experts"] = QuantizationScheme(targets=[EXPERTS_TARGET], format="pack-quantized",
                                                      weights=QuantizationArgs(**scheme_args(parse_format(*experts))))
    ignore = sorted({loaded.source.checkpoint_key(f"{n}.weight").removesuffix(".weight") for n in linears}
                    - {m for members in groups.values() for m in members})
    # Every linear left out of the groups, the output layer included (tied or not, it stays 16-bit).
    qconfig = QuantizationConfig(config_groups=config_groups, format="pack-quantized",
                                 quantization_status="compressed", ignore=ignore)

    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    stored_as: dict[str, tuple[str, slice | None, str | None]] = {}  # written tensor -> (parameter, rows, part)
    for name, entry in entries.items():
        for module, rows, shape in written[name]:
            if name in quantized:
                for part, spec in _converted_specs(parse_format(entry["format"]), shape).items():
                    specs[f"{module}.weight_{part}"], stored_as[f"{module}.weight_{part}"] = spec, (name, rows, part)
            else:
                specs[module], stored_as[module] = (native.KEPT_FORMATS[entry["format"]], shape), (name, rows, None)

    cache: dict[tuple[str, int], dict[str, torch.Tensor]] = {}  # the last matrix converted: parts in turn

    def pieces_of(key: str):
        name, rows, part = stored_as[key]
        if part is None:
            yield stored.tensor(name) if rows is None else stored.tensor(name)[rows]
            return
        piece = (name, rows.start if rows else 0)
        if piece not in cache:
            cache.clear()
            cache[piece] = _converted(stored, name, entries[name], rows)
        yield cache[piece][part]

    with atomic_dir(Path(out), overwrite) as tmp:
        write_safetensors(tmp / "model.safetensors", specs, pieces_of, {"format": "pt"})
        config = loaded.config.__class__.from_dict(loaded.config.to_dict())
        config.dtype = DTYPE
        config.save_pretrained(tmp)
        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
        loaded.tokenizer.save_pretrained(tmp)
        source = Path(info["model"])
        for file in COPIED_FILES:
            if source.is_dir() and (source / file).is_file():
                shutil.copyfile(source / file, tmp / file)
        verify(tmp, stored, quantized, written)
    counts = ", ".join(f"{len(members)} {fmt}" for fmt, members in sorted(groups.items(), key=lambda kv: -len(kv[1])))
    return f"{len(quantized)} quantized linears ({counts or 'none'}), {len(ignore)} kept at 16 bits"


def written_as(loaded: LoadedModel, name: str, entry: dict) -> list[tuple[str, slice | None, tuple[int, ...]]]:
    """How a stored parameter is written: (key, its rows or None for all, shape) for each piece. An
    expert's matrix goes under the keys its checkpoint lists it as, one linear each (gate and up
    share its rows), the layout transformers and vLLM read experts from; every other parameter under
    its checkpoint's key (a quantized one's key is its module's: NAME.weight_packed, ...)."""
    shape = tuple(entry["shape"])
    kept = entry["format"] in native.KEPT_FORMATS
    if "stack" not in entry:
        key = loaded.source.checkpoint_key(name)
        return [(key if kept else key.removesuffix(".weight"), None, shape)]
    keys = loaded.source.expert_keys(entry["stack"])[entry["expert"]]
    share = shape[0] // len(keys)
    return [(key if kept else key.removesuffix(".weight"), slice(i * share, (i + 1) * share), (share, *shape[1:]))
            for i, key in enumerate(keys)]


def _converted(stored: native.StoredModel, name: str, entry: dict, rows: slice | None) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of quantized parameter `name` (or its `rows`), by part (packed, scale, ...)."""
    parts = stored.parts(name)
    q = parse_format(entry["format"]).unpack(parts, tuple(entry["shape"]), rows)
    return packed(q, parts["scales"][rows or slice(None)])


def _converted_specs(fmt: IntFormat, shape: tuple[int, int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """dtype and shape of each part `packed` makes for a (rows, cols) matrix in `fmt`: made on the meta
    device, so they follow the installed package's packing."""
    rows, cols = shape
    q = QTensor(fmt, torch.empty(shape, device="meta"), torch.empty(rows, fmt.n_groups(cols), device="meta"),
                torch.empty(rows, fmt.n_groups(cols), device="meta"))
    return {part: (t.dtype, tuple(t.shape)) for part, t in packed(q, q.scale).items()}


def nbytes(fmt_name: str, shape: tuple[int, int]) -> int:
    """Bytes of a (rows, cols) matrix quantized in `fmt_name` in the written model.safetensors."""
    specs = _converted_specs(parse_format(fmt_name), shape).values()
    return sum(torch.Size(part_shape).numel() * dtype.itemsize for dtype, part_shape in specs)


def header_bound(loaded: LoadedModel, planned: list[str]) -> int:
    """An upper bound on model.safetensors' header for any plan over the `planned` tensors: each
    planned weight counted with all four parts, every entry with room for 20-digit numbers."""
    planned_params = {f"{n}.weight" for n in planned}
    pieces = {}  # an expert's matrix: the checkpoint keys it is written under (see written_as)
    for ref in loaded.quantizable().values():
        listed = loaded.source.expert_keys(ref.param) if ref.expert is not None else None
        if listed:
            pieces[f"{ref.name}.weight"] = listed[ref.expert]
    keys, split_shapes = [], 0
    for name in loaded.stored_tensors():
        written = pieces.get(name, [loaded.source.checkpoint_key(name)])
        split_shapes += len(written) - 1  # each piece of a split matrix stores its own int64 (rows, cols)
        for key in written:
            keys += ([f"{key.removesuffix('.weight')}.weight_{part}" for part in ("packed", "scale", "zero_point", "shape")]
                     if name in planned_params else [key])
    entry = len('"":{"dtype":"F16","shape":[,],"data_offsets":[,]},') + 4 * 20
    return 8 + len('{"__metadata__":{"format":"pt"}}') + sum(len(k) + entry for k in keys) + 8 + 16 * split_shapes


def verify(out: Path, stored: native.StoredModel, quantized: dict[str, dict], written: dict[str, list]) -> None:
    """Reread every quantized linear (each expert's linears too) from the written file and decompress
    it with compressed-tensors: it must equal mixq's dequantized weight exactly."""
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for name, entry in quantized.items():
            fmt = parse_format(entry["format"])
            for module, rows, _ in written[name]:
                key = f"{module}.weight_"
                tensors = {part: f.get_tensor(key + part) for part in ("packed", "scale", "shape", "zero_point")
                           if key + part in f.keys()}  # noqa: SIM118
                ours = fmt.unpack(stored.parts(name), tuple(entry["shape"]), rows).dequantize()
                theirs = dequantized_by_the_package(tensors, fmt)
                if not torch.equal(ours, theirs):
                    raise MixqError(f"internal error: {module} decompressed by compressed-tensors differs from "
                                    f"mixq's values by up to {(ours - theirs).abs().max().item():.3g}")


TARGET = register(Target(
    name="compressed-tensors",
    summary="a directory transformers and vLLM load (pack-quantized integer grids)",
    refusal=refusal,
    export=export_compressed_tensors,
    model_refusal=model_refusal,
    quantizes_embeddings=False,
    tie="all-experts",
    nbytes=nbytes,
    overhead=header_bound,
    expert_format=expert_format,
))

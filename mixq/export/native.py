"""mixq's own on-disk layout: one safetensors file plus a JSON of settings and metrics.

    DIR/model.safetensors   every parameter of the model, once (a tied embedding is written once);
                            an expert stack as its experts' (out, in) matrices STACK.E.weight
    DIR/mixq.json           source model, settings, calibration, plan, storage, metrics

In model.safetensors a quantized weight `NAME` (rows, cols) is stored as
    NAME.qweight  uint8   codes, `bits` each, packed little-endian row-major (formats/bitpack.py)
    NAME.scales   fp16    (rows, n_groups)
    NAME.qzeros   uint8   zero points, `bits` each, packed like the codes (asymmetric formats only)
and dequantizes as scale * (code - zero) (formats/integer.py). Every other parameter is kept at
16 bits: matrices as fp16, vectors (norms, biases) as fp32. The header's `__metadata__` holds one
key, `mixq`: a JSON object {"layout": "2", "tensors": {NAME: {"format": ..., "shape": [...]}}}, where
the format is a registered format name or "f16"/"f32" for kept tensors; an expert's matrix also
names its stack, its index and whether the stack stores it transposed (x @ W, as gpt-oss does).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mixq.atomic import atomic_write_text
from mixq.errors import MixqError
from mixq.export.safetensors_writer import write_safetensors
from mixq.formats import parse_format
from mixq.models import LoadedModel
from mixq.models.source import WeightSource

WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "mixq.json"
LAYOUT_VERSION = "2"
# One metadata key: safetensors writes several in an order that varies between runs, and the same
# command must give the same bytes.
METADATA_KEY = "mixq"
KEPT_FORMATS = {"f16": torch.float16, "f32": torch.float32}


@dataclass(frozen=True)
class Storage:
    """Exact storage of a model file: bytes of tensor data, whole file, and bits per weight."""

    payload_bytes: int  # tensor data only
    file_bytes: int  # payload + safetensors header
    n_weights: int  # every parameter of the model, counted once

    @property
    def bpw(self) -> float:
        return 8 * self.file_bytes / self.n_weights

    def as_dict(self) -> dict[str, Any]:
        return dict(
            payload_bytes=self.payload_bytes, file_bytes=self.file_bytes, n_weights=self.n_weights, bpw=self.bpw
        )


def kept_format(ndim: int) -> str:
    """Storage of a tensor that is not quantized: 16-bit matrices, fp32 vectors."""
    return "f16" if ndim >= 2 else "f32"


def kept_nbytes(shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * KEPT_FORMATS[kept_format(len(shape))].itemsize


def storage_plan(loaded: LoadedModel, formats: dict[str, str]) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """name -> (format, shape, bytes) for every stored tensor, given formats of the quantized ones."""
    out = {}
    for name, shape in loaded.stored_tensors().items():  # tied parameters appear once
        if name in formats:
            out[name] = (formats[name], shape, parse_format(formats[name]).nbytes(shape))
        else:
            fmt = kept_format(len(shape))
            out[name] = (fmt, shape, torch.Size(shape).numel() * KEPT_FORMATS[fmt].itemsize)
    return out


def header_bound(loaded: LoadedModel, planned: list[str]) -> int:
    """An upper bound on the safetensors header of any plan over the `planned` tensors.

    Each planned weight is counted as quantized with zero points (three stored tensors) and the
    longest format name; every entry gets room for 20-digit offsets.
    """
    longest_format = "x" * 24
    planned_params = {f"{n}.weight" for n in planned}
    keys, tensors_meta = [], {}
    for name, shape in loaded.stored_tensors().items():
        keys += [f"{name}.{part}" for part in ("qweight", "scales", "qzeros")] if name in planned_params else [name]
        tensors_meta[name] = {"format": longest_format, "shape": list(shape), "stack": name, "expert": 1 << 20,
                              "transposed": False}
    metadata = {METADATA_KEY: json.dumps({"layout": LAYOUT_VERSION, "tensors": tensors_meta})}
    entry = len('"":{"dtype":"F16","shape":[,],"data_offsets":[,]},') + 4 * 20
    return 8 + len(json.dumps({"__metadata__": metadata})) + sum(len(k) + entry for k in keys) + 16


def save(out_dir: Path, loaded: LoadedModel, result, info: dict[str, Any]) -> Storage:
    """Write DIR/model.safetensors and DIR/mixq.json from a QuantizedModel: its QTensors, the
    parameters it changed, and every other parameter as the model has it, one tensor at a time."""
    quantized = {f"{name}.weight": name for name in result.tensors}
    plan = storage_plan(loaded, {param: result.tensors.format(name).name for param, name in quantized.items()})
    stacks = {f"{t.name}.weight": t for t in loaded.quantizable().values() if t.expert is not None}
    params = loaded.parameters()
    entries: dict[str, dict[str, Any]] = {}
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    stored_as: dict[str, tuple[str, str | None]] = {}  # stored tensor -> (parameter, part)
    for name, (fmt, shape, _nbytes) in plan.items():
        entries[name] = {"format": fmt, "shape": list(shape)}
        ref = stacks.get(name)
        if ref is not None:
            entries[name].update(stack=ref.param, expert=ref.expert, transposed=ref.transposed)
        if name in quantized:
            for part, spec in result.tensors.parts(quantized[name]).items():
                specs[f"{name}.{part}"], stored_as[f"{name}.{part}"] = spec, (name, part)
        else:
            specs[name], stored_as[name] = (KEPT_FORMATS[fmt], shape), (name, None)

    cache: dict[str, Any] = {}  # the last parameter or expert stack read: its parts come in turn

    def value(name: str) -> torch.Tensor:
        if name in result.changed:
            return result.changed[name]
        return loaded.residents[name] if name in loaded.residents else loaded.read(name)

    def pieces_of(key: str) -> Iterator[torch.Tensor]:
        name, part = stored_as[key]
        dtype = specs[key][0]
        if part is not None:
            if cache.get("name") != name:
                cache.clear()
                cache.update(name=name, parts=result.tensors.packed(quantized[name]))
            yield cache["parts"][part]
            return
        ref = stacks.get(name)
        if ref is not None:
            if cache.get("name") != ref.param:
                cache.clear()
                cache.update(name=ref.param, stack={ref.param: value(ref.param)})
            yield ref.view(cache["stack"]).detach().to(dtype)
        elif name in result.changed or name in loaded.residents or len(params[name]) < 2:
            yield value(name).detach().to(dtype)
        else:  # a kept matrix read from the source a slice of rows at a time (an embedding: ~1 GB in float32)
            for rows in loaded.row_slices(name):
                yield loaded.read(name, rows=rows).to(dtype)

    metadata = {METADATA_KEY: json.dumps({"layout": LAYOUT_VERSION, "tensors": entries})}
    path = Path(out_dir) / WEIGHTS_FILE
    write_safetensors(path, specs, pieces_of, metadata)
    _verify(Path(out_dir), entries, result.tensors, quantized)
    storage = Storage(
        payload_bytes=sum(nb for _, _, nb in plan.values()),
        file_bytes=path.stat().st_size,
        n_weights=sum(torch.Size(s).numel() for s in params.values()),
    )
    info = {**info, "storage": storage.as_dict()}
    write_info(Path(out_dir), info)
    return storage


def _verify(out_dir: Path, entries: dict[str, dict[str, Any]], tensors, quantized: dict[str, str]) -> None:
    """Reread the written file before it is renamed into place: every tensor's format and shape as
    planned, every quantized tensor's stored parts (so its dequantized values) as quantized."""
    stored = StoredModel(out_dir)
    if stored.entries != entries:
        raise MixqError(f"internal error: {stored.path} lists other formats or shapes than planned")
    for param, name in quantized.items():
        written, meant = stored.parts(param), tensors.packed(name)
        if written.keys() != meant.keys() or not all(torch.equal(written[k], meant[k]) for k in meant):
            raise MixqError(f"internal error: {stored.path} does not hold {param} as it was quantized")


def write_info(out_dir: Path, info: dict[str, Any]) -> None:
    atomic_write_text(Path(out_dir) / INFO_FILE, json.dumps(info, indent=2) + "\n")


def read_info(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / INFO_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MixqError(f"{out_dir} is not a mixq output directory (no {INFO_FILE})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise MixqError(f"cannot read {path}: {e}") from None


def header_bytes(path: Path) -> int:
    """Size of a safetensors file's header: the 8-byte length and the JSON it announces."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


class StoredModel:
    """A saved model's tensor entries (from its header) and its stored tensors, read one parameter
    at a time from the file (mapped only while they are in use)."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / WEIGHTS_FILE
        try:
            with safe_open(str(self.path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
                self.keys = list(f.keys())
        except Exception as e:
            raise MixqError(f"cannot read {self.path}: {e}") from None
        if header.get("layout") != LAYOUT_VERSION:
            raise MixqError(f"{self.path} is not a mixq layout {LAYOUT_VERSION} file")
        self.entries: dict[str, dict[str, Any]] = header["tensors"]

    def parts(self, name: str) -> dict[str, torch.Tensor]:
        """The stored tensors of one quantized parameter, by part (`qweight`, `scales`, `blocks`, ...)."""
        return self._read([k for k in self.keys if k.startswith(name + ".")], len(name) + 1)

    def tensor(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """A parameter stored whole (a kept one), or its rows `rows`."""
        return self._read([name], 0, rows)[name]

    def _read(self, keys: list[str], cut: int, rows: slice | None = None) -> dict[str, torch.Tensor]:
        try:
            with safe_open(str(self.path), framework="pt") as f:
                return {k[cut:]: f.get_tensor(k) if rows is None else f.get_slice(k)[rows] for k in keys}
        except Exception as e:
            raise MixqError(f"cannot read {self.path}: {e}") from None


class NativeSource(WeightSource):
    """The parameters of a saved model, dequantized to float32 one at a time (expert stacks restacked
    from their experts' matrices): the weights `mixq eval` runs."""

    fresh = True

    def __init__(self, out_dir: Path):
        self._stored = StoredModel(out_dir)
        self._entries = self._stored.entries
        self._experts: dict[str, list[str]] = {}
        for name, entry in self._entries.items():
            if "stack" in entry:
                self._experts.setdefault(entry["stack"], []).append(name)
        self.names = (set(self._entries) - {n for ns in self._experts.values() for n in ns}) | set(self._experts)

    def _matrix(self, name: str, rows: slice | None = None) -> torch.Tensor:
        entry = self._entries[name]
        fmt, shape = entry["format"], tuple(entry["shape"])
        if fmt in KEPT_FORMATS:
            return self._stored.tensor(name, rows).to(torch.float32, copy=True)
        return parse_format(fmt).unpack(self._stored.parts(name), shape, rows).dequantize()

    def rows(self, name: str, rows: slice) -> torch.Tensor:
        if name in self._experts or name not in self._entries:
            return super().rows(name, rows)
        return self._matrix(name, rows)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._experts:
            if name not in self._entries:
                raise KeyError(name)
            return self._matrix(name)
        members = sorted(self._experts[name], key=lambda n: self._entries[n]["expert"])
        mats = [self._matrix(n) for n in members]
        return torch.stack([m.T if self._entries[n]["transposed"] else m for n, m in zip(members, mats)])

"""mixq's own on-disk layout: one safetensors file plus a JSON of settings and metrics.

    DIR/model.safetensors   every parameter of the model, once (a tied embedding is written once)
    DIR/mixq.json           source model, settings, calibration, plan, storage, metrics

In model.safetensors a quantized weight `NAME` (rows, cols) is stored as
    NAME.qweight  uint8   codes, `bits` each, packed little-endian row-major (formats/bitpack.py)
    NAME.scales   fp16    (rows, n_groups)
    NAME.qzeros   uint8   zero points, `bits` each, packed like the codes (asymmetric formats only)
and dequantizes as scale * (code - zero) (formats/integer.py). Every other parameter is kept at
16 bits: matrices as fp16, vectors (norms, biases) as fp32. The header's `__metadata__` holds
`mixq.tensors`: a JSON object {NAME: {"format": ..., "shape": [...]}} for every parameter, where
the format is a registered format name or "f16"/"f32" for kept tensors.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mixq.atomic import atomic_write_text
from mixq.errors import MixqError
from mixq.formats import QTensor, parse_format
from mixq.models import LoadedModel

WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "mixq.json"
LAYOUT_VERSION = "1"
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


def kept_format(param: torch.Tensor) -> str:
    """Storage of a tensor that is not quantized: 16-bit matrices, fp32 vectors."""
    return "f16" if param.dim() >= 2 else "f32"


def kept_nbytes(param: torch.Tensor) -> int:
    return param.numel() * KEPT_FORMATS[kept_format(param)].itemsize


def storage_plan(loaded: LoadedModel, formats: dict[str, str]) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """name -> (format, shape, bytes) for every parameter, given formats of the quantized weights."""
    out = {}
    for name, p in loaded.model.named_parameters():  # tied parameters appear once
        shape = tuple(p.shape)
        if name in formats:
            out[name] = (formats[name], shape, parse_format(formats[name]).nbytes(shape))
        else:
            out[name] = (kept_format(p), shape, kept_nbytes(p))
    return out


def header_bound(loaded: LoadedModel, planned: list[str]) -> int:
    """An upper bound on the safetensors header of any plan over the `planned` tensors.

    Each planned weight is counted as quantized with zero points (three stored tensors) and the
    longest format name; every entry gets room for 20-digit offsets.
    """
    longest_format = "x" * 24
    planned_params = {f"{n}.weight" for n in planned}
    keys, tensors_meta = [], {}
    for name, p in loaded.model.named_parameters():
        keys += [f"{name}.{part}" for part in ("qweight", "scales", "qzeros")] if name in planned_params else [name]
        tensors_meta[name] = {"format": longest_format, "shape": list(p.shape)}
    metadata = {"mixq.layout": LAYOUT_VERSION, "mixq.tensors": json.dumps(tensors_meta)}
    entry = len('"":{"dtype":"F16","shape":[,],"data_offsets":[,]},') + 4 * 20
    return 8 + len(json.dumps({"__metadata__": metadata})) + sum(len(k) + entry for k in keys) + 16


def save(out_dir: Path, loaded: LoadedModel, tensors: dict[str, QTensor], info: dict[str, Any]) -> Storage:
    """Write DIR/model.safetensors and DIR/mixq.json; `tensors` maps linear names to QTensors."""
    quantized = {f"{name}.weight": q for name, q in tensors.items()}
    plan = storage_plan(loaded, {name: q.format.name for name, q in quantized.items()})
    data: dict[str, torch.Tensor] = {}
    params = dict(loaded.model.named_parameters())
    for name, (fmt, _shape, _nbytes) in plan.items():
        if name in quantized:
            for part, t in quantized[name].format.pack(quantized[name]).items():
                data[f"{name}.{part}"] = t.contiguous()
        else:
            data[name] = params[name].detach().to(KEPT_FORMATS[fmt]).contiguous()
    metadata = {
        "mixq.layout": LAYOUT_VERSION,
        "mixq.tensors": json.dumps({n: {"format": f, "shape": list(s)} for n, (f, s, _) in plan.items()}),
    }
    path = Path(out_dir) / WEIGHTS_FILE
    save_file(data, path, metadata=metadata)
    storage = Storage(
        payload_bytes=sum(nb for _, _, nb in plan.values()),
        file_bytes=path.stat().st_size,
        n_weights=sum(p.numel() for p in params.values()),
    )
    info = {**info, "storage": storage.as_dict()}
    write_info(Path(out_dir), info)
    return storage


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


def load_stored(out_dir: Path) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """The `mixq.tensors` entries of a saved model and every stored tensor, as written."""
    path = Path(out_dir) / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("mixq.layout") != LAYOUT_VERSION:
                raise MixqError(f"{path} is not a mixq layout {LAYOUT_VERSION} file")
            entries = json.loads(meta["mixq.tensors"])
            stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no items())
    except MixqError:
        raise
    except Exception as e:
        raise MixqError(f"cannot read {path}: {e}") from None
    return entries, stored


def stored_parts(stored: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The stored tensors of one quantized parameter, by part (`qweight`, `scales`, `blocks`, ...)."""
    return {k[len(name) + 1 :]: v for k, v in stored.items() if k.startswith(name + ".")}


def load_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    """Every parameter of a saved model, dequantized to fp32, by parameter name."""
    entries, stored = load_stored(out_dir)
    out = {}
    for name, entry in entries.items():
        fmt, shape = entry["format"], tuple(entry["shape"])
        if fmt in KEPT_FORMATS:
            out[name] = stored[name].float()
        else:
            out[name] = parse_format(fmt).unpack(stored_parts(stored, name), shape).dequantize()
    return out


def apply_weights(loaded: LoadedModel, weights: dict[str, torch.Tensor]) -> None:
    """Replace the model's parameters by saved ones, checking that every parameter is covered once."""
    params = dict(loaded.model.named_parameters())
    missing, extra = set(params) - set(weights), set(weights) - set(params)
    if missing or extra:
        raise MixqError(
            f"saved weights do not match the model: {len(missing)} missing, {len(extra)} unexpected "
            f"(e.g. {sorted(missing | extra)[:3]})"
        )
    for name, w in weights.items():
        if w.shape != params[name].shape:
            raise MixqError(f"saved {name} has shape {tuple(w.shape)}, the model {tuple(params[name].shape)}")
        params[name].data.copy_(w)

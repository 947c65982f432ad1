"""Atomic outputs: a result appears whole at its final path or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from mixq.errors import MixqError


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail before any long work if `out` cannot be written."""
    if out.exists() and not overwrite:
        raise MixqError(f"output {out} already exists (pass --overwrite to replace it)")
    parent = out.resolve().parent
    if parent.exists() and not os.access(parent, os.W_OK):
        raise MixqError(f"cannot write into {parent}")


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch directory beside `out`; rename it to `out` only if the block succeeds."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary sibling and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written through a temporary sibling, synced, then renamed: a kill or a full
    disk leaves what was at `path` as it was, and a failed write is one clear error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    storages: set[int] = set()
    own = {}
    for k, t in tensors.items():  # safetensors refuses tensors that share memory: those get a copy
        t = t.contiguous().cpu()  # a device's tensors are stored from the host
        ptr = t.untyped_storage().data_ptr()
        own[k] = t.clone() if ptr in storages else t
        storages.add(ptr)
    try:
        save_file(own, str(tmp), metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data on disk before the rename makes it the file
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        raise MixqError(f"cannot write {path}: {e}") from None

"""Resumable runs: a long job keeps its state in a work directory beside its output, `.OUT.resume/`.

A job saves a checkpoint after each unit of work (a quantized block, a finished profile); rerunning
the same command finds the directory and continues from the last checkpoint, and its output is the
uninterrupted run's to the byte. The directory records the inputs its checkpoints depend on (mixq's
version, the command's settings, the thread count, the names, sizes and modification times of the
model files and of the calibration text and profile files); a rerun with other inputs is refused,
naming what differs, and `--restart` discards the directory. It is removed once the output is in place.

Every file in it is written whole or not at all (a temporary name, then a rename), so a kill or a
full disk at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mixq.atomic import atomic_write_text, save_tensors
from mixq.errors import MixqError

INPUTS_FILE = "inputs.json"
STATE_KEY = "mixq.checkpoint"


def work_dir(out: Path) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.resume")


def file_identity(path: Path) -> list[list[Any]]:
    """(name, bytes, modification time) of a model file, or of every file in a model directory: a
    changed model is noticed without hashing gigabytes."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


class Checkpoints:
    """The work directory of one job: its recorded inputs and its named checkpoints."""

    def __init__(self, directory: Path, inputs: dict[str, Any], restart: bool = False):
        self.directory = Path(directory)
        self.inputs = json.loads(json.dumps(inputs, default=str))  # as it reads back from the file
        self.resumed = False
        if restart:
            shutil.rmtree(self.directory, ignore_errors=True)
        recorded = self.directory / INPUTS_FILE
        if recorded.is_file():
            try:
                saved = json.loads(recorded.read_text())
            except (OSError, ValueError) as e:
                raise MixqError(f"cannot read {recorded}: {e}; rerun with --restart to discard it") from None
            if saved != self.inputs:
                differ = sorted(k for k in saved.keys() | self.inputs.keys() if saved.get(k) != self.inputs.get(k))
                raise MixqError(f"{self.directory} holds a run with other inputs (they differ in: "
                                f"{', '.join(differ)}); rerun with --restart to discard it")
            self.resumed = True
        else:
            shutil.rmtree(self.directory, ignore_errors=True)  # a directory without inputs is no checkpoint

    def ensure(self) -> None:
        """Create the directory with its inputs, once work worth keeping begins (a run refused before
        that leaves nothing behind)."""
        recorded = self.directory / INPUTS_FILE
        if not recorded.is_file():
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_text(recorded, json.dumps(self.inputs, indent=1) + "\n")

    def path(self, name: str) -> Path:
        return self.directory / name

    def save(self, name: str, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Write checkpoint `name`: tensors and a JSON state, whole or not at all."""
        self.ensure()
        save_tensors(tensors, self.path(name), metadata={STATE_KEY: json.dumps(state)})

    def load(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """Checkpoint `name`, or None if it was never written."""
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[STATE_KEY])  # noqa: SIM118
        except Exception as e:
            raise MixqError(f"cannot read checkpoint {path}: {e}; rerun with --restart to discard it") from None

    def remove(self, pattern: str) -> None:
        """Drop the checkpoints whose names match `pattern` (a glob)."""
        for path in self.directory.glob(pattern):
            path.unlink(missing_ok=True)

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

